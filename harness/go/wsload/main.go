// Command wsload is a test driver that talks to a tunnel server directly over
// WebSocket (plain byte stream or smux inside), pushes data through it to a
// test dst, checks the results itself, prints one JSON object on stdout and
// exits 0 only if everything matched:
//
//	{"ok": bool, "conns": N, "streams": N, "bytes_total": N, "errors": [...],
//	 "elapsed_s": float, ...}
//
// streams is the total number of byte streams (plain: one per WebSocket);
// bytes_total counts payload bytes sent plus received, headers excluded.
//
// # dst protocols (the Python tests implement the dst side)
//
// echo: the dst writes back every byte it reads. wsload sends N pseudo-random
// bytes (math/rand seeded with the stream's global index) while concurrently
// reading N bytes back, and compares sha256(sent) with sha256(received).
//
// upload: wsload sends an 8-byte big-endian u64 length L = N, then L bytes.
// The dst reads exactly those L bytes and answers with the 32-byte raw
// sha256 of them. wsload compares it with sha256 of what it sent.
//
// download: wsload sends an 8-byte big-endian u64 length N. The dst sends N
// bytes (any content), then the 32-byte raw sha256 of those N bytes. wsload
// reads exactly N bytes, hashes them, reads the 32-byte digest and compares.
//
// In all patterns wsload closes the stream/WebSocket once it has checked the
// result; the dst should expect EOF (or a reset) afterwards.
//
// # -idle
//
// With -idle D, every stream first sends "a little", then all streams stay
// idle for D (in mux mode the smux keepalive is what keeps the session up),
// then the transfer completes and is verified. "A little" is: echo -> the
// first min(N, 1024) bytes, read back before idling; upload -> the 8-byte
// header and the first min(N, 1024) bytes; download -> the first 4 bytes of
// the 8-byte header (the rest is sent after the idle period).
//
// Flags: -url -connect -sni -sv -ca -mode -smux-version -conns -streams -bytes
// -pattern -idle -subprotocol -timeout
package main

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash"
	"io"
	"math/rand"
	"net"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/xtaci/smux"
)

const (
	chunkSize  = 16 * 1024
	littleSize = 1024
	maxErrors  = 50
)

type options struct {
	pattern string
	bytes   int64
	idle    time.Duration
}

// wsConn wraps a *websocket.Conn as a net.Conn. Writes come from one
// goroutine at a time (smux's send loop or the stream's writer); Close uses
// WriteControl, which is safe concurrently with them.
type wsConn struct {
	ws     *websocket.Conn
	reader io.Reader
}

func (c *wsConn) Read(b []byte) (int, error) {
	for {
		if c.reader == nil {
			_, r, err := c.ws.NextReader()
			if err != nil {
				return 0, err
			}
			c.reader = r
		}
		n, err := c.reader.Read(b)
		if err == io.EOF {
			c.reader = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (c *wsConn) Write(b []byte) (int, error) {
	if err := c.ws.WriteMessage(websocket.BinaryMessage, b); err != nil {
		return 0, err
	}
	return len(b), nil
}

func (c *wsConn) Close() error {
	msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "")
	c.ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(100*time.Millisecond))
	return c.ws.Close()
}

func (c *wsConn) LocalAddr() net.Addr                { return c.ws.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr               { return c.ws.RemoteAddr() }
func (c *wsConn) SetDeadline(t time.Time) error      { return c.ws.UnderlyingConn().SetDeadline(t) }
func (c *wsConn) SetReadDeadline(t time.Time) error  { return c.ws.SetReadDeadline(t) }
func (c *wsConn) SetWriteDeadline(t time.Time) error { return c.ws.SetWriteDeadline(t) }

type result struct {
	OK         bool     `json:"ok"`
	Mode       string   `json:"mode"`
	Pattern    string   `json:"pattern"`
	Conns      int      `json:"conns"`
	Streams    int      `json:"streams"`
	StreamsOK  int      `json:"streams_ok"`
	BytesTotal int64    `json:"bytes_total"`
	Errors     []string `json:"errors"`
	ElapsedS   float64  `json:"elapsed_s"`
}

type collector struct {
	mu        sync.Mutex
	errs      []string
	nerr      int
	bytes     int64
	streamsOK int
}

func (c *collector) fail(format string, args ...interface{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nerr++
	if len(c.errs) < maxErrors {
		c.errs = append(c.errs, fmt.Sprintf(format, args...))
	}
}

func (c *collector) done(n int64) {
	c.mu.Lock()
	c.bytes += n
	c.streamsOK++
	c.mu.Unlock()
}

// pseudo returns a deterministic source for the stream with global index idx.
func pseudo(idx int) io.Reader { return rand.New(rand.NewSource(int64(idx) + 1)) }

// writeN writes n bytes from src to w, in chunks, hashing them into h.
func writeN(w io.Writer, src io.Reader, n int64, h hash.Hash) error {
	buf := make([]byte, chunkSize)
	for n > 0 {
		k := int64(len(buf))
		if k > n {
			k = n
		}
		if _, err := io.ReadFull(src, buf[:k]); err != nil {
			return err
		}
		h.Write(buf[:k])
		if _, err := w.Write(buf[:k]); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// readN reads exactly n bytes from r, hashing them into h.
func readN(r io.Reader, n int64, h hash.Hash) error {
	got, err := io.CopyN(h, r, n)
	if err != nil {
		return fmt.Errorf("read %d of %d bytes: %w", got, n, err)
	}
	return nil
}

func header(n int64) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(n))
	return b[:]
}

// runStream runs the pattern on one byte stream. idleStart is called after
// the "little" part is done; it blocks until the idle period is over.
// It returns the number of payload bytes moved (sent + received).
func runStream(conn io.ReadWriter, idx int, o options, idleWait func()) (int64, error) {
	n := o.bytes
	little := int64(littleSize)
	if little > n {
		little = n
	}
	switch o.pattern {
	case "echo":
		src := pseudo(idx)
		sent, recv := sha256.New(), sha256.New()
		if o.idle > 0 {
			if err := writeN(conn, src, little, sent); err != nil {
				return 0, fmt.Errorf("write before idle: %w", err)
			}
			if err := readN(conn, little, recv); err != nil {
				return 0, fmt.Errorf("echo before idle: %w", err)
			}
		} else {
			little = 0
		}
		idleWait()
		werr := make(chan error, 1)
		go func() { werr <- writeN(conn, src, n-little, sent) }()
		rerr := readN(conn, n-little, recv)
		if err := <-werr; err != nil {
			return 0, fmt.Errorf("write: %w", err)
		}
		if rerr != nil {
			return 0, rerr
		}
		if !bytes.Equal(sent.Sum(nil), recv.Sum(nil)) {
			return 0, errors.New("echo: sha256 of received data differs from sent")
		}
		return 2 * n, nil
	case "upload":
		src := pseudo(idx)
		sent := sha256.New()
		if _, err := conn.Write(header(n)); err != nil {
			return 0, fmt.Errorf("write header: %w", err)
		}
		if o.idle > 0 {
			if err := writeN(conn, src, little, sent); err != nil {
				return 0, fmt.Errorf("write before idle: %w", err)
			}
		} else {
			little = 0
		}
		idleWait()
		if err := writeN(conn, src, n-little, sent); err != nil {
			return 0, fmt.Errorf("write: %w", err)
		}
		var digest [32]byte
		if _, err := io.ReadFull(conn, digest[:]); err != nil {
			return 0, fmt.Errorf("read digest: %w", err)
		}
		if !bytes.Equal(sent.Sum(nil), digest[:]) {
			return 0, errors.New("upload: dst's sha256 differs from sent")
		}
		return n, nil
	case "download":
		hdr := header(n)
		split := 0
		if o.idle > 0 {
			split = 4
			if _, err := conn.Write(hdr[:split]); err != nil {
				return 0, fmt.Errorf("write header before idle: %w", err)
			}
		}
		idleWait()
		if _, err := conn.Write(hdr[split:]); err != nil {
			return 0, fmt.Errorf("write header: %w", err)
		}
		recv := sha256.New()
		if err := readN(conn, n, recv); err != nil {
			return 0, err
		}
		var digest [32]byte
		if _, err := io.ReadFull(conn, digest[:]); err != nil {
			return 0, fmt.Errorf("read digest: %w", err)
		}
		if !bytes.Equal(recv.Sum(nil), digest[:]) {
			return 0, errors.New("download: sha256 of received data differs from dst's")
		}
		return n, nil
	}
	return 0, fmt.Errorf("unknown pattern %q", o.pattern)
}

// report prints the JSON result and exits (0 only if everything matched).
func report(res *result, col *collector, start time.Time) {
	col.mu.Lock()
	res.Errors = append([]string{}, col.errs...)
	if col.nerr > len(col.errs) {
		res.Errors = append(res.Errors, fmt.Sprintf("... %d more errors", col.nerr-len(col.errs)))
	}
	res.BytesTotal = col.bytes
	res.StreamsOK = col.streamsOK
	res.OK = col.nerr == 0 && col.streamsOK == res.Streams
	col.mu.Unlock()
	res.ElapsedS = time.Since(start).Seconds()
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
	if res.OK {
		os.Exit(0)
	}
	os.Exit(1)
}

func main() {
	rawURL := flag.String("url", "", "wss://host:port/path or ws://host:port/path")
	connect := flag.String("connect", "", "dial this host:port instead of the URL's host")
	sni := flag.String("sni", "", "TLS server name (default: URL host)")
	skipVerify := flag.Bool("sv", false, "skip certificate verification")
	caFile := flag.String("ca", "", "PEM file of a CA to trust")
	mode := flag.String("mode", "plain", "plain|mux")
	smuxVersion := flag.Int("smux-version", 1, "smux version (1 or 2)")
	conns := flag.Int("conns", 1, "number of WebSockets")
	streams := flag.Int("streams", 1, "streams per WebSocket (mux mode)")
	nbytes := flag.Int64("bytes", 1<<20, "payload bytes per stream")
	pattern := flag.String("pattern", "echo", "echo|upload|download")
	idle := flag.Duration("idle", 0, "idle period between the first bytes and the transfer")
	subprotocol := flag.String("subprotocol", "", "smux_on|smux_off|none (default: from -mode)")
	timeout := flag.Duration("timeout", 2*time.Minute, "overall deadline (plus -idle)")
	flag.Parse()

	start := time.Now()
	col := &collector{}
	res := result{Mode: *mode, Pattern: *pattern, Conns: *conns}
	var emitOnce sync.Once
	emit := func() { emitOnce.Do(func() { report(&res, col, start) }) }

	perConn := 1
	if *mode == "mux" {
		perConn = *streams
	}
	res.Streams = *conns * perConn

	bad := func(format string, args ...interface{}) {
		col.fail(format, args...)
		emit()
	}
	switch {
	case *mode != "plain" && *mode != "mux":
		bad("bad -mode %q", *mode)
	case *pattern != "echo" && *pattern != "upload" && *pattern != "download":
		bad("bad -pattern %q", *pattern)
	case *smuxVersion != 1 && *smuxVersion != 2:
		bad("bad -smux-version %d", *smuxVersion)
	case *conns < 1 || perConn < 1 || *nbytes < 0:
		bad("-conns, -streams must be >= 1 and -bytes >= 0")
	}
	u, err := url.Parse(*rawURL)
	if err != nil || (u.Scheme != "ws" && u.Scheme != "wss") {
		bad("bad -url %q", *rawURL)
	}

	var protos []string
	switch *subprotocol {
	case "":
		if *mode == "mux" {
			protos = []string{"smux_on"}
		} else {
			protos = []string{"smux_off"}
		}
	case "none":
	case "smux_on", "smux_off":
		protos = []string{*subprotocol}
	default:
		bad("bad -subprotocol %q", *subprotocol)
	}

	tlsConf := &tls.Config{InsecureSkipVerify: *skipVerify, ServerName: u.Hostname()}
	if *sni != "" {
		tlsConf.ServerName = *sni
	}
	if *caFile != "" {
		pemData, err := os.ReadFile(*caFile)
		if err != nil {
			bad("read -ca: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemData) {
			bad("no certificate in %s", *caFile)
		}
		tlsConf.RootCAs = pool
	}
	netDialer := &net.Dialer{Timeout: 10 * time.Second}
	dialer := &websocket.Dialer{
		TLSClientConfig:  tlsConf,
		Subprotocols:     protos,
		HandshakeTimeout: 10 * time.Second,
		ReadBufferSize:   chunkSize,
		WriteBufferSize:  chunkSize,
	}
	if *connect != "" {
		target := *connect
		dialer.NetDial = func(network, _ string) (net.Conn, error) {
			return netDialer.Dial(network, target)
		}
	}
	smuxConfig := &smux.Config{
		Version:           *smuxVersion,
		KeepAliveInterval: 30 * time.Second,
		KeepAliveTimeout:  70 * time.Second,
		MaxFrameSize:      16384,
		MaxReceiveBuffer:  262144,
		MaxStreamBuffer:   65536,
	}
	o := options{pattern: *pattern, bytes: *nbytes, idle: *idle}

	// All streams reach the idle point, then wait out -idle together.
	var littleDone sync.WaitGroup
	littleDone.Add(res.Streams)
	idleOver := make(chan struct{})
	go func() {
		littleDone.Wait()
		time.Sleep(*idle)
		close(idleOver)
	}()
	var once sync.Map // stream index -> struct{}: littleDone.Done at most once
	reached := func(idx int) {
		if _, dup := once.LoadOrStore(idx, struct{}{}); !dup {
			littleDone.Done()
		}
	}

	var mu sync.Mutex
	var closers []io.Closer
	track := func(c io.Closer) {
		mu.Lock()
		closers = append(closers, c)
		mu.Unlock()
	}
	deadline := time.AfterFunc(*timeout+*idle, func() {
		col.fail("overall timeout after %s", *timeout+*idle)
		mu.Lock()
		for _, c := range closers {
			c.Close()
		}
		mu.Unlock()
		emit()
	})
	defer deadline.Stop()

	var wg sync.WaitGroup
	stream := func(rw io.ReadWriter, idx int) {
		moved, err := runStream(rw, idx, o, func() {
			reached(idx)
			<-idleOver
		})
		reached(idx)
		if err != nil {
			col.fail("stream %d: %v", idx, err)
			return
		}
		col.done(moved)
	}
	for c := 0; c < *conns; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			first := c * perConn
			ws, resp, err := dialer.Dial(u.String(), nil)
			if err != nil {
				status := ""
				if resp != nil {
					status = " (HTTP " + resp.Status + ")"
				}
				col.fail("conn %d: dial: %v%s", c, err, status)
				for i := 0; i < perConn; i++ {
					reached(first + i)
				}
				return
			}
			conn := &wsConn{ws: ws}
			track(conn)
			defer conn.Close()
			if *mode == "plain" {
				stream(conn, first)
				return
			}
			sess, err := smux.Client(conn, smuxConfig)
			if err != nil {
				col.fail("conn %d: smux: %v", c, err)
				for i := 0; i < perConn; i++ {
					reached(first + i)
				}
				return
			}
			track(sess)
			defer sess.Close()
			var swg sync.WaitGroup
			for i := 0; i < perConn; i++ {
				swg.Add(1)
				go func(idx int) {
					defer swg.Done()
					st, err := sess.OpenStream()
					if err != nil {
						reached(idx)
						col.fail("stream %d: open: %v", idx, err)
						return
					}
					defer st.Close()
					stream(st, idx)
				}(first + i)
			}
			swg.Wait()
		}(c)
	}
	wg.Wait()
	deadline.Stop()
	emit()
}

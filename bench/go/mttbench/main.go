// Command mttbench is the benchmark suite's load tool. It talks WebSocket (and
// smux) to a tunnel server directly, so connection-setup and scale numbers do
// not depend on a client's local listener. Subcommands:
//
//	mttbench echo -b 127.0.0.1:0
//	    A TCP echo dst. Prints "listening <addr>" on stdout, serves until killed.
//
//	mttbench rate -url wss://name/p -connect ADDR -sv -mode plain|mux -n MAX -d DUR -c CONC
//	    New tunnels per second. plain: each op is a fresh TCP+TLS+upgrade, one
//	    byte written and echoed back, then a close. mux: one warm smux session;
//	    each op opens a stream, echoes one byte and closes the stream. Stops at
//	    MAX ops or after DUR, whichever comes first. Prints one JSON object.
//
//	mttbench hold -url ... -connect ADDR -sv -n N -c CONC [-mode mux -streams K]
//	    Opens N plain tunnels (CONC WebSockets at a time), or N smux streams in
//	    ceil(N/K) sessions, each proven by a 16-byte echo, prints {"opened":...},
//	    then for each "echo" line on stdin re-checks every tunnel and prints
//	    {"echoed":...}; stdin EOF or "close" closes all and exits.
//
// Every loop is bounded by a count and a deadline.
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
	"github.com/xtaci/smux"
)

const (
	opTimeout  = 10 * time.Second
	maxErrors  = 20
	echoSize   = 16
	holdBuffer = 1024
)

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

type errList struct {
	mu   sync.Mutex
	n    int
	errs []string
}

func (e *errList) add(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.n++
	if len(e.errs) < maxErrors {
		e.errs = append(e.errs, err.Error())
	}
}

func emit(v interface{}) {
	out, _ := json.Marshal(v)
	fmt.Println(string(out))
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(2)
}

// dialer builds a gorilla dialer for -url, connecting to -connect.
func dialer(rawURL, connect string, sv bool, proto string, bufSize int) (*websocket.Dialer, string) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "ws" && u.Scheme != "wss") {
		fail("bad -url %q", rawURL)
	}
	nd := &net.Dialer{Timeout: opTimeout}
	d := &websocket.Dialer{
		TLSClientConfig:  &tls.Config{InsecureSkipVerify: sv, ServerName: u.Hostname()},
		Subprotocols:     []string{proto},
		HandshakeTimeout: opTimeout,
		ReadBufferSize:   bufSize,
		WriteBufferSize:  bufSize,
	}
	if connect != "" {
		d.NetDial = func(network, _ string) (net.Conn, error) { return nd.Dial(network, connect) }
	}
	return d, u.String()
}

func echoOnce(rw io.ReadWriter, payload []byte) error {
	if _, err := rw.Write(payload); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(rw, got); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("echo mismatch")
	}
	return nil
}

// ---------------------------------------------------------------- echo

func runEcho(args []string) {
	fs := flag.NewFlagSet("echo", flag.ExitOnError)
	bind := fs.String("b", "127.0.0.1:0", "listen address")
	fs.Parse(args)
	l, err := net.Listen("tcp", *bind)
	if err != nil {
		fail("listen: %v", err)
	}
	fmt.Printf("listening %s\n", l.Addr())
	for {
		c, err := l.Accept()
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go func(c net.Conn) {
			defer c.Close()
			// A plain loop, not io.Copy: TCPConn.ReadFrom would splice through a
			// pipe pair, 3 descriptors per connection, and run out at ~6,600.
			buf := make([]byte, 16*1024)
			for {
				n, err := c.Read(buf)
				if n > 0 {
					if _, werr := c.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}(c)
	}
}

// ---------------------------------------------------------------- rate

type rateResult struct {
	OK       bool     `json:"ok"`
	Mode     string   `json:"mode"`
	Ops      int64    `json:"ops"`
	Errors   int      `json:"errors"`
	ElapsedS float64  `json:"elapsed_s"`
	Rate     float64  `json:"rate"`
	P50Ms    float64  `json:"p50_ms"`
	P99Ms    float64  `json:"p99_ms"`
	First    []string `json:"first_errors"`
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return sorted[i]
}

func runRate(args []string) {
	fs := flag.NewFlagSet("rate", flag.ExitOnError)
	rawURL := fs.String("url", "", "wss://name/path")
	connect := fs.String("connect", "", "dial this host:port")
	sv := fs.Bool("sv", false, "skip certificate verification")
	mode := fs.String("mode", "plain", "plain|mux")
	maxOps := fs.Int64("n", 1000, "maximum number of operations")
	dur := fs.Duration("d", 3*time.Second, "maximum duration")
	conc := fs.Int("c", 4, "concurrent workers")
	fs.Parse(args)
	if *conc < 1 || *conc > 16 || *maxOps < 1 {
		fail("-c must be 1..16 and -n >= 1")
	}
	proto := "smux_off"
	if *mode == "mux" {
		proto = "smux_on"
	} else if *mode != "plain" {
		fail("bad -mode %q", *mode)
	}
	d, u := dialer(*rawURL, *connect, *sv, proto, 16*1024)

	var sess *smux.Session
	if *mode == "mux" {
		ws, _, err := d.Dial(u, nil)
		if err != nil {
			fail("dial warm session: %v", err)
		}
		conn := &wsConn{ws: ws}
		cfg := &smux.Config{
			Version: 1, KeepAliveInterval: 30 * time.Second, KeepAliveTimeout: 70 * time.Second,
			MaxFrameSize: 16384, MaxReceiveBuffer: 262144, MaxStreamBuffer: 65536,
		}
		sess, err = smux.Client(conn, cfg)
		if err != nil {
			fail("smux client: %v", err)
		}
		defer sess.Close()
		// Warm: one full stream round trip before the clock starts.
		st, err := sess.OpenStream()
		if err != nil {
			fail("warm stream: %v", err)
		}
		st.SetDeadline(time.Now().Add(opTimeout))
		if err := echoOnce(st, []byte{'w'}); err != nil {
			fail("warm stream: %v", err)
		}
		st.Close()
	}

	one := func() error {
		payload := []byte{'x'}
		if sess != nil {
			st, err := sess.OpenStream()
			if err != nil {
				return fmt.Errorf("open stream: %w", err)
			}
			defer st.Close()
			st.SetDeadline(time.Now().Add(opTimeout))
			return echoOnce(st, payload)
		}
		ws, _, err := d.Dial(u, nil)
		if err != nil {
			return fmt.Errorf("dial: %w", err)
		}
		conn := &wsConn{ws: ws}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(opTimeout))
		return echoOnce(conn, payload)
	}

	var issued int64
	var errs errList
	var mu sync.Mutex
	var lat []float64
	start := time.Now()
	deadline := start.Add(*dur)
	var wg sync.WaitGroup
	for w := 0; w < *conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			local := make([]float64, 0, 1024)
			for time.Now().Before(deadline) && atomic.AddInt64(&issued, 1) <= *maxOps {
				t0 := time.Now()
				if err := one(); err != nil {
					errs.add(err)
					continue
				}
				local = append(local, float64(time.Since(t0).Microseconds())/1000)
			}
			mu.Lock()
			lat = append(lat, local...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	sort.Float64s(lat)
	res := rateResult{
		OK: errs.n == 0 && len(lat) > 0, Mode: *mode, Ops: int64(len(lat)), Errors: errs.n,
		ElapsedS: elapsed, Rate: float64(len(lat)) / elapsed,
		P50Ms: percentile(lat, 0.5), P99Ms: percentile(lat, 0.99), First: errs.errs,
	}
	emit(res)
}

// ---------------------------------------------------------------- hold

type holdResult struct {
	Opened   int      `json:"opened,omitempty"`
	Echoed   int      `json:"echoed,omitempty"`
	Failed   int      `json:"failed"`
	Sessions int      `json:"sessions,omitempty"`
	ElapsedS float64  `json:"elapsed_s"`
	First    []string `json:"first_errors"`
}

// tunnel is a plain WebSocket or an smux stream.
type tunnel interface {
	io.ReadWriteCloser
	SetDeadline(t time.Time) error
}

func runHold(args []string) {
	fs := flag.NewFlagSet("hold", flag.ExitOnError)
	rawURL := fs.String("url", "", "wss://name/path")
	connect := fs.String("connect", "", "dial this host:port")
	sv := fs.Bool("sv", false, "skip certificate verification")
	n := fs.Int("n", 1000, "tunnels (plain) or streams (mux) to open")
	mode := fs.String("mode", "plain", "plain|mux")
	perSession := fs.Int("streams", 16, "streams per smux session (mux)")
	conc := fs.Int("c", 32, "WebSockets opened concurrently")
	limit := fs.Duration("timeout", 120*time.Second, "deadline for opening or checking all tunnels")
	fs.Parse(args)
	if *n < 1 || *conc < 1 || *perSession < 1 || *perSession > 16 {
		fail("-n and -c must be >= 1, -streams 1..16")
	}
	proto, k := "smux_off", 1
	if *mode == "mux" {
		proto, k = "smux_on", *perSession
	} else if *mode != "plain" {
		fail("bad -mode %q", *mode)
	}
	d, u := dialer(*rawURL, *connect, *sv, proto, holdBuffer)
	nconn := (*n + k - 1) / k
	tunnels := make([]tunnel, *n)
	var sessions []*smux.Session
	var sessMu sync.Mutex

	// forEach runs f on indices 0..count-1 with conc workers, bounded by -timeout.
	forEach := func(count int, f func(i int) error) holdResult {
		var errs errList
		var next int64 = -1
		start := time.Now()
		deadline := start.Add(*limit)
		var wg sync.WaitGroup
		for w := 0; w < *conc; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(atomic.AddInt64(&next, 1))
					if i >= count {
						return
					}
					if time.Now().After(deadline) {
						errs.add(fmt.Errorf("item %d: deadline passed", i))
						continue
					}
					if err := f(i); err != nil {
						errs.add(fmt.Errorf("item %d: %w", i, err))
					}
				}
			}()
		}
		wg.Wait()
		return holdResult{Failed: errs.n, ElapsedS: time.Since(start).Seconds(), First: errs.errs}
	}
	check := func(t tunnel, i int) error {
		payload := []byte(fmt.Sprintf("%016d", i))[:echoSize]
		t.SetDeadline(time.Now().Add(opTimeout))
		err := echoOnce(t, payload)
		t.SetDeadline(time.Time{})
		return err
	}
	smuxConfig := &smux.Config{
		Version: 1, KeepAliveInterval: 30 * time.Second, KeepAliveTimeout: 70 * time.Second,
		MaxFrameSize: 16384, MaxReceiveBuffer: 262144, MaxStreamBuffer: 65536,
	}

	// Opening: item c is WebSocket c, carrying tunnels c*k .. c*k+k-1.
	res := forEach(nconn, func(c int) error {
		ws, _, err := d.Dial(u, nil)
		if err != nil {
			return fmt.Errorf("dial: %w", err)
		}
		conn := &wsConn{ws: ws}
		if *mode == "plain" {
			if err := check(conn, c); err != nil {
				conn.Close()
				return err
			}
			tunnels[c] = conn
			return nil
		}
		sess, err := smux.Client(conn, smuxConfig)
		if err != nil {
			conn.Close()
			return fmt.Errorf("smux: %w", err)
		}
		sessMu.Lock()
		sessions = append(sessions, sess)
		sessMu.Unlock()
		for i := c * k; i < (c+1)*k && i < *n; i++ {
			st, err := sess.OpenStream()
			if err != nil {
				return fmt.Errorf("stream %d: open: %w", i, err)
			}
			if err := check(st, i); err != nil {
				st.Close()
				return fmt.Errorf("stream %d: %w", i, err)
			}
			tunnels[i] = st
		}
		return nil
	})
	opened := 0
	for _, t := range tunnels {
		if t != nil {
			opened++
		}
	}
	res.Opened = opened
	res.Failed = *n - opened
	res.Sessions = len(sessions)
	emit(res)

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if in.Text() != "echo" {
			break
		}
		res := forEach(*n, func(i int) error {
			if tunnels[i] == nil {
				return fmt.Errorf("was never opened")
			}
			return check(tunnels[i], i)
		})
		res.Echoed = *n - res.Failed
		emit(res)
	}
	for _, t := range tunnels {
		if t != nil {
			t.Close()
		}
	}
	for _, s := range sessions {
		s.Close()
	}
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: mttbench echo|rate|hold [flags]")
	}
	switch os.Args[1] {
	case "echo":
		runEcho(os.Args[2:])
	case "rate":
		runRate(os.Args[2:])
	case "hold":
		runHold(os.Args[2:])
	default:
		fail("unknown subcommand %q", os.Args[1])
	}
}

// Command mttclient is a test stand-in for mos-tls-tunnel's Go `mtt-client`
// in wss mode (optionally with -mux). It reproduces the original's behaviour,
// including its hazards:
//
//   - the WebSocket is wrapped as a net.Conn whose Close() writes a close frame
//     with WriteMessage and then closes the socket, with no lock against a
//     concurrent Write from the other relay goroutine. When a server closes
//     the WebSocket while this client is still uploading, gorilla/websocket
//     panics with "concurrent write to websocket connection" and the whole
//     process dies, exactly like the real client. Do not add locking: tests
//     rely on this to prove a server never provokes it.
//   - relay = two goroutines, each copying one direction with a 16 KiB buffer
//     and an idle deadline, then closing both sides.
//   - mux: a pool of smux client sessions, a session is reused while it has
//     fewer than -mux-max-stream streams, and closed after 10 s without
//     streams (checked every 2 s).
//
// It prints "listening <addr>" on stdout once the local listener is up, and
// one line per failed dial on stderr.
//
// Flags: -b -s -n -wss-path -sv -mux -mux-max-stream -smux-version -timeout -ca
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/xtaci/smux"
)

const (
	copyBufferSize       = 16 * 1024
	wsBufferSize         = 16 * 1024
	handshakeTimeout     = 10 * time.Second
	muxCheckIdleInterval = 2 * time.Second
	muxSessIdleTimeout   = 10 * time.Second
)

// wsConn wraps a *websocket.Conn as a net.Conn, like the original client.
type wsConn struct {
	ws     *websocket.Conn
	reader io.Reader
}

func (c *wsConn) Read(b []byte) (int, error) {
	var err error
	for {
		if c.reader == nil {
			_, c.reader, err = c.ws.NextReader()
			if err != nil {
				return 0, err
			}
		}
		n, err := c.reader.Read(b)
		if n == 0 && err == io.EOF {
			c.reader = nil
			continue
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

// Close is deliberately unsynchronised with Write (see the package comment).
func (c *wsConn) Close() error {
	c.ws.WriteMessage(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""))
	return c.ws.Close()
}

func (c *wsConn) LocalAddr() net.Addr  { return c.ws.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr { return c.ws.RemoteAddr() }
func (c *wsConn) SetDeadline(t time.Time) error {
	return c.ws.UnderlyingConn().SetDeadline(t)
}
func (c *wsConn) SetReadDeadline(t time.Time) error  { return c.ws.SetReadDeadline(t) }
func (c *wsConn) SetWriteDeadline(t time.Time) error { return c.ws.SetWriteDeadline(t) }

type client struct {
	wssURL       string
	dialer       *websocket.Dialer
	timeout      time.Duration
	mux          bool
	muxMaxStream int
	smuxConfig   *smux.Config
	sessPool     sync.Map // *smux.Session -> nil
	bufPool      sync.Pool
}

func (cl *client) dialWSS() (net.Conn, error) {
	ws, _, err := cl.dialer.Dial(cl.wssURL, nil)
	if err != nil {
		return nil, err
	}
	return &wsConn{ws: ws}, nil
}

func (cl *client) dialNewSmuxSess() (*smux.Session, error) {
	conn, err := cl.dialWSS()
	if err != nil {
		return nil, err
	}
	sess, err := smux.Client(conn, cl.smuxConfig)
	if err != nil {
		conn.Close()
		return nil, err
	}
	go func() {
		ticker := time.NewTicker(muxCheckIdleInterval)
		defer ticker.Stop()
		lastBusy := time.Now()
		for {
			if sess.IsClosed() {
				cl.sessPool.Delete(sess)
				return
			}
			now := <-ticker.C
			if sess.NumStreams() > 0 {
				lastBusy = now
				continue
			}
			if now.Sub(lastBusy) > muxSessIdleTimeout {
				sess.Close()
				cl.sessPool.Delete(sess)
				return
			}
		}
	}()
	cl.sessPool.Store(sess, nil)
	return sess, nil
}

func (cl *client) getSmuxStream() (*smux.Stream, error) {
	var stream *smux.Stream
	cl.sessPool.Range(func(key, _ interface{}) bool {
		sess := key.(*smux.Session)
		if sess.IsClosed() {
			cl.sessPool.Delete(sess)
			return true
		}
		if sess.NumStreams() < cl.muxMaxStream {
			s, err := sess.OpenStream()
			if err != nil {
				cl.sessPool.Delete(sess)
				log.Printf("deleted broken session: open stream: %v", err)
				return true
			}
			stream = s
			return false
		}
		return true
	})
	if stream != nil {
		return stream, nil
	}
	sess, err := cl.dialNewSmuxSess()
	if err != nil {
		return nil, err
	}
	return sess.OpenStream()
}

func (cl *client) forward(leftConn net.Conn) {
	defer leftConn.Close()
	var rightConn net.Conn
	var err error
	if cl.mux {
		rightConn, err = cl.getSmuxStream()
		if err != nil {
			log.Printf("mux get stream: %v", err)
			return
		}
	} else {
		rightConn, err = cl.dialWSS()
		if err != nil {
			log.Printf("connect to remote: %v", err)
			return
		}
	}
	go cl.openTunnel(rightConn, leftConn)
	cl.openTunnel(leftConn, rightConn)
}

func (cl *client) openTunnel(dst, src net.Conn) {
	buf := cl.bufPool.Get().([]byte)
	copyBuffer(dst, src, buf, cl.timeout)
	dst.Close()
	src.Close()
	cl.bufPool.Put(buf)
}

func copyBuffer(dst, src net.Conn, buf []byte, timeout time.Duration) (written int64, err error) {
	for {
		src.SetReadDeadline(time.Now().Add(timeout))
		nr, er := src.Read(buf)
		if nr > 0 {
			dst.SetWriteDeadline(time.Now().Add(timeout))
			nw, ew := dst.Write(buf[0:nr])
			if nw > 0 {
				written += int64(nw)
			}
			if ew != nil {
				err = ew
				break
			}
			if nr != nw {
				err = io.ErrShortWrite
				break
			}
		}
		if er != nil {
			if er != io.EOF {
				err = er
			}
			break
		}
	}
	return written, err
}

func main() {
	bind := flag.String("b", "127.0.0.1:0", "local listen address")
	server := flag.String("s", "", "server address host:port")
	serverName := flag.String("n", "", "server name (default: host part of -s)")
	wssPath := flag.String("wss-path", "/", "WebSocket path")
	skipVerify := flag.Bool("sv", false, "skip certificate verification")
	enableMux := flag.Bool("mux", false, "enable smux")
	muxMaxStream := flag.Int("mux-max-stream", 4, "max streams per smux session (1..16)")
	smuxVersion := flag.Int("smux-version", 1, "smux protocol version (1 or 2)")
	timeout := flag.Duration("timeout", 5*time.Minute, "idle timeout")
	caFile := flag.String("ca", "", "PEM file of a CA to trust (test addition)")
	flag.Parse()
	log.SetOutput(os.Stderr)

	if *server == "" {
		log.Fatal("need -s")
	}
	if *muxMaxStream < 1 || *muxMaxStream > 16 {
		log.Fatal("-mux-max-stream must be 1..16")
	}
	if *smuxVersion != 1 && *smuxVersion != 2 {
		log.Fatal("-smux-version must be 1 or 2")
	}
	if *timeout <= 0 {
		log.Fatal("-timeout must be positive")
	}
	name := *serverName
	if name == "" {
		host, _, err := net.SplitHostPort(*server)
		if err != nil {
			log.Fatalf("bad -s: %v", err)
		}
		name = host
	}
	path := *wssPath
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}

	tlsConf := &tls.Config{ServerName: name, InsecureSkipVerify: *skipVerify}
	if *caFile != "" {
		pemData, err := os.ReadFile(*caFile)
		if err != nil {
			log.Fatalf("read -ca: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemData) {
			log.Fatalf("no certificate in %s", *caFile)
		}
		tlsConf.RootCAs = pool
	}

	netDialer := &net.Dialer{Timeout: handshakeTimeout}
	remote := *server
	subprotocol := "smux_off"
	if *enableMux {
		subprotocol = "smux_on"
	}
	cl := &client{
		wssURL: "wss://" + name + path,
		dialer: &websocket.Dialer{
			NetDial: func(network, _ string) (net.Conn, error) {
				return netDialer.Dial(network, remote)
			},
			TLSClientConfig:  tlsConf,
			Subprotocols:     []string{subprotocol},
			HandshakeTimeout: handshakeTimeout,
			ReadBufferSize:   wsBufferSize,
			WriteBufferSize:  wsBufferSize,
		},
		timeout:      *timeout,
		mux:          *enableMux,
		muxMaxStream: *muxMaxStream,
		smuxConfig: &smux.Config{
			Version:           *smuxVersion,
			KeepAliveInterval: 30 * time.Second,
			KeepAliveTimeout:  70 * time.Second,
			MaxFrameSize:      16384,
			MaxReceiveBuffer:  262144,
			MaxStreamBuffer:   65536,
		},
		bufPool: sync.Pool{New: func() interface{} { return make([]byte, copyBufferSize) }},
	}

	l, err := net.Listen("tcp", *bind)
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	fmt.Printf("listening %s\n", l.Addr())
	for {
		c, err := l.Accept()
		if err != nil {
			log.Fatalf("accept: %v", err)
		}
		go cl.forward(c)
	}
}

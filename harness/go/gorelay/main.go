// Command gorelay is a small Go server that does what mtt-mu-server does, for
// testing the Python client against a Go server and as the benchmark baseline.
//
//	gorelay -b 127.0.0.1:0 -route /p1=127.0.0.1:9001 [-route ...]
//	        [-cert f -key f | -self-signed] [-mux] [-smux-version 1|2] [-timeout 1m]
//
// TLS: -cert/-key -> HTTPS with them; -self-signed -> HTTPS with an in-memory
// ECDSA certificate (for "localhost" and 127.0.0.1); neither -> plain HTTP.
// A WebSocket upgrade on a routed path (exact match on r.URL.Path; anything
// else is 404) is relayed to that route's dst: sub-protocol smux_off -> one
// TCP connection to dst; smux_on -> an smux server session, one TCP
// connection per accepted stream; no sub-protocol -> as -mux says.
//
// xtaci/smux sessions do not follow the peer's version (a frame with another
// version is a protocol error that ends the session), so the version is
// taken from -smux-version.
//
// Prints "listening <addr>" on stdout once ready.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/xtaci/smux"
)

const (
	copyBufferSize   = 32 * 1024
	handshakeTimeout = 10 * time.Second
	maxStreams       = 16
)

type routeFlag map[string]string

func (r routeFlag) String() string { return fmt.Sprint(map[string]string(r)) }

func (r routeFlag) Set(v string) error {
	i := strings.IndexByte(v, '=')
	if i <= 0 || i == len(v)-1 {
		return fmt.Errorf("want /path=host:port, got %q", v)
	}
	r[v[:i]] = v[i+1:]
	return nil
}

var bufPool = sync.Pool{New: func() interface{} {
	b := make([]byte, copyBufferSize)
	return &b
}}

// wsConn wraps a *websocket.Conn as a net.Conn.
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

// Close sends a close frame (1000), waiting at most 100 ms for it to be
// written, then closes the socket. WriteControl is safe to call concurrently
// with Write.
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

type relay struct {
	routes     map[string]string
	mux        bool
	timeout    time.Duration
	upgrader   websocket.Upgrader
	dialer     net.Dialer
	smuxConfig *smux.Config
}

func (s *relay) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	dst, ok := s.routes[r.URL.Path]
	if !ok {
		http.NotFound(w, r)
		return
	}
	ws, err := s.upgrader.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade has already replied
	}
	conn := &wsConn{ws: ws}
	useMux := s.mux
	switch ws.Subprotocol() {
	case "smux_on":
		useMux = true
	case "smux_off":
		useMux = false
	}
	if useMux {
		s.serveMux(conn, dst)
	} else {
		s.serveConn(conn, dst)
	}
}

func (s *relay) serveMux(conn net.Conn, dst string) {
	sess, err := smux.Server(conn, s.smuxConfig)
	if err != nil {
		conn.Close()
		return
	}
	defer sess.Close()
	for {
		stream, err := sess.AcceptStream()
		if err != nil {
			return
		}
		if sess.NumStreams() > maxStreams {
			stream.Close()
			continue
		}
		go s.serveConn(stream, dst)
	}
}

func (s *relay) serveConn(left net.Conn, dst string) {
	right, err := s.dialer.Dial("tcp", dst)
	if err != nil {
		log.Printf("dial %s: %v", dst, err)
		left.Close()
		return
	}
	done := make(chan struct{})
	go func() {
		s.copyAndClose(right, left)
		close(done)
	}()
	s.copyAndClose(left, right)
	<-done
}

// copyAndClose copies src to dst with an idle deadline, then closes both.
func (s *relay) copyAndClose(dst, src net.Conn) {
	bp := bufPool.Get().(*[]byte)
	buf := *bp
	for {
		src.SetReadDeadline(time.Now().Add(s.timeout))
		n, err := src.Read(buf)
		if n > 0 {
			dst.SetWriteDeadline(time.Now().Add(s.timeout))
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	bufPool.Put(bp)
	dst.Close()
	src.Close()
}

func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "localhost"},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(1, 0, 0),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, &tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

func main() {
	routes := routeFlag{}
	bind := flag.String("b", "127.0.0.1:0", "listen address")
	certFile := flag.String("cert", "", "TLS certificate PEM file")
	keyFile := flag.String("key", "", "TLS key PEM file")
	selfSign := flag.Bool("self-signed", false, "HTTPS with a generated ECDSA certificate")
	flag.Var(routes, "route", "/path=host:port (repeatable)")
	enableMux := flag.Bool("mux", false, "use smux when the client sends no sub-protocol")
	smuxVersion := flag.Int("smux-version", 1, "smux protocol version of server sessions (1 or 2)")
	timeout := flag.Duration("timeout", time.Minute, "idle timeout")
	flag.Parse()

	if *smuxVersion != 1 && *smuxVersion != 2 {
		log.Fatal("-smux-version must be 1 or 2")
	}
	if *timeout <= 0 {
		log.Fatal("-timeout must be positive")
	}
	if (*certFile == "") != (*keyFile == "") {
		log.Fatal("-cert and -key go together")
	}

	s := &relay{
		routes:  routes,
		mux:     *enableMux,
		timeout: *timeout,
		upgrader: websocket.Upgrader{
			HandshakeTimeout: handshakeTimeout,
			Subprotocols:     []string{"smux_on", "smux_off"},
		},
		dialer: net.Dialer{Timeout: handshakeTimeout},
		smuxConfig: &smux.Config{
			Version:           *smuxVersion,
			KeepAliveInterval: 30 * time.Second,
			KeepAliveTimeout:  70 * time.Second,
			MaxFrameSize:      16384,
			MaxReceiveBuffer:  262144,
			MaxStreamBuffer:   65536,
		},
	}

	l, err := net.Listen("tcp", *bind)
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	var tlsConf *tls.Config
	switch {
	case *certFile != "":
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatalf("load cert: %v", err)
		}
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}}
	case *selfSign:
		cert, err := selfSigned()
		if err != nil {
			log.Fatalf("generate cert: %v", err)
		}
		tlsConf = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
	if tlsConf != nil {
		tlsConf.NextProtos = []string{"http/1.1"}
		l = tls.NewListener(l, tlsConf)
	}
	srv := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: handshakeTimeout,
		ErrorLog:          log.New(io.Discard, "", 0),
	}
	fmt.Printf("listening %s\n", l.Addr())
	log.Fatal(srv.Serve(l))
}

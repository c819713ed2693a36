// Command edclient is a test stand-in for the WebSocket transport of Xray's
// client (and v2fly's with earlyDataHeaderName "Sec-WebSocket-Protocol")
// with early data: a local TCP listener whose every connection becomes one
// WebSocket carrying one byte stream, dialed the way those clients dial:
//
//   - the ws path is configured as Xray configs spell it, "/p1?ed=2048": the
//     `ed` query parameter is taken out of the path (the rest of the query
//     stays) and becomes the early-data size, as Xray's config builder does;
//   - the WebSocket is not dialed before the first local bytes: they go,
//     base64.RawURLEncoding (no padding), in the Sec-WebSocket-Protocol
//     request header; the rest of the stream follows in binary messages.
//     (Xray puts its first write in the header when it fits in ed bytes and
//     sends none otherwise; v2fly takes the first ed bytes and writes the
//     rest as a message. This client reads at most ed bytes first, which is
//     what either sends when the first write is not larger.)
//
// With -protocol V it sends V as Sec-WebSocket-Protocol instead and no early
// data. Each dial is reported on stderr as one line "event <json>":
//
//	{"event":"open","early":N,"sent":"<header sent>","echo":"<header in the 101>","path":"/p1"}
//	{"event":"refused","status":N,"path":"/p1","error":"..."}
//
// It prints "listening <addr>" on stdout once the local listener is up.
//
// Flags: -b -s -path -wss -sni -ca -protocol -timeout
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

const copyBufferSize = 16 * 1024

var stderrMu sync.Mutex

func event(fields map[string]interface{}) {
	line, _ := json.Marshal(fields)
	stderrMu.Lock()
	defer stderrMu.Unlock()
	fmt.Fprintf(os.Stderr, "event %s\n", line)
}

// splitEd takes `ed` out of a configured path as Xray's WebSocketConfig.Build does.
func splitEd(path string) (string, int) {
	u, err := url.Parse(path)
	if err != nil {
		return path, 0
	}
	q := u.Query()
	if q.Get("ed") == "" {
		return path, 0
	}
	ed, _ := strconv.Atoi(q.Get("ed"))
	q.Del("ed")
	u.RawQuery = q.Encode()
	return u.String(), ed
}

type client struct {
	server   string
	host     string
	path     string
	ed       int
	protocol string
	wss      bool
	tls      *tls.Config
	timeout  time.Duration
}

func (c *client) dial(early []byte) (*websocket.Conn, error) {
	dialer := &websocket.Dialer{
		NetDial: func(network, addr string) (net.Conn, error) {
			return net.DialTimeout("tcp", c.server, c.timeout)
		},
		TLSClientConfig:  c.tls,
		ReadBufferSize:   4 * 1024,
		WriteBufferSize:  4 * 1024,
		HandshakeTimeout: 8 * time.Second,
	}
	scheme := "ws"
	if c.wss {
		scheme = "wss"
	}
	header := http.Header{}
	sent := c.protocol
	if early != nil {
		sent = base64.RawURLEncoding.EncodeToString(early)
	}
	if sent != "" {
		header.Set("Sec-WebSocket-Protocol", sent)
	}
	ws, resp, err := dialer.Dial(scheme+"://"+c.host+c.path, header)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		event(map[string]interface{}{
			"event": "refused", "status": status, "path": c.path, "error": err.Error(),
		})
		return nil, err
	}
	event(map[string]interface{}{
		"event": "open", "early": len(early), "sent": sent, "path": c.path,
		"echo": resp.Header.Get("Sec-WebSocket-Protocol"),
	})
	return ws, nil
}

func (c *client) serve(local net.Conn) {
	defer local.Close()
	var early []byte
	if c.ed > 0 && c.protocol == "" {
		// Nothing is dialed before the first bytes (Xray's delayDialConn).
		buf := make([]byte, c.ed)
		local.SetReadDeadline(time.Now().Add(c.timeout))
		n, err := local.Read(buf)
		if n == 0 {
			if err != nil && err != io.EOF {
				log.Printf("first read: %v", err)
			}
			return
		}
		local.SetReadDeadline(time.Time{})
		early = buf[:n]
	}
	ws, err := c.dial(early)
	if err != nil {
		return
	}
	defer ws.Close()
	var once sync.Once
	done := make(chan struct{})
	stop := func() { once.Do(func() { close(done) }) }
	go func() { // local -> WebSocket
		defer stop()
		buf := make([]byte, copyBufferSize)
		for {
			n, err := local.Read(buf)
			if n > 0 {
				if werr := ws.WriteMessage(websocket.BinaryMessage, buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	go func() { // WebSocket -> local
		defer stop()
		for {
			_, r, err := ws.NextReader()
			if err != nil {
				return
			}
			if _, err := io.Copy(local, r); err != nil {
				return
			}
		}
	}()
	<-done
	ws.WriteControl(websocket.CloseMessage,
		websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""),
		time.Now().Add(100*time.Millisecond))
}

func main() {
	bind := flag.String("b", "127.0.0.1:0", "local listen address")
	server := flag.String("s", "", "server address host:port")
	path := flag.String("path", "/", "ws path as configured, e.g. /p1?ed=2048")
	wss := flag.Bool("wss", false, "TLS")
	sni := flag.String("sni", "", "server name (SNI and Host); default: -s")
	caFile := flag.String("ca", "", "PEM CA to verify the server with")
	protocol := flag.String("protocol", "", "send this Sec-WebSocket-Protocol and no early data")
	timeout := flag.Duration("timeout", 10*time.Second, "dial and first-read timeout")
	flag.Parse()

	c := &client{server: *server, host: *sni, protocol: *protocol, wss: *wss, timeout: *timeout}
	if c.host == "" {
		c.host = *server
	}
	c.path, c.ed = splitEd(*path)
	if *wss {
		name, _, err := net.SplitHostPort(c.host)
		if err != nil {
			name = c.host
		}
		c.tls = &tls.Config{ServerName: name, NextProtos: []string{"http/1.1"}}
		if *caFile != "" {
			pem, err := os.ReadFile(*caFile)
			if err != nil {
				log.Fatal(err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				log.Fatal("no certificate in -ca")
			}
			c.tls.RootCAs = pool
		}
	}
	ln, err := net.Listen("tcp", *bind)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	for {
		local, err := ln.Accept()
		if err != nil {
			log.Fatal(err)
		}
		go c.serve(local)
	}
}

"""The TLS listener's first-bytes step against the real server: a ClientHello
however segmented still handshakes (alone, after a PROXY header, on a Unix
socket), plain HTTP gets nginx's page for it, and every failure is one log line
naming the peer and the reason."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path

import pytest

from mtt.accept.front import TO_HTTPS_PAGE
from tests.integration.hostile_helpers import client_hello
from tests.integration.test_proxy_protocol import v1, wait_for_log
from tests.support import ServerProcess, running_server

GET = b"GET /nobody HTTP/1.1\r\nHost: tunnel.test\r\nConnection: close\r\n\r\n"


def tls_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def read_all(sock: socket.socket, limit_s: float = 10) -> bytes:
    sock.settimeout(limit_s)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def get_over_tls(sock: socket.socket, piece: int, sent: int = 0) -> bytes:
    """A TLS handshake whose first flight goes out in `piece`-byte segments
    (but its first `sent` bytes, already sent), then a GET; the answer."""
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = tls_client().wrap_bio(incoming, outgoing, server_hostname="tunnel.test")
    first = True
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        flight = outgoing.read()
        if first:  # the ClientHello, in small writes that are not coalesced
            for at in range(sent, len(flight), piece):
                sock.sendall(flight[at : at + piece])
                time.sleep(0.002)
            first = False
        elif flight:
            sock.sendall(flight)
        chunk = sock.recv(65536)
        assert chunk, "closed during the handshake"
        incoming.write(chunk)
    sock.sendall(outgoing.read())
    tls.write(GET)
    sock.sendall(outgoing.read())
    answer = b""
    while b"</html>" not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            break
        incoming.write(chunk)
        with contextlib.suppress(ssl.SSLWantReadError):
            answer += tls.read(65536)
    return answer


@pytest.fixture(scope="module")
def tls_listener(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    with running_server("-force-tls", "-n", "tunnel.test", "-workers", "1") as server:
        yield server  # type: ignore[misc]


@pytest.mark.parametrize("piece", [1, 7, 100_000], ids=["1-byte", "7-byte", "whole"])
def test_client_hello_however_split_handshakes(tls_listener: ServerProcess, piece: int) -> None:
    with socket.create_connection(("127.0.0.1", tls_listener.port)) as sock:
        answer = get_over_tls(sock, piece)
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n"), answer[:200]


def test_after_a_proxy_header_a_split_hello_handshakes(cert_files: tuple[Path, Path]) -> None:
    with (
        running_server(
            "-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-proxy-protocol"
        ) as server,
        socket.create_connection(("127.0.0.1", server.port)) as sock,
    ):
        sock.sendall(v1("192.0.2.8", 4242) + b"\x16")  # the hello's first byte rides along
        answer = get_over_tls(sock, 1, sent=1)
        assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n"), answer[:200]
        wait_for_log(server, '192.0.2.8:4242: no user for path "/nobody"')


def test_plain_http_after_a_proxy_header_gets_nginx_page(cert_files: tuple[Path, Path]) -> None:
    with (
        running_server(
            "-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-proxy-protocol"
        ) as server,
        socket.create_connection(("127.0.0.1", server.port)) as sock,
    ):
        sock.sendall(v1("192.0.2.9", 4343) + b"GET / HTTP/1.0\r\n\r\n")
        answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\n")
        assert answer.endswith(b"\r\n\r\n" + TO_HTTPS_PAGE)
        line = wait_for_log(server, "192.0.2.9:4343:")
        assert "plain HTTP request to the TLS port" in line


def test_unix_socket_tls_listener(tmp_path: Path, cert_files: tuple[Path, Path]) -> None:
    path = tmp_path / "tunnel.sock"
    with running_server(
        "-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-bind-unix", bind=str(path)
    ):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            assert get_over_tls(sock, 1).startswith(b"HTTP/1.1 404 Not Found\r\n")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert read_all(sock).endswith(TO_HTTPS_PAGE)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "closed before a TLS ClientHello"),
        (b"\x16\x03\x01\x00\x05hello", "TLS handshake failed: "),
        (b"GET / HTTP/1.0\r\n\r\n", "plain HTTP request to the TLS port"),
        (b"HELP\r\n", "plain HTTP to the TLS port: bad request line"),
        (client_hello(), "closed during the TLS handshake"),
    ],
    ids=["silent", "bad-record", "plain-http", "bad-line", "hello-then-eof"],
)
def test_each_failure_is_one_log_line(
    tls_listener: ServerProcess, data: bytes, reason: str
) -> None:
    mark = len(tls_listener.lines)
    with socket.create_connection(("127.0.0.1", tls_listener.port)) as sock:
        port = sock.getsockname()[1]
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        read_all(sock)
    line = wait_for_log(tls_listener, f"127.0.0.1:{port}:")
    assert reason in line, line
    time.sleep(0.2)
    mine = [ln for ln in tls_listener.lines[mark:] if f"127.0.0.1:{port}:" in ln]
    assert len(mine) == 1, mine
    assert not [ln for ln in tls_listener.lines[mark:] if "mtt.loop" in ln]  # no second line
    assert "Traceback" not in tls_listener.log_text()

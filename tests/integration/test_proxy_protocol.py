"""-proxy-protocol and -trusted-proxy against the real server: PROXY headers
written by hand, then a tunnel through the same connection; the logged peer
must be the client the header (or X-Forwarded-For) names."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest
from websockets.asyncio.client import connect

from tests.integration.test_tunnel import echo_roundtrip
from tests.support import ServerProcess, echo_server, pattern, running_server

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src: str, sport: int, dport: int = 443) -> bytes:
    proto, dst = ("TCP6", "::1") if ":" in src else ("TCP4", "127.0.0.1")
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, sport: int, *, local: bool = False, tlv: bytes = b"") -> bytes:
    if ":" in src:
        family = 0x21
        block = socket.inet_pton(socket.AF_INET6, src) + bytes(16)
    else:
        family = 0x11
        block = socket.inet_aton(src) + socket.inet_aton("127.0.0.1")
    block += struct.pack("!HH", sport, 443) + tlv
    return (
        V2_SIGNATURE
        + bytes([0x20 if local else 0x21, family])
        + struct.pack("!H", len(block))
        + block
    )


class Reachable(Protocol):
    """The server, or a proxy in front of it: a port to connect to, users to add."""

    @property
    def port(self) -> int: ...

    def add(self, path: str, dst: str) -> None: ...


def connected(server: Reachable, source: str = "127.0.0.1") -> socket.socket:
    """A socket to the tunnel port from a chosen loopback source address."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    return sock


async def tunnel_through(
    server: Reachable,
    sock: socket.socket,
    ctx: ssl.SSLContext | None,
    path: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Open a plain tunnel on an already connected socket and echo through it."""
    async with echo_server() as echo:
        server.add(path, echo.addr)
        async with connect(
            f"{'wss' if ctx else 'ws'}://tunnel.test:{server.port}{path}",
            sock=sock,
            ssl=ctx,
            server_hostname="tunnel.test" if ctx else None,
            subprotocols=["smux_off"],  # type: ignore[list-item]
            additional_headers=headers,
            max_size=None,
            compression=None,
            open_timeout=10,
        ) as ws:
            payload = pattern(7, 100_000)
            assert await echo_roundtrip(ws, payload) == payload


def wait_for_log(server: ServerProcess, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(server.lines):
            if text in line:
                return line
        time.sleep(0.02)
    raise AssertionError(f"no log line with {text!r}:\n{server.log_text()}")


def assert_closed(sock: socket.socket) -> None:
    sock.setblocking(True)
    sock.settimeout(5)
    try:
        assert sock.recv(4096) == b""
    except ConnectionResetError:
        pass
    finally:
        sock.close()


@pytest.fixture
def pp_tls_server(cert_files: tuple[Path, Path]) -> Iterator[ServerProcess]:
    with running_server(
        "-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-proxy-protocol", "-verbose"
    ) as s:
        yield s


@pytest.mark.parametrize(
    ("header", "peer"),
    [
        (v1("192.0.2.7", 40001), "192.0.2.7:40001"),
        (v1("2001:db8::7", 40002), "[2001:db8::7]:40002"),
        (v2("198.51.100.9", 40003), "198.51.100.9:40003"),
        (v2("2001:db8::9", 40004, tlv=b"\x04\x00\x03abc"), "[2001:db8::9]:40004"),
    ],
    ids=["v1-tcp4", "v1-tcp6", "v2-inet", "v2-inet6-tlv"],
)
async def test_header_names_the_logged_peer_over_tls(
    pp_tls_server: ServerProcess, client_tls: ssl.SSLContext, header: bytes, peer: str
) -> None:
    sock = connected(pp_tls_server)
    sock.send(header)  # alone: the ClientHello follows in its own segment
    await tunnel_through(pp_tls_server, sock, client_tls, "/pp")
    wait_for_log(pp_tls_server, f"{peer} /pp: upgrade")


async def test_header_and_client_hello_in_one_segment(
    pp_tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    """Bytes read together with the header reach the TLS layer, none lost."""

    class Prefixed(socket.socket):
        sent = False

        def send(self, data: bytes, *args: int) -> int:  # type: ignore[override]
            if not self.sent:
                self.sent = True
                header = v2("203.0.113.5", 40010)
                super().sendall(header + bytes(data), *args)
                return len(data)
            return super().send(data, *args)

    plain = connected(pp_tls_server)
    sock = Prefixed(fileno=plain.detach())
    sock.setblocking(False)
    await tunnel_through(pp_tls_server, sock, client_tls, "/one")
    assert sock.sent
    wait_for_log(pp_tls_server, "203.0.113.5:40010 /one: upgrade")


async def test_local_command_uses_the_real_peer(
    pp_tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    sock = connected(pp_tls_server, "127.0.0.3")
    sock.send(v2("192.0.2.1", 1, local=True))
    await tunnel_through(pp_tls_server, sock, client_tls, "/local")
    wait_for_log(pp_tls_server, "127.0.0.3:")
    assert "192.0.2.1" not in pp_tls_server.log_text()


async def test_plain_http_listener_with_v1_unknown() -> None:
    with running_server("-proxy-protocol", "-verbose") as server:
        sock = connected(server, "127.0.0.4")
        sock.send(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
        await tunnel_through(server, sock, None, "/plain")
        wait_for_log(server, "127.0.0.4:")
        sock = connected(server)
        sock.send(v1("192.0.2.44", 5555))
        await tunnel_through(server, sock, None, "/plain2")
        wait_for_log(server, "192.0.2.44:5555 /plain2: upgrade")


def test_connection_without_header_is_closed(
    pp_tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    raw = connected(pp_tls_server, "127.0.0.5")
    raw.setblocking(True)
    with pytest.raises((ssl.SSLError, OSError)):
        client_tls.wrap_socket(raw, server_hostname="tunnel.test").do_handshake()
    raw.close()
    line = wait_for_log(pp_tls_server, "127.0.0.5:")
    assert "not a PROXY protocol header" in line


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"PROXY TCP4 300.1.1.1 127.0.0.1 1 2\r\n", "v1 address"),
        (b"PROXY TCP4 1.2.3.4 127.0.0.1 99999 2\r\n", "v1 port"),
        (b"PROXY " + b"A" * 200, "longer than 107"),
        (b"GET / HTTP/1.1\r\n\r\n", "not a PROXY protocol header"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "more than"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "version 3"),
    ],
    ids=["v1-bad-ip", "v1-bad-port", "v1-too-long", "http", "v2-too-big", "v2-version"],
)
def test_garbage_header_is_refused_and_server_stays_up(
    pp_tls_server: ServerProcess, client_tls: ssl.SSLContext, garbage: bytes, reason: str
) -> None:
    sock = connected(pp_tls_server, "127.0.0.6")
    sock.setblocking(True)
    sock.sendall(garbage)
    assert_closed(sock)
    line = wait_for_log(pp_tls_server, reason)
    assert "127.0.0.6:" in line
    assert pp_tls_server.proc.poll() is None
    status, _ = pp_tls_server.control({"opt": 9})
    assert status == 200


def test_eof_mid_header_is_refused() -> None:
    with running_server("-proxy-protocol") as server:
        sock = connected(server, "127.0.0.7")
        sock.setblocking(True)
        sock.sendall(b"PROXY TCP4 ")
        sock.shutdown(socket.SHUT_WR)  # EOF mid-header: refused at once
        assert_closed(sock)
        assert "closed before sending a PROXY protocol header" in wait_for_log(server, "127.0.0.7:")


async def test_header_ignored_from_untrusted_peer(
    cert_files: tuple[Path, Path], client_tls: ssl.SSLContext
) -> None:
    """With -trusted-proxy, a PROXY header from elsewhere is read but not believed."""
    with running_server(
        "-cert", str(cert_files[0]), "-key", str(cert_files[1]),
        "-proxy-protocol", "-trusted-proxy", "127.0.0.1/32", "-verbose",
    ) as server:  # fmt: skip
        sock = connected(server, "127.0.0.8")
        sock.send(v1("192.0.2.66", 6666))
        await tunnel_through(server, sock, client_tls, "/untrusted")
        wait_for_log(server, "127.0.0.8:")
        assert "192.0.2.66:6666 /untrusted" not in server.log_text()
        sock = connected(server, "127.0.0.1")
        sock.send(v1("192.0.2.67", 6667))
        await tunnel_through(server, sock, client_tls, "/trusted")
        wait_for_log(server, "192.0.2.67:6667 /trusted: upgrade")


async def test_forwarded_for_only_from_trusted_peers(
    cert_files: tuple[Path, Path], client_tls: ssl.SSLContext
) -> None:
    with running_server(
        "-cert", str(cert_files[0]), "-key", str(cert_files[1]),
        "-trusted-proxy", "127.0.0.1/32", "-trusted-proxy", "10.0.0.0/8", "-verbose",
    ) as server:  # fmt: skip
        headers = {"X-Forwarded-For": "6.6.6.6, 192.0.2.9, 10.1.2.3"}
        await tunnel_through(server, connected(server), client_tls, "/xff", headers)
        wait_for_log(server, "192.0.2.9 /xff: upgrade")
        await tunnel_through(
            server, connected(server), client_tls, "/real", {"X-Real-IP": "192.0.2.10"}
        )
        wait_for_log(server, "192.0.2.10 /real: upgrade")
        await tunnel_through(server, connected(server, "127.0.0.9"), client_tls, "/spoof", headers)
        assert "127.0.0.9:" in wait_for_log(server, "/spoof: upgrade")
        assert "6.6.6.6" not in server.log_text() and "192.0.2.9 /spoof" not in server.log_text()


async def test_proxy_protocol_with_workers(
    cert_files: tuple[Path, Path], client_tls: ssl.SSLContext
) -> None:
    """The flags reach worker processes through the JSON config."""
    with running_server(
        "-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-workers", "2",
        "-proxy-protocol", "-trusted-proxy", "127.0.0.0/8", "-verbose",
    ) as server:  # fmt: skip
        for i in range(4):
            sock = connected(server)
            sock.send(v1(f"192.0.2.{100 + i}", 7000 + i))
            await tunnel_through(server, sock, client_tls, f"/w{i}")
            wait_for_log(server, f"192.0.2.{100 + i}:{7000 + i} /w{i}: upgrade")


async def test_no_flags_keeps_the_direct_peer() -> None:
    """Without -trusted-proxy forwarding headers mean nothing."""
    with running_server("-verbose") as server:
        headers = {"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.7"}
        await tunnel_through(server, connected(server, "127.0.0.10"), None, "/d", headers)
        assert "127.0.0.10:" in wait_for_log(server, "/d: upgrade")
        assert "6.6.6" not in server.log_text()


async def test_unix_socket_listener_takes_the_header(tmp_path: Path) -> None:
    """nginx can proxy_pass to unix:/path with proxy_protocol on."""
    path = tmp_path / "mtt.sock"
    with running_server("-bind-unix", "-proxy-protocol", "-verbose", bind=str(path)) as server:

        class Unix:
            port = 0

            def add(self, route: str, dst: str) -> None:
                server.add(route, dst)

        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        sock.send(v2("192.0.2.77", 7777))
        sock.setblocking(False)
        await tunnel_through(Unix(), sock, None, "/ux")
        wait_for_log(server, "192.0.2.77:7777 /ux: upgrade")
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        sock.send(v2("192.0.2.78", 1, local=True))  # LOCAL: the peer is the socket
        sock.setblocking(False)
        await tunnel_through(Unix(), sock, None, "/ux2")
        assert " unix /ux2: upgrade" in wait_for_log(server, "/ux2: upgrade")

"""To a prober without a user path the server answers exactly as a real nginx
(Debian's, with the ssl_* lines of Debian's /etc/nginx/nginx.conf and
server_tokens off) answers for a site that has nothing there: over TLS, to
plain HTTP sent to the TLS port, and to handshakes OpenSSL refuses."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support import ServerProcess, running_server

from .test_behind_nginx import free_port, nginx_argv, running

pytestmark = pytest.mark.interop

NGINX_404_SITE = """
user root;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    server_tokens off;
    default_type text/html;
    # SSL Settings of Debian's /etc/nginx/nginx.conf
    ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3; # Dropping SSLv3, ref: POODLE
    ssl_prefer_server_ciphers on;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 404; }}
    }}
}}
"""

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = (
    f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: smux_off\r\n"
)
PROBES = {
    "GET of a user's path": "GET /secret HTTP/1.1\r\nHost: tunnel.test\r\n\r\n",
    "GET of an unknown path": "GET /nobody HTTP/1.1\r\nHost: tunnel.test\r\n\r\n",
    "upgrade on an unknown path": f"GET /nobody HTTP/1.1\r\nHost: tunnel.test\r\n{UPGRADE}\r\n",
    "upgrade with a wrong version on a user's path": (
        "GET /secret HTTP/1.1\r\nHost: tunnel.test\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 8\r\n\r\n"
    ),
    "HEAD of a user's path": "HEAD /secret HTTP/1.1\r\nHost: tunnel.test\r\n\r\n",
    "GET of the root, closing": "GET / HTTP/1.1\r\nHost: tunnel.test\r\nConnection: close\r\n\r\n",
    "GET over HTTP/1.0": "GET /secret HTTP/1.0\r\n\r\n",
}


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path]) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("nginx404")
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_404_SITE.format(tmp=tmp, port=port, cert=tls_files[0], key=tls_files[1]))
    with running(nginx_argv(tmp, conf), port):
        yield port


@pytest.fixture(scope="module")
def ours(tls_files: tuple[Path, Path]) -> Iterator[ServerProcess]:
    with running_server("-cert", str(tls_files[0]), "-key", str(tls_files[1])) as server:
        server.add("/secret", "127.0.0.1:9")
        yield server


def ask(
    port: int, request: str, requests: int = 1
) -> list[tuple[str, list[tuple[str, str]], bytes]]:
    """Send the request `requests` times on one TLS connection; parse each answer."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="tunnel.test") as tls,
    ):
        tls.sendall(request.encode() * requests)
        data = b""
        deadline = time.monotonic() + 10
        answers: list[tuple[str, list[tuple[str, str]], bytes]] = []
        while len(answers) < requests and time.monotonic() < deadline:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
            while b"\r\n\r\n" in data:
                head, rest = data.split(b"\r\n\r\n", 1)
                lines = head.decode().split("\r\n")
                headers = [tuple(x.split(": ", 1)) for x in lines[1:]]
                length = int(dict(headers).get("Content-Length", "0"))
                if request.startswith("HEAD"):
                    length = 0
                if len(rest) < length:
                    break
                answers.append((lines[0], [h for h in headers if h[0] != "Date"], rest[:length]))  # type: ignore[misc]
                data = rest[length:]
        return answers


@pytest.mark.parametrize("probe", PROBES)
def test_answers_match_a_real_nginx(nginx: int, ours: ServerProcess, probe: str) -> None:
    theirs = ask(nginx, PROBES[probe])
    mine = ask(ours.port, PROBES[probe])
    assert theirs, "nginx answered nothing"
    assert mine == theirs


def test_keep_alive_behaves_like_nginx(nginx: int, ours: ServerProcess) -> None:
    request = PROBES["GET of a user's path"]
    assert ask(ours.port, request, requests=3) == ask(nginx, request, requests=3)


def test_nothing_names_the_software(ours: ServerProcess) -> None:
    for request in PROBES.values():
        for status, headers, body in ask(ours.port, request):
            text = (status + str(headers)).lower() + body.decode().lower()
            for word in ("python", "picows", "aiohttp", "mtt", "uvloop", "websocket"):
                assert word not in text


def test_malformed_request_gets_nginx_400(nginx: int, ours: ServerProcess) -> None:
    request = "GARBAGE\r\n\r\n"
    mine = ask(ours.port, request)
    theirs = ask(nginx, request)
    assert mine[0][0] == theirs[0][0] == "HTTP/1.1 400 Bad Request"
    assert mine[0][2] == theirs[0][2]


def test_a_valid_upgrade_still_works(ours: ServerProcess) -> None:
    status = ask(ours.port, f"GET /secret HTTP/1.1\r\nHost: tunnel.test\r\n{UPGRADE}\r\n")
    assert status[0][0] == "HTTP/1.1 101 Switching Protocols"
    assert ("Sec-WebSocket-Protocol", "smux_off") in status[0][1]


# -- before TLS: plain HTTP to the TLS port, and handshakes OpenSSL refuses ------------

# What a scanner sends besides nmap's probes (test_tls_fingerprint.py runs those).
PLAIN_PROBES = {
    "HTTP/1.0 GET": b"GET / HTTP/1.0\r\n\r\n",
    "GET with Host": b"GET /secret HTTP/1.1\r\nHost: tunnel.test\r\n\r\n",
    "HEAD": b"HEAD / HTTP/1.1\r\nHost: tunnel.test\r\n\r\n",
    "HTTP/1.1 without Host": b"GET / HTTP/1.1\r\n\r\n",
    "POST with its body": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    "empty lines first": b"\r\n\r\nGET / HTTP/1.0\r\n\r\n",
    "HTTP/0.9 GET": b"GET /\r\n",
    "HTTP/0.9 POST": b"POST /\r\n",
    "HTTP/2.0": b"GET / HTTP/2.0\r\n\r\n",
    "lower-case method": b"get / HTTP/1.0\r\n\r\n",
    "target without a slash": b"GET x HTTP/1.0\r\n\r\n",
    "absolute target": b"GET http://tunnel.test/ HTTP/1.0\r\n\r\n",
    "bad header": b"GET / HTTP/1.0\r\nBad Header\r\n\r\n",
    "two Host headers": b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
    "garbage": b"GARBAGE\r\n\r\n",
    "random bytes": b"G\x91\x07\xfe\x00" * 50,
    "NUL": b"\x00",
}


def client_hello(**options: Any) -> bytes:
    """A real client's first flight; options set on its context."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for name, value in options.items():
        if name == "alpn":
            ctx.set_alpn_protocols(value)
        elif name == "ciphers":
            ctx.set_ciphers(value)
        else:
            setattr(ctx, name, value)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="tunnel.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def old_tls_hello(version: ssl.TLSVersion) -> bytes:
    with warnings.catch_warnings():  # TLSv1 and 1.1 are deprecated in ssl: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        return client_hello(
            ciphers="DEFAULT:@SECLEVEL=0", minimum_version=version, maximum_version=version
        )


REFUSED_HELLOS: dict[str, Callable[[], bytes]] = {
    "a handshake record of garbage": lambda: b"\x16\x03\x01\x00\x05hello",
    "ALPN offering only h2": lambda: client_hello(alpn=["h2"]),
    "TLS 1.0 only": lambda: old_tls_hello(ssl.TLSVersion.TLSv1),
    "TLS 1.1 only": lambda: old_tls_hello(ssl.TLSVersion.TLSv1_1),
    "no shared cipher": lambda: client_hello(
        ciphers="AES128-SHA", maximum_version=ssl.TLSVersion.TLSv1_2
    ),
}

_DATE = re.compile(rb"Date: [^\r\n]*\r\n")


def raw_exchange(port: int, data: bytes, limit_s: float = 10) -> tuple[bytes, bool]:
    """Send data on a plain TCP connection; (what came back, Date blanked; closed?)."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as sock:
        sock.sendall(data)
        got = b""
        closed = False
        deadline = time.monotonic() + limit_s
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                got += chunk
    return _DATE.sub(b"Date: -\r\n", got), closed


def both(nginx: int, ours: int, data: bytes, limit_s: float = 10) -> list[tuple[bytes, bool]]:
    """The same bytes to nginx and to us, at once (a slow answer costs its time once)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda port: raw_exchange(port, data, limit_s), (nginx, ours)))


@pytest.mark.parametrize("probe", PLAIN_PROBES)
def test_plain_http_to_the_tls_port_gets_nginx_answer(
    nginx: int, ours: ServerProcess, probe: str
) -> None:
    theirs, mine = both(nginx, ours.port, PLAIN_PROBES[probe], limit_s=8)
    assert theirs[1], "nginx did not close"
    assert mine == theirs


def test_plain_http_with_a_body_to_come_is_closed_when_nginx_closes(
    nginx: int, ours: ServerProcess
) -> None:
    """nginx waits 5 s (lingering) for a body it was announced, then closes."""
    started = time.monotonic()
    request = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
    theirs, mine = both(nginx, ours.port, request, limit_s=15)
    assert theirs[1] and mine == theirs
    assert 4 < time.monotonic() - started < 12


@pytest.mark.parametrize("hello", REFUSED_HELLOS)
def test_refused_handshakes_get_nginx_alert(nginx: int, ours: ServerProcess, hello: str) -> None:
    theirs, mine = both(nginx, ours.port, REFUSED_HELLOS[hello]())
    assert theirs[1], "nginx did not close"
    assert mine == theirs


def _records(data: bytes) -> list[tuple[int, bytes]]:
    """(content type, version) of each TLS record: lengths vary with the signature."""
    out = []
    while len(data) >= 5:
        out.append((data[0], data[1:3]))
        data = data[5 + int.from_bytes(data[3:5], "big") :]
    return out


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_garbage_after_a_good_hello_gets_nginx_records(
    nginx: int, ours: ServerProcess, version: ssl.TLSVersion
) -> None:
    """The server's flight goes out, then an alert (encrypted in TLS 1.3)."""
    data = client_hello(maximum_version=version) + b"GARBAGE\r\n" * 4
    theirs, mine = both(nginx, ours.port, data)
    assert theirs[1] and mine[1]
    assert len(_records(theirs[0])) >= 4
    assert _records(mine[0]) == _records(theirs[0])


@pytest.fixture(scope="module")
def ours_with_fallback(tls_files: tuple[Path, Path], nginx: int) -> Iterator[ServerProcess]:
    with running_server(
        "-cert",
        str(tls_files[0]),
        "-key",
        str(tls_files[1]),
        "-fallback",
        f"https://127.0.0.1:{nginx}",
    ) as server:
        yield server


def test_plain_http_is_relayed_to_an_https_decoy_as_plain_http(
    nginx: int, ours_with_fallback: ServerProcess
) -> None:
    """With -fallback https://..., plain HTTP goes to the decoy's TLS port as
    it came, so the decoy answers it with its own page for that."""
    for probe in ("HTTP/1.0 GET", "HTTP/0.9 GET", "garbage"):
        theirs, mine = both(nginx, ours_with_fallback.port, PLAIN_PROBES[probe])
        assert theirs[1] and mine == theirs, probe

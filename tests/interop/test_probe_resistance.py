"""To a prober without a user path the server answers exactly as a real nginx
(Debian's, server_tokens off) answers for a site that has nothing there."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

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

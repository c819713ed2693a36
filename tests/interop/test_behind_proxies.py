"""Real client addresses behind a real nginx, haproxy and Caddy (Debian's):
PROXY protocol v1 from nginx's stream module, v1 and v2 from haproxy in TCP
mode, X-Forwarded-For from all three in HTTP mode. The test client binds its
source to 127.0.0.x, so the address the server logs tells which one it took.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_proxy_protocol import connected, tunnel_through, wait_for_log
from tests.support import ServerProcess, running_server

from .test_behind_nginx import free_port, nginx_argv, running

pytestmark = pytest.mark.interop

NGINX_CONF = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
user root;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
stream {{
    server {{
        listen 127.0.0.1:{stream_port};
        proxy_pass {upstream};
        proxy_protocol on;
    }}
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{http_port};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
        }}
    }}
}}
"""

HAPROXY_CONF = """
global
    maxconn 256
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout tunnel 30s
frontend fe
    mode {mode}
    bind 127.0.0.1:{port}
    {forwardfor}
    default_backend be
backend be
    mode {mode}
    server s1 {upstream} {send_proxy}
"""


CADDYFILE = """
{{
    admin off
    auto_https off
    storage file_system {tmp}/caddy-data
}}
http://:{port} {{
    bind 127.0.0.1
    reverse_proxy {upstream}
}}
"""


@pytest.fixture
def client_ctx(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files[0]))


@contextlib.contextmanager
def nginx(tmp: Path, server: ServerProcess) -> Iterator[tuple[int, int]]:
    """nginx with a stream server (proxy_protocol on) and an http server (XFF)."""
    stream_port, http_port = free_port(), free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp, stream_port=stream_port, http_port=http_port, upstream=server.tunnel
        )
    )
    with running(nginx_argv(tmp, conf), stream_port, http_port):
        yield stream_port, http_port


@contextlib.contextmanager
def haproxy(tmp: Path, server: ServerProcess, mode: str, send_proxy: str = "") -> Iterator[int]:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    port = free_port()
    conf = tmp / f"haproxy-{uuid.uuid4().hex}.cfg"
    forwardfor = "option forwardfor" if mode == "http" else ""
    conf.write_text(
        HAPROXY_CONF.format(
            mode=mode,
            port=port,
            forwardfor=forwardfor,
            upstream=server.tunnel,
            send_proxy=send_proxy,
        )
    )
    with running([binary, "-db", "-f", str(conf)], port):
        yield port


@contextlib.contextmanager
def caddy(tmp: Path, server: ServerProcess) -> Iterator[int]:
    """Caddy's reverse_proxy, which passes WebSocket upgrades and adds X-Forwarded-For."""
    binary = shutil.which("caddy") or "/usr/bin/caddy"
    port = free_port()
    conf = tmp / "Caddyfile"
    conf.write_text(CADDYFILE.format(tmp=tmp, port=port, upstream=server.tunnel))
    argv = [binary, "run", "--config", str(conf), "--adapter", "caddyfile"]
    with running(argv, port, env={"XDG_CONFIG_HOME": str(tmp), "XDG_DATA_HOME": str(tmp)}):
        yield port


class Via:
    """The server as reached through a proxy port: what tunnel_through needs."""

    def __init__(self, server: ServerProcess, port: int) -> None:
        self.server = server
        self.port = port
        self.tunnel = f"127.0.0.1:{port}"

    def add(self, path: str, dst: str) -> None:
        self.server.add(path, dst)


def tls_args(tls_files: tuple[Path, Path]) -> list[str]:
    return ["-cert", str(tls_files[0]), "-key", str(tls_files[1])]


async def test_nginx_stream_proxy_protocol(
    tmp_path: Path, tls_files: tuple[Path, Path], client_ctx: ssl.SSLContext
) -> None:
    with (
        running_server(*tls_args(tls_files), "-proxy-protocol", "-verbose") as server,
        nginx(tmp_path, server) as (stream_port, _),
    ):
        via = Via(server, stream_port)
        await tunnel_through(via, connected(via, "127.0.0.2"), client_ctx, "/ngx")
        assert re.search(r" 127\.0\.0\.2:\d+ /ngx: upgrade", wait_for_log(server, "/ngx"))


async def test_nginx_http_forwarded_for(tmp_path: Path) -> None:
    with (
        running_server("-trusted-proxy", "127.0.0.1/32", "-verbose") as server,
        nginx(tmp_path, server) as (_, http_port),
    ):
        via = Via(server, http_port)
        spoof = {"X-Forwarded-For": "6.6.6.6"}
        await tunnel_through(via, connected(via, "127.0.0.3"), None, "/nx", spoof)
        line = wait_for_log(server, "/nx: upgrade")
        assert "127.0.0.3 /nx" in line
        assert "6.6.6.6" not in server.log_text()


@pytest.mark.parametrize(
    ("send_proxy", "source"), [("send-proxy", "127.0.0.4"), ("send-proxy-v2", "127.0.0.5")]
)
async def test_haproxy_tcp_proxy_protocol(
    tmp_path: Path,
    tls_files: tuple[Path, Path],
    client_ctx: ssl.SSLContext,
    send_proxy: str,
    source: str,
) -> None:
    with (
        running_server(
            *tls_args(tls_files), "-proxy-protocol", "-trusted-proxy", "127.0.0.1", "-verbose"
        ) as server,
        haproxy(tmp_path, server, "tcp", send_proxy) as port,
    ):
        via = Via(server, port)
        await tunnel_through(via, connected(via, source), client_ctx, "/hap")
        assert re.search(rf" {re.escape(source)}:\d+ /hap: upgrade", wait_for_log(server, "/hap"))


async def test_haproxy_http_forwarded_for(tmp_path: Path) -> None:
    with (
        running_server("-trusted-proxy", "127.0.0.0/8", "-verbose") as server,
        haproxy(tmp_path, server, "http") as port,
    ):
        via = Via(server, port)
        await tunnel_through(via, connected(via, "127.0.0.6"), None, "/hx")
        assert "127.0.0.6 /hx: upgrade" in wait_for_log(server, "/hx: upgrade")


async def test_spoofed_forwarded_for_is_not_taken(tmp_path: Path) -> None:
    """Only haproxy (127.0.0.1) is trusted: a client's own X-Forwarded-For
    entries are skipped through haproxy and ignored when it connects directly."""
    with (
        running_server("-trusted-proxy", "127.0.0.1/32", "-verbose") as server,
        haproxy(tmp_path, server, "http") as port,
    ):
        via = Via(server, port)
        spoof = {"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.7"}
        await tunnel_through(via, connected(via, "127.0.0.7"), None, "/via", spoof)
        assert "127.0.0.7 /via: upgrade" in wait_for_log(server, "/via: upgrade")
        await tunnel_through(server, connected(server, "127.0.0.8"), None, "/direct", spoof)
        assert "127.0.0.8:" in wait_for_log(server, "/direct: upgrade")
        assert "6.6.6" not in server.log_text()


async def test_caddy_reverse_proxy_forwarded_for(tmp_path: Path) -> None:
    with (
        running_server("-trusted-proxy", "127.0.0.1/32", "-verbose") as server,
        caddy(tmp_path, server) as port,
    ):
        via = Via(server, port)
        spoof = {"X-Forwarded-For": "6.6.6.6"}
        await tunnel_through(via, connected(via, "127.0.0.7"), None, "/cx", spoof)
        assert "127.0.0.7 /cx: upgrade" in wait_for_log(server, "/cx: upgrade")
        assert "6.6.6.6" not in server.log_text()

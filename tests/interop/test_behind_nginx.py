"""The plain-HTTP mode behind a real nginx that terminates TLS (Debian's nginx),
over TCP and over a Unix socket (`proxy_pass http://unix:`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness.gopeers import run_wsload
from harness.server import ServerProcess, start_server

from .test_server_with_go_clients import add_routes, echo_through, start_mttclient

pytestmark = pytest.mark.interop

MiB = 1 << 20

NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name tunnel.test;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 300s;
            proxy_buffering off;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], limit_s: float = 15) -> None:
    name = Path(str(proc.args[0])).name
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen")


@contextlib.contextmanager
def running(argv: list[str], *ports: int, env: dict[str, str] | None = None) -> Iterator[None]:
    """A proxy (nginx, haproxy, caddy) from start until it listens on ports, to its end."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    try:
        for port in ports:
            wait_listening(port, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nginx_argv(tmp: Path, conf: Path) -> list[str]:
    return [
        shutil.which("nginx") or "/usr/sbin/nginx",
        "-c",
        str(conf),
        "-e",
        str(tmp / "error.log"),
    ]


@pytest.fixture(params=["tcp", "unix"])
def behind_nginx(
    request: pytest.FixtureRequest, tmp_path: Path, tls_files: tuple[Path, Path]
) -> Iterator[tuple[ServerProcess, str]]:
    if request.param == "unix":
        sock = tmp_path / "mtt.sock"
        server = start_server("-bind-unix", bind=str(sock))
        upstream = f"http://unix:{sock}:"
    else:
        server = start_server()
        upstream = f"http://{server.tunnel}"
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp_path, port=port, cert=tls_files[0], key=tls_files[1], upstream=upstream
        )
    )
    try:
        with running(nginx_argv(tmp_path, conf), port):
            yield server, f"127.0.0.1:{port}"
    finally:
        assert server.stop() == 0
        assert "Traceback" not in server.log_text()


async def test_go_wsload_through_nginx(
    go_bins: dict[str, Path],
    behind_nginx: tuple[ServerProcess, str],
    tls_files: tuple[Path, Path],
    dsts: dict[str, int],
) -> None:
    server, front = behind_nginx
    add_routes(server, dsts)
    for args in (
        ["-mode", "plain", "-conns", "8"],
        ["-mode", "mux", "-conns", "2", "-streams", "4"],
    ):
        result = await run_wsload(
            [
                "-url",
                "wss://tunnel.test/echo",
                "-connect",
                front,
                "-ca",
                str(tls_files[0]),
                *args,
                "-bytes",
                str(2 * MiB),
                "-pattern",
                "echo",
            ],
            limit_s=90,
        )
        assert result["ok"], (result["errors"], result["stderr"][-2000:], server.log_text()[-3000:])


async def test_go_mtt_client_through_nginx(
    go_bins: dict[str, Path],
    go_peer: Any,
    behind_nginx: tuple[ServerProcess, str],
    tls_files: tuple[Path, Path],
    dsts: dict[str, int],
) -> None:
    server, front = behind_nginx
    add_routes(server, dsts)

    class Front:
        tunnel = front

    client, port = start_mttclient(go_peer, go_bins, Front, tls_files, "/echo", "-mux")  # type: ignore[arg-type]
    await echo_through(port, 8 * MiB, seed=3)
    assert client.poll() is None

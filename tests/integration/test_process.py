"""The server as an operator runs it: exit codes, one-line errors, signals, unix sockets."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

from websockets.asyncio.client import unix_connect

from tests.support import echo_server, run_cli, running_server, start_server


def test_help_lists_the_go_flags() -> None:
    result = run_cli("-h")
    assert result.returncode == 0
    for flag in (
        "-b string",
        "-c string",
        "-mux",
        "-timeout duration",
        "-cert string",
        "-key string",
        "-force-tls",
        "-n string",
        "-bind-unix",
        "-fast-open",
        "-verbose",
    ):
        assert flag in result.stderr


def test_unknown_flag_is_one_line_and_exit_2() -> None:
    result = run_cli("-bogus")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "mtt-mu-server: flag provided but not defined: -bogus"
    assert "Traceback" not in result.stderr


def test_unreadable_cert_is_one_line_and_nonzero(tmp_path: Path) -> None:
    result = run_cli(
        "-b",
        "127.0.0.1:0",
        "-c",
        "127.0.0.1:0",
        "-cert",
        str(tmp_path / "nope.pem"),
        "-key",
        str(tmp_path / "nope.key"),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("nope.pem: no such file")


def test_garbage_cert_is_one_line_and_nonzero(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    result = run_cli(
        "-b",
        "127.0.0.1:0",
        "-c",
        "127.0.0.1:0",
        "-cert",
        str(tmp_path / "c.pem"),
        "-key",
        str(tmp_path / "k.pem"),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot load certificate" in result.stderr


def test_port_in_use_is_one_line_and_nonzero() -> None:
    with running_server() as server:
        result = run_cli("-b", server.tunnel, "-c", "127.0.0.1:0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot listen on {server.tunnel}" in result.stderr


def test_sigint_stops_cleanly() -> None:
    server = start_server()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=15) == 0
    assert "Traceback" not in server.log_text()


def test_a_half_sent_controller_request_does_not_hold_the_shutdown() -> None:
    """A panel that stalls mid-body at the moment of a restart: the process still exits
    in a few seconds, with 0, not after systemd's stop timeout with a SIGKILL."""
    server = start_server()
    host, port = server.controller.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as panel:
        panel.sendall(b"POST / HTTP/1.1\r\nHost: panel\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.3)  # the request is in its handler, waiting for the body
        server.proc.send_signal(signal.SIGTERM)
        # controller_shutdown_wait is 2 s; aiohttp's own default would hold it 60 s
        assert server.proc.wait(timeout=10) == 0
        panel.settimeout(5)
        assert panel.recv(65536) == b""  # and the panel sees its connection closed
    assert "Traceback" not in server.log_text()
    assert "stopped" in server.log_text()


async def test_bind_unix_serves_plain_http(tmp_path: Path) -> None:
    sock_path = tmp_path / "mtt.sock"
    server = start_server("-bind-unix", bind=str(sock_path))
    try:
        async with echo_server() as echo:
            server.add("/u", echo.addr)
            async with unix_connect(str(sock_path), "ws://tunnel.test/u") as ws:
                await ws.send(b"over unix")
                assert await asyncio.wait_for(ws.recv(), 10) == b"over unix"
    finally:
        assert server.stop() == 0
    assert not sock_path.exists()

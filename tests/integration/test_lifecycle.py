"""Stopping with grace, certificate reloads without dropping tunnels, JSON logs."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from websockets.exceptions import ConnectionClosed

from mtt.transport.tls import self_signed_pem
from tests.integration.test_tunnel import echo_roundtrip, opener
from tests.support import echo_server, start_server


def write_cert(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = self_signed_pem(name)
    (directory / "cert.pem").write_bytes(cert)
    (directory / "key.pem").write_bytes(key)
    return directory / "cert.pem", directory / "key.pem"


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def served_name(port: int) -> str:
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=insecure(), server_hostname="tunnel.test"
    )
    der = writer.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.rfc4514_string())


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_lets_open_tunnels_finish(workers: str) -> None:
    server = start_server("-force-tls", "-grace", "20s", "-workers", workers)
    try:
        async with echo_server() as echo:
            server.add("/g", echo.addr)
            async with opener(server, insecure(), "/g") as ws:
                assert await echo_roundtrip(ws, b"before") == b"before"
                server.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                # Still relaying during the grace period ...
                assert await echo_roundtrip(ws, b"during") == b"during"
                # ... while new connections are refused.
                with pytest.raises(OSError):
                    await asyncio.open_connection("127.0.0.1", server.port)
            started = time.monotonic()
            code = await asyncio.to_thread(server.proc.wait, 15)
        assert code == 0
        assert time.monotonic() - started < 5, "exits as soon as the last tunnel closed"
    finally:
        server.stop()
    assert "Traceback" not in server.log_text()


async def test_grace_expiry_closes_with_going_away() -> None:
    server = start_server("-force-tls", "-grace", "1s")
    try:
        async with echo_server() as echo:
            server.add("/g", echo.addr)
            async with opener(server, insecure(), "/g") as ws:
                assert await echo_roundtrip(ws, b"x") == b"x"
                started = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 10)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1001
                assert 0.8 <= time.monotonic() - started < 5
        assert await asyncio.to_thread(server.proc.wait, 15) == 0
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("trigger", ["SIGHUP", "file change"])
async def test_certificate_reload_keeps_established_tunnels(tmp_path: Path, trigger: str) -> None:
    cert, key = write_cert(tmp_path, "old.test")
    server = start_server("-cert", str(cert), "-key", str(key))
    try:
        assert await served_name(server.port) == "CN=old.test"
        async with echo_server() as echo:
            server.add("/r", echo.addr)
            async with opener(server, insecure(), "/r") as ws:
                assert await echo_roundtrip(ws, b"a") == b"a"
                await asyncio.sleep(0.05)  # a distinct mtime
                write_cert(tmp_path, "new.test")
                if trigger == "SIGHUP":
                    server.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 15
                while await served_name(server.port) != "CN=new.test":
                    assert time.monotonic() < deadline, server.log_text()
                    await asyncio.sleep(0.2)
                assert await echo_roundtrip(ws, b"still") == b"still"
        assert "certificate reloaded" in server.log_text()
    finally:
        assert server.stop() == 0


async def test_a_broken_new_certificate_keeps_the_old_one(tmp_path: Path) -> None:
    cert, key = write_cert(tmp_path, "good.test")
    server = start_server("-cert", str(cert), "-key", str(key))
    try:
        cert.write_text("garbage")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "certificate reload (SIGHUP) failed" not in server.log_text():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert await served_name(server.port) == "CN=good.test"
    finally:
        assert server.stop() == 0


def test_json_logs_are_one_object_per_line() -> None:
    server = start_server("-log-format", "json", "-workers", "2")
    server.control({"opt": 11})
    assert server.stop() == 0
    lines = [ln for ln in server.log_text().splitlines() if ln.strip()]
    entries = [json.loads(ln) for ln in lines]
    assert any("tunnel listener on" in e["msg"] for e in entries)
    assert any(e["level"] == "warning" and "unknown opt 11" in e["msg"] for e in entries)
    assert all({"time", "level", "logger", "msg"} <= set(e) for e in entries)

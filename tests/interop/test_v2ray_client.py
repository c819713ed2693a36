"""Debian's v2ray 4.34 as the client, configured as an Xray share link says:
ws path "/v2?ed=2048", plus maxEarlyData and earlyDataHeaderName.

    local TCP --> v2ray (dokodemo-door in, vless over ws out)
        --> recording relay ==WS==> mtt-mu-server
        --> v2ray (vless in, freedom out; the user's dst) --> echo

v2ray 4.34 knows neither Xray's `ed` query parameter nor v2fly's
earlyDataHeaderName (4.39): it sends the path with "?ed=2048" on and no early
data. The server routes by the path without the query (docs/protocol.md §3,
§10), so such a client reaches its user all the same; the relay records what
went on the wire, and every byte is checked by sha256.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import echo_server, pattern, running_server

from .test_sip003 import free_port, wait_listening

pytestmark = pytest.mark.interop

UUID = "b831381d-6324-4d53-ad4f-8cda48b30811"
MiB = 1 << 20


@contextlib.contextmanager
def v2ray(config: dict[str, Any], tmp_path: Path, name: str) -> Iterator[Path]:
    """/usr/bin/v2ray with this config; its output goes to a file (returned)."""
    exe = shutil.which("v2ray")
    if exe is None:
        raise RuntimeError("v2ray not found: this test needs Debian's v2ray package")
    conf, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
    conf.write_text(json.dumps(config))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, "-config", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        yield log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextlib.asynccontextmanager
async def recording_relay(target_port: int) -> AsyncIterator[tuple[int, list[bytearray]]]:
    """A TCP relay to target_port that keeps what each client sent first (its
    request head, and whatever followed in the same reads, up to 16 KiB)."""
    heads: list[bytearray] = []

    async def pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keep: bytearray | None
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if keep is not None and len(keep) < 16384:
                    keep += data[: 16384 - len(keep)]
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = bytearray()
        heads.append(head)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
            await asyncio.gather(pipe(reader, up_writer, head), pipe(up_reader, writer, None))
        except (ConnectionError, asyncio.CancelledError):
            writer.close()  # cancelled: the test is over (asyncio would log the cancellation)

    relay = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(relay.sockets[0].getsockname()[1]), heads
    finally:
        relay.close()


async def test_v2ray_with_an_xray_style_path_reaches_its_user(tmp_path: Path) -> None:
    payload = pattern(41, 3 * MiB + 17)
    vless_port, local_port = free_port(), free_port()
    with running_server("-verbose") as server:
        async with echo_server() as echo, recording_relay(server.port) as (relay_port, heads):
            server.add("/v2", f"127.0.0.1:{vless_port}")
            dst_config = {
                "log": {"loglevel": "warning"},
                "inbounds": [
                    {
                        "listen": "127.0.0.1",
                        "port": vless_port,
                        "protocol": "vless",
                        "settings": {"clients": [{"id": UUID}], "decryption": "none"},
                    }
                ],
                "outbounds": [{"protocol": "freedom"}],
            }
            client_config = {
                "log": {"loglevel": "warning"},
                "inbounds": [
                    {
                        "listen": "127.0.0.1",
                        "port": local_port,
                        "protocol": "dokodemo-door",
                        "settings": {"address": "127.0.0.1", "port": echo.port, "network": "tcp"},
                    }
                ],
                "outbounds": [
                    {
                        "protocol": "vless",
                        "settings": {
                            "vnext": [
                                {
                                    "address": "127.0.0.1",
                                    "port": relay_port,
                                    "users": [{"id": UUID, "encryption": "none"}],
                                }
                            ]
                        },
                        "streamSettings": {
                            "network": "ws",
                            "wsSettings": {
                                "path": "/v2?ed=2048",
                                "maxEarlyData": 2048,
                                "earlyDataHeaderName": "Sec-WebSocket-Protocol",
                            },
                        },
                    }
                ],
            }
            with v2ray(dst_config, tmp_path, "dst"), v2ray(client_config, tmp_path, "client"):
                await wait_listening(vless_port)
                await wait_listening(local_port)
                reader, writer = await asyncio.open_connection("127.0.0.1", local_port)

                async def send() -> None:
                    for i in range(0, len(payload), 64 * 1024):
                        writer.write(payload[i : i + 64 * 1024])
                        await writer.drain()

                sender = asyncio.ensure_future(send())
                back = await asyncio.wait_for(reader.readexactly(len(payload)), 60)
                await sender
                writer.close()
            assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()
    # One WebSocket per local connection, wait_listening's probe included.
    assert heads
    for head in heads:
        request = bytes(head).split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        assert request.startswith("get /v2?ed=2048 http/1.1\r\n"), request
        assert "sec-websocket-protocol" not in request  # 4.34 sends no early data
    assert "/v2: upgrade (plain) to" in server.log_text()

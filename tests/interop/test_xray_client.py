"""Xray-core (its PyPI build, the real Go core run in a child process) as the
client, configured as an Xray share link with `?ed=2048` says:

    local TCP --> Xray (dokodemo-door in, freedom over ws out, path "/x?ed=2048")
        --> recording relay ==WS==> mtt-mu-server --> echo (the user's dst)

This is how v2ray-plugin frames a tunnel (freedom over a WebSocket: the bytes
ride the WebSocket as they are), with Xray's early data on top: Xray dials at
the first write and, when that write fits in `ed` bytes, sends it base64url in
Sec-WebSocket-Protocol and no frame (docs/protocol.md §10). The relay records
the request Xray put on the wire; every byte is checked by sha256.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import echo_server, pattern, running_server

from .test_sip003 import free_port, wait_listening
from .test_v2ray_client import recording_relay

pytestmark = pytest.mark.interop

MiB = 1 << 20
# Xray's core runs inside a Python process: start it, then wait to be stopped.
RUN_XRAY = "import sys, time, xray; xray.startFromJSON(open(sys.argv[1]).read()); time.sleep(600)"


@contextlib.contextmanager
def xray(config: dict[str, Any], tmp_path: Path) -> Iterator[Path]:
    conf, log = tmp_path / "xray.json", tmp_path / "xray.log"
    conf.write_text(json.dumps(config))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUN_XRAY, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        yield log
    finally:
        proc.send_signal(signal.SIGKILL)  # the Go runtime inside ignores a polite exit
        proc.wait(5)


def client_config(local_port: int, server_port: int, path: str) -> dict[str, Any]:
    return {
        "log": {"loglevel": "warning"},
        "inbounds": [
            {
                "listen": "127.0.0.1",
                "port": local_port,
                "protocol": "dokodemo-door",
                "settings": {"address": "127.0.0.1", "port": server_port, "network": "tcp"},
            }
        ],
        "outbounds": [
            {
                "protocol": "freedom",
                "streamSettings": {"network": "ws", "wsSettings": {"path": path}},
            }
        ],
    }


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def test_xray_early_data_reaches_dst_first_and_intact(tmp_path: Path) -> None:
    first = pattern(70, 1500)  # fits in ed=2048: it rides in the header
    rest = pattern(71, 3 * MiB + 5)
    local = free_port()
    with running_server() as server:
        async with echo_server() as echo, recording_relay(server.port) as (relay_port, heads):
            server.add("/x", echo.addr)
            with xray(client_config(local, relay_port, "/x?ed=2048"), tmp_path) as log:
                try:
                    await wait_listening(local)
                    heads.clear()  # wait_listening's probe is not a tunnel
                    reader, writer = await asyncio.open_connection("127.0.0.1", local)
                    writer.write(first)
                    await writer.drain()
                    got = await asyncio.wait_for(reader.readexactly(len(first)), 20)
                    writer.write(rest)
                    await writer.drain()
                    got += await asyncio.wait_for(reader.readexactly(len(rest)), 60)
                    writer.close()
                except BaseException:
                    print(log.read_text(errors="replace"), server.log_text())
                    raise
    sent = first + rest
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(sent).hexdigest()
    head = bytes(heads[0])
    assert head.startswith(b"GET /x HTTP/1.1\r\n"), head[:200]  # Xray took `ed` off the path
    early = header(head, b"sec-websocket-protocol")
    assert early is not None, head[:600]
    assert base64.urlsafe_b64decode(early + b"=" * (-len(early) % 4)) == first


async def test_xray_without_early_data_over_parallel_connections(tmp_path: Path) -> None:
    payloads = [pattern(80 + i, MiB + 11 * i) for i in range(4)]
    local = free_port()
    with running_server() as server:
        async with echo_server() as echo:
            server.add("/plain", echo.addr)
            with xray(client_config(local, server.port, "/plain"), tmp_path):
                await wait_listening(local)

                async def one(payload: bytes) -> bytes:
                    reader, writer = await asyncio.open_connection("127.0.0.1", local)
                    writer.write(payload)
                    await writer.drain()
                    back = await asyncio.wait_for(reader.readexactly(len(payload)), 60)
                    writer.close()
                    return back

                backs = await asyncio.gather(*(one(p) for p in payloads))
    for sent, back in zip(payloads, backs, strict=True):
        assert hashlib.sha256(back).hexdigest() == hashlib.sha256(sent).hexdigest()

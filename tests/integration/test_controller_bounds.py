"""Controller connections are bounded: time to a full head, to a full body, idle
keep-alive time, and how many may be open at once.

The bounds are shortened here by starting the controller in-process with small
ControllerSettings; the flood test runs the real server under a low descriptor
limit, where the cap follows from RLIMIT_NOFILE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mtt.config import Limits
from mtt.controller.http import ControllerSettings, start_controller
from mtt.service.user_service import UserService
from mtt.store.memory import MemoryStore
from tests.integration.test_tunnel import echo_roundtrip, opener
from tests.support import controller_limits, echo_server, running_server

BOUND = 1.5  # the bound under test, in seconds
SLACK = 3.0  # what a loaded 2-core machine may add to it
LONG = 60.0  # the other bounds, out of the way
PING = b'{"opt":9}'


@contextlib.asynccontextmanager
async def controller(**bounds: Any) -> AsyncIterator[tuple[str, int]]:
    """The controller on a free loopback port, with the given ControllerSettings bounds."""
    settings = {"head_timeout": LONG, "body_timeout": LONG, "keepalive": LONG, **bounds}
    service = UserService(MemoryStore())
    await service.start()
    runner, where = await start_controller(
        "127.0.0.1:0", service, ControllerSettings(limits=controller_limits(**settings))
    )
    host, port = where.rsplit(":", 1)
    try:
        yield host, int(port)
    finally:
        await runner.cleanup()
        await service.close()


async def seconds_until_closed(reader: asyncio.StreamReader, limit: float) -> float:
    """How long until the server closes (EOF or reset); fails past limit."""
    start = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), limit):
            pass
    return time.monotonic() - start


async def closed_within(reader: asyncio.StreamReader, limit: float) -> bool:
    try:
        await seconds_until_closed(reader, limit)
    except TimeoutError:
        return False
    return True


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 response with a Content-Length: (status, JSON body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    body = await asyncio.wait_for(reader.readexactly(int(headers["Content-Length"])), 10)
    return int(lines[0].split()[1]), json.loads(body)


def post(body: bytes, extra: str = "") -> bytes:
    return (
        f"POST / HTTP/1.1\r\nHost: c\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
    )


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST / HTTP/1.1\r\nHost: c\r\nContent-Len"],
    ids=["nothing", "half-a-head"],
)
async def test_a_stalled_head_is_closed_at_the_head_bound(sent: bytes) -> None:
    async with controller(head_timeout=BOUND) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(sent)
        waited = await seconds_until_closed(reader, BOUND + SLACK)
        writer.close()
        assert BOUND - 0.2 <= waited <= BOUND + SLACK


async def test_a_head_sent_byte_by_byte_is_closed_at_the_head_bound() -> None:
    """The bound is on the whole head, not between reads."""
    async with controller(head_timeout=BOUND) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        start = time.monotonic()

        async def trickle() -> None:
            for byte in post(PING):  # 48 bytes of head at 0.2 s each: far past the bound
                writer.write(bytes([byte]))
                await asyncio.sleep(0.2)

        sender = asyncio.ensure_future(trickle())
        await seconds_until_closed(reader, BOUND + SLACK)
        waited = time.monotonic() - start
        sender.cancel()
        writer.close()
        assert BOUND - 0.2 <= waited <= BOUND + SLACK


@pytest.mark.parametrize(
    "head,body_part",
    [
        (post(b'{"opt":9,"args_bunch":[]}').split(b"\r\n\r\n")[0] + b"\r\n\r\n", b'{"opt":'),
        (
            b"POST / HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n",
            b'9\r\n{"opt":9}\r\n5\r\n{"a":',
        ),
    ],
    ids=["half-a-body", "half-a-chunked-body"],
)
async def test_a_stalled_body_gets_408_at_the_body_bound(head: bytes, body_part: bytes) -> None:
    async with controller(body_timeout=BOUND) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head + body_part)
        start = time.monotonic()
        status, reply = await read_reply(reader)
        answered = time.monotonic() - start
        await seconds_until_closed(reader, SLACK)
        writer.close()
        assert (status, reply) == (
            408,
            {
                "res": 2,
                "err_string": f"body not complete within {BOUND:g} s",
                "current_users": 0,
                "revision": 0,
            },
        )
        assert BOUND - 0.2 <= answered <= BOUND + SLACK


async def test_an_idle_keepalive_connection_is_closed_at_the_keepalive_bound() -> None:
    async with controller(keepalive=BOUND) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        for _ in range(2):  # the connection is kept alive between requests
            writer.write(post(PING))
            status, reply = await read_reply(reader)
            assert (status, reply["res"]) == (200, 1)
        waited = await seconds_until_closed(reader, BOUND + SLACK)
        writer.close()
        assert BOUND - 0.2 <= waited <= BOUND + SLACK


async def test_past_the_cap_new_connections_are_refused_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cap, extra = 4, 3
    caplog.set_level(logging.WARNING, logger="mtt.controller")
    async with controller(max_connections=cap, head_timeout=2 * BOUND) as (host, port):
        idle = [await asyncio.open_connection(host, port) for _ in range(cap)]
        await asyncio.sleep(0.3)  # let the server take them all before the extra ones
        for _ in range(extra):
            reader, writer = await asyncio.open_connection(host, port)
            status, reply = await read_reply(reader)
            assert (status, reply["err_string"]) == (
                503,
                f"more than {cap} controller connections open, try again later",
            )
            assert await seconds_until_closed(reader, SLACK) < SLACK
            writer.close()
        assert all(not reader.at_eof() for reader, _ in idle)
        refusals = [r for r in caplog.records if "(the cap): refusing" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]

        # One idle connection closes: a request fits under the cap again.
        idle.pop()[1].close()
        deadline = time.monotonic() + SLACK
        while True:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(post(PING))
            status, reply = await read_reply(reader)
            writer.close()
            if status != 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert (status, reply["res"]) == (200, 1)

        # The idle ones time out at the head bound; then every slot is free again.
        for reader, _ in idle:
            assert await seconds_until_closed(reader, 2 * BOUND + SLACK) < 2 * BOUND + SLACK
        await asyncio.sleep(0.3)
        held = [await asyncio.open_connection(host, port) for _ in range(cap)]
        for reader, writer in held:
            writer.write(post(PING))
            assert (await read_reply(reader))[0] == 200
            writer.close()
        for _, writer in idle:
            writer.close()


@pytest.mark.slow
async def test_the_server_closes_stalled_heads_at_its_default_bound() -> None:
    """The real server applies Limits.controller_head_timeout (10 s)."""
    bound = Limits().controller_head_timeout
    with running_server("-workers", "1") as server:
        host, port = server.controller.rsplit(":", 1)
        stalled = [await asyncio.open_connection(host, int(port)) for _ in range(2)]
        half_a_head = b"POST / HTTP/1.1\r\nHost: c\r\n"
        stalled[1][1].write(half_a_head)
        waited = await asyncio.gather(
            *(seconds_until_closed(reader, bound + SLACK) for reader, _ in stalled)
        )
        for _, writer in stalled:
            writer.close()
        assert all(bound - 1.0 <= w <= bound + SLACK for w in waited), waited
        assert server.control({"opt": 9})[0] == 200
    assert "no complete request head within 10 s (0 bytes received)" in server.log_text()
    assert f"within 10 s ({len(half_a_head)} bytes received), closed" in server.log_text()


@pytest.mark.slow
async def test_a_tunnel_still_connects_while_the_controller_is_flooded() -> None:
    """With 256 descriptors the controller takes at most 64 and refuses the rest:
    a flood of idle controller connections leaves the tunnel listener room."""
    flood = 400
    with running_server("-workers", "1", prefix=("prlimit", "--nofile=256:256")) as server:
        host, port = server.controller.rsplit(":", 1)
        async with echo_server() as echo:
            server.add("/flooded", echo.addr)
            conns = []
            for _ in range(flood):
                conns.append(await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10))
            try:
                async with opener(server, None, "/flooded", open_timeout=15) as ws:
                    assert await echo_roundtrip(ws, b"through the flood") == b"through the flood"
                closed = await asyncio.gather(*(closed_within(r, 3) for r, _ in conns))
                held = closed.count(False)
                assert held <= 64, f"the controller holds {held} of {flood}"
            finally:
                for _, writer in conns:
                    writer.close()
            await asyncio.sleep(1)
            assert server.control({"opt": 9})[0] == 200
        assert "(the cap): refusing new ones" in server.log_text()

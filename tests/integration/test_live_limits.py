"""expire and quota hold for open tunnels too: past either, a user's plain
tunnels and smux sessions (every stream in them) close within a second, with
one log line and `blocked` in the listing, and a raised limit lets the user in
again. The real server in both layouts; clocks are read, never slept on."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.integration.accounting_support import (
    LAYOUTS,
    MiB,
    add,
    layout_server,
    listing,
    probe_server,
    receive,
    refused_status,
    until,
    wait_active,
    ws_open,
)
from tests.integration.test_mux import MuxClient
from tests.support import echo_server, pattern

QUOTA = 16 * MiB
# What one process may relay past the quota (docs/controller.md, "Limits on open
# tunnels"): the reads its tunnels make before the cut, 256 KiB each from a dst.
ONE_PROCESS_OVERSHOOT = 1 * MiB


async def roundtrip(ws: ClientConnection, size: int = 1000) -> None:
    payload = pattern(size, size)
    await ws.send(payload)
    assert await receive(ws, size, limit_s=10) == payload


async def mux_roundtrip(mux: MuxClient, sid: int, data: bytes) -> None:
    before = len(mux.received[sid])
    await mux.send(sid, data)
    await mux.wait_for(lambda: len(mux.received[sid]) == before + len(data), limit_s=10)


@dataclass
class Tally:
    """What a user's tunnels received until the server closed them, and when."""

    quota: int
    received: int = 0
    reached_quota: float = 0.0  # time.monotonic() when `received` first reached the quota
    closed: float = 0.0

    def add(self, size: int) -> None:
        self.received += size
        if not self.reached_quota and self.received >= self.quota:
            self.reached_quota = time.monotonic()


async def download_plain(
    ws: ClientConnection, tally: Tally | None = None, limit_s: float = 30
) -> Tally:
    got = tally or Tally(QUOTA)
    async with asyncio.timeout(limit_s):
        try:
            async for message in ws:
                got.add(len(message))
        except ConnectionClosed:
            pass
    got.closed = max(got.closed, time.monotonic())
    return got


async def download_stream(mux: MuxClient, sid: int, tally: Tally, limit_s: float = 30) -> Tally:
    seen = 0
    async with asyncio.timeout(limit_s):
        while True:
            now = len(mux.received[sid])
            tally.add(now - seen)
            seen = now
            if sid in mux.ended or mux._reader.done():
                break
            mux.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(mux.changed.wait(), 0.05)
    tally.add(len(mux.received[sid]) - seen)
    tally.closed = max(tally.closed, time.monotonic())
    return tally


def cut_lines(log: str, path: str) -> list[str]:
    return [line for line in log.splitlines() if f"user {path}: " in line and "closing" in line]


# -- expire ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_expiry_closes_a_plain_tunnel_and_an_smux_stream_within_a_second(
    layout: tuple[str, ...],
) -> None:
    with layout_server(layout) as server:
        async with echo_server() as echo:
            expire = int(time.time()) + 2
            add(server, "/e", echo.addr, expire=expire)
            add(server, "/other", echo.addr)
            async with (
                ws_open(server, "/e") as plain,
                ws_open(server, "/e", mux=True) as session,
                ws_open(server, "/other") as other,
            ):
                mux = MuxClient(session)
                sid = await mux.open()
                await mux_roundtrip(mux, sid, b"before")
                await roundtrip(plain)
                await asyncio.wait_for(plain.wait_closed(), expire - time.time() + 5)
                plain_closed = time.time()
                await mux.wait_for(lambda: sid in mux.ended or mux._reader.done(), limit_s=5)
                stream_closed = time.time()
                for closed in (plain_closed, stream_closed):
                    assert expire <= closed <= expire + 1.0, (closed - expire, server.log_text())
                assert plain.close_code == 1008
                print(
                    f"\n{layout}: plain closed {plain_closed - expire:.3f} s, smux stream "
                    f"{stream_closed - expire:.3f} s after the expire time"
                )
                await roundtrip(other)  # another user's tunnel is untouched
                await mux.close()
            await wait_active(server, "/e", 0)
            lines = cut_lines(server.log_text(), "/e")
            assert len(lines) == 1, server.log_text()
            assert re.search(
                rf"user /e: expired at {expire} \(\d\.\d s ago\); closing 2 tunnels$", lines[0]
            )
            entry = listing(server, "/e")["/e"]
            assert (entry["state"], entry["blocked"]) == ("expired", "expired")
            assert expire <= entry["blocked_at"] <= expire + 1
            assert listing(server, "/other")["/other"]["blocked"] == ""

            # A later expire lets the user in again.
            add(server, "/e", echo.addr, expire=int(time.time()) + 3600)
            entry = listing(server, "/e")["/e"]
            assert (entry["state"], entry["blocked"], entry["blocked_at"]) == ("ok", "", 0)
            async with ws_open(server, "/e") as again:
                await roundtrip(again)
            await until(lambda: "user /e: let in again" in server.log_text())


# -- quota -----------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_quota_closes_a_downloading_tunnel_within_a_second(layout: tuple[str, ...]) -> None:
    with layout_server(layout) as server:
        async with probe_server(flood=True) as dst:
            add(server, "/q", dst.addr, quota=QUOTA)
            async with ws_open(server, "/q") as ws:
                got = await download_plain(ws)
            assert got.reached_quota, f"cut at {got.received} bytes, before the quota"
            assert got.closed - got.reached_quota <= 1.0
            # Everything counted reached the client; at most one read past the quota.
            assert QUOTA <= got.received <= QUOTA + ONE_PROCESS_OVERSHOOT, got.received
            await wait_active(server, "/q", 0)
            entry = listing(server, "/q")["/q"]
            assert entry["quota_used"] == entry["bytes_down"] == got.received
            assert (entry["state"], entry["blocked"]) == ("over_quota", "quota")
            lines = cut_lines(server.log_text(), "/q")
            assert len(lines) == 1, server.log_text()
            assert re.search(
                rf"user /q: quota used up \(\d+ of {QUOTA} bytes\); closing 1 tunnel$", lines[0]
            )

            # Refused while used up; a raised quota lets it in (and cuts it again).
            assert await refused_status(server, "/q") == 403
            add(server, "/q", dst.addr, quota=got.received + 4 * MiB)
            assert listing(server, "/q")["/q"]["blocked"] == ""
            async with ws_open(server, "/q") as ws:
                more = await download_plain(ws, Tally(4 * MiB))
            assert 4 * MiB <= more.received <= 4 * MiB + ONE_PROCESS_OVERSHOOT
            await until(lambda: len(cut_lines(server.log_text(), "/q")) == 2)


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_quota_closes_plain_and_smux_tunnels_of_a_user_together(
    layout: tuple[str, ...],
) -> None:
    """Two tunnels download at once, maybe through two workers: each process may
    spend the whole remainder before the cut reaches it (the documented bound)."""
    processes = int(layout[1])
    with layout_server(layout) as server:
        async with probe_server(flood=True) as dst, echo_server() as echo:
            add(server, "/q2", dst.addr, quota=QUOTA)
            add(server, "/free", echo.addr)
            async with (
                ws_open(server, "/q2") as plain,
                ws_open(server, "/q2", mux=True) as session,
                ws_open(server, "/free") as other,
            ):
                mux = MuxClient(session)
                sid = await mux.open()
                tally = Tally(QUOTA)
                await asyncio.gather(download_plain(plain, tally), download_stream(mux, sid, tally))
                await roundtrip(other)
                await mux.close()
            total = tally.received
            bound = QUOTA + (processes - 1) * QUOTA + 2 * ONE_PROCESS_OVERSHOOT
            assert QUOTA <= total <= bound, (total, server.log_text())
            assert tally.closed - tally.reached_quota <= 1.0
            await wait_active(server, "/q2", 0)
            entry = listing(server, "/q2")["/q2"]
            assert entry["quota_used"] >= QUOTA
            assert (entry["state"], entry["blocked"]) == ("over_quota", "quota")
            assert len(cut_lines(server.log_text(), "/q2")) == 1, server.log_text()
            print(
                f"\n{layout}: {total - QUOTA} bytes past a {QUOTA}-byte quota, closed "
                f"{tally.closed - tally.reached_quota:.3f} s after"
            )


async def test_a_quota_cut_is_refused_again_at_once_and_listed_until_reset() -> None:
    """After the cut the user's next tunnel is refused at the upgrade, before its
    closed tunnels' last counts land; a new billing period lets it in."""
    with layout_server(("-workers", "1")) as server:
        async with probe_server(flood=True) as dst:
            add(server, "/r", dst.addr, quota=2 * MiB)
            async with ws_open(server, "/r") as ws:
                await download_plain(ws, Tally(2 * MiB))
            for _ in range(3):
                assert await refused_status(server, "/r") == 403
            add(server, "/r", dst.addr, quota=2 * MiB, quota_used=0)
            entry = listing(server, "/r")["/r"]
            assert (entry["quota_used"], entry["state"], entry["blocked"]) == (0, "ok", "")
            async with ws_open(server, "/r") as ws:
                got = await download_plain(ws, Tally(2 * MiB))
            assert 2 * MiB <= got.received <= 2 * MiB + ONE_PROCESS_OVERSHOOT

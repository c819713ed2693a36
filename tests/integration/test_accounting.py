"""Per-user counters and rate limits (issue 7), against the real server in both
layouts: the counts are the tunnel payload bytes, exact to the byte, and a
user's rate holds across all its tunnels."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from websockets.exceptions import InvalidStatus

from tests.integration.accounting_support import (
    LAYOUTS,
    KiB,
    MiB,
    add,
    layout_server,
    listing,
    ok,
    probe_server,
    receive,
    sha,
    until,
    upload,
    wait_active,
    ws_open,
)
from tests.integration.test_mux import MuxClient
from tests.support import ServerProcess, echo_server, pattern

# Without limits a user's tunnels are counted by collection only; with one they
# are also admitted, and a closing tunnel hands its bytes to the service itself.
KINDS = [
    pytest.param({}, id="unlimited"),
    pytest.param({"max_tunnels": 10, "quota": 1 << 40}, id="admitted"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("limits", KINDS)
async def test_plain_tunnel_counts_exact_bytes(
    layout: tuple[str, ...], limits: dict[str, int]
) -> None:
    up_size, down_size = 3 * MiB + 12345, 2 * MiB + 777
    payload = pattern(11, up_size)
    with layout_server(layout) as server:
        async with probe_server(download=down_size) as probe:
            add(server, "/acct", probe.addr, **limits)
            async with ws_open(server, "/acct") as ws:
                await until(lambda: len(probe.conns) == 1)
                live = listing(server, "/acct")["/acct"]
                assert live["active_tunnels"] == 1
                assert live["client_ips"] == ["127.0.0.1"]
                sender = asyncio.ensure_future(upload(ws, payload, chunk=50_000))
                back = await receive(ws, down_size)
                await sender
                await until(lambda: probe.conns[0].received == up_size)
            assert probe.conns[0].digest.digest() == sha(payload)
            assert sha(back) == sha(pattern(probe.seed, down_size))
            await wait_active(server, "/acct", 0)
            entry = listing(server, "/acct")["/acct"]
            assert entry["bytes_up"] == up_size
            assert entry["bytes_down"] == down_size
            assert entry["quota_used"] == up_size + down_size
            assert entry["total_tunnels"] == 1
            assert entry["active_tunnels"] == 0
            assert entry["client_ips"] == []
            assert abs(entry["last_seen"] - time.time()) < 5
            assert entry["state"] == "ok"

            # A second tunnel adds to the same counters.
            async with ws_open(server, "/acct") as ws:
                await upload(ws, b"z" * 1001)
                await receive(ws, down_size)
                await until(lambda: len(probe.conns) == 2 and probe.conns[1].received == 1001)
            await wait_active(server, "/acct", 0)
            entry = listing(server, "/acct")["/acct"]
            assert (entry["bytes_up"], entry["bytes_down"], entry["total_tunnels"]) == (
                up_size + 1001,
                2 * down_size,
                2,
            )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("limits", KINDS)
async def test_smux_counts_payload_bytes_of_every_stream(
    layout: tuple[str, ...], limits: dict[str, int]
) -> None:
    down_size = 300 * KiB + 3
    sizes = [MiB + 1, 512 * KiB + 17, 5, 700 * KiB]
    with layout_server(layout) as server:
        async with probe_server(download=down_size) as probe:
            add(server, "/mux", probe.addr, **limits)
            async with ws_open(server, "/mux", mux=True) as ws:
                assert ws.subprotocol == "smux_on"
                client = MuxClient(ws)
                sids = [await client.open() for _ in sizes]
                payloads = {sid: pattern(sid, size) for sid, size in zip(sids, sizes, strict=True)}
                await asyncio.gather(*(client.send(s, d) for s, d in payloads.items()))
                await client.wait_for(
                    lambda: all(len(client.received[s]) == down_size for s in sids)
                )
                await until(
                    lambda: (
                        len(probe.conns) == len(sizes)
                        and sorted(c.received for c in probe.conns) == sorted(sizes)
                    )
                )
                live = listing(server, "/mux")["/mux"]
                assert (live["active_tunnels"], live["client_ips"]) == (1, ["127.0.0.1"])
                await client.close()
            digests = {c.digest.digest() for c in probe.conns}
            assert digests == {sha(d) for d in payloads.values()}
            await wait_active(server, "/mux", 0)
            entry = listing(server, "/mux")["/mux"]
            assert entry["bytes_up"] == sum(sizes)
            assert entry["bytes_down"] == down_size * len(sizes)
            assert entry["total_tunnels"] == 1  # one WebSocket, however many streams
            assert entry["quota_used"] == sum(sizes) + down_size * len(sizes)


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_read_and_reset_keeps_quota_and_delete_forgets(layout: tuple[str, ...]) -> None:
    with layout_server(layout) as server:
        async with probe_server(download=4000) as probe:
            add(server, "/r", probe.addr, quota=1 << 40)
            add(server, "/other", probe.addr)
            for path in ("/r", "/other"):
                async with ws_open(server, path) as ws:
                    await upload(ws, b"u" * 6000)
                    await receive(ws, 4000)
                    await until(lambda: probe.conns[-1].received == 6000)
                await wait_active(server, path, 0)

            status, read = server.control({"opt": 5, "args_bunch": [{"path": "/r"}], "reset": True})
            assert status == 200 and read["res"] == 1, read
            revision = read["revision"]
            [entry] = read["users"]
            assert (entry["bytes_up"], entry["bytes_down"], entry["total_tunnels"]) == (
                6000,
                4000,
                1,
            )
            after = listing(server)
            assert (after["/r"]["bytes_up"], after["/r"]["bytes_down"]) == (0, 0)
            assert after["/r"]["total_tunnels"] == 0
            assert after["/r"]["quota_used"] == 10000  # a reset is not a new billing period
            assert after["/other"]["bytes_up"] == 6000  # only the listed user was reset
            assert ok(server, {"opt": 9})["revision"] == revision  # reads change nothing

            async with ws_open(server, "/r") as ws:
                await upload(ws, b"v" * 10)
                await receive(ws, 4000)
                await until(lambda: probe.conns[-1].received == 10)
            await wait_active(server, "/r", 0)
            entry = listing(server, "/r")["/r"]
            assert (entry["bytes_up"], entry["bytes_down"], entry["quota_used"]) == (
                10,
                4000,
                14010,
            )

            # Counters go with the user: deleted and added again, it starts from zero.
            ok(server, {"opt": 2, "args_bunch": [{"path": "/r"}]})
            assert "/r" not in listing(server)
            add(server, "/r", probe.addr, quota=1 << 40)
            entry = listing(server, "/r")["/r"]
            assert [
                entry[k] for k in ("bytes_up", "bytes_down", "quota_used", "total_tunnels")
            ] == [
                0,
                0,
                0,
                0,
            ]
            assert entry["last_seen"] == 0


# -- rate limits ------------------------------------------------------------------

RATE = 2 * MiB
WINDOW = 5.0
SETTLE = 0.5  # the first half second holds the burst allowance and the pipes filling


async def _flood_upload(ws: object, stop: asyncio.Event, fill: bytes) -> None:
    chunk = fill * (64 * KiB)
    while not stop.is_set():
        await ws.send(chunk)  # type: ignore[attr-defined]


async def _drain_download(ws: object, samples: list[tuple[float, int]]) -> None:
    async for message in ws:  # type: ignore[attr-defined]
        samples.append((time.monotonic(), len(message)))


def _in_window(samples: list[tuple[float, int]], start: float) -> int:
    return sum(n for t, n in samples if start + SETTLE <= t < start + SETTLE + WINDOW)


@pytest.mark.slow
@pytest.mark.serial  # it measures a rate to 10 %
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_rate_holds_up_down_and_across_tunnels(layout: tuple[str, ...]) -> None:
    """Three users with the same rate at once: one uploads, one downloads, one
    uploads through two tunnels (they share one budget). Measured at the
    receiving end over a 5 s window after a short settle."""
    expected = RATE * WINDOW
    # No grace: the server would relay what the clients sent, at the rate, before stopping.
    with layout_server(layout, "-grace", "0s") as server:
        async with probe_server() as sink, probe_server(flood=True) as source:
            add(server, "/up", sink.addr, rate=RATE)
            add(server, "/two", sink.addr, rate=RATE)
            add(server, "/down", source.addr, rate=RATE)
            stop = asyncio.Event()
            down_samples: list[tuple[float, int]] = []
            async with (
                ws_open(server, "/up") as up,
                ws_open(server, "/two") as two_a,
                ws_open(server, "/two") as two_b,
                ws_open(server, "/down") as down,
            ):
                start = time.monotonic()
                tasks = [
                    asyncio.ensure_future(_flood_upload(ws, stop, fill))
                    for ws, fill in ((up, b"u"), (two_a, b"a"), (two_b, b"b"))
                ]
                tasks.append(asyncio.ensure_future(_drain_download(down, down_samples)))
                await asyncio.sleep(SETTLE + WINDOW + 0.2)
                stop.set()
                for task in tasks:
                    task.cancel()
                for ws in (up, two_a, two_b, down):
                    ws.transport.abort()  # a throttled tunnel would hold a polite close
            await until(lambda: len(sink.conns) == 3)
            by_fill = {c.first: c for c in sink.conns}
            measured = {
                "up": _in_window(by_fill[b"u"].samples, start),
                "two tunnels": _in_window(by_fill[b"a"].samples, start)
                + _in_window(by_fill[b"b"].samples, start),
                "down": _in_window(down_samples, start),
            }
            report = ", ".join(
                f"{name} {n / WINDOW / MiB:.3f} MiB/s ({n / expected - 1:+.1%})"
                for name, n in measured.items()
            )
            print(f"\nrate {RATE / MiB:.0f} MiB/s, {layout}: {report}")
            for name, n in measured.items():
                assert abs(n - expected) <= 0.1 * expected, (name, report)
            # Both tunnels of one user got a real share, not one starving the other.
            shares = [_in_window(by_fill[f].samples, start) for f in (b"a", b"b")]
            assert min(shares) > 0.2 * expected, shares


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_user_without_rate_is_not_slowed(layout: tuple[str, ...]) -> None:
    with layout_server(layout, "-grace", "0s") as server:
        async with probe_server() as sink:
            add(server, "/slow", sink.addr, rate=RATE)
            add(server, "/fast", sink.addr)
            stop = asyncio.Event()
            async with ws_open(server, "/slow") as slow, ws_open(server, "/fast") as fast:
                start = time.monotonic()
                tasks = [
                    asyncio.ensure_future(_flood_upload(ws, stop, fill))
                    for ws, fill in ((slow, b"s"), (fast, b"f"))
                ]
                await asyncio.sleep(1)
                stop.set()
                for task in tasks:
                    task.cancel()
                slow.transport.abort()
            end = start + 1
            by_fill = {c.first: c for c in sink.conns}
            slow_n = by_fill[b"s"].bytes_between(start, end)
            fast_n = by_fill[b"f"].bytes_between(start, end)
            print(
                f"\n{layout}: unlimited {fast_n / MiB:.1f} MiB/s"
                f" beside {slow_n / MiB:.2f} MiB/s limited (over 1 s)"
            )
            assert fast_n > 3 * RATE


@pytest.mark.slow
@pytest.mark.serial  # it measures a rate to 10 %
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_rate_holds_for_smux_streams(layout: tuple[str, ...]) -> None:
    """Two streams of one smux session upload as fast as the session lets them;
    at the same time two streams of another user's session download."""
    expected = RATE * WINDOW
    with layout_server(layout, "-grace", "0s") as server:
        async with probe_server() as sink, probe_server(flood=True) as source:
            add(server, "/mr", sink.addr, rate=RATE)
            add(server, "/md", source.addr, rate=RATE)
            async with (
                ws_open(server, "/mr", mux=True) as ws,
                ws_open(server, "/md", mux=True) as ws_down,
            ):
                client = MuxClient(ws)
                down = MuxClient(ws_down)
                sids = [await client.open() for _ in range(2)]
                for _ in range(2):
                    await down.open()
                start = time.monotonic()
                down_samples: list[tuple[float, int]] = []

                async def flood(sid: int) -> None:
                    chunk = bytes([sid]) * (256 * KiB)
                    while True:
                        await client.send(sid, chunk)

                async def sample() -> None:
                    while True:
                        down_samples.append(
                            (time.monotonic(), sum(map(len, down.received.values())))
                        )
                        await asyncio.sleep(0.01)

                tasks = [asyncio.ensure_future(flood(sid)) for sid in sids]
                tasks.append(asyncio.ensure_future(sample()))
                await asyncio.sleep(SETTLE + WINDOW + 0.2)
                for task in tasks:
                    task.cancel()
                for mux, sock in ((client, ws), (down, ws_down)):
                    mux._reader.cancel()
                    sock.transport.abort()
            up_total = sum(_in_window(c.samples, start) for c in sink.conns)
            window = [n for t, n in down_samples if start + SETTLE <= t < start + SETTLE + WINDOW]
            down_total = window[-1] - window[0]
            report = ", ".join(
                f"{name} {n / WINDOW / MiB:.3f} MiB/s ({n / expected - 1:+.1%})"
                for name, n in (("up", up_total), ("down", down_total))
            )
            print(f"\nsmux rate {RATE / MiB:.0f} MiB/s, {layout}: {report}")
            assert abs(up_total - expected) <= 0.1 * expected, report
            assert abs(down_total - expected) <= 0.1 * expected, report
            shares = {s: len(d) for s, d in down.received.items()}
            print(f"download shares by stream: {shares}")
            assert len(shares) == 2 and min(shares.values()) > 0.2 * sum(shares.values()), shares


# -- replace-all under load -----------------------------------------------------------

STEADY = ["/s0", "/s1", "/s2", "/s3"]


def _desired(round_: int, dst: str) -> list[dict[str, object]]:
    """The steady users (their limits flip each round, so tunnels move between
    the admitted and the unadmitted paths) and a few churning ones."""
    flip = round_ % 2
    limits: list[dict[str, int]] = [
        {"max_tunnels": 20} if flip else {},
        {} if flip else {"quota": 1 << 40},
        {"max_ips": 2, "expire": 4_000_000_000} if flip else {"max_tunnels": 50},
        {"quota": 1 << 40, "max_tunnels": 30},
    ]
    steady = [{"path": p, "dst": dst, **lim} for p, lim in zip(STEADY, limits, strict=True)]
    churn = [{"path": f"/c{(round_ + k) % 7}", "dst": dst} for k in range(round_ % 4)]
    return steady + churn


@pytest.mark.slow
@pytest.mark.serial  # it counts the replaces done in 4 s: a rate
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_replace_under_load_keeps_users_tunnels_and_counters(
    layout: tuple[str, ...],
) -> None:
    with layout_server(layout) as server:
        async with echo_server() as echo:
            ok(server, {"opt": 4, "args_bunch": _desired(0, echo.addr)})
            stop = asyncio.Event()
            sent: Counter[str] = Counter()
            opened: Counter[str] = Counter()

            async def client(path: str, seed: int) -> None:
                round_ = 0
                while not stop.is_set():
                    payload = pattern(
                        seed * 1000 + round_, 1 + (seed * 7919 + round_ * 104729) % 65536
                    )
                    async with ws_open(server, path) as ws:
                        opened[path] += 1
                        sender = asyncio.ensure_future(upload(ws, payload, chunk=8192))
                        assert await receive(ws, len(payload), limit_s=10) == payload
                        await sender
                        sent[path] += len(payload)
                    round_ += 1

            def controller() -> tuple[int, list[dict[str, object]]]:
                revision = ok(server, {"opt": 9})["revision"]
                round_ = 1
                desired = _desired(0, echo.addr)
                deadline = time.monotonic() + 4
                while time.monotonic() < deadline:
                    desired = _desired(round_, echo.addr)
                    reply = ok(server, {"opt": 4, "args_bunch": desired})
                    assert reply["revision"] == revision + 1, (reply, revision)
                    assert reply["current_users"] == len(desired)
                    revision = reply["revision"]
                    round_ += 1
                    time.sleep(0.02)
                return round_ - 1, desired

            clients = [
                asyncio.ensure_future(client(path, i * len(STEADY) + n))
                for n, path in enumerate(STEADY)
                for i in range(2)
            ]
            replaces, last = await asyncio.to_thread(controller)
            stop.set()
            await asyncio.gather(*clients)  # any refusal or broken tunnel fails here
            for path in STEADY:
                await wait_active(server, path, 0)
            users = listing(server)
            print(
                f"\n{layout}: {replaces} replaces, tunnels "
                + ", ".join(f"{p} {opened[p]}" for p in STEADY)
            )
            assert replaces >= 20
            assert sorted(users) == sorted(str(e["path"]) for e in last)
            for path in STEADY:
                entry = users[path]
                assert entry["bytes_up"] == sent[path], path
                assert entry["bytes_down"] == sent[path], path
                assert entry["total_tunnels"] == opened[path], path
                assert opened[path] >= 5, path

            # Users left out of the set are gone, with their counters.
            ok(server, {"opt": 4, "args_bunch": _desired(0, echo.addr)[:2]})
            assert sorted(listing(server)) == ["/s0", "/s1"]
            for path in ("/s2", "/s3"):
                assert await refused_status_404(server, path)
            assert listing(server, "/s0")["/s0"]["bytes_up"] == sent["/s0"]


async def refused_status_404(server: ServerProcess, path: str) -> bool:
    with pytest.raises(InvalidStatus) as info:
        async with ws_open(server, path):
            pass
    return info.value.response.status_code == 404


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_read_and_reset_under_traffic_loses_and_doubles_nothing(
    layout: tuple[str, ...],
) -> None:
    """Resets while tunnels open, transfer and close: the reads add up to what flowed."""
    paths = ["/plain", "/admitted"]
    with layout_server(layout) as server:
        async with echo_server() as echo:
            add(server, "/plain", echo.addr)
            add(server, "/admitted", echo.addr, max_tunnels=50, quota=1 << 40)
            stop = asyncio.Event()
            sent: Counter[str] = Counter()
            opened: Counter[str] = Counter()

            async def client(path: str, seed: int) -> None:
                round_ = 0
                while not stop.is_set():
                    payload = pattern(seed + round_, 1 + (seed * 31 + round_ * 7777) % 100_000)
                    async with ws_open(server, path) as ws:
                        opened[path] += 1
                        await upload(ws, payload, chunk=16384)
                        assert await receive(ws, len(payload), limit_s=10) == payload
                        sent[path] += len(payload)
                    round_ += 1

            def reader() -> tuple[int, dict[str, Counter[str]]]:
                totals: dict[str, Counter[str]] = {p: Counter() for p in paths}
                reads = 0
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    for path, entry in listing(server, *paths, reset=True).items():
                        for key in ("bytes_up", "bytes_down", "total_tunnels"):
                            totals[path][key] += entry[key]
                    reads += 1
                    time.sleep(0.01)
                return reads, totals

            clients = [asyncio.ensure_future(client(p, i * 100)) for i, p in enumerate(paths * 2)]
            reads, totals = await asyncio.to_thread(reader)
            stop.set()
            await asyncio.gather(*clients)
            for path in paths:
                await wait_active(server, path, 0)
            for path, entry in listing(server, *paths, reset=True).items():
                for key in ("bytes_up", "bytes_down", "total_tunnels"):
                    totals[path][key] += entry[key]
            final = listing(server, *paths)
            print(f"\n{layout}: {reads} resets; tunnels {dict(opened)}")
            for path in paths:
                assert totals[path] == Counter(
                    bytes_up=sent[path], bytes_down=sent[path], total_tunnels=opened[path]
                ), path
                assert final[path]["bytes_up"] == 0
                assert final[path]["quota_used"] == 2 * sent[path]


@pytest.mark.slow
@pytest.mark.serial  # it measures a rate to 10 %
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_rate_change_applies_to_open_tunnels(layout: tuple[str, ...]) -> None:
    """opt 1 with a new rate takes effect on a tunnel already throttled; rate 0 lifts it."""
    slow, fast = MiB, 4 * MiB
    with layout_server(layout, "-grace", "0s") as server:
        async with probe_server() as sink:
            add(server, "/rc", sink.addr, rate=slow)
            stop = asyncio.Event()
            async with ws_open(server, "/rc") as ws:
                task = asyncio.ensure_future(_flood_upload(ws, stop, b"r"))
                t0 = time.monotonic()
                await asyncio.sleep(1.7)
                add(server, "/rc", sink.addr, rate=fast)
                t1 = time.monotonic()
                await asyncio.sleep(2.2)
                add(server, "/rc", sink.addr)
                t2 = time.monotonic()
                await asyncio.sleep(0.6)
                t3 = time.monotonic()
                task.cancel()
                ws.transport.abort()
            [conn] = sink.conns
            measured = [
                conn.bytes_between(t0 + 0.5, t1) / (t1 - t0 - 0.5),
                conn.bytes_between(t1 + 0.5, t2) / (t2 - t1 - 0.5),
                conn.bytes_between(t2 + 0.2, t3) / (t3 - t2 - 0.2),
            ]
            print(
                f"\n{layout}: rate 1 MiB/s -> 4 MiB/s -> none: "
                + ", ".join(f"{m / MiB:.2f} MiB/s" for m in measured)
            )
            assert abs(measured[0] - slow) <= 0.1 * slow
            assert abs(measured[1] - fast) <= 0.1 * fast
            assert measured[2] > 3 * fast

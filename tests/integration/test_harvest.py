"""Harvests (opts 7, 8, 10) against the real server: counters taken exactly
once, whatever happens to the reply, the process or the node.

Traffic is real WebSocket tunnels, plain and smux, into a dst that checksums
what it receives; every harvested number is compared with the bytes sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import shutil
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis as RedisClient

from mtt.address import Destination
from mtt.core.commands import Command, Entry, Opt
from mtt.core.harvest import Acked, AckState, HarvestBounds, Refused, Share, Taken
from mtt.core.usage import Usage
from mtt.core.users import User
from mtt.store.redis_store import RedisStore
from tests.integration.accounting_support import (
    KiB,
    Probe,
    add,
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
from tests.integration.test_durable import kill_everything
from tests.integration.test_mux import MuxClient
from tests.integration.test_redis_store import RedisServer, nodes, reach
from tests.support import ServerProcess, pattern, running_server, start_server

DOWN = 150 * KiB + 11  # what the dst sends back on every connection (or smux stream)


# -- traffic -------------------------------------------------------------------------------


async def traffic(
    server: ServerProcess, path: str, probe: Probe, sizes: list[int], *, mux: bool, seed: int
) -> tuple[int, int]:
    """One WebSocket through server: plain, one upload of sizes[0]; smux, one
    stream per size. Each upload is sha256-checked at the dst and each download
    at the client; returns the payload bytes (up, down) the server must count."""
    first = len(probe.conns)
    payloads = [pattern(seed + i, size) for i, size in enumerate(sizes)]
    async with ws_open(server, path, mux=mux) as ws:
        if mux:
            client = MuxClient(ws)
            sids = [await client.open() for _ in payloads]
            await asyncio.gather(*(client.send(s, p) for s, p in zip(sids, payloads, strict=True)))
            await client.wait_for(lambda: all(len(client.received[s]) == DOWN for s in sids))
            downloads = [bytes(client.received[s]) for s in sids]
        else:
            (payload,) = payloads
            sender = asyncio.ensure_future(upload(ws, payload, chunk=50_000))
            downloads = [await receive(ws, DOWN)]
            await sender
        await until(
            lambda: (
                len(probe.conns) == first + len(sizes)
                and sorted(c.received for c in probe.conns[first:]) == sorted(sizes)
            )
        )
        if mux:
            await client.close()
    assert {c.digest.digest() for c in probe.conns[first:]} == {sha(p) for p in payloads}
    assert {sha(d) for d in downloads} == {sha(pattern(probe.seed, DOWN))}
    return sum(sizes), DOWN * len(sizes)


async def counted(server: ServerProcess, path: str, up: int, down: int) -> None:
    """Wait until the live counters (opt 5, no reset) show exactly this."""
    await wait_active(server, path, 0)

    def there() -> bool:
        entry = listing(server, path)[path]
        return (entry["bytes_up"], entry["bytes_down"]) == (up, down)

    await until(there)
    entry = listing(server, path)[path]
    assert (entry["bytes_up"], entry["bytes_down"]) == (up, down), entry


def share(path: str, up: int, down: int, tunnels: int = 1) -> dict[str, Any]:
    return {"path": path, "bytes_up": up, "bytes_down": down, "total_tunnels": tunnels}


def harvest_of(reply: dict[str, Any]) -> dict[str, Any]:
    """What must be the same however often a harvest is asked for."""
    return {k: reply[k] for k in ("harvest_id", "taken_at", "more", "harvested")}


def refused(server: ServerProcess, doc: dict[str, Any]) -> dict[str, Any]:
    status, reply = server.control(doc)
    assert (status, reply["res"]) == (409, 2), reply
    return reply


# -- a reply that never arrives -----------------------------------------------------------


class CuttingProxy:
    """Between the panel and the controller: forwards each request whole, reads
    the controller's reply, and cuts the panel's connection (RST) instead of
    passing it on; `dropped` keeps the replies the panel never saw."""

    def __init__(self, controller: str) -> None:
        host, port = controller.rsplit(":", 1)
        self.target = (host, int(port))
        self.dropped: list[bytes] = []
        self.server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return "127.0.0.1", int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def forward() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(64 * KiB):
                    up_writer.write(data)
                    await up_writer.drain()

        forwarding = asyncio.ensure_future(forward())
        try:
            async with asyncio.timeout(30):
                self.dropped.append(await _one_reply(up_reader))
        finally:
            writer.transport.abort()  # the panel sees a reset, not a byte of the reply
            forwarding.cancel()
            up_writer.close()

    def dropped_reply(self) -> dict[str, Any]:
        (raw,) = self.dropped
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        reply: dict[str, Any] = json.loads(body)
        return reply


async def _one_reply(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


@contextlib.asynccontextmanager
async def cutting_proxy(controller: str) -> AsyncIterator[CuttingProxy]:
    proxy = CuttingProxy(controller)
    proxy.server = await asyncio.start_server(proxy._handle, "127.0.0.1", 0)
    try:
        yield proxy
    finally:
        proxy.server.close()


def post(address: tuple[str, int], doc: dict[str, Any]) -> dict[str, Any]:
    """A panel's request, as http.client sends it."""
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("POST", "/", body=json.dumps(doc).encode())
        reply: dict[str, Any] = json.loads(conn.getresponse().read())
        return reply
    finally:
        conn.close()


@pytest.mark.parametrize("mux", [False, True], ids=["plain", "smux"])
async def test_a_lost_reply_is_recovered_by_its_id_and_nothing_counts_twice(mux: bool) -> None:
    sizes_1 = [700 * KiB + 3, 64 * KiB + 1, 9] if mux else [1024 * KiB + 5]
    sizes_2 = [300 * KiB + 17, 1] if mux else [333 * KiB + 7]
    with running_server("-workers", "2", "-timeout", "1m") as server:
        async with probe_server(download=DOWN) as probe, cutting_proxy(server.controller) as cut:
            add(server, "/h", probe.addr)
            add(server, "/quiet", probe.addr)
            up_1, down_1 = await traffic(server, "/h", probe, sizes_1, mux=mux, seed=1)
            await counted(server, "/h", up_1, down_1)

            # The panel asks for harvest h-1; the server takes it; the reply is lost.
            with pytest.raises((ConnectionError, http.client.HTTPException)):
                await asyncio.to_thread(post, cut.address, {"opt": 7, "harvest_id": "h-1"})
            lost = cut.dropped_reply()
            assert (lost["res"], lost["repeat"], lost["more"]) == (1, False, False)
            assert lost["harvested"] == [share("/h", up_1, down_1)]  # one WebSocket
            assert listing(server, "/h")["/h"]["bytes_up"] == 0  # moved out of the live counters

            # Traffic while h-1 is pending counts live, not in h-1.
            up_2, down_2 = await traffic(server, "/h", probe, sizes_2, mux=mux, seed=50)
            await counted(server, "/h", up_2, down_2)

            # The retry gets exactly the lost reply's numbers.
            again = ok(server, {"opt": 7, "harvest_id": "h-1"})
            assert again["repeat"] is True
            assert harvest_of(again) == harvest_of(lost)
            # A panel that lost even the id: another id is refused naming it, opt 10 tells it.
            other = refused(server, {"opt": 7, "harvest_id": "h-2"})
            assert other["pending_id"] == "h-1"
            assert "h-1" in other["err_string"]
            assert harvest_of(ok(server, {"opt": 10})) == harvest_of(lost)

            acked = ok(server, {"opt": 8, "harvest_id": "h-1"})
            assert (acked["ack"], acked["pending_id"]) == ("acked", "")
            assert ok(server, {"opt": 8, "harvest_id": "h-1"})["ack"] == "already_acked"
            assert ok(server, {"opt": 8, "harvest_id": "never"})["ack"] == "unknown"
            assert ok(server, {"opt": 10})["harvest_id"] == ""
            # A late duplicate of the first request takes nothing under a finished id.
            assert refused(server, {"opt": 7, "harvest_id": "h-1"})["pending_id"] == ""

            second = ok(server, {"opt": 7, "harvest_id": "h-2"})
            assert second["harvested"] == [share("/h", up_2, down_2)]  # only what came after
            assert ok(server, {"opt": 8, "harvest_id": "h-2"})["ack"] == "acked"
            entry = listing(server, "/h")["/h"]
            assert (entry["bytes_up"], entry["bytes_down"], entry["total_tunnels"]) == (0, 0, 0)
            assert entry["quota_used"] == up_1 + down_1 + up_2 + down_2  # not a billing period
            assert ok(server, {"opt": 7, "harvest_id": "h-3"})["harvested"] == []
            ok(server, {"opt": 8, "harvest_id": "h-3"})


async def test_a_harvest_in_the_middle_of_a_tunnel_splits_its_bytes_exactly() -> None:
    """Harvests taken while a tunnel streams: their sum is every byte, once."""
    chunks = [pattern(100 + i, 200 * KiB + i) for i in range(4)]
    with running_server("-workers", "2", "-timeout", "1m") as server:
        async with probe_server(download=DOWN) as probe:
            add(server, "/mid", probe.addr)
            taken = []
            async with ws_open(server, "/mid") as ws:
                back = await receive(ws, DOWN)
                sent = 0
                for i, chunk in enumerate(chunks):
                    await upload(ws, chunk)
                    sent += len(chunk)
                    await until(lambda n=sent: probe.conns[0].received == n)  # type: ignore[misc]
                    reply = ok(server, {"opt": 7, "harvest_id": f"mid-{i}"})
                    taken.append(reply["harvested"])
                    ok(server, {"opt": 8, "harvest_id": f"mid-{i}"})
            assert probe.conns[0].digest.digest() == sha(b"".join(chunks))
            assert sha(back) == sha(pattern(probe.seed, DOWN))
            await wait_active(server, "/mid", 0)
            last = ok(server, {"opt": 7, "harvest_id": "mid-last"})["harvested"]
    shares = [s for harvest in [*taken, last] for s in harvest]
    assert sum(s["bytes_up"] for s in shares) == sum(len(c) for c in chunks)
    assert sum(s["bytes_down"] for s in shares) == DOWN
    assert sum(s["total_tunnels"] for s in shares) == 1


# -- SQLite across kill -9 -----------------------------------------------------------------


def in_the_file(db: str, path: str) -> tuple[int, int]:
    """bytes_up, bytes_down of a user as committed to the file."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT bytes_up, bytes_down FROM users WHERE path = ?", (path,))
        up, down = row.fetchone()
    return int(up), int(down)


@contextlib.contextmanager
def killed_at_the_end(*args: str) -> Iterator[ServerProcess]:
    """A server (and its workers) that ends by SIGKILL, whatever the test did."""
    server = start_server(*args, prefix=("setsid",))
    try:
        yield server
    finally:
        kill_everything(server)
        assert "Traceback" not in server.log_text(), server.log_text()


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid(1)")
async def test_kill_9_keeps_a_pending_harvest_and_never_recounts_an_acked_one(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "users.db")
    # Counters reach the file only through a harvest, or also every 200 ms.
    never = ("-db", db, "-workers", "2", "-flush-interval", "1h")
    often = ("-db", db, "-workers", "2", "-flush-interval", "200ms")
    async with probe_server(download=DOWN) as probe:
        with killed_at_the_end(*never) as first:
            add(first, "/h", probe.addr)
            up_a, down_a = await traffic(first, "/h", probe, [512 * KiB + 1], mux=False, seed=1)
            await counted(first, "/h", up_a, down_a)
            taken = ok(first, {"opt": 7, "harvest_id": "h1"})
            assert taken["harvested"] == [share("/h", up_a, down_a)]
            # kill -9 before the ack: no flush ever ran, the harvest's transaction holds them

        with killed_at_the_end(*often) as second:
            assert harvest_of(ok(second, {"opt": 10})) == harvest_of(taken)
            assert harvest_of(ok(second, {"opt": 7, "harvest_id": "h1"})) == harvest_of(taken)
            entry = listing(second, "/h")["/h"]
            assert (entry["bytes_up"], entry["bytes_down"]) == (0, 0)  # not counted again
            assert entry["quota_used"] == up_a + down_a
            up_b, down_b = await traffic(second, "/h", probe, [77 * KiB + 5], mux=False, seed=2)
            await counted(second, "/h", up_b, down_b)
            await until(lambda: in_the_file(db, "/h") == (up_b, down_b))  # flushed
            assert ok(second, {"opt": 8, "harvest_id": "h1"})["ack"] == "acked"
            # kill -9 right after the ack's reply

        with killed_at_the_end(*never) as third:
            assert ok(third, {"opt": 10})["harvest_id"] == ""
            assert ok(third, {"opt": 8, "harvest_id": "h1"})["ack"] == "already_acked"
            assert refused(third, {"opt": 7, "harvest_id": "h1"})["pending_id"] == ""
            # What was flushed and not harvested is there; h1's bytes are not, a second time.
            after = ok(third, {"opt": 7, "harvest_id": "h2"})
            assert after["harvested"] == [share("/h", up_b, down_b)]
            assert ok(third, {"opt": 8, "harvest_id": "h2"})["ack"] == "acked"
            # Traffic neither flushed nor harvested is what a kill -9 loses.
            up_c, down_c = await traffic(third, "/h", probe, [10 * KiB], mux=False, seed=3)
            await counted(third, "/h", up_c, down_c)

        with killed_at_the_end(*never) as fourth:
            assert ok(fourth, {"opt": 8, "harvest_id": "h2"})["ack"] == "already_acked"
            assert ok(fourth, {"opt": 7, "harvest_id": "h3"})["harvested"] == []
            entry = listing(fourth, "/h")["/h"]
            assert entry["quota_used"] == up_a + down_a + up_b + down_b


# -- Redis: one harvest for every node ------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server (Debian package)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def in_redis(redis: RedisServer, path: str) -> tuple[int, int]:
    """The shared counters of a user: what every node has flushed."""
    with contextlib.closing(RedisClient(port=redis.port)) as client:
        up, down = client.hget("mtt:up", path), client.hget("mtt:down", path)
    return int(up or 0), int(down or 0)


async def test_one_harvest_takes_every_nodes_counters_once(redis_server: RedisServer) -> None:
    async with probe_server(download=DOWN) as probe:
        with nodes(redis_server, 1, 2) as (a, b):
            revision = ok(a, {"opt": 1, "args_bunch": [{"path": "/n", "dst": probe.addr}]})
            await reach(revision["revision"], b)
            up_a, down_a = await traffic(a, "/n", probe, [200 * KiB + 1], mux=False, seed=1)
            up_b, down_b = await traffic(b, "/n", probe, [90 * KiB, 3], mux=True, seed=2)
            up, down = up_a + up_b, down_a + down_b
            await until(lambda: in_redis(redis_server, "/n") == (up, down))  # both flushed

            taken = ok(a, {"opt": 7, "harvest_id": "n1"})
            assert taken["harvested"] == [share("/n", up, down, tunnels=2)]
            assert in_redis(redis_server, "/n") == (0, 0)
            # The other node answers the same harvest, and refuses another.
            again = ok(b, {"opt": 7, "harvest_id": "n1"})
            assert (again["repeat"], harvest_of(again)) == (True, harvest_of(taken))
            assert refused(b, {"opt": 7, "harvest_id": "n2"})["pending_id"] == "n1"
            assert harvest_of(ok(b, {"opt": 10})) == harvest_of(taken)

            assert ok(b, {"opt": 8, "harvest_id": "n1"})["ack"] == "acked"
            assert ok(a, {"opt": 8, "harvest_id": "n1"})["ack"] == "already_acked"
            assert ok(a, {"opt": 10})["harvest_id"] == ""
            assert refused(a, {"opt": 7, "harvest_id": "n1"})["pending_id"] == ""
            with contextlib.closing(RedisClient(port=redis_server.port)) as client:
                assert client.exists("mtt:harvest", "mtt:harvest:users") == 0

            up_c, down_c = await traffic(b, "/n", probe, [33 * KiB + 3], mux=False, seed=3)
            await until(lambda: in_redis(redis_server, "/n") == (up_c, down_c))
            later = ok(a, {"opt": 7, "harvest_id": "n2"})
            assert later["harvested"] == [share("/n", up_c, down_c)]
            assert ok(a, {"opt": 8, "harvest_id": "n2"})["ack"] == "acked"
            for node in (a, b):
                entry = listing(node, "/n")["/n"]
                assert (entry["bytes_up"], entry["bytes_down"]) == (0, 0)
                assert entry["quota_used"] == up + down + up_c + down_c


async def test_redis_harvest_script_bounds_paths_and_exact_counters(
    redis_server: RedisServer,
) -> None:
    """The store against a real redis-server: what the Lua script takes."""
    store = RedisStore(redis_server.url, 3600.0)
    await store.load()
    try:
        user = User(Destination("127.0.0.1", 9))
        paths = ["/a", "/b", "/é", "/idle"]
        await store.commit(Command(Opt.ADD, entries=tuple(Entry(p, user) for p in paths)))
        huge = 2**62 + 1  # beyond a double: moved as a string, exact
        await store.add_usage(
            {"/a": Usage(huge, 1, 0, 1), "/b": Usage(5, 0, 5, 0), "/é": Usage(0, 0, 0, 2)}
        )
        await store.flush()
        await store.add_usage({"/b": Usage(1, 2, 3, 1)})  # this node's, not yet flushed
        two = HarvestBounds(max_users=2, acked_kept=2)
        taken = await store.harvest("r1", None, 10.5, two)
        assert isinstance(taken, Taken) and not taken.repeat
        assert taken.harvest.users == (("/a", Share(huge, 1, 1)), ("/b", Share(6, 2, 1)))
        assert (taken.harvest.more, taken.harvest.taken_at) == (True, 10.5)
        assert await store.harvest("r1", ["/é"], 99.0, two) == Taken(taken.harvest, True)
        assert await store.pending_harvest() == taken.harvest
        assert await store.harvest("r2", None, 11.0, two) == Refused("r1", False)
        live = await store.read_usage(["/a", "/é"], False)
        assert (live["/a"].bytes_up, live["/a"].quota_used, live["/é"].total_tunnels) == (0, 0, 2)
        assert await store.ack_harvest("r1", two) == Acked(AckState.ACKED, "")
        rest = await store.harvest("r2", ["/é", "/idle", "/nobody"], 12.0, two)
        assert isinstance(rest, Taken)
        assert (rest.harvest.users, rest.harvest.more) == ((("/é", Share(0, 0, 2)),), False)
        assert await store.ack_harvest("r2", two) == Acked(AckState.ACKED, "")
        await store.harvest("r3", None, 13.0, two)
        assert await store.ack_harvest("r3", two) == Acked(AckState.ACKED, "")
        # Two acknowledged ids are kept: r1 is forgotten, r2 and r3 are not.
        assert await store.ack_harvest("r2", two) == Acked(AckState.ALREADY_ACKED, "")
        assert await store.ack_harvest("r1", two) == Acked(AckState.UNKNOWN, "")
        assert await store.harvest("r3", None, 14.0, two) == Refused("", acked_before=True)
        assert await store.pending_harvest() is None
    finally:
        await store.close()

"""Several nodes sharing users through a real redis-server (-store redis://).

Each test starts its own redis-server on a free loopback port (AOF with fsync
always, so a killed server comes back with its data) and three mtt nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from redis import Redis as RedisClient
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support import (
    ServerProcess,
    concurrent_adds,
    echo_server,
    pattern,
    start_server,
    tagged_server,
)

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (Debian package)"
)

FLUSH = "500ms"
# The bounds docs/redis.md promises, plus room for a reload on a busy machine.
SLACK = 2.5
CHECK_BOUND = 2.5 + SLACK  # a change no message announced, a flush, an eviction
RETURN_BOUND = 1.0 + SLACK  # after Redis is back


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """redis-server in a temp dir; kill() is a crash, start() again keeps the port and data."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--dir", str(self.dir), "--save", "", "--appendonly", "yes"),
                *("--appendfsync", "always", "--protected-mode", "no"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def node_args(redis: RedisServer, workers: int = 1) -> tuple[str, ...]:
    return ("-store", redis.url, "-flush-interval", FLUSH, "-workers", str(workers))


@contextlib.contextmanager
def nodes(redis: RedisServer, *workers: int) -> Iterator[list[ServerProcess]]:
    """Nodes started in parallel (each takes a moment to import and listen)."""
    with ThreadPoolExecutor(len(workers)) as pool:
        started = list(pool.map(lambda w: start_server(*node_args(redis, w)), workers))
    try:
        yield started
    finally:
        for node in started:
            stop_clean(node)


def stop_clean(node: ServerProcess) -> None:
    code = node.stop()
    log = node.log_text()
    assert code == 0, f"node exited with {code}:\n{log}"
    assert "Traceback" not in log, log
    assert "did not finish" not in log, log  # every shutdown step ended by itself


def control(node: ServerProcess, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return node.control(doc)


def revision(node: ServerProcess) -> int:
    status, reply = control(node, {"opt": 9})
    assert status == 200, reply
    return int(reply["revision"])


def add(node: ServerProcess, *entries: dict[str, Any]) -> int:
    status, reply = control(node, {"opt": 1, "args_bunch": list(entries)})
    assert (status, reply["res"]) == (200, 1), reply
    return int(reply["revision"])


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)


async def reach(wanted: int, *targets: ServerProcess, within: float = 1.0) -> None:
    for node in targets:
        await until(lambda n=node: revision(n) >= wanted, within, f"revision {wanted}")  # type: ignore[misc]


def ws(node: ServerProcess, path: str) -> connect:
    return connect(
        f"ws://127.0.0.1:{node.port}{path}",
        subprotocols=["smux_off"],  # type: ignore[list-item]
        max_size=None,
        compression=None,
    )


async def read_tag(node: ServerProcess, path: str) -> bytes:
    async with ws(node, path) as conn:
        return bytes(await asyncio.wait_for(conn.recv(), 5))


async def refused(node: ServerProcess, path: str) -> bool:
    try:
        async with ws(node, path):
            return False
    except InvalidStatus:
        return True


async def echo_through(node: ServerProcess, path: str, payload: bytes) -> None:
    async with ws(node, path) as conn:
        await conn.send(payload)
        back = bytearray()
        while len(back) < len(payload):
            back += await asyncio.wait_for(conn.recv(), 10)
        assert back == payload


def listed(node: ServerProcess, path: str) -> dict[str, Any] | None:
    status, reply = control(node, {"opt": 5, "args_bunch": [{"path": path}]})
    assert status == 200, reply
    return reply["users"][0] if reply["users"] else None


async def test_a_change_on_one_node_is_served_by_the_others(redis: RedisServer) -> None:
    async with tagged_server(b"dst-1") as dst:
        with nodes(redis, 1, 1, 2) as (a, b, c):
            rev = add(a, {"path": "/shared", "dst": dst})
            await reach(rev, c, b)  # within 1 s
            assert await read_tag(c, "/shared") == b"dst-1"
            assert await read_tag(b, "/shared") == b"dst-1"

            status, reply = control(b, {"opt": 2, "args_bunch": [{"path": "/shared"}]})
            assert (status, reply["res"], reply["revision"]) == (200, 1, rev + 1)
            await reach(rev + 1, a, c)
            assert await refused(a, "/shared")
            assert await refused(c, "/shared")
            assert control(c, {"opt": 9})[1]["current_users"] == 0


async def test_counters_add_up_across_nodes_exactly(redis: RedisServer) -> None:
    async with echo_server() as echo:
        with nodes(redis, 1, 1, 2) as (a, b, c):
            rev = add(a, {"path": "/billed", "dst": echo.addr, "quota": 10**9})
            await reach(rev, b, c)
            await echo_through(a, "/billed", pattern(1, 100_000))
            await echo_through(c, "/billed", pattern(2, 23_456))
            await echo_through(c, "/billed", pattern(3, 1))
            total = 100_000 + 23_456 + 1

            def summed() -> bool:
                user = listed(b, "/billed")
                return (
                    user is not None and user["total_tunnels"] == 3 and (user["bytes_up"] == total)
                )

            # counters: collected each second, flushed each 0.5 s, on every node
            await until(summed, 8, "the three tunnels counted on B")
            user = listed(b, "/billed")
            assert user is not None
            assert (user["bytes_up"], user["bytes_down"]) == (total, total)
            assert user["quota_used"] == 2 * total

            status, reply = control(a, {"opt": 5, "reset": True})
            assert status == 200 and reply["users"][0]["bytes_up"] == total
            after = listed(c, "/billed")
            assert after is not None
            assert (after["bytes_up"], after["bytes_down"], after["total_tunnels"]) == (0, 0, 0)
            assert after["quota_used"] == 2 * total  # the quota counter survives a read-reset

            # deleting a user drops its counters everywhere; re-adding starts from zero
            status, reply = control(c, {"opt": 2, "args_bunch": [{"path": "/billed"}]})
            assert reply["res"] == 1
            rev = add(c, {"path": "/billed", "dst": echo.addr})
            await reach(rev, a, b)
            user = listed(a, "/billed")
            assert user is not None and user["quota_used"] == 0


async def test_nodes_ride_out_a_redis_outage_and_resync(redis: RedisServer) -> None:
    async with tagged_server(b"old") as old_dst, tagged_server(b"new") as new_dst:
        with nodes(redis, 1, 1, 1) as (a, b, c):
            rev = add(
                a,
                {"path": "/kept", "dst": old_dst},
                {"path": "/quota", "dst": old_dst, "quota": 10**9},
            )
            await reach(rev, b, c)

            redis.kill()
            # existing users are still served, including one whose quota lives in Redis
            assert await read_tag(b, "/kept") == b"old"
            assert await read_tag(c, "/quota") == b"old"
            # writes are refused, applied nowhere
            status, reply = control(a, {"opt": 1, "args_bunch": [{"path": "/x", "dst": new_dst}]})
            assert (status, reply["res"], reply["revision"]) == (503, 2, rev)
            assert "unavailable" in reply["err_string"]
            assert control(a, {"opt": 9})[1]["current_users"] == 2
            assert control(b, {"opt": 5})[0] == 503
            await until(
                lambda: all("lost the Redis subscription" in n.log_text() for n in (a, b, c)),
                5,
                "every node noticed",
            )

            redis.start()  # same port, data back from the append-only file
            # At once, before B and C resubscribe (they back off): they miss this
            # change's message and must catch up by reloading.
            rev2 = add(a, {"path": "/after", "dst": new_dst})
            assert rev2 == rev + 1
            await reach(rev2, b, c, within=8)
            assert await read_tag(c, "/after") == b"new"
            assert await read_tag(b, "/kept") == b"old"
            for node in (b, c):
                assert "Redis is back; reloading the users" in node.log_text()

            # and live pub/sub works again
            rev3 = add(c, {"path": "/later", "dst": new_dst})
            await reach(rev3, a, b)
            assert await read_tag(a, "/later") == b"new"


async def test_a_restarted_node_catches_up(redis: RedisServer) -> None:
    async with tagged_server(b"one") as one, tagged_server(b"two") as two:
        with nodes(redis, 1, 1) as (a, b):
            c = start_server(*node_args(redis))
            rev = add(a, {"path": "/gone", "dst": one}, {"path": "/stays", "dst": one})
            await reach(rev, c)
            stop_clean(c)

            status, _ = control(b, {"opt": 2, "args_bunch": [{"path": "/gone"}]})
            assert status == 200
            rev = add(a, {"path": "/stays", "dst": two}, {"path": "/new", "dst": two})

            c = start_server(*node_args(redis))
            try:
                assert revision(c) == rev
                assert control(c, {"opt": 9})[1]["current_users"] == 2
                assert await read_tag(c, "/new") == b"two"
                assert await read_tag(c, "/stays") == b"two"
                assert await refused(c, "/gone")
            finally:
                stop_clean(c)


async def test_a_bulk_add_of_40000_users_is_one_change(redis: RedisServer) -> None:
    with nodes(redis, 1, 1) as (a, b):
        entries = [
            {"path": f"/bulk{i:05d}", "dst": f"127.0.0.1:{1000 + i % 60000}"} for i in range(40_000)
        ]
        rev = add(a, *entries)
        await reach(rev, b, within=5)
        assert control(b, {"opt": 9})[1]["current_users"] == 40_000
        status, reply = control(b, {"opt": 4, "args_bunch": entries[:3]})
        assert (status, reply["res"], reply["current_users"]) == (200, 1, 3)
        await reach(rev + 1, a)
        assert control(a, {"opt": 9})[1]["current_users"] == 3


@contextlib.contextmanager
def client(redis: RedisServer) -> Iterator[RedisClient]:
    """A direct connection, as an operator's redis-cli."""
    conn = RedisClient.from_url(redis.url, socket_timeout=5)
    try:
        yield conn
    finally:
        conn.close()


def redis_table(conn: RedisClient) -> tuple[int, dict[str, str]]:
    """Redis's revision and users (path -> dst), what every node must serve."""
    revision = int(conn.get("mtt:revision") or 0)
    users = {}
    for path, value in conn.hgetall("mtt:users").items():
        host, port, *_ = json.loads(value)
        users[path.decode()] = f"{host}:{port}"
    return revision, users


def agrees(node: ServerProcess, conn: RedisClient) -> bool:
    """The node lists (opt 5) and counts (opt 9) exactly Redis's users, at its revision."""
    revision, users = redis_table(conn)
    status, listing = control(node, {"opt": 5})
    assert status == 200, listing
    served = {user["path"]: user["dst"] for user in listing["users"]}
    _, ping = control(node, {"opt": 9})
    return (served, ping["current_users"], ping["revision"]) == (users, len(users), revision)


async def serve_redis(conn: RedisClient, *targets: ServerProcess, within: float, what: str) -> None:
    for node in targets:
        await until(lambda n=node: agrees(n, conn), within, what)  # type: ignore[misc]


async def test_two_nodes_taking_changes_at_once_give_each_its_own_revision(
    redis: RedisServer,
) -> None:
    with nodes(redis, 1, 2) as (a, b), client(redis) as conn:
        start, revisions = concurrent_adds([a, b])
        assert len(set(revisions)) == 800, "two replies named one revision"
        assert sorted(revisions) == list(range(start + 1, start + 801))
        # and both nodes serve all 800, though their changes interleaved
        await serve_redis(conn, a, b, within=CHECK_BOUND, what="both serve all 800")
        assert redis_table(conn)[0] == start + 800


WIPES = [
    ("FLUSHALL",),
    ("FLUSHDB",),
    ("DEL", "mtt:users"),  # as an allkeys-* eviction may
    ("DEL", "mtt:revision", "mtt:epoch"),
]


@pytest.mark.slow
async def test_nodes_follow_redis_whatever_happens_to_its_keys(redis: RedisServer) -> None:
    with nodes(redis, 1, 1) as (a, b), client(redis) as conn:
        for round_, wipe in enumerate(WIPES):
            for i in range(5):  # through both nodes, so each is a few revisions on
                add(a if i % 2 else b, {"path": f"/old{round_}-{i}", "dst": "127.0.0.1:1000"})
            await serve_redis(conn, a, b, within=CHECK_BOUND, what="in step")

            conn.execute_command(*wipe)
            # the panel's full sync, through A, at once
            sync = [{"path": f"/new{round_}-{i}", "dst": f"127.0.0.1:{2000 + i}"} for i in (1, 2)]
            status, reply = control(a, {"opt": 4, "args_bunch": sync})
            assert (status, reply["res"], reply["current_users"]) == (200, 1, 2), (wipe, reply)
            await serve_redis(conn, a, b, within=CHECK_BOUND, what=f"synced after {wipe}")
            assert set(redis_table(conn)[1]) == {f"/new{round_}-1", f"/new{round_}-2"}

            # no write after it: Redis is the truth even when that is fewer users
            conn.execute_command(*wipe)
            await serve_redis(conn, a, b, within=CHECK_BOUND, what=f"{wipe} alone")

        # a change made directly in Redis, announced by no message
        conn.hset("mtt:users", "/direct", json.dumps(["127.0.0.1", 3000, 0, 0, 0, 0, 0]))
        conn.incr("mtt:revision")
        await serve_redis(conn, a, b, within=CHECK_BOUND, what="the direct change")
        # and changes still flow through pub/sub
        rev = add(b, {"path": "/later", "dst": "127.0.0.1:4000"})
        await reach(rev, a)
        assert agrees(a, conn)


async def test_a_node_that_missed_changes_serves_redis_soon_after_it_returns(
    redis: RedisServer,
) -> None:
    with nodes(redis, 1, 1) as (a, b), client(redis) as conn:
        rev = add(a, {"path": "/before", "dst": "127.0.0.1:1000"})
        await reach(rev, b)
        redis.kill()
        await until(
            lambda: all("lost the Redis subscription" in n.log_text() for n in (a, b)),
            5,
            "both nodes noticed",
        )
        await asyncio.sleep(3)  # an outage of a few seconds: long enough for a backoff to grow
        redis.start()  # with its data
        # Through B at once, while A is still away: A misses its message.
        rev = add(b, {"path": "/meanwhile", "dst": "127.0.0.1:2000"})
        await serve_redis(conn, a, within=RETURN_BOUND, what="A serves Redis's table")
        assert redis_table(conn) == (
            rev,
            {"/before": "127.0.0.1:1000", "/meanwhile": "127.0.0.1:2000"},
        )
        assert agrees(b, conn)


async def test_a_users_mux_reaches_every_node_and_a_node_started_later(
    redis: RedisServer,
) -> None:
    """Through the change message (2 workers: and on to them), and through mtt:users."""
    with nodes(redis, 1, 2) as (a, b):
        rev = add(
            a,
            {"path": "/v2", "dst": "127.0.0.1:8388", "mux": "mux.cool"},
            {"path": "/plain", "dst": "127.0.0.1:8389"},
        )
        await reach(rev, b)
        for node in (a, b):
            assert (listed(node, "/v2") or {})["mux"] == "mux.cool"
            assert (listed(node, "/plain") or {})["mux"] is None
        c = start_server(*node_args(redis))
        try:
            assert (listed(c, "/v2") or {})["mux"] == "mux.cool"
        finally:
            stop_clean(c)

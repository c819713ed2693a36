"""max_tunnels and max_ips across nodes sharing one real redis-server
(docs/redis.md, "Limits across nodes"): real WebSocket tunnels through two
nodes, the usual 403 when the user's tunnels on both are at the limit, a
killed node's slots freed when its leases end, and both answers of
-redis-limits-when-down while Redis is stopped (SIGSTOP).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from mtt.config import Limits
from tests.integration import test_redis_store
from tests.integration.accounting_support import receive, refused_status, upload, ws_open
from tests.integration.test_redis_store import (
    RedisServer,
    add,
    client,
    node_args,
    reach,
    stop_clean,
    until,
)
from tests.support import ServerProcess, echo_server, pattern, start_server

pytestmark = test_redis_store.pytestmark
redis = test_redis_store.redis  # a redis-server of the test's own

LIMITS = Limits()
LEASE = LIMITS.redis_lease
RENEW = LIMITS.redis_lease_renew
SOCKET_TIMEOUT = LIMITS.redis_socket_timeout
MARGIN = 2.5  # a busy machine's scheduling, the poll, a reconnect


@contextlib.contextmanager
def pair(
    redis: RedisServer, *, a_workers: int = 1, b_args: tuple[str, ...] = ()
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two nodes on the same Redis, started in parallel; each stopped cleanly
    at the end unless the test killed it."""
    argv = [node_args(redis, a_workers), (*node_args(redis), *b_args)]
    with ThreadPoolExecutor(2) as pool:
        a_node, b_node = pool.map(lambda args: start_server(*args), argv)
    try:
        yield a_node, b_node
    finally:
        for node in (a_node, b_node):
            if node.proc.poll() is None:
                stop_clean(node)


async def roundtrip(conn: ClientConnection, seed: int) -> None:
    """Bytes through the tunnel to the echo dst and back, compared whole."""
    payload = pattern(seed, 20_000)
    await upload(conn, payload)
    assert await receive(conn, len(payload), limit_s=10) == payload


async def opened(node: ServerProcess, path: str, from_ip: str | None = None) -> ClientConnection:
    return await ws_open(node, path, from_ip=from_ip)


async def admitted_within(
    node: ServerProcess, path: str, within: float, from_ip: str | None = None
) -> tuple[ClientConnection, float]:
    """Try to open a tunnel until one is admitted (each refusal a 403); the
    tunnel and how long it took."""
    started = time.monotonic()
    while True:
        try:
            return await opened(node, path, from_ip), time.monotonic() - started
        except InvalidStatus as exc:
            assert exc.response.status_code == 403, exc
        if time.monotonic() - started > within:
            raise AssertionError(f"{path} on {node.tunnel} not admitted within {within} s")
        await asyncio.sleep(0.2)


def leases(redis: RedisServer, path: str) -> tuple[int, dict[str, int]]:
    """What Redis holds for the user: tunnels, and tunnels per client address."""
    with client(redis) as conn:
        tunnels = int(conn.zcard(f"mtt:adm:{path}"))
        ips = {k.decode(): int(v) for k, v in conn.hgetall(f"mtt:admip:{path}").items()}
    return tunnels, ips


async def test_max_tunnels_holds_across_two_nodes(redis: RedisServer) -> None:
    async with echo_server() as echo:
        # A serves through two workers: its admissions reach the count over RPC
        with pair(redis, a_workers=2) as (a, b):
            rev = add(a, {"path": "/mt", "dst": echo.addr, "max_tunnels": 2})
            await reach(rev, b)
            async with contextlib.AsyncExitStack() as stack:
                on_a = await stack.enter_async_context(ws_open(a, "/mt"))
                on_b = await stack.enter_async_context(ws_open(b, "/mt"))
                await roundtrip(on_a, 1)
                await roundtrip(on_b, 2)
                assert leases(redis, "/mt") == (2, {"127.0.0.1": 2})
                # each node holds one, below the limit on its own: the shared count refuses
                assert await refused_status(a, "/mt") == 403
                assert await refused_status(b, "/mt") == 403
                assert await refused_status(b, "/mt") == 403  # no slot leaked
                for node in (a, b):
                    await until(
                        lambda n=node: "at its limit of 2 tunnels across nodes" in n.log_text(),  # type: ignore[misc]
                        2,
                        "the refusal's log line",
                    )
                await on_a.close()
                # the slot A held is B's to give now
                third, _ = await admitted_within(b, "/mt", within=MARGIN)
                stack.push_async_callback(third.close)
                await roundtrip(third, 3)
                assert await refused_status(a, "/mt") == 403
            await until(lambda: leases(redis, "/mt") == (0, {}), MARGIN, "every lease let go")


async def test_max_ips_holds_across_two_nodes(redis: RedisServer) -> None:
    async with echo_server() as echo:
        with pair(redis) as (a, b):
            rev = add(a, {"path": "/mi", "dst": echo.addr, "max_ips": 1})
            await reach(rev, b)
            async with ws_open(a, "/mi") as first:
                await roundtrip(first, 4)
                assert await refused_status(b, "/mi", from_ip="127.0.0.2") == 403
                async with ws_open(b, "/mi") as same_address:  # the same address, another node
                    await roundtrip(same_address, 5)
                    assert leases(redis, "/mi") == (2, {"127.0.0.1": 2})
                    assert await refused_status(a, "/mi", from_ip="127.0.0.2") == 403
            assert "at its limit of 1 client addresses across nodes" in b.log_text()
            # once 127.0.0.1 has nothing open anywhere, another address may come in
            other, _ = await admitted_within(b, "/mi", within=MARGIN, from_ip="127.0.0.2")
            async with other:
                await roundtrip(other, 6)
                assert leases(redis, "/mi") == (1, {"127.0.0.2": 1})


@pytest.mark.slow
async def test_a_killed_nodes_slots_free_when_its_leases_end(redis: RedisServer) -> None:
    async with echo_server() as echo:
        with pair(redis) as (a, b):
            rev = add(a, {"path": "/kill", "dst": echo.addr, "max_tunnels": 2})
            await reach(rev, b)
            held = [await opened(a, "/kill"), await opened(a, "/kill")]
            for i, conn in enumerate(held):
                await roundtrip(conn, 10 + i)
            assert await refused_status(b, "/kill") == 403

            a.proc.send_signal(signal.SIGKILL)  # no clean shutdown: nothing is let go
            a.proc.wait()
            killed = time.monotonic()
            # not at once: the leases outlive the node by up to the lease
            assert await refused_status(b, "/kill") == 403
            assert leases(redis, "/kill")[0] == 2
            conn, _ = await admitted_within(b, "/kill", within=LEASE + MARGIN)
            after = time.monotonic() - killed
            async with conn:
                await roundtrip(conn, 12)
            # the last renewal was at most RENEW before the kill
            assert LEASE - RENEW - MARGIN <= after <= LEASE + MARGIN, after
            for dead in held:  # closed by the kernel with their node
                await asyncio.wait_for(dead.wait_closed(), 5)


@pytest.mark.slow
async def test_redis_stopped_open_admits_closed_refuses_unlimited_pass(
    redis: RedisServer,
) -> None:
    async with echo_server() as echo:
        with pair(redis, b_args=("-redis-limits-when-down", "closed")) as (a, b):
            rev = add(
                a,
                {"path": "/lim", "dst": echo.addr, "max_tunnels": 5, "max_ips": 2},
                {"path": "/free", "dst": echo.addr},
            )
            await reach(rev, b)
            async with ws_open(a, "/lim") as before:  # Redis answers: counted there
                await roundtrip(before, 20)
                assert leases(redis, "/lim") == (1, {"127.0.0.1": 1})
            await until(lambda: leases(redis, "/lim") == (0, {}), MARGIN, "its lease let go")
            assert redis.proc is not None
            redis.proc.send_signal(signal.SIGSTOP)
            try:
                async with contextlib.AsyncExitStack() as stack:

                    async def opened(node: ServerProcess, path: str, seed: int) -> float:
                        """Seconds to open a tunnel (kept open), which then carries data."""
                        started = time.monotonic()
                        conn = await stack.enter_async_context(ws_open(node, path))
                        took = time.monotonic() - started
                        await roundtrip(conn, seed)
                        return took

                    async def refused_limited() -> float:
                        started = time.monotonic()
                        assert await refused_status(b, "/lim") == 403
                        return time.monotonic() - started

                    free_a, free_b, lim_a, lim_b = await asyncio.gather(
                        opened(a, "/free", 21),
                        opened(b, "/free", 21),
                        opened(a, "/lim", 22),
                        refused_limited(),
                    )
                    # users without max_tunnels/max_ips never wait for Redis
                    assert free_a < 1.0 and free_b < 1.0, (free_a, free_b)
                    # the first limited admission waits out the socket timeout, no more
                    assert lim_a <= SOCKET_TIMEOUT + MARGIN, lim_a
                    assert lim_b <= SOCKET_TIMEOUT + MARGIN, lim_b
                    # the next ones (within Limits.redis_limits_retry) get the
                    # policy's answer at once
                    lim_a, lim_b = await asyncio.gather(opened(a, "/lim", 22), refused_limited())
                    assert lim_a < 1.0 and lim_b < 1.0, (lim_a, lim_b)
                    assert await opened(b, "/free", 21) < 1.0

                    logs_a, logs_b = a.log_text(), b.log_text()
                    assert logs_a.count("admitting on this node's own count") == 1, logs_a
                    assert logs_b.count("refusing users with max_tunnels or max_ips") == 1, logs_b
                    assert "-redis-limits-when-down closed" in logs_b
                    assert "its limits across nodes cannot be checked" in logs_b

                    redis.proc.send_signal(signal.SIGCONT)
                    # A's two tunnels admitted while Redis was silent reach it with
                    # A's next renewal; B's refused attempts leave nothing behind
                    await until(
                        lambda: leases(redis, "/lim") == (2, {"127.0.0.1": 2}),
                        RENEW + MARGIN,
                        "the leases of the tunnels admitted during the outage",
                    )
                    late, _ = await admitted_within(b, "/lim", within=MARGIN)
                    stack.push_async_callback(late.close)
                    await roundtrip(late, 24)
                    assert leases(redis, "/lim") == (3, {"127.0.0.1": 3})
                    await until(
                        lambda: (
                            "Redis answers again" in a.log_text()
                            and "Redis answers again" in b.log_text()
                        ),
                        RENEW + MARGIN,
                        "each node says the outage ended",
                    )
            finally:
                redis.proc.send_signal(signal.SIGCONT)

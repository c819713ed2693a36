"""Per-user admission limits, kick and controller validation (issue 7), against
the real server in both layouts. A refusal is an nginx-style 403 at the
upgrade, exactly at the limit; waits are on the list reply, not on the clock."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection
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
    refused_status,
    until,
    upload,
    wait_active,
    ws_open,
)
from tests.integration.test_mux import MuxClient
from tests.support import ServerProcess, echo_server, pattern


async def roundtrip(ws: ClientConnection, size: int = 1000) -> None:
    payload = pattern(size, size)
    await upload(ws, payload)
    assert await receive(ws, size, limit_s=10) == payload


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_max_tunnels_refuses_the_third_and_frees_on_close(layout: tuple[str, ...]) -> None:
    with layout_server(layout) as server:
        async with echo_server() as echo:
            add(server, "/mt", echo.addr, max_tunnels=2)
            async with ws_open(server, "/mt") as first, ws_open(server, "/mt", mux=True):
                with pytest.raises(InvalidStatus) as info:
                    async with ws_open(server, "/mt"):
                        pass
                response = info.value.response
                assert response.status_code == 403
                assert response.headers["Server"] == "nginx"
                assert await refused_status(server, "/mt") == 403  # and again: no slot leaked
                assert listing(server, "/mt")["/mt"]["active_tunnels"] == 2
                await first.close()
                await wait_active(server, "/mt", 1)
                async with ws_open(server, "/mt") as third:
                    await roundtrip(third)
                    assert await refused_status(server, "/mt") == 403
            await wait_active(server, "/mt", 0)
            # Refused attempts took no slot: two fit again.
            async with ws_open(server, "/mt") as a, ws_open(server, "/mt") as b:
                await roundtrip(a)
                await roundtrip(b)
            await until(lambda: "at its limit of 2 tunnels" in server.log_text())


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_max_ips_refuses_a_second_address(layout: tuple[str, ...]) -> None:
    with layout_server(layout) as server:
        async with echo_server() as echo:
            add(server, "/mi", echo.addr, max_ips=1)
            async with ws_open(server, "/mi") as a, ws_open(server, "/mi") as same_ip:
                await roundtrip(a)
                await roundtrip(same_ip)
                assert await refused_status(server, "/mi", from_ip="127.0.0.2") == 403
                assert listing(server, "/mi")["/mi"]["client_ips"] == ["127.0.0.1"]
            await wait_active(server, "/mi", 0)
            async with ws_open(server, "/mi", from_ip="127.0.0.2") as b:
                await roundtrip(b)
                assert listing(server, "/mi")["/mi"]["client_ips"] == ["127.0.0.2"]
                assert await refused_status(server, "/mi") == 403
            await until(lambda: "at its limit of 1 client addresses" in server.log_text())


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_quota_refuses_once_used_up_and_a_new_period_admits(
    layout: tuple[str, ...],
) -> None:
    chunk = 600 * KiB
    rest = MiB - chunk  # the second tunnel ends exactly at the quota
    with layout_server(layout) as server:
        async with probe_server() as sink:
            add(server, "/q", sink.addr, quota=MiB)
            for round_, size in enumerate((chunk, rest)):
                async with ws_open(server, "/q") as ws:
                    await upload(ws, pattern(round_, size))
                    done = [chunk, rest][: round_ + 1]
                    await until(lambda: [c.received for c in sink.conns] == done)  # noqa: B023
                    if round_ == 1:  # used up while open: closed by the server
                        await asyncio.wait_for(ws.wait_closed(), 5)
                await wait_active(server, "/q", 0)
                entry = listing(server, "/q")["/q"]
                assert entry["quota_used"] == chunk + round_ * rest
                assert entry["state"] == ("ok" if round_ == 0 else "over_quota")
                assert entry["blocked"] == ("" if round_ == 0 else "quota")
            assert await refused_status(server, "/q") == 403
            await until(
                lambda: "user /q: quota used up (1048576 of 1048576 bytes)" in server.log_text()
            )
            await until(lambda: "/q: refused: over quota" in server.log_text())

            # Exactly at the quota is over it; one byte more admits.
            add(server, "/q", sink.addr, quota=MiB)
            assert await refused_status(server, "/q") == 403
            assert listing(server, "/q")["/q"]["state"] == "over_quota"
            add(server, "/q", sink.addr, quota=MiB + 1)
            entry = listing(server, "/q")["/q"]
            assert (entry["state"], entry["blocked"]) == ("ok", "")
            async with ws_open(server, "/q"):
                pass
            await wait_active(server, "/q", 0)

            # A new billing period: quota_used back to 0, without a restart.
            add(server, "/q", sink.addr, quota=MiB)
            assert await refused_status(server, "/q") == 403
            add(server, "/q", sink.addr, quota=MiB, quota_used=0)
            entry = listing(server, "/q")["/q"]
            assert (entry["quota_used"], entry["state"]) == (0, "ok")
            assert entry["bytes_up"] == MiB  # traffic counters are not the quota
            async with ws_open(server, "/q") as ws:
                await upload(ws, b"q" * 100)
                await until(lambda: sink.conns[-1].received == 100)  # the last to dial
            await wait_active(server, "/q", 0)
            assert listing(server, "/q")["/q"]["quota_used"] == 100


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_expire_refuses_new_tunnels_from_then_on(layout: tuple[str, ...]) -> None:
    with layout_server(layout) as server:
        async with echo_server() as echo:
            expire = int(time.time()) + 2
            add(server, "/e", echo.addr, expire=expire)
            assert listing(server, "/e")["/e"]["state"] == "ok"
            async with ws_open(server, "/e") as held:
                await roundtrip(held)
                await asyncio.sleep(max(0.0, expire - time.time()) + 0.05)
                assert await refused_status(server, "/e") == 403
                assert listing(server, "/e")["/e"]["state"] == "expired"
            await until(lambda: "/e: refused: expired" in server.log_text())
            add(server, "/e", echo.addr, expire=int(time.time()) + 3600)
            async with ws_open(server, "/e") as ws:
                await roundtrip(ws)


# -- kick --------------------------------------------------------------------------


async def assert_kicked(ws: ClientConnection) -> None:
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert ws.close_code == 1008


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_kick_closes_every_tunnel_of_the_user_only(layout: tuple[str, ...]) -> None:
    with layout_server(layout) as server:
        async with echo_server() as echo:
            add(server, "/k", echo.addr)
            add(server, "/k2", echo.addr, max_tunnels=5)
            add(server, "/o", echo.addr)
            async with (
                ws_open(server, "/k") as a,
                ws_open(server, "/k") as b,
                ws_open(server, "/k", mux=True) as m,
                ws_open(server, "/k2") as c,
                ws_open(server, "/o") as other,
            ):
                mux = MuxClient(m)
                sid = await mux.open()
                await mux.send(sid, b"hello")
                await mux.wait_for(lambda: bytes(mux.received[sid]) == b"hello")
                for ws in (a, b, c, other):
                    await roundtrip(ws)
                revision = ok(server, {"opt": 9})["revision"]
                reply = ok(server, {"opt": 6, "args_bunch": [{"path": "/k"}, {"path": "/k2"}]})
                assert reply["kicked"] == 4
                assert reply["revision"] == revision  # a kick changes no user
                for ws in (a, b, m, c):
                    await assert_kicked(ws)
                await roundtrip(other)
                await wait_active(server, "/k", 0)
                await wait_active(server, "/k2", 0)
                # Kicked tunnels are counted to their last byte.
                counted = listing(server, "/k", "/k2")
                assert [(counted[p]["bytes_up"], counted[p]["bytes_down"]) for p in counted] == [
                    (2005, 2005),
                    (1000, 1000),
                ]
                assert listing(server, "/o")["/o"]["active_tunnels"] == 1
                again = ok(server, {"opt": 6, "args_bunch": [{"path": "/k"}, {"path": "/x"}]})
                assert again["kicked"] == 0
                await mux.close()
            # A kick is not a ban.
            async with ws_open(server, "/k") as ws, ws_open(server, "/k2") as ws2:
                await roundtrip(ws)
                await roundtrip(ws2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kick_on_delete", [True, False], ids=["kick-on-delete", "default"])
async def test_delete_and_established_tunnels(
    layout: tuple[str, ...], kick_on_delete: bool
) -> None:
    flags = ("-kick-on-delete",) if kick_on_delete else ()
    with layout_server(layout, *flags) as server:
        async with echo_server() as echo:
            for path in ("/d", "/r", "/keep"):
                add(server, path, echo.addr)
            async with (
                ws_open(server, "/d") as deleted,
                ws_open(server, "/r", mux=True) as replaced,
                ws_open(server, "/keep") as kept,
            ):
                mux = MuxClient(replaced)
                sid = await mux.open()
                await mux.send(sid, b"m")
                await mux.wait_for(lambda: bytes(mux.received[sid]) == b"m")
                await roundtrip(deleted)
                ok(server, {"opt": 2, "args_bunch": [{"path": "/d"}]})
                ok(server, {"opt": 4, "args_bunch": [{"path": "/keep", "dst": echo.addr}]})
                if kick_on_delete:
                    await assert_kicked(deleted)
                    await assert_kicked(replaced)
                else:  # the seed's behaviour: an established tunnel outlives its user
                    await roundtrip(deleted)
                    await mux.send(sid, b"n")
                    await mux.wait_for(lambda: bytes(mux.received[sid]) == b"mn")
                await roundtrip(kept)
                ok(server, {"opt": 3})  # reset: every user goes
                if kick_on_delete:
                    await assert_kicked(kept)
                else:
                    await roundtrip(kept)
                await mux.close()
            for path in ("/d", "/r", "/keep"):
                with pytest.raises(InvalidStatus) as info:
                    async with ws_open(server, path):
                        pass
                assert info.value.response.status_code == 404


# -- controller validation ---------------------------------------------------------

BAD_ENTRIES: list[tuple[dict[str, Any], str]] = [
    ({"rate": -1}, "args_bunch[1].rate must be from 0 to 2^53"),
    ({"rate": 1.5}, "args_bunch[1].rate must be an integer, got number"),
    ({"rate": 2.0}, "args_bunch[1].rate must be an integer, got number"),
    ({"max_tunnels": True}, "args_bunch[1].max_tunnels must be an integer, got boolean"),
    ({"max_ips": "3"}, "args_bunch[1].max_ips must be an integer, got string"),
    ({"quota": 2**53 + 1}, "args_bunch[1].quota must be from 0 to 2^53"),
    ({"quota": 10**30}, "args_bunch[1].quota must be from 0 to 2^53"),
    ({"expire": []}, "args_bunch[1].expire must be an integer, got array"),
    ({"quota_used": -5}, "args_bunch[1].quota_used must be from 0 to 2^53"),
    ({"quota_used": False}, "args_bunch[1].quota_used must be an integer, got boolean"),
]


def _rejected(server: ServerProcess, doc: dict[str, Any], message: str) -> None:
    status, reply = server.control(doc)
    assert (status, reply["res"]) == (400, 2), reply
    assert message in reply["err_string"], reply


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_bad_limit_fields_are_rejected_and_nothing_applies(
    layout: tuple[str, ...],
) -> None:
    with layout_server(layout) as server:
        add(server, "/v", "127.0.0.1:9", quota=100, rate=5)
        before = listing(server)
        revision = ok(server, {"opt": 9})["revision"]
        good = {"path": "/new", "dst": "127.0.0.1:9"}
        for fields, message in BAD_ENTRIES:
            bad = {"path": "/v", "dst": "127.0.0.1:10", **fields}
            for opt in (1, 4):  # a good first entry is not applied either
                _rejected(server, {"opt": opt, "args_bunch": [good, bad]}, message)
        _rejected(
            server,
            {"opt": 4, "args_bunch": [good, {"path": "/new", "dst": "127.0.0.1:8"}]},
            'args_bunch[1].path "/new" appears twice',
        )
        for reset in ("yes", 1, None, [True]):
            _rejected(server, {"opt": 5, "reset": reset}, "reset must be a boolean")
        assert listing(server) == before
        assert ok(server, {"opt": 9})["revision"] == revision
        # The bounds themselves are fine.
        top = {"rate": 2**53, "max_tunnels": 0, "quota": 2**53, "expire": 0, "quota_used": 2**53}
        add(server, "/v", "127.0.0.1:9", **top)
        entry = listing(server, "/v")["/v"]
        assert (entry["rate"], entry["quota"], entry["quota_used"]) == (2**53, 2**53, 2**53)


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_concurrent_upgrades_admit_exactly_max_tunnels(layout: tuple[str, ...]) -> None:
    """Twelve upgrades at once against max_tunnels=3 (with a quota, so admission
    also reads the counters): exactly three get through."""
    with layout_server(layout) as server:
        async with echo_server() as echo:
            add(server, "/burst", echo.addr, max_tunnels=3, quota=1 << 40)
            release = asyncio.Event()

            async def attempt() -> bool:
                try:
                    async with ws_open(server, "/burst") as ws:
                        await roundtrip(ws)
                        await release.wait()
                        return True
                except InvalidStatus as exc:
                    assert exc.response.status_code == 403
                    return False

            tasks = [asyncio.ensure_future(attempt()) for _ in range(12)]
            await until(lambda: sum(t.done() for t in tasks) == 9)
            assert listing(server, "/burst")["/burst"]["active_tunnels"] == 3
            release.set()
            assert sorted(await asyncio.gather(*tasks)) == [False] * 9 + [True] * 3
            await wait_active(server, "/burst", 0)


async def test_a_dead_worker_frees_its_admitted_tunnels() -> None:
    """The supervisor counts admitted tunnels per worker: when a worker dies its
    tunnels die with it and their slots come back."""
    import os
    import signal

    with layout_server(("-workers", "2")) as server:
        async with echo_server() as echo:
            add(server, "/one", echo.addr, max_tunnels=1)
            async with ws_open(server, "/one") as ws:
                await roundtrip(ws)
                assert await refused_status(server, "/one") == 403
                before = server.children()
                for pid in before:
                    os.kill(pid, signal.SIGKILL)
                await asyncio.wait_for(ws.wait_closed(), 10)
            await until(
                lambda: len(server.children()) == 2 and not set(server.children()) & set(before),
                limit_s=20,
            )
            await wait_active(server, "/one", 0)
            async with ws_open(server, "/one") as ws:
                await roundtrip(ws)

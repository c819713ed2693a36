"""Early data in Sec-WebSocket-Protocol (docs/protocol.md §10) against the
server as a process: the bytes reach dst first and whole, are counted as
upload, the 101 echoes the header; past the bound the upgrade gets a 400.
tests/interop/test_early_data.py does the same with a Go client that dials
as Xray's does."""

from __future__ import annotations

import asyncio
from base64 import urlsafe_b64encode

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from mtt.config import Limits
from tests.integration.accounting_support import (
    LAYOUTS,
    KiB,
    add,
    layout_server,
    listing,
    probe_server,
    receive,
    sha,
    until,
    upload,
    wait_active,
)
from tests.support import ServerProcess, echo_server, pattern

MAX_EARLY_DATA = Limits().max_early_data


def raw_url(data: bytes) -> str:
    """base64.RawURLEncoding, as Xray's dialer encodes early data."""
    return urlsafe_b64encode(data).decode().rstrip("=")


def ed_open(server: ServerProcess, path: str, early: bytes) -> connect:
    """A WebSocket whose first bytes ride in Sec-WebSocket-Protocol."""
    return connect(
        f"ws://tunnel.test:{server.port}{path}",
        host="127.0.0.1",
        port=server.port,
        subprotocols=[raw_url(early)],  # type: ignore[list-item]
        max_size=None,
        compression=None,
        open_timeout=10,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    ("mux", "limits"),
    [
        pytest.param(False, {}, id="plain"),
        pytest.param(True, {}, id="mux-default"),
        # A user with server-wide limits is admitted before its tunnel opens.
        pytest.param(False, {"max_tunnels": 10, "quota": 1 << 40}, id="admitted"),
    ],
)
async def test_early_data_goes_first_and_is_counted(
    layout: tuple[str, ...], mux: bool, limits: dict[str, int]
) -> None:
    early = pattern(21, 2048)
    rest = pattern(22, 300 * KiB + 5)
    down = 100 * KiB + 3
    with layout_server(layout, *(["-mux"] if mux else [])) as server:
        async with probe_server(download=down) as probe:
            add(server, "/ed", probe.addr, **limits)
            async with ed_open(server, "/ed", early) as ws:
                assert ws.subprotocol == raw_url(early)
                assert ws.response.headers["Sec-WebSocket-Protocol"] == raw_url(early)
                sender = asyncio.ensure_future(upload(ws, rest, chunk=16 * KiB))
                back = await receive(ws, down)
                await sender
                await until(lambda: len(probe.conns) == 1)
                await until(lambda: probe.conns[0].received == len(early) + len(rest))
            assert probe.conns[0].first == early[:1]
            assert probe.conns[0].digest.digest() == sha(early + rest)
            assert sha(back) == sha(pattern(probe.seed, down))
            await wait_active(server, "/ed", 0)
            entry = listing(server, "/ed")["/ed"]
            assert (entry["bytes_up"], entry["bytes_down"]) == (len(early) + len(rest), down)
            if limits:
                assert entry["quota_used"] == len(early) + len(rest) + down


async def test_early_data_alone_gets_its_answer() -> None:
    """A request that fits in the header needs no frame at all."""
    with layout_server(("-workers", "1")) as server:
        async with echo_server() as echo:
            add(server, "/ed", echo.addr)
            early = pattern(23, MAX_EARLY_DATA)  # at the bound
            async with ed_open(server, "/ed", early) as ws:
                assert await receive(ws, len(early)) == early


async def test_early_data_over_the_bound_is_refused() -> None:
    with layout_server(("-workers", "1")) as server:
        async with echo_server() as echo:
            add(server, "/ed", echo.addr)
            with pytest.raises(InvalidStatus) as info:
                async with ed_open(server, "/ed", pattern(24, MAX_EARLY_DATA + 1)):
                    pass
            assert info.value.response.status_code == 400
            await until(lambda: "early data" in server.log_text())
            assert (
                f"/ed: early data of {MAX_EARLY_DATA + 1} bytes over the"
                f" {MAX_EARLY_DATA}-byte bound" in server.log_text()
            )
            assert echo.connections == 0

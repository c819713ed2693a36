"""Client close frames answered as gorilla/websocket answers them: the same close
frame, code for code, from our server and from gorelay (a Go server built on
gorilla/websocket, as mtt-mu-server is), for each boundary of RFC 6455 §7.4's
valid and invalid ranges, in both sub-protocols.

Three answers differ on purpose: picows (not gorilla) fails a 1-byte close body
(1002, RFC 6455 §5.5.1 requires a 2-byte code) and a reason that is not UTF-8
(1007, where gorilla says 1002), and an empty close is answered with 1000 where
gorilla sends an empty close.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.gopeers import Peer, running_peer

from tests.integration.hostile_helpers import (
    INVALID_CLOSE_CODES,
    OP_CLOSE,
    VALID_CLOSE_CODES,
    RawWebSocket,
    dst_server,
    ws_frame,
)
from tests.support import ServerProcess, running_server

pytestmark = pytest.mark.interop

BODIES = {
    **{f"code-{code}": struct.pack("!H", code) + b"bye" for code in INVALID_CLOSE_CODES},
    **{f"code-{code}": struct.pack("!H", code) + b"bye" for code in VALID_CLOSE_CODES},
    "empty": b"",
    "1-byte": b"\x03",
    "reason-not-utf8": b"\x03\xe8bad \xff\xfe",
}
# body: (our answer, gorilla's); 1005 is an empty close frame.
DIFFERENT = {"empty": (1000, 1005), "1-byte": (1002, 1005), "reason-not-utf8": (1007, 1002)}


@pytest.fixture(scope="module")
def ours() -> Iterator[ServerProcess]:
    with running_server("-workers", "1") as server:
        yield server


@pytest.fixture(scope="module")
def gorelay(go_bins: dict[str, Path]) -> Iterator[tuple[Peer, int]]:
    # A dst whose connects the kernel completes (gorelay closes a plain tunnel with
    # 1000 if its dial fails); nothing is ever sent to it before the close.
    with socket.socket() as dst:
        dst.bind(("127.0.0.1", 0))
        dst.listen(128)
        route = f"/close=127.0.0.1:{dst.getsockname()[1]}"
        args = [str(go_bins["gorelay"]), "-b", "127.0.0.1:0", "-route", route]
        with running_peer(args) as (proc, addr):
            yield proc, int(addr.rsplit(":", 1)[1])


async def answer_to(port: ServerProcess | int, subprotocol: str, body: bytes) -> int | None:
    """The close code a server answers a client close frame with (None: no close frame)."""
    ws = await RawWebSocket.open(port, "/close", tls=False, subprotocol=subprotocol)
    try:
        ws.send(ws_frame(OP_CLOSE, body))
        closing = await ws.wait_closed(5)
    finally:
        ws.abort()
    assert closing.eof, closing.describe()
    return closing.code


@pytest.mark.parametrize("subprotocol", ["smux_off", "smux_on"])
@pytest.mark.parametrize("name", list(BODIES))
async def test_close_frames_are_answered_like_gorilla(
    ours: ServerProcess, gorelay: tuple[Peer, int], subprotocol: str, name: str
) -> None:
    async with dst_server() as dst:
        ours.add("/close", dst.addr)
        mine = await answer_to(ours, subprotocol, BODIES[name])
    gorillas = await answer_to(gorelay[1], subprotocol, BODIES[name])
    assert (mine, gorillas) == DIFFERENT.get(name, (gorillas, gorillas))

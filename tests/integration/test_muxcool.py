"""Mux.Cool inside the WebSocket (docs/protocol.md §11), driven by a client made
of our own codec over a real TLS WebSocket; Debian's v2ray and v2ray-plugin
test the same in tests/interop/test_muxcool.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from mtt.muxcool import (
    OPTION_DATA,
    OPTION_ERROR,
    AddressType,
    Frame,
    FrameDecoder,
    Network,
    Status,
    Target,
    encode_frame,
)
from tests.support import ServerProcess, echo_server, pattern, running_server, tagged_server

MiB = 1024 * 1024
# What v2ray-plugin's dokodemo-door names: the server must not care.
ANYWHERE = Target(Network.TCP, 9, AddressType.IPV4, bytes([192, 0, 2, 1]))


class CoolClient:
    """A minimal Mux.Cool client (v2ray's ClientWorker, roughly) for tests."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.decoder = FrameDecoder()
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.ended: dict[int, int] = {}  # id -> option of its End
        self.frames: list[Frame] = []
        self.changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                assert isinstance(message, bytes)
                for frame in self.decoder.feed(message):
                    self.frames.append(frame)
                    if frame.status is Status.KEEP:
                        assert frame.session_id not in self.ended, "data after End"
                        self.received[frame.session_id] += frame.payload
                    elif frame.status is Status.END:
                        self.ended[frame.session_id] = frame.option
                    else:
                        raise AssertionError(f"a server sent {frame}")
                self.changed.set()
        self.changed.set()

    async def new(self, sid: int, data: bytes | None = None, target: Target = ANYWHERE) -> None:
        option = OPTION_DATA if data is not None else 0
        await self.ws.send(
            encode_frame(Frame(sid, Status.NEW, option, target, payload=data or b""))
        )

    async def keep(self, sid: int, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), 8192):
            chunk = bytes(view[start : start + 8192])
            await self.ws.send(encode_frame(Frame(sid, Status.KEEP, OPTION_DATA, payload=chunk)))

    async def end(self, sid: int) -> None:
        await self.ws.send(encode_frame(Frame(sid, Status.END)))

    async def wait_for(self, predicate: Callable[[], bool], limit_s: float = 20) -> None:
        async with asyncio.timeout(limit_s):
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.05)

    def gone(self) -> bool:
        """The server closed the WebSocket."""
        return self._reader.done()

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()


def cool_connect(server: ServerProcess, ctx: ssl.SSLContext, path: str) -> connect:
    """A WebSocket naming no sub-protocol, as v2ray's websocket transport opens it."""
    return connect(
        f"wss://tunnel.test:{server.port}{path}",
        ssl=ctx,
        host="127.0.0.1",
        port=server.port,
        server_hostname="tunnel.test",
        max_size=None,
        compression=None,
    )


@contextlib.asynccontextmanager
async def client_of(
    server: ServerProcess, ctx: ssl.SSLContext, path: str
) -> AsyncIterator[CoolClient]:
    async with cool_connect(server, ctx, path) as ws:
        assert ws.subprotocol is None
        client = CoolClient(ws)
        try:
            yield client
        finally:
            await client.close()


def add_user(server: ServerProcess, path: str, dst: str, mux: str | None = "mux.cool") -> None:
    entry = {"path": path, "dst": dst} | ({"mux": mux} if mux else {})
    status, reply = server.control({"opt": 1, "args_bunch": [entry]})
    assert (status, reply["res"]) == (200, 1), reply


@pytest.fixture
def cool_server(cert_files: tuple[Path, Path]) -> Iterator[ServerProcess]:
    """-mux-protocol mux.cool: what a client without a sub-protocol speaks, server-wide."""
    with running_server(
        *("-cert", str(cert_files[0]), "-key", str(cert_files[1])), "-mux-protocol", "mux.cool"
    ) as s:
        yield s


async def test_sub_connections_echo_byte_exact_each_on_its_own_dst_connection(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    """The user's "mux" picks Mux.Cool on a server whose default is plain."""
    async with echo_server() as echo:
        add_user(tls_server, "/c", echo.addr)
        async with client_of(tls_server, client_tls, "/c") as client:
            bodies = {sid: pattern(sid, 300_000 + sid * 7) for sid in range(1, 9)}
            for sid, body in bodies.items():
                await client.new(sid, body[:100])
            await asyncio.gather(*(client.keep(sid, body[100:]) for sid, body in bodies.items()))
            await client.wait_for(
                lambda: all(len(client.received[s]) == len(b) for s, b in bodies.items())
            )
            for sid, body in bodies.items():
                assert (
                    hashlib.sha256(client.received[sid]).digest() == hashlib.sha256(body).digest()
                )
            assert echo.connections == 8 and not client.ended


async def test_every_sub_connection_goes_to_the_users_dst_whatever_new_names(
    cert_files: tuple[Path, Path], client_tls: ssl.SSLContext
) -> None:
    """-allow-dst admits the user's dst; a New naming the controller (or anything) is
    never dialed: the client's bytes reach the user's dst and only it."""
    async with tagged_server(b"the user's dst") as dst:
        port = dst.rsplit(":", 1)[1]
        with running_server(
            *("-cert", str(cert_files[0]), "-key", str(cert_files[1])),
            *("-allow-dst", f"127.0.0.1/32:{port}"),
        ) as server:
            add_user(server, "/t", dst)
            host, cport = server.controller.rsplit(":", 1)
            controller = Target(Network.TCP, int(cport), AddressType.DOMAIN, host.encode())
            async with client_of(server, client_tls, "/t") as client:
                await client.new(1, b"GET / HTTP/1.0\r\n\r\n", controller)
                await client.new(2, None, ANYWHERE)
                await client.wait_for(lambda: {1, 2} <= client.ended.keys())
                assert client.received[1] == client.received[2] == b"the user's dst"
                assert client.ended == {1: 0, 2: 0}


async def test_dst_closing_first_sends_all_data_then_end(
    cool_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    """Server-wide -mux-protocol; the End follows the body, and the session lives on."""
    body = pattern(5, 3 * MiB + 1)
    async with tagged_server(body) as dst:
        add_user(cool_server, "/d", dst, mux=None)
        async with client_of(cool_server, client_tls, "/d") as client:
            for sid in (1, 2, 3):
                await client.new(sid)
                await client.wait_for(lambda sid=sid: sid in client.ended)  # type: ignore[misc]
                assert (
                    hashlib.sha256(client.received[sid]).digest() == hashlib.sha256(body).digest()
                )
                assert client.ended[sid] == 0  # no Error
            last = [f for f in client.frames if f.session_id == 3]
            assert last[-1].status is Status.END and all(f.status is Status.KEEP for f in last[:-1])
            assert max(len(f.payload) for f in client.frames) == 8192  # v2ray's chunk size


async def test_client_end_closes_dst_and_end_comes_back(
    cool_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    async with echo_server() as echo:
        add_user(cool_server, "/e", echo.addr, mux=None)
        async with client_of(cool_server, client_tls, "/e") as client:
            await client.new(1, b"abc")
            await client.wait_for(lambda: bytes(client.received[1]) == b"abc")
            await client.keep(1, b"last words")
            await client.end(1)
            await client.wait_for(lambda: 1 in client.ended and echo.open == 0)
            assert echo.connections == 1 and client.ended[1] == 0


async def test_udp_is_refused_and_the_session_goes_on(
    cool_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    async with echo_server() as echo:
        add_user(cool_server, "/u", echo.addr, mux=None)
        async with client_of(cool_server, client_tls, "/u") as client:
            dns = Target(Network.UDP, 53, AddressType.IPV4, b"\x08\x08\x08\x08")
            await client.new(1, b"query", dns)
            await client.wait_for(lambda: 1 in client.ended)
            assert client.ended[1] == OPTION_ERROR and 1 not in client.received
            await client.new(2, b"tcp")
            await client.wait_for(lambda: bytes(client.received[2]) == b"tcp")
            assert echo.connections == 1


async def test_a_dst_that_cannot_be_dialed_ends_with_error(
    cool_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    add_user(cool_server, "/x", "127.0.0.1:9", mux=None)  # discard port: nothing listens
    async with client_of(cool_server, client_tls, "/x") as client:
        await client.new(1, b"hello")
        await client.wait_for(lambda: 1 in client.ended)
        assert client.ended[1] == OPTION_ERROR
    await asyncio.sleep(0.1)
    assert "stream 1: dial 127.0.0.1:9 failed" in cool_server.log_text()


async def test_keepalive_and_frames_for_unknown_ids_get_no_answer(
    cool_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    async with echo_server() as echo:
        add_user(cool_server, "/k", echo.addr, mux=None)
        async with client_of(cool_server, client_tls, "/k") as client:
            await client.ws.send(
                encode_frame(Frame(77, Status.KEEPALIVE, OPTION_DATA, payload=b"pad"))
            )
            await client.keep(5, b"to nowhere")
            await client.end(6)
            await client.new(1, b"ping")
            await client.wait_for(lambda: bytes(client.received[1]) == b"ping")
            assert [f.session_id for f in client.frames] == [1]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x02\x01" + bytes(513), "metadata of 513 bytes"),
        (b"\x00\x04\x00\x01\x09\x00", "unknown status 0x09"),
        (
            encode_frame(Frame(1, Status.NEW, 0, ANYWHERE)) * 2,
            "New for sub-connection 1, open already",
        ),
    ],
)
async def test_bad_frames_close_with_1002_and_a_log_line(
    cool_server: ServerProcess, client_tls: ssl.SSLContext, data: bytes, why: str
) -> None:
    add_user(cool_server, "/bad", "127.0.0.1:9", mux=None)
    async with cool_connect(cool_server, client_tls, "/bad") as ws:
        await ws.send(data)
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1002
    await asyncio.sleep(0.1)
    assert f"/bad: Mux.Cool protocol error: Mux.Cool: {why}" in cool_server.log_text()


async def test_a_session_without_sub_connections_ends_when_idle(
    cert_files: tuple[Path, Path], client_tls: ssl.SSLContext
) -> None:
    with running_server(
        *("-cert", str(cert_files[0]), "-key", str(cert_files[1])),
        *("-mux-protocol", "mux.cool", "-timeout", "1s"),
    ) as server:
        add_user(server, "/i", "127.0.0.1:9", mux=None)
        async with cool_connect(server, client_tls, "/i") as ws:
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1000
        await asyncio.sleep(0.1)
        assert "/i: Mux.Cool session ended: nothing received for" in server.log_text()


async def test_a_dst_that_does_not_read_stops_reading_the_websocket(
    cool_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    """Mux.Cool has no window: memory is bounded by not reading the WebSocket."""
    stalled: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)  # never reads

    dst = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        add_user(cool_server, "/slow", f"127.0.0.1:{dst.sockets[0].getsockname()[1]}", mux=None)
        async with client_of(cool_server, client_tls, "/slow") as client:
            await client.new(1)
            chunk = pattern(1, 64 * 1024)
            sent = 0

            async def push() -> None:
                nonlocal sent
                while sent < 256 * MiB:
                    await client.keep(1, chunk)
                    sent += len(chunk)

            rss_before = cool_server.rss()
            pusher = asyncio.ensure_future(push())
            await asyncio.sleep(4)
            pusher.cancel()
            growth = cool_server.rss() - rss_before
            assert growth < 16 * MiB, growth
            # Kernel buffers on both hops plus the budgets and dst high-water.
            assert sent < 48 * MiB, sent
            for writer in stalled:  # dst goes: the budget frees, our close is read
                writer.close()
            await client.wait_for(lambda: 1 in client.ended)
    finally:
        dst.close()


async def test_a_flood_of_refused_sub_connections_ends_the_session(
    cool_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    """1,024 refusals are answered, the next ends the session: one log line in all."""
    add_user(cool_server, "/flood", "127.0.0.1:9", mux=None)
    dns = Target(Network.UDP, 53, AddressType.IPV4, b"\x08\x08\x08\x08")
    flood = b"".join(encode_frame(Frame(sid, Status.NEW, 0, dns)) for sid in range(1, 1100))
    async with cool_connect(cool_server, client_tls, "/flood") as ws:
        client = CoolClient(ws)
        await ws.send(flood)
        await client.wait_for(client.gone)
        assert ws.close_code == 1002
        assert client.ended == dict.fromkeys(range(1, 1025), OPTION_ERROR)
    await asyncio.sleep(0.1)
    lines = [line for line in cool_server.log_text().splitlines() if "/flood:" in line]
    assert len(lines) == 1, lines
    assert lines[0].endswith(
        "/flood: Mux.Cool protocol error: Mux.Cool: more than 1024 sub-connections refused"
    )

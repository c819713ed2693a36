"""mtt-client (its console script, as users run it) against our server over TLS.

The client trusts the test certificate through SSL_CERT_FILE, which OpenSSL's
default verify paths honour, and names the server tunnel.test with -n.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from mtt.address import Destination
from mtt.client import ClientConfig, ClientLimits
from mtt.client.dialer import Dialer
from mtt.client.main import Client
from mtt.smux import Cmd, FrameDecoder, SmuxConfig, encode_frame
from tests.client_support import (
    ClientProcess,
    client_args,
    echo_round_trip,
    eventually,
    running_client,
    start_client,
    trust,
)
from tests.integration.hostile_helpers import OP_BINARY, ws_frame
from tests.support import ServerProcess, echo_server, pattern, running_server

MiB = 1024 * 1024


@contextlib.asynccontextmanager
async def source_server(size: int) -> AsyncIterator[str]:
    """A dst that sends `size` pattern bytes, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(pattern(7, size))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


@contextlib.asynccontextmanager
async def sink_server() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A dst that records the sha256 of everything each connection sent before EOF."""
    digests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        while chunk := await reader.read(65536):
            h.update(chunk)
        digests.append(h.digest())
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", digests
    finally:
        server.close()


MODES = {"plain": (), "mux": ("-mux",)}


@pytest.mark.parametrize("mode", list(MODES))
async def test_checksummed_transfers_both_ways_and_in_parallel(
    tls_server: ServerProcess, cert_files: tuple[Path, Path], mode: str
) -> None:
    size = 6 * MiB
    async with echo_server() as echo, source_server(size) as source, sink_server() as (sink, got):
        tls_server.add("/echo", echo.addr)
        tls_server.add("/down", source)
        tls_server.add("/up", sink)
        args = MODES[mode]
        with (
            running_client(*client_args(tls_server, "/echo", *args), env=trust(cert_files)) as c,
            running_client(*client_args(tls_server, "down", *args), env=trust(cert_files)) as d,
            running_client(*client_args(tls_server, "/up", *args), env=trust(cert_files)) as u,
        ):
            # Both directions at once, several MiB.
            assert await echo_round_trip(c, size, 1)
            # 32 connections in parallel.
            results = await asyncio.gather(*(echo_round_trip(c, 256 * 1024, i) for i in range(32)))
            assert all(results)
            assert echo.connections == 33
            # Download only: every byte arrives before the end of the stream.
            reader, writer = await asyncio.open_connection(*d.host_port)
            data = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            assert hashlib.sha256(data).digest() == hashlib.sha256(pattern(7, size)).digest()
            # Upload only, then close: the close follows the data.
            reader, writer = await asyncio.open_connection(*u.host_port)
            writer.write(pattern(9, size))
            await writer.drain()
            writer.close()
            await eventually(lambda: bool(got), 30)
            assert got == [hashlib.sha256(pattern(9, size)).digest()]
        for client in (c, d, u):
            assert "WARNING" not in client.log_text()


async def test_mux_pool_respects_the_stream_limit(
    cert_files: tuple[Path, Path],
) -> None:
    """-mux-max-stream 2 and 6 concurrent connections: 3 WebSockets, closed when idle."""
    with running_server(
        "-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-verbose"
    ) as server:
        async with echo_server() as echo:
            server.add("/pool", echo.addr)
            args = client_args(server, "/pool", "-mux", "-mux-max-stream", "2", "-verbose")
            with running_client(*args, env=trust(cert_files)) as client:
                conns = [await asyncio.open_connection(*client.host_port) for _ in range(6)]
                for i, (_, writer) in enumerate(conns):
                    writer.write(b"ping %d" % i)
                for i, (reader, _) in enumerate(conns):
                    assert await asyncio.wait_for(reader.readexactly(6), 10) == b"ping %d" % i
                # Log lines cross process boundaries: wait for them, then for strays.
                await eventually(lambda: server.log_text().count("upgrade (smux)") >= 3)
                await client.wait_for_log("smux session 3 open")
                await asyncio.sleep(0.2)
                assert server.log_text().count("upgrade (smux)") == 3
                assert "smux session 4 open" not in client.log_text()
                assert echo.connections == 6
                # A session ends with its last stream.
                for _, writer in conns:
                    writer.close()
                await client.wait_for_log("smux session 3 closed")
                await client.wait_for_log("smux session 1 closed")
                await client.wait_for_log("smux session 2 closed")
                # The next connection needs a new session.
                assert await echo_round_trip(client, 1000, 1)
                await eventually(lambda: server.log_text().count("upgrade (smux)") >= 4)
                await client.wait_for_log("smux session 4 open")


async def _refused(client: ClientProcess) -> tuple[int, str]:
    """Open a local connection that the client cannot tunnel: (local port, EOF data)."""
    reader, writer = await asyncio.open_connection(*client.host_port)
    port = writer.get_extra_info("sockname")[1]
    writer.write(b"lost")
    try:
        data = await asyncio.wait_for(reader.read(), 15)
    except ConnectionResetError:
        data = b""
    writer.close()
    return port, data.decode()


async def _failure_lines(client: ClientProcess, port: int) -> list[str]:
    """The warning lines about local connection `port` (exactly one is expected)."""

    def lines() -> list[str]:
        return [
            line
            for line in client.lines
            if f"127.0.0.1:{port}:" in line and "cannot reach" in line and "WARNING" in line
        ]

    await eventually(lambda: bool(lines()), 10)
    await asyncio.sleep(0.1)  # a second line would have shown up by now
    return lines()


@pytest.mark.parametrize("mode", list(MODES))
async def test_failed_dials_close_only_that_connection(
    tls_server: ServerProcess, cert_files: tuple[Path, Path], mode: str
) -> None:
    env = trust(cert_files)
    mux = (*MODES[mode], "-mux-max-stream", "1")
    async with echo_server() as echo:
        tls_server.add("/live", echo.addr)
        with running_client(*client_args(tls_server, "/live", *mux), env=env) as client:
            # A tunnel that works ...
            reader, writer = await asyncio.open_connection(*client.host_port)
            writer.write(b"before")
            assert await asyncio.wait_for(reader.readexactly(6), 10) == b"before"
            # ... survives the route being deleted; new connections now get a 404.
            status, reply = tls_server.control({"opt": 2, "args_bunch": [{"path": "/live"}]})
            assert (status, reply["res"]) == (200, 1)
            for _ in range(2):
                port, data = await _refused(client)
                assert data == ""
                lines = await _failure_lines(client, port)
                assert len(lines) == 1, client.log_text()
                assert "upgrade rejected: HTTP 404" in lines[0]
            writer.write(b"after")
            assert await asyncio.wait_for(reader.readexactly(5), 10) == b"after"
            writer.close()

        # Nothing listening at -s.
        with running_client(
            "-s", "127.0.0.1:9", "-n", "tunnel.test", "-wss", *mux, env=env
        ) as client:
            for _ in range(2):
                port, data = await _refused(client)
                lines = await _failure_lines(client, port)
                assert len(lines) == 1 and "Connection refused" in lines[0], client.log_text()

        # A certificate for another name.
        tls_server.add("/live", echo.addr)
        args = ["-s", f"127.0.0.1:{tls_server.port}", "-n", "other.test", "-wss-path", "/live"]
        with running_client(*args, *mux, env=env) as client:
            port, data = await _refused(client)
            lines = await _failure_lines(client, port)
            assert len(lines) == 1 and "certificate verify failed" in lines[0], client.log_text()
            assert "other.test" in lines[0]

        # ... and the same server with -sv works.
        with running_client(*args, *mux, "-sv") as client:
            assert await echo_round_trip(client, 100_000, 3)


async def test_tls_sessions_are_resumed(cert_files: tuple[Path, Path]) -> None:
    with running_server(
        "-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-workers", "1"
    ) as server:
        async with echo_server() as echo:
            server.add("/r", echo.addr)
            args = client_args(server, "/r", "-verbose")
            with running_client(*args, env=trust(cert_files)) as client:
                for i in range(4):
                    assert await echo_round_trip(client, 1000, i)
                await client.wait_for_log("TLS session resumed", count=3)


@pytest.mark.parametrize("mode", list(MODES))
async def test_idle_timeout_closes_the_tunnel(
    tls_server: ServerProcess, cert_files: tuple[Path, Path], mode: str
) -> None:
    async with echo_server() as echo:
        tls_server.add("/idle", echo.addr)
        args = client_args(tls_server, "/idle", *MODES[mode], "-timeout", "500ms", "-verbose")
        with running_client(*args, env=trust(cert_files)) as client:
            reader, writer = await asyncio.open_connection(*client.host_port)
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert 0.3 < time.monotonic() - started < 5
            writer.close()
            await client.wait_for_log("idle for")
            await eventually(lambda: echo.open == 0, 5)


@pytest.mark.parametrize("mode", list(MODES))
async def test_memory_stays_bounded_with_slow_peers(
    tls_server: ServerProcess, cert_files: tuple[Path, Path], mode: str
) -> None:
    """A local app that never reads, and a dst that never reads: the client buffers little."""
    stalled: list[asyncio.StreamWriter] = []
    pushed = 0

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pushed
        chunk = b"\x00" * 65536
        with contextlib.suppress(ConnectionError):
            for _ in range(2048):  # 128 MiB at most
                writer.write(chunk)
                await writer.drain()
                pushed += len(chunk)

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)

    flood_server = await asyncio.start_server(flood, "127.0.0.1", 0)
    stall_server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    try:
        tls_server.add("/flood", f"127.0.0.1:{flood_server.sockets[0].getsockname()[1]}")
        tls_server.add("/stall", f"127.0.0.1:{stall_server.sockets[0].getsockname()[1]}")
        env = trust(cert_files)
        with (
            running_client(
                *client_args(tls_server, "/flood", *MODES[mode], "-verbose"), env=env
            ) as down,
            running_client(
                *client_args(tls_server, "/stall", *MODES[mode], "-timeout", "4s", "-verbose"),
                env=env,
            ) as up,
        ):
            base = max(down.rss(), up.rss())
            # Download toward a local app that does not read.
            _, down_writer = await asyncio.open_connection(*down.host_port)
            # Upload from a local app toward a dst that does not read.
            _, up_writer = await asyncio.open_connection(*up.host_port)
            up_writer.transport.set_write_buffer_limits(high=128 * MiB)
            up_writer.write(b"\x01" * (128 * MiB))
            await asyncio.sleep(2.5)
            assert pushed < 64 * MiB  # the flood stopped: back-pressure reached the dst
            # The upload stalled too: what the app still holds stops shrinking. (How much
            # the sockets on the way absorb first is the kernel's: up to 32 MiB per socket.)
            held = up_writer.transport.get_write_buffer_size()
            await asyncio.sleep(1.0)
            assert held > 0 and up_writer.transport.get_write_buffer_size() == held, held
            assert down.rss() - base < 24 * MiB, down.rss() - base
            assert up.rss() - base < 24 * MiB, up.rss() - base
            down_writer.transport.abort()
            up_writer.transport.abort()
            # The client notices both apps leaving (the tunnels end, whatever is still queued).
            # The flood's app leaving is seen at once (the write to it fails). The stalled
            # upload's is not: its reading is paused, as a Go client's copy loop would be
            # blocked in Write, so it ends at the idle timeout.
            await down.wait_for_log("closed (local app closed)")
            await up.wait_for_log("idle for", limit_s=10)
    finally:
        for writer in stalled:
            writer.transport.abort()
        flood_server.close()
        stall_server.close()


@dataclass
class WireCapture:
    """What an in-process WebSocket server saw from the client."""

    sni: list[str | None] = field(default_factory=list)
    requests: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    frame_sizes: list[int] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)


@contextlib.asynccontextmanager
async def capturing_server(cert_files: tuple[Path, Path]) -> AsyncIterator[tuple[int, WireCapture]]:
    """A TLS WebSocket server (picows) that records SNI, the upgrade request and frame sizes."""
    seen = WireCapture()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_files[0]), str(cert_files[1]))
    ctx.sni_callback = lambda _obj, name, _ctx: seen.sni.append(name)

    class Recorder(WSListener):
        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.BINARY:
                payload = frame.get_payload_as_bytes()
                seen.frame_sizes.append(len(payload))
                seen.received += payload
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.send_close()
                transport.disconnect()

    def route(request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        seen.requests.append((request.path, dict(request.headers)))
        proto = request.headers.get("Sec-WebSocket-Protocol", "")
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response({"Sec-WebSocket-Protocol": proto}), Recorder()
        )

    server = await ws_create_server(route, "127.0.0.1", 0, ssl=ctx, use_aiofastnet=False)
    try:
        yield int(server.sockets[0].getsockname()[1]), seen
    finally:
        server.close()


@pytest.mark.parametrize("mode", list(MODES))
async def test_wire_shape_sni_host_subprotocol_and_message_size(
    cert_files: tuple[Path, Path], mode: str
) -> None:
    async with capturing_server(cert_files) as (port, seen):
        args = ["-s", f"127.0.0.1:{port}", "-n", "tunnel.test", "-wss", "-wss-path", "p1"]
        with running_client(*args, *MODES[mode], env=trust(cert_files)) as client:
            _, writer = await asyncio.open_connection(*client.host_port)
            writer.write(pattern(5, 1_000_000))
            await writer.drain()
            await eventually(lambda: len(seen.received) >= 1_000_000 + (mode == "mux") * 8, 15)
            writer.close()
    assert seen.sni == ["tunnel.test"]
    path, headers = seen.requests[0]
    assert path == b"/p1"
    assert headers["Host"] == "tunnel.test"  # the server name, not the address dialed
    assert headers["Sec-WebSocket-Protocol"] == ("smux_on" if mode == "mux" else "smux_off")
    if mode == "plain":
        assert bytes(seen.received) == pattern(5, 1_000_000)
        assert max(seen.frame_sizes) == 16 * 1024  # the Go client's copy buffer
    else:
        assert seen.received[:8] == b"\x01\x00\x00\x00\x03\x00\x00\x00"  # SYN, stream 3
        assert max(seen.frame_sizes) == 16 * 1024 + 8  # one full smux frame per message


@dataclass
class HostileServer:
    """An in-process server that sends frames built by hand (see hostile_server)."""

    port: int
    go: asyncio.Event  # set: send the rest
    closes: list[int]  # close codes the client sent


@contextlib.asynccontextmanager
async def hostile_server(
    cert_files: tuple[Path, Path], first: bytes, rest: bytes, pause_s: float | None
) -> AsyncIterator[HostileServer]:
    """A TLS WebSocket server that answers the client's first message with `first`
    and, once `go` is set, sends `rest`: in one write, or in 64 KiB pieces `pause_s`
    apart."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_files[0]), str(cert_files[1]))
    tasks: set[asyncio.Task[None]] = set()

    async def answer(raw: asyncio.Transport) -> None:
        raw.write(first)
        await hostile.go.wait()
        step = len(rest) if pause_s is None else 64 * 1024
        for i in range(0, len(rest), step):
            if raw.is_closing():
                return
            raw.write(rest[i : i + step])
            await asyncio.sleep(pause_s or 0)

    class Hostile(WSListener):
        answered = False

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.CLOSE:
                hostile.closes.append(int(frame.get_close_code()))
                transport.disconnect()
            elif not self.answered:
                self.answered = True
                tasks.add(asyncio.ensure_future(answer(transport.underlying_transport)))

    def route(request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        proto = request.headers.get("Sec-WebSocket-Protocol", "")
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response({"Sec-WebSocket-Protocol": proto}), Hostile()
        )

    server = await ws_create_server(route, "127.0.0.1", 0, ssl=ctx, use_aiofastnet=False)
    hostile = HostileServer(int(server.sockets[0].getsockname()[1]), asyncio.Event(), [])
    try:
        yield hostile
    finally:
        server.close()
        for task in tasks:
            task.cancel()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("pause_s", [None, 0.005], ids=["one-write", "in-pieces"])
@pytest.mark.parametrize("size", [MiB + 1, 2 * MiB], ids=["1MiB+1", "2MiB"])
async def test_oversized_server_frames_never_reach_the_local_app(
    cert_files: tuple[Path, Path], size: int, pause_s: float | None, mode: str
) -> None:
    """A server frame over the 1 MiB bound gets 1009, and nothing of it, nor of the
    frame after it, is written to the local app (or fed to the smux session), however
    fast it arrives: picows goes on parsing for 10 ms after it sends the 1009."""
    if mode == "mux":
        data = pattern(11, size)
        chunk = 32 * 1024
        stream = b"".join(psh3(data[i : i + chunk]) for i in range(0, size, chunk))
        before, oversized, after = psh3(b"before;"), stream[:size], psh3(b"after")
    else:
        before, oversized, after = b"before;", pattern(11, size), b"after"
    rest = ws_frame(OP_BINARY, oversized, mask=False) + ws_frame(OP_BINARY, after, mask=False)
    first = ws_frame(OP_BINARY, before, mask=False)
    async with hostile_server(cert_files, first, rest, pause_s) as server:
        args = ["-s", f"127.0.0.1:{server.port}", "-n", "tunnel.test", "-wss", "-wss-path", "/b"]
        with running_client(*args, *MODES[mode], env=trust(cert_files)) as client:
            reader, writer = await asyncio.open_connection(*client.host_port)
            try:
                writer.write(b"hello")
                assert await asyncio.wait_for(reader.readexactly(7), 10) == b"before;"
                server.go.set()
                got = await asyncio.wait_for(reader.read(), 10)
            finally:
                writer.close()
            await eventually(lambda: bool(server.closes), 5)
    assert got == b"", f"{len(got)} bytes of the oversized frame reached the local app"
    assert server.closes == [1009]


def psh3(data: bytes) -> bytes:
    """An smux v1 PSH frame for stream 3, the client's first."""
    return encode_frame(1, Cmd.PSH, 3, data)


async def test_handshake_timeout_bounds_a_silent_server(cert_files: tuple[Path, Path]) -> None:
    """TCP accepted but no TLS answer, or TLS done but no upgrade reply: the dial gives up
    at the deadline and the socket is closed, not leaked."""
    closed: list[float] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        closed.append(time.monotonic())
        writer.close()

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert_files[0]), str(cert_files[1]))
    for tls in (None, ctx):
        server = await asyncio.start_server(silent, "127.0.0.1", 0, ssl=tls)
        port = server.sockets[0].getsockname()[1]
        config = ClientConfig(
            bind="127.0.0.1:0",
            server=Destination("127.0.0.1", port),
            server_name="tunnel.test",
            insecure=True,
            limits=ClientLimits(handshake_timeout=0.5),
        )
        closed.clear()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await Dialer(config).dial(WSListener, "smux_off")
        assert 0.4 < time.monotonic() - started < 2
        await eventually(lambda: bool(closed), 5)
        server.close()


async def test_mux_keepalive_nops_and_a_silent_server_drops_the_session(
    cert_files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """In process, with keepalive shrunk from 30 s / 70 s to 0.2 s / 0.8 s: the client sends
    NOPs, and a server that sends nothing at all loses the session (and its streams)."""
    limits = ClientLimits(
        smux=SmuxConfig(is_client=True, keepalive_interval=0.2, keepalive_timeout=0.8)
    )
    async with capturing_server(cert_files) as (port, seen):
        config = ClientConfig(
            bind="127.0.0.1:0",
            server=Destination("127.0.0.1", port),
            server_name="tunnel.test",
            path="/k",
            mux=True,
            insecure=True,
            limits=limits,
        )
        client = Client(config)
        listener = await asyncio.get_running_loop().create_server(
            client.new_connection, "127.0.0.1", 0
        )
        try:
            reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname())
            writer.write(b"hello")
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert 0.7 < time.monotonic() - started < 3
            writer.close()
        finally:
            listener.close()
    frames = FrameDecoder().feed(bytes(seen.received))
    assert [(f.cmd, f.stream_id) for f in frames[:2]] == [(Cmd.SYN, 3), (Cmd.PSH, 3)]
    assert sum(f.cmd == Cmd.NOP and f.stream_id == 0 for f in frames) >= 3
    assert "keepalive timeout" in caplog.text


def test_sigint_stops_the_client_with_exit_0() -> None:
    client = start_client("-s", "127.0.0.1:9", "-wss")
    client.proc.send_signal(signal.SIGINT)
    assert client.proc.wait(10) == 0
    client.join()
    assert "Traceback" not in client.log_text()


async def test_ipv6_listen_and_server_addresses(cert_files: tuple[Path, Path]) -> None:
    with running_server(
        "-cert", str(cert_files[0]), "-key", str(cert_files[1]), bind="[::1]:0"
    ) as server:
        async with echo_server() as echo:
            server.add("/v6", echo.addr)
            args = ["-b", "[::1]:0", "-s", f"[::1]:{server.port}", "-n", "tunnel.test", "-wss"]
            with running_client(*args, "-wss-path", "/v6", env=trust(cert_files)) as client:
                assert client.addr.startswith("[::1]:")
                assert await echo_round_trip(client, 300_000, 6)

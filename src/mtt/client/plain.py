"""One local TCP connection relayed over one WebSocket (smux_off).

Local bytes go out as binary messages of at most 16 KiB, as the Go client
writes them (docs/protocol.md §4); server messages are written to the local
connection whatever their size. Back-pressure runs both ways: a WebSocket
that cannot take more pauses reading the local connection, a local app that
does not read pauses reading the WebSocket. While the WebSocket is being
dialed, local bytes are held up to a bound, then the local side is paused.

Either side ending ends both, like the Go client's two copy loops: the
close frame (1000) follows any data still queued, and the local connection
is closed after its buffered bytes are written. A peer that never takes
those last bytes is cut off after ClientLimits.close_linger.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
from typing import Protocol

from picows import WSCloseCode, WSFrame, WSHandshakeError, WSListener, WSMsgType, WSTransport

from mtt.address import format_hostport
from mtt.client import ClientConfig
from mtt.client.dialer import SMUX_OFF, Dialer, describe_error
from mtt.transport.dst import DstConnection
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.client")

DATA_TYPES = (WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.TEXT)
DIAL_ERRORS = (OSError, ssl.SSLError, WSHandshakeError, TimeoutError)


def local_peer(conn: DstConnection) -> str:
    """The local app's address as host:port, for log lines."""
    transport = conn.transport
    return peer_name(transport.get_extra_info("peername") if transport is not None else None)


def peer_name(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_hostport(str(peer[0]), peer[1])
    return "local"


class Closable(Protocol):
    def shutdown(self) -> None: ...
    def abort(self) -> None: ...


class Tunnels:
    """Everything the client has open, so a signal can close it all."""

    def __init__(self) -> None:
        self.active: set[Closable] = set()
        self.total = 0
        self.all_closed = asyncio.Event()
        self.all_closed.set()

    def opened(self, item: Closable) -> None:
        self.active.add(item)
        self.total += 1
        self.all_closed.clear()

    def closed(self, item: Closable) -> None:
        self.active.discard(item)
        if not self.active:
            self.all_closed.set()

    def shutdown(self) -> None:
        """Close everything, letting buffered bytes go out."""
        for item in list(self.active):
            item.shutdown()

    def abort(self) -> None:
        """Drop whatever did not finish closing."""
        for item in list(self.active):
            item.abort()


def send_chunked(ws: WSTransport, data: bytes | memoryview, step: int) -> None:
    """Send data as binary messages of at most `step` bytes (picows masks and copies)."""
    if ws.underlying_transport.is_closing():
        return
    size = len(data)
    if size <= step:
        ws.send(WSMsgType.BINARY, data)
        return
    view = memoryview(data)
    for start in range(0, size, step):
        ws.send(WSMsgType.BINARY, view[start : start + step])


def resume_reading(ws: WSTransport) -> None:
    transport = ws.underlying_transport
    if not transport.is_closing() and not transport.is_reading():
        transport.resume_reading()


class _State(enum.Enum):
    WAITING = 0  # the local connection is not accepted yet
    DIALING = 1
    RELAYING = 2
    CLOSED = 3


class PlainClientTunnel(WSListener):
    """Relays one local connection over its own WebSocket."""

    def __init__(self, config: ClientConfig, dialer: Dialer, tunnels: Tunnels) -> None:
        super().__init__()
        self._config = config
        self._limits = config.limits
        self._dialer = dialer
        self._tunnels = tunnels
        self._loop = asyncio.get_running_loop()
        self._state = _State.WAITING
        self._peer = "local"
        self._local: DstConnection | None = None
        self._ws: WSTransport | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._local_blocks: set[str] = set()  # why local reading is paused
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._dial_task: asyncio.Task[None] | None = None
        self._local_done = False
        self._ws_done = False
        self.bytes_up = 0
        self.bytes_down = 0

    # -- local side (DstOwner) -------------------------------------------

    def dst_connected(self, conn: DstConnection) -> None:
        """The local connection was accepted (DstConnection set its socket options)."""
        self._local = conn
        self._peer = local_peer(conn)
        self._tunnels.opened(self)
        self._state = _State.DIALING
        self._last_activity = self._loop.time()
        self._idle_timer = self._loop.call_later(self._config.idle_timeout, self._check_idle)
        self._dial_task = spawn(self._dial(), name=f"dial {self._dialer.target} for {self._peer}")

    def dst_data(self, data: bytes) -> None:
        state = self._state
        if state is _State.RELAYING:
            assert self._ws is not None
            self.bytes_up += len(data)
            self._last_activity = self._loop.time()
            send_chunked(self._ws, data, self._limits.max_message)
        elif state is _State.DIALING:
            self.bytes_up += len(data)
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size >= self._limits.dial_buffer:
                self._block_local("dial")

    def dst_eof(self) -> None:
        self._finish("local app closed")

    def dst_lost(self, exc: Exception | None) -> None:
        self._local_done = True
        self._finish("local app closed")
        self._maybe_release()

    def dst_pause_writing(self) -> None:
        """The local app is not reading: stop reading the WebSocket."""
        ws = self._ws
        if ws is not None and self._state is _State.RELAYING:
            transport = ws.underlying_transport
            if not transport.is_closing():
                transport.pause_reading()

    def dst_resume_writing(self) -> None:
        if self._ws is not None:
            resume_reading(self._ws)

    # -- dialing ---------------------------------------------------------------

    async def _dial(self) -> None:
        try:
            await self._dialer.dial(lambda: self, SMUX_OFF)
        except DIAL_ERRORS as exc:
            if self._state is not _State.CLOSED:
                log.warning(
                    "%s: cannot reach %s: %s",
                    self._peer,
                    self._dialer.target,
                    describe_error(exc, self._limits.handshake_timeout),
                )
                self._finish("dial failed")
        finally:
            if self._ws is None:  # failed or cancelled: no WebSocket will report
                self._ws_done = True
                self._maybe_release()

    # -- WebSocket side ----------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        if self._state is not _State.DIALING:
            # The local app left while we dialed.
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        transport.underlying_transport.set_write_buffer_limits(high=self._limits.write_high_water)
        self._state = _State.RELAYING
        pending, self._pending, self._pending_size = self._pending, [], 0
        for chunk in pending:
            send_chunked(transport, chunk, self._limits.max_message)
        self._unblock_local("dial")
        log.debug("%s: tunnel open to %s", self._peer, self._dialer.target)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type in DATA_TYPES:
            # A close already sent may be picows' 1009 for a frame too big, which it
            # goes on parsing (and handing over) until it disconnects.
            if self._state is not _State.RELAYING or transport.is_close_frame_sent:
                return
            data = frame.get_payload_as_bytes()
            self.bytes_down += len(data)
            self._last_activity = self._loop.time()
            assert self._local is not None
            self._local.write(data)
        elif msg_type is WSMsgType.CLOSE:
            self._finish("server closed")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._ws_done = True
        self._finish("server disconnected")
        self._maybe_release()

    def pause_writing(self) -> None:
        """The WebSocket is backed up: stop reading the local app."""
        self._block_local("ws")

    def resume_writing(self) -> None:
        self._unblock_local("ws")

    def shutdown(self) -> None:
        """Close now (the client is stopping)."""
        self._finish("client shutting down", WSCloseCode.GOING_AWAY)

    # -- ending ------------------------------------------------------------------

    def _finish(self, reason: str, code: WSCloseCode = WSCloseCode.OK) -> None:
        """End both sides; each still writes what it has buffered."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._pending = []
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._dial_task is not None and not self._dial_task.done():
            self._dial_task.cancel()
        if self._local is not None:
            self._local.close()
        ws = self._ws
        if ws is not None and not ws.underlying_transport.is_closing():
            if not ws.is_close_frame_sent:
                ws.send_close(code)
            # Read (and drop) what still comes, so TLS's close_notify is seen.
            resume_reading(ws)
            ws.disconnect()
        if not (self._local_done and self._ws_done):
            self._linger_timer = self._loop.call_later(self._limits.close_linger, self._abort)
        log.debug(
            "%s: closed (%s), up %d down %d bytes",
            self._peer,
            reason,
            self.bytes_up,
            self.bytes_down,
        )

    def abort(self) -> None:
        """Drop both sides now (the client is exiting)."""
        self._finish("client exiting", WSCloseCode.GOING_AWAY)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._abort()

    def _abort(self) -> None:
        """The peers did not take their last bytes in time."""
        self._linger_timer = None
        if self._local is not None:
            self._local.abort()
        if self._ws is not None:
            self._ws.disconnect(False)
        if self._dial_task is None or self._dial_task.done():
            self._ws_done = True
        self._local_done = True
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self._state is _State.CLOSED and self._local_done and self._ws_done:
            if self._linger_timer is not None:
                self._linger_timer.cancel()
                self._linger_timer = None
            self._tunnels.closed(self)

    # -- timers and flow control -----------------------------------------------------

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self._state is _State.CLOSED:
            return
        timeout = self._config.idle_timeout
        idle_for = self._loop.time() - self._last_activity
        if idle_for >= timeout:
            log.debug("%s: idle for %.0f s, closing", self._peer, idle_for)
            self._finish("idle timeout")
        else:
            self._idle_timer = self._loop.call_later(timeout - idle_for, self._check_idle)

    def _block_local(self, reason: str) -> None:
        if not self._local_blocks and self._local is not None:
            self._local.pause_reading()
        self._local_blocks.add(reason)

    def _unblock_local(self, reason: str) -> None:
        if reason not in self._local_blocks:
            return
        self._local_blocks.discard(reason)
        if not self._local_blocks and self._local is not None:
            self._local.resume_reading()

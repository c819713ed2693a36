"""One WebSocket carrying an smux session (smux_on): each stream goes to its
own TCP connection to the user's dst.

The protocol lives in mtt.smux (sans-I/O); this module only moves bytes and
owns the clock. Memory is bounded by the session's receive budget: bytes
handed out in StreamData count until they are written to a dst that is not
pushing back; past the budget the WebSocket stops being read, which is the
only back-pressure smux v1 has (docs/protocol.md §5). Toward the client, a
WebSocket that cannot take more pauses reading every dst of the session.

A stream whose dst ends sends its FIN only once the client has received the
stream's data (v2: the part beyond the peer's window too), as a plain tunnel
does with its close frame (mtt.transport.delivery), at most
`close_flush_max` after dst ended; client data for it is discarded meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from picows import WSCloseCode, WSFrame, WSMsgType, WSTransport

from mtt.config import Limits
from mtt.core.rate import Direction
from mtt.core.stats import STATS
from mtt.errors import SmuxProtocolError
from mtt.smux import (
    SessionEnded,
    SmuxSession,
    StreamData,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamWritable,
)
from mtt.transport.delivery import Delivery
from mtt.transport.dst import DstConnection, dial
from mtt.transport.plain import TunnelRegistry
from mtt.transport.session_timer import SessionTimer
from mtt.transport.tasks import spawn
from mtt.transport.wsbase import CheckedListener

if TYPE_CHECKING:
    from mtt.core.meter import Account, Meter

log = logging.getLogger("mtt.tunnel")


class MuxStream:
    """One smux stream relayed to one dst connection."""

    __slots__ = (
        "_dial_task",
        "_dst",
        "_dst_paused",
        "_ending",
        "_outbound",
        "_peer_ended",
        "_pending",
        "_throttled",
        "_tunnel",
        "closed",
        "fin_at",
        "fin_mark",
        "last_activity",
        "sid",
    )

    def __init__(self, tunnel: MuxTunnel, sid: int, now: float) -> None:
        self._tunnel = tunnel
        self.sid = sid
        self.last_activity = now
        self.closed = False
        self._dst: DstConnection | None = None
        self._dst_paused = False  # dst's write buffer is full
        # Over the user's download rate. Each stream pauses on its own, as plain
        # tunnels do: pausing the whole session let the stream whose dst the
        # event loop polls first take every grant and starve the others.
        self._throttled = False
        self._pending: list[bytes] = []  # data from the client not yet handed to dst
        self._outbound = b""  # v2: dst data beyond the peer's window
        self._peer_ended = False
        self._ending = False  # dst ended; the FIN waits for the client to have the data
        # Once set: the FIN waits for the client to have this many bytes of the session ...
        self.fin_mark: int | None = None
        # ... and then goes at this time.
        self.fin_at: float | None = None
        self._dial_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        t = self._tunnel
        self._dial_task = spawn(self._dial(), name=f"dial {t.dst} for {t.peer} stream {self.sid}")

    async def _dial(self) -> None:
        t = self._tunnel
        limits = t.limits
        try:
            await dial(self, t.dst, limits.connect_timeout, limits.smux.stream_window)
        except (OSError, TimeoutError) as exc:
            STATS.dial_failed(exc)
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or repr(exc))
            log.warning(
                "%s %s: stream %d: dial %s failed: %s", t.peer, t.path, self.sid, t.dst, reason
            )
            self.close()

    def dst_connected(self, conn: DstConnection) -> None:
        if self.closed:
            conn.close()
            return
        self._dst = conn
        if self._tunnel.writing_paused:
            conn.pause_reading()
        self._flush_pending()
        if self._peer_ended:
            self.close()

    # -- client -> dst ---------------------------------------------------

    def client_data(self, data: bytes) -> None:
        self.last_activity = self._tunnel.now
        if self._ending:  # nowhere to go
            self._tunnel.session.consumed(self.sid, len(data))
            return
        if self._dst is None or self._dst_paused or self._pending:
            self._pending.append(data)
            return
        self._dst.write(data)
        self._tunnel.session.consumed(self.sid, len(data))

    def _flush_pending(self) -> None:
        dst = self._dst
        session = self._tunnel.session
        while self._pending and dst is not None and not self._dst_paused:
            chunk = self._pending.pop(0)
            dst.write(chunk)
            session.consumed(self.sid, len(chunk))
        self._tunnel.after_consume()

    def client_ended(self) -> None:
        """Peer FIN: deliver what is pending, then close both sides."""
        self._peer_ended = True
        if self._dst is not None and not self._pending and not self._ending:
            self.close()

    # -- dst -> client (DstOwner) --------------------------------------------

    def dst_data(self, data: bytes) -> None:
        t = self._tunnel
        self.last_activity = t.now
        if t.meter is not None:
            t.meter.count_down(len(data), self)
        taken = t.session.send_data(self.sid, data)
        if taken < len(data):
            self._outbound = data[taken:]
            if self._dst is not None:
                self._dst.pause_reading()
        t.flush()

    def writable(self) -> None:
        """v2: the peer opened its window again."""
        if not self._outbound:
            return
        t = self._tunnel
        taken = t.session.send_data(self.sid, self._outbound)
        self._outbound = self._outbound[taken:]
        if (
            not self._outbound
            and self._dst is not None
            and not t.writing_paused
            and not self._throttled
        ):
            self._dst.resume_reading()
        t.flush()
        if self._ending and not self._outbound:
            self._set_fin_mark()

    def dst_eof(self) -> None:
        self._dst_ended()

    def dst_lost(self, exc: Exception | None) -> None:
        self._dst_ended()

    def _dst_ended(self) -> None:
        """dst is done: close it, and send the FIN once the client has its data."""
        if self.closed or self._ending:
            return
        self._ending = True
        if self._dst is not None:
            self._dst.close()
        t = self._tunnel
        session = t.session
        for chunk in self._pending:
            session.consumed(self.sid, len(chunk))
        self._pending = []
        t.fin_after_delivery(self)
        if not self._outbound:
            t.flush()
            self._set_fin_mark()

    def _set_fin_mark(self) -> None:
        t = self._tunnel
        self.fin_mark = t.delivery.written if t.delivery is not None else 0
        t.check_fins()

    def dst_pause_writing(self) -> None:
        self._dst_paused = True

    def dst_resume_writing(self) -> None:
        self._dst_paused = False
        if self._ending:
            return
        self._flush_pending()
        if self._peer_ended and not self._pending:
            self.close()

    def pause_reading(self) -> None:
        if self._dst is not None:
            self._dst.pause_reading()

    def resume_reading(self) -> None:
        if self._dst is not None and not self._outbound and not self._throttled:
            self._dst.resume_reading()

    def throttle_pause(self, direction: Direction) -> None:
        self._throttled = True
        self.pause_reading()

    def throttle_resume(self, direction: Direction) -> None:
        self._throttled = False
        if not self._tunnel.writing_paused:
            self.resume_reading()

    def close(self) -> None:
        """End the stream both ways; the budget its pending data held is freed."""
        if self.closed:
            return
        self.closed = True
        t = self._tunnel
        meter = t.meter
        if meter is not None:
            meter.forget(self)
        if self._dial_task is not None and not self._dial_task.done():
            self._dial_task.cancel()
        if self._dst is not None:
            self._dst.close()
        session = t.session
        for chunk in self._pending:
            session.consumed(self.sid, len(chunk))
        self._pending = []
        self._outbound = b""
        if not session.closed:
            session.close_stream(self.sid)
        t.stream_closed(self)


class MuxTunnel(CheckedListener):
    """Drives an SmuxSession over one WebSocket."""

    def __init__(
        self, account: Account, peer: str, limits: Limits, registry: TunnelRegistry
    ) -> None:
        super().__init__()
        self._account = account
        self.meter: Meter | None = None
        self._throttled_up = False
        # Messages picows handed over after the rate paused reading (the rest of
        # one read, which may be megabytes): parsed as the rate allows.
        self._held: deque[bytes] = deque()
        self.dst = account.user.dst
        self.peer = peer
        self.path = account.path
        self.limits = limits
        self._registry = registry
        self._loop = asyncio.get_running_loop()
        self.now = self._loop.time()
        self.session = SmuxSession(limits.smux, self.now)
        self.streams: dict[int, MuxStream] = {}
        self.writing_paused = False
        self._ws: WSTransport | None = None
        self._reading_paused = False
        self._timer = SessionTimer(self._loop, limits.idle_timeout, self._on_timer)
        self._closed = False
        self._refused = 0
        self.delivery: Delivery | None = None
        # Streams whose dst ended, by when their FIN goes whatever the client has.
        self._ending: dict[MuxStream, float] = {}
        self._fin_timer: asyncio.TimerHandle | None = None
        self._fin_poll = limits.close_flush_poll

    # -- WebSocket side -------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        transport.underlying_transport.set_write_buffer_limits(high=self.limits.write_high_water)
        self.delivery = Delivery(transport.underlying_transport)
        self._registry.opened(self)
        STATS.opened["smux"] += 1
        self.meter = self._account.open(self)
        self._timer.rearm(self.session.get_timer())

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = self.screen(transport, frame)
        if msg_type is None:
            return
        if msg_type is not WSMsgType.CLOSE:
            if self._closed:
                return
            if self._throttled_up or self._held:
                self._held.append(frame.get_payload_as_bytes())
                return
            self._receive(frame.get_payload_as_memoryview())
            self.flush()
            self.after_consume()
        else:
            self._release_held(all_of_it=True)
            code = frame.get_close_code()  # a valid one (screened): echoed, as gorilla does
            self._finish(code if code is not WSCloseCode.NO_INFO else WSCloseCode.OK)

    def _receive(self, data: memoryview | bytes) -> None:
        self.now = now = self._loop.time()
        try:
            events = self.session.receive_data(data, now)
        except SmuxProtocolError as exc:
            log.warning("%s %s: smux protocol error: %s", self.peer, self.path, exc)
            self._finish(WSCloseCode.PROTOCOL_ERROR)
            return
        for event in events:
            self._handle(event)

    def _release_held(self, all_of_it: bool = False) -> None:
        """Parse held messages until the rate pauses again (or all of them: the
        client is leaving, and what it sent before must still arrive)."""
        held = self._held
        while held and (all_of_it or not self._throttled_up) and not self._closed:
            self._receive(held.popleft())
        if self._closed:
            held.clear()

    def violation(self, reason: str) -> None:
        log.warning("%s %s: WebSocket protocol error: %s", self.peer, self.path, reason)
        self._finish(WSCloseCode.PROTOCOL_ERROR)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self._closed:
            self._release_held(all_of_it=True)
            reason = self.picows_close_reason(transport)
            if reason is not None:
                log.warning("%s %s: WebSocket %s", self.peer, self.path, reason)
        self._finish(WSCloseCode.OK)
        self._registry.closed(self)
        if self.meter is not None:
            self.meter = None
            self._account.close(self)

    def pause_writing(self) -> None:
        self.ws_writing_paused = self.writing_paused = True
        for stream in self.streams.values():
            stream.pause_reading()

    def resume_writing(self) -> None:
        self.ws_writing_paused = self.writing_paused = False
        for stream in self.streams.values():
            stream.resume_reading()

    def shutdown(self) -> None:
        """Close the session now (server shutdown)."""
        self._finish(WSCloseCode.GOING_AWAY)

    def kick(self) -> None:
        """Close the session now (the controller said so)."""
        log.info("%s %s: kicked", self.peer, self.path)
        self._finish(WSCloseCode.POLICY_VIOLATION)

    def throttle_pause(self, direction: Direction) -> None:
        """Over the upload rate (downloads are charged to each stream)."""
        self._throttled_up = True
        self.after_consume()

    def throttle_resume(self, direction: Direction) -> None:
        self._throttled_up = False
        self._release_held()
        self.after_consume()

    # -- session events -----------------------------------------------------

    def _handle(self, event: object) -> None:
        if isinstance(event, StreamData):
            if self.meter is not None:
                self.meter.count_up(len(event.data), self)
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.client_data(event.data)
            else:
                self.session.consumed(event.stream_id, len(event.data))
        elif isinstance(event, StreamOpened):
            stream = MuxStream(self, event.stream_id, self.now)
            self.streams[event.stream_id] = stream
            STATS.opened["stream"] += 1
            stream.start()
        elif isinstance(event, StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.client_ended()
        elif isinstance(event, StreamWritable):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.writable()
        elif isinstance(event, StreamRefused):
            # One line for the first; a flood of SYNs must not become a flood of lines.
            self._refused += 1
            if self._refused == 1:
                log.info(
                    "%s %s: stream %d refused: %d streams open",
                    self.peer,
                    self.path,
                    event.stream_id,
                    self.session.stream_count,
                )
        elif isinstance(event, SessionEnded):
            log.info("%s %s: smux session ended: %s", self.peer, self.path, event.reason)
            self._finish(WSCloseCode.OK)

    def flush(self) -> None:
        """Send what the session queued."""
        out = self.session.data_to_send()
        ws = self._ws
        if out and ws is not None and not ws.underlying_transport.is_closing():
            assert self.delivery is not None
            self.delivery.write_binary(out)

    def after_consume(self) -> None:
        """Pause or resume reading the WebSocket by the session's receive budget."""
        ws = self._ws
        if ws is None or self._closed:
            return
        transport = ws.underlying_transport
        paused = self.session.reading_paused() or self._throttled_up or bool(self._held)
        if paused and not self._reading_paused:
            self._reading_paused = True
            if not transport.is_closing():
                transport.pause_reading()
        elif not paused and self._reading_paused:
            self._reading_paused = False
            if not transport.is_closing():
                transport.resume_reading()
        self.flush()

    def stream_closed(self, stream: MuxStream) -> None:
        self.streams.pop(stream.sid, None)
        self._ending.pop(stream, None)
        if not self._closed:
            self.flush()
            self.after_consume()

    # -- FINs after delivery ---------------------------------------------------

    def fin_after_delivery(self, stream: MuxStream) -> None:
        """stream's dst ended: its FIN waits (bounded) for the client to have its data."""
        self._ending[stream] = self._loop.time() + self.limits.close_flush_max
        self.after_consume()
        self.check_fins()  # arms the poll, which also keeps the deadline

    def check_fins(self) -> None:
        """Send each ending stream's FIN `drain_quiet` after the client has its
        data, or once it has waited `close_flush_max`."""
        if self._fin_timer is not None:
            self._fin_timer.cancel()
            self._fin_timer = None
        now = self._loop.time()
        limits = self.limits
        delivery = self.delivery
        next_check = now + self._fin_poll
        for stream, deadline in list(self._ending.items()):
            mark = stream.fin_mark
            delivered = mark is not None and (delivery is None or delivery.received(mark))
            if stream.fin_at is None and delivered:
                stream.fin_at = now + limits.drain_quiet
            if stream.fin_at is not None:
                if now >= stream.fin_at:
                    stream.close()
                else:
                    next_check = min(next_check, stream.fin_at)
            elif now >= deadline:
                log.info(
                    "%s %s: stream %d: client still receiving after %.0f s, closing",
                    self.peer,
                    self.path,
                    stream.sid,
                    limits.close_flush_max,
                )
                stream.close()
        if not self._ending or self._closed:
            self._fin_poll = limits.close_flush_poll
            return
        self._fin_timer = self._loop.call_at(next_check, self.check_fins)
        self._fin_poll = min(self._fin_poll * 2, limits.drain_quiet)

    # -- timers ---------------------------------------------------------------

    def _on_timer(self, now: float, sweep: bool) -> None:
        if self._closed:
            return
        self.now = now
        for event in self.session.handle_timer(now):
            self._handle(event)
        if sweep:
            self._sweep_idle(now)
        self.flush()
        if not self._closed:
            self._timer.rearm(self.session.get_timer())

    def _sweep_idle(self, now: float) -> None:
        timeout = self.limits.idle_timeout
        for stream in [s for s in self.streams.values() if now - s.last_activity >= timeout]:
            log.debug("%s %s: stream %d idle, closing", self.peer, self.path, stream.sid)
            stream.close()

    # -- ending ----------------------------------------------------------------

    def _finish(self, code: WSCloseCode) -> None:
        if self._closed:
            return
        self._closed = True
        self._timer.cancel()
        if self._fin_timer is not None:
            self._fin_timer.cancel()
            self._fin_timer = None
        for stream in list(self.streams.values()):
            stream.close()
        self.flush()
        self.session.close()
        ws = self._ws
        if ws is not None and not ws.underlying_transport.is_closing():
            if not ws.is_close_frame_sent:
                ws.send_close(code)
            ws.disconnect()
            self._loop.call_later(self.limits.idle_timeout, ws.disconnect, False)
        if self._refused > 1:
            log.info("%s %s: %d streams refused in all", self.peer, self.path, self._refused)
        log.debug("%s %s: smux session closed", self.peer, self.path)

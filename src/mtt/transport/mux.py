"""One WebSocket carrying a multiplexed session: smux (smux_on, docs/protocol.md
§5) or v2ray's Mux.Cool (§11). Each stream (a Mux.Cool sub-connection) goes
to its own TCP connection to the user's dst, whatever target a Mux.Cool New
frame names: the server never dials an address a client chose.

The protocols live in mtt.smux and mtt.muxcool (sans-I/O) and the loop
driving them over the WebSocket in mtt.transport.mux_link; this module relays
the streams. Memory is bounded by the session's receive budget: bytes handed
out in StreamData count until they are written to a dst that is not pushing
back; past the budget the WebSocket stops being read, which is the only
back-pressure smux v1 and Mux.Cool have (Mux.Cool also stops when one
sub-connection holds its own budget). Toward the client, a WebSocket that
cannot take more pauses reading every dst of the session.

A stream whose dst ends sends its FIN (End) only once the client has
received the stream's data (smux v2: the part beyond the peer's window too),
as a plain tunnel does with its close frame (mtt.transport.delivery), at
most `close_flush_max` after dst ended; client data for it is discarded
meanwhile. An smux FIN then waits `drain_quiet` more; a Mux.Cool End does
not: v2ray's client closes a sub-connection on End after handing on what it
holds, and keeps writing nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from picows import WSCloseCode, WSFrame, WSMsgType, WSTransport

from mtt.config import Limits
from mtt.core.rate import Direction
from mtt.core.stats import STATS
from mtt.core.users import MuxProtocol
from mtt.errors import ProtocolError
from mtt.muxcool import MuxCoolSession
from mtt.smux import SmuxSession
from mtt.transport.delivery import Delivery
from mtt.transport.dst import DstConnection, dial
from mtt.transport.mux_link import MuxLink, MuxSession
from mtt.transport.plain import TunnelRegistry
from mtt.transport.tasks import spawn
from mtt.transport.wsbase import CheckedListener

if TYPE_CHECKING:
    from mtt.core.meter import Account

log = logging.getLogger("mtt.tunnel")


class MuxStream:
    """One smux stream (Mux.Cool sub-connection) relayed to one dst connection."""

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
        self._dial_task = spawn(self._dial(), f"{t.dial_name}{self.sid}", t.loop)

    async def _dial(self) -> None:
        t = self._tunnel
        limits = t.limits
        try:
            await dial(self, t.dst, limits.connect_timeout, t.dst_high_water, t.loop)
        except (OSError, TimeoutError) as exc:
            STATS.dial_failed(exc)
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or repr(exc))
            log.warning(
                "%s %s: stream %d: dial %s failed: %s", t.peer, t.path, self.sid, t.dst, reason
            )
            self.close(error=True)

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

    def peer_data(self, data: bytes) -> None:
        self.last_activity = self._tunnel.now
        if self._ending:  # nowhere to go
            self._tunnel.mux.consumed(self.sid, len(data))
            return
        if self._dst is None or self._dst_paused or self._pending:
            self._pending.append(data)
            return
        self._dst.write(data)
        self._tunnel.mux.consumed(self.sid, len(data))

    def _flush_pending(self) -> None:
        dst = self._dst
        session = self._tunnel.mux
        while self._pending and dst is not None and not self._dst_paused:
            chunk = self._pending.pop(0)
            dst.write(chunk)
            session.consumed(self.sid, len(chunk))
        self._tunnel.after_consume()

    def peer_ended(self) -> None:
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
        taken = t.mux.send_data(self.sid, data)
        if taken < len(data):
            self._outbound = data[taken:]
            if self._dst is not None:
                self._dst.pause_reading()
        # Now, not at the iteration's end: a reply is what a new stream waits for,
        # and gathering them measured slower for new streams (and no better in CPU).
        t.flush()

    def writable(self) -> None:
        """v2: the peer opened its window again."""
        if not self._outbound:
            return
        t = self._tunnel
        taken = t.mux.send_data(self.sid, self._outbound)
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
        session = t.mux
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

    def close(self, error: bool = False) -> None:
        """End the stream both ways; the budget its pending data held is freed.
        `error`: it failed (Mux.Cool says so in its End; smux cannot)."""
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
        session = t.mux
        for chunk in self._pending:
            session.consumed(self.sid, len(chunk))
        self._pending = []
        self._outbound = b""
        if not session.closed:
            session.close_stream(self.sid, error)
        t.stream_closed(self)


class MuxTunnel(MuxLink[MuxStream, MuxSession], CheckedListener):
    """The server's side of a session: each stream the client opens goes to dst."""

    def __init__(
        self,
        account: Account,
        peer: str,
        limits: Limits,
        registry: TunnelRegistry,
        protocol: MuxProtocol = MuxProtocol.SMUX,
    ) -> None:
        make_session: Callable[[float], MuxSession]
        if protocol is MuxProtocol.MUXCOOL:
            make_session = partial(MuxCoolSession, limits.muxcool)
            self.dst_high_water = limits.muxcool.stream_budget
            self._fin_quiet = 0.0
            self.kind, self._name = "muxcool", "Mux.Cool"
        else:
            make_session = partial(SmuxSession, limits.smux)
            self.dst_high_water = limits.smux.stream_window
            self._fin_quiet = limits.drain_quiet
            self.kind, self._name = "smux", "smux"
        super().__init__(make_session, limits.idle_timeout, limits.idle_timeout, limits.smux)
        self.protocol = protocol
        self._account = account
        self.dst = account.user.dst
        self.peer = peer
        self.dial_name = f"dial {self.dst} for {peer} stream "  # + the stream id: a task's name
        self.path = account.path
        self.limits = limits
        self._registry = registry
        self.writing_paused = False
        self._refused = 0
        self.delivery: Delivery | None = None
        # Streams whose dst ended, by when their FIN goes whatever the client has.
        self._ending: dict[MuxStream, float] = {}
        self._fin_timer: asyncio.TimerHandle | None = None
        self._fin_poll = limits.close_flush_poll

    # -- WebSocket side -------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.delivery = delivery = Delivery(transport.underlying_transport)
        self.attach(transport, self.limits.write_high_water, delivery.write_binary)
        self._registry.opened(self)
        STATS.opened[self.kind] += 1
        self.meter = self._account.open(self)
        self.arm_timer()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = self.screen(transport, frame)
        if msg_type is None:
            return
        if msg_type is not WSMsgType.CLOSE:
            if not self.closed:
                self.on_message(frame)
        else:
            self.release_held(all_of_it=True)
            code = frame.get_close_code()  # a valid one (screened): echoed, as gorilla does
            self.finish(code if code is not WSCloseCode.NO_INFO else WSCloseCode.OK)

    def violation(self, reason: str) -> None:
        log.warning("%s %s: WebSocket protocol error: %s", self.peer, self.path, reason)
        self.finish(WSCloseCode.PROTOCOL_ERROR)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closed:
            self.release_held(all_of_it=True)
            reason = self.picows_close_reason(transport)
            if reason is not None:
                log.warning("%s %s: WebSocket %s", self.peer, self.path, reason)
        self.disconnected()
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
        self.finish(WSCloseCode.GOING_AWAY)

    def kick(self, why: str | None = None) -> bool:
        """Close the session and every stream in it now: the controller said so,
        or a limit (why), which its user's one log line reports."""
        if self.closed:
            return False
        if why is None:
            log.info("%s %s: kicked", self.peer, self.path)
        else:
            log.debug("%s %s: closed: %s", self.peer, self.path, why)
        self.finish(WSCloseCode.POLICY_VIOLATION)
        return True

    # -- session events (MuxLink hooks) ------------------------------------------

    def _stream_opened(self, stream_id: int) -> None:
        stream = MuxStream(self, stream_id, self.now)
        self.streams[stream_id] = stream
        STATS.opened["stream"] += 1
        stream.start()

    def _stream_refused(self, stream_id: int, reason: str) -> None:
        # One line for the first; a flood of SYNs must not become a flood of lines.
        self._refused += 1
        if self._refused == 1:
            log.info(
                "%s %s: stream %d refused: %s",
                self.peer,
                self.path,
                stream_id,
                reason or f"{self.mux.stream_count} streams open",
            )

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning("%s %s: %s protocol error: %s", self.peer, self.path, self._name, exc)

    def _session_ended(self, reason: str) -> None:
        log.info("%s %s: %s session ended: %s", self.peer, self.path, self._name, reason)

    def _close_idle(self, stream: MuxStream, now: float) -> None:
        log.debug("%s %s: stream %d idle, closing", self.peer, self.path, stream.sid)
        stream.close()

    def stream_closed(self, stream: MuxStream) -> None:
        self.streams.pop(stream.sid, None)
        self._ending.pop(stream, None)
        self.after_consume()

    # -- FINs after delivery ---------------------------------------------------

    def fin_after_delivery(self, stream: MuxStream) -> None:
        """stream's dst ended: its FIN waits (bounded) for the client to have its data."""
        self._ending[stream] = self.loop.time() + self.limits.close_flush_max
        self.after_consume()
        self.check_fins()  # arms the poll, which also keeps the deadline

    def check_fins(self) -> None:
        """Send each ending stream's FIN `drain_quiet` (Mux.Cool: no time) after
        the client has its data, or once it has waited `close_flush_max`."""
        if self._fin_timer is not None:
            self._fin_timer.cancel()
            self._fin_timer = None
        now = self.loop.time()
        limits = self.limits
        delivery = self.delivery
        next_check = now + self._fin_poll
        for stream, deadline in list(self._ending.items()):
            mark = stream.fin_mark
            delivered = mark is not None and (delivery is None or delivery.received(mark))
            if stream.fin_at is None and delivered:
                stream.fin_at = now + self._fin_quiet
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
        if not self._ending or self.closed:
            self._fin_poll = limits.close_flush_poll
            return
        self._fin_timer = self.loop.call_at(next_check, self.check_fins)
        self._fin_poll = min(self._fin_poll * 2, limits.drain_quiet)

    # -- ending ----------------------------------------------------------------

    def _end_streams(self) -> None:
        if self._fin_timer is not None:
            self._fin_timer.cancel()
            self._fin_timer = None
        for stream in list(self.streams.values()):
            stream.close()

    def finish(self, code: WSCloseCode) -> None:
        if self.closed:
            return
        super().finish(code)
        if self._refused > 1:
            log.info("%s %s: %d streams refused in all", self.peer, self.path, self._refused)
        log.debug("%s %s: %s session closed", self.peer, self.path, self._name)

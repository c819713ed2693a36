"""One WebSocket carrying one plain byte stream to one TCP dst (smux_off).

Each binary (or text, or continuation) message is the next chunk of the
stream; boundaries mean nothing (docs/protocol.md §4). Back-pressure runs both
ways: a dst that cannot take more pauses reading the WebSocket, a client that
cannot take more pauses reading dst, so memory per tunnel stays bounded by the
write-buffer high-water marks whatever the peers do.

When dst ends first the close frame waits for two things. First, the client
must have received every byte before it (v2ray-plugin drops what it has not
yet delivered when it reads a close frame): until our buffers and the kernel's
send queue are empty, at most `close_flush_max` (mtt.transport.delivery).
Then the tunnel does not close under a client that may still be uploading
(the Go client panics on a close that races its own write, taking every
tunnel of that process down, docs/protocol.md §7): it discards client data until
the client has been quiet for `drain_quiet`, at most `drain_max`. Only then
does the close frame go.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from typing import TYPE_CHECKING, Protocol

from picows import WSCloseCode, WSFrame, WSMsgType, WSTransport

from mtt.config import Limits
from mtt.core.rate import Direction
from mtt.core.stats import STATS
from mtt.transport.delivery import Delivery
from mtt.transport.dst import DstConnection, dial
from mtt.transport.tasks import spawn
from mtt.transport.wsbase import CheckedListener
from mtt.wire.close_schedule import Close, CloseSchedule

if TYPE_CHECKING:
    from mtt.core.meter import Account, Meter


log = logging.getLogger("mtt.tunnel")


class _State(enum.Enum):
    DIALING = 1
    RELAYING = 2
    DRAINING = 3  # dst ended; flushing to the client, discarding its data, then the close
    CLOSED = 4


class Tunnel(Protocol):
    """What the registry needs of a tunnel (plain or smux)."""

    def shutdown(self) -> None: ...


class TunnelRegistry:
    """The live tunnels of a server, so shutdown can close them all."""

    def __init__(self) -> None:
        self.active: set[Tunnel] = set()
        self.total = 0
        self._idle: asyncio.Event | None = None

    def opened(self, tunnel: Tunnel) -> None:
        self.active.add(tunnel)
        self.total += 1

    def closed(self, tunnel: Tunnel) -> None:
        self.active.discard(tunnel)
        if not self.active and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no tunnel is open."""
        if not self.active:
            return
        self._idle = asyncio.Event()
        await self._idle.wait()


class PlainTunnel(CheckedListener):
    """Relays one WebSocket to one dst connection."""

    def __init__(
        self,
        account: Account,
        peer: str,
        limits: Limits,
        registry: TunnelRegistry,
        early_data: bytes = b"",
    ) -> None:
        super().__init__()
        # Sent in the upgrade request (docs/protocol.md §10): dst gets it first.
        self._early_data = early_data
        self._account = account
        self._meter: Meter | None = None
        self._dst_throttled = False
        # Client data picows handed over after the rate paused reading (the rest
        # of one read, which may be megabytes): relayed as the rate allows.
        self._held: deque[bytes] = deque()
        self._rate_paused = False
        self._dst_addr = account.user.dst
        self._peer = peer
        self._path = account.path
        self._limits = limits
        self._registry = registry
        self._loop = asyncio.get_running_loop()
        self._state = _State.DIALING
        self._ws: WSTransport | None = None
        self._delivery: Delivery | None = None
        self._dst: DstConnection | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._read_blocks: set[str] = set()
        self._last_activity = 0.0
        self._flush_mark = 0  # what the client must have received before the close
        self._close_schedule: CloseSchedule | None = None  # once DRAINING
        self._timer: asyncio.TimerHandle | None = None
        self._dial_task: asyncio.Task[None] | None = None
        self.bytes_up = 0
        self.bytes_down = 0

    # -- WebSocket side -------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        transport.underlying_transport.set_write_buffer_limits(high=self._limits.write_high_water)
        self._delivery = Delivery(transport.underlying_transport)
        self._registry.opened(self)
        STATS.opened["plain"] += 1
        self._meter = self._account.open(self)
        if self._early_data:  # ahead of every frame, counted as any client byte is
            self._count_up(len(self._early_data))
            self._pending.append(self._early_data)
            self._pending_size += len(self._early_data)
            self._early_data = b""
        self._last_activity = self._loop.time()
        self._arm_idle_timer(self._limits.idle_timeout)
        self._dial_task = spawn(self._dial(), name=f"dial {self._dst_addr} for {self._peer}")

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = self.screen(transport, frame)
        if msg_type is None:
            return
        if msg_type is not WSMsgType.CLOSE:
            state = self._state
            if state is _State.RELAYING:
                data = frame.get_payload_as_bytes()
                self._last_activity = self._loop.time()
                if self._rate_paused or self._held:
                    self._held.append(data)
                    return
                self._count_up(len(data))
                assert self._dst is not None
                self._dst.write(data)
            elif state is _State.DIALING:
                data = frame.get_payload_as_bytes()
                self._count_up(len(data))
                self._pending.append(data)
                self._pending_size += len(data)
                if self._pending_size >= self._limits.dial_buffer:
                    self._block_reading("dial")
            elif state is _State.DRAINING:
                assert self._close_schedule is not None
                self._close_schedule.client_data(self._loop.time())
        else:
            self._release_held(all_of_it=True)
            self._finish("client closed", reply_code=frame.get_close_code())

    def violation(self, reason: str) -> None:
        log.warning("%s %s: WebSocket protocol error: %s", self._peer, self._path, reason)
        self._finish(reason, reply_code=WSCloseCode.PROTOCOL_ERROR)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._state is not _State.CLOSED:
            self._release_held(all_of_it=True)
            reason = self.picows_close_reason(transport)
            if reason is not None:
                log.warning("%s %s: WebSocket %s", self._peer, self._path, reason)
            self._finish(reason or "client disconnected")
        if self._dst is not None:
            self._dst.close()
        self._cancel_timer()
        self._registry.closed(self)
        if self._meter is not None:
            self._meter = None
            self._account.close(self)

    def pause_writing(self) -> None:
        self.ws_writing_paused = True
        if self._dst is not None:
            self._dst.pause_reading()

    def resume_writing(self) -> None:
        self.ws_writing_paused = False
        if self._dst is not None and not self._dst_throttled:
            self._dst.resume_reading()

    def shutdown(self) -> None:
        """Close this tunnel now (server shutdown)."""
        self._finish("server shutting down", WSCloseCode.GOING_AWAY)

    def kick(self, why: str | None = None) -> bool:
        """Close this tunnel now: the controller said so, or a limit (why), which
        its user's one log line reports instead of a line per tunnel."""
        if self._state is _State.CLOSED:
            return False
        if why is None:
            log.info("%s %s: kicked", self._peer, self._path)
        self._finish(why or "kicked", WSCloseCode.POLICY_VIOLATION)
        return True

    # -- accounting and rate limits ---------------------------------------------

    def _count_up(self, size: int) -> None:
        self.bytes_up += size
        if self._meter is not None:
            self._meter.count_up(size, self)

    def throttle_pause(self, direction: Direction) -> None:
        if direction == Direction.UP:
            self._rate_paused = True
            self._block_reading("rate")
        else:
            self._dst_throttled = True
            if self._dst is not None:
                self._dst.pause_reading()

    def throttle_resume(self, direction: Direction) -> None:
        if direction == Direction.UP:
            self._rate_paused = False
            self._release_held()
            if not self._rate_paused and self._state in (_State.DIALING, _State.RELAYING):
                self._unblock_reading("rate")
        else:
            self._dst_throttled = False
            if self._dst is not None and not self.ws_writing_paused:
                self._dst.resume_reading()

    def _release_held(self, all_of_it: bool = False) -> None:
        """Relay held client data until the rate pauses again (or all of it:
        the client is leaving, and what it sent before must still arrive)."""
        held = self._held
        while held and (all_of_it or not self._rate_paused) and self._state is _State.RELAYING:
            data = held.popleft()
            self._count_up(len(data))
            assert self._dst is not None
            self._dst.write(data)
        if self._state is not _State.RELAYING:
            held.clear()

    # -- dst side ---------------------------------------------------------

    async def _dial(self) -> None:
        limits = self._limits
        try:
            await dial(self, self._dst_addr, limits.connect_timeout, limits.write_high_water)
        except (OSError, TimeoutError) as exc:
            STATS.dial_failed(exc)
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or repr(exc))
            log.warning("%s %s: dial %s failed: %s", self._peer, self._path, self._dst_addr, reason)
            self._start_draining()

    def dst_connected(self, conn: DstConnection) -> None:
        if self._state is not _State.DIALING:
            conn.close()  # the client went away while we dialed
            return
        self._dst = conn
        if self._dst_throttled or self.ws_writing_paused:
            conn.pause_reading()
        self._state = _State.RELAYING
        for chunk in self._pending:
            conn.write(chunk)
        self._pending = []
        self._pending_size = 0
        self._unblock_reading("dial")
        log.debug("%s %s: connected to %s", self._peer, self._path, self._dst_addr)

    def dst_data(self, data: bytes) -> None:
        ws = self._ws
        if ws is None or self._state is not _State.RELAYING:
            return
        self.bytes_down += len(data)
        if self._meter is not None:
            self._meter.count_down(len(data), self)
        self._last_activity = self._loop.time()
        if not ws.underlying_transport.is_closing():
            assert self._delivery is not None
            self._delivery.write_binary(data)

    def dst_eof(self) -> None:
        self._start_draining()

    def dst_lost(self, exc: Exception | None) -> None:
        self._start_draining()

    def dst_pause_writing(self) -> None:
        self._block_reading("dst")

    def dst_resume_writing(self) -> None:
        self._unblock_reading("dst")

    # -- ending ------------------------------------------------------------

    def _start_draining(self) -> None:
        """dst is gone: once the client has what dst sent, discard client data
        until it has been quiet, then close."""
        if self._state in (_State.DRAINING, _State.CLOSED):
            return
        self._state = _State.DRAINING
        self._held.clear()
        limits = self._limits
        self._close_schedule = CloseSchedule(
            self._loop.time(),
            flush_max=limits.close_flush_max,
            flush_poll=limits.close_flush_poll,
            quiet=limits.drain_quiet,
            drain_max=limits.drain_max,
        )
        self._flush_mark = self._delivery.written if self._delivery is not None else 0
        self._read_blocks.clear()
        self._resume_ws_reading()
        self._cancel_timer()
        self._check_drained()

    def _check_drained(self) -> None:
        schedule = self._close_schedule
        assert schedule is not None
        delivery = self._delivery
        has_all = not schedule.flushing or delivery is None or delivery.received(self._flush_mark)
        decision = schedule.poll(self._loop.time(), has_all)
        if decision.flush_timed_out:
            log.info(
                "%s %s: client still receiving after %.0f s, closing",
                self._peer,
                self._path,
                self._limits.close_flush_max,
            )
        if isinstance(decision, Close):
            self._finish("dst closed")
        else:
            self._timer = self._loop.call_at(decision.at, self._check_drained)

    def _finish(self, reason: str, reply_code: WSCloseCode = WSCloseCode.OK) -> None:
        """Close both sides: the close frame goes after any data still buffered."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._held.clear()
        self._cancel_timer()
        if self._dial_task is not None and not self._dial_task.done():
            self._dial_task.cancel()
        if self._dst is not None:
            self._dst.close()
        ws = self._ws
        if ws is not None and not ws.underlying_transport.is_closing():
            if not ws.is_close_frame_sent:
                code = reply_code if reply_code is not WSCloseCode.NO_INFO else WSCloseCode.OK
                ws.send_close(code)
            ws.disconnect()
            # A client that stops reading cannot hold the socket forever.
            self._timer = self._loop.call_later(self._limits.idle_timeout, ws.disconnect, False)
        log.debug(
            "%s %s: closed (%s), up %d down %d bytes",
            self._peer,
            self._path,
            reason,
            self.bytes_up,
            self.bytes_down,
        )

    # -- timers and flow control --------------------------------------------

    def _arm_idle_timer(self, delay: float) -> None:
        self._timer = self._loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        if self._state not in (_State.DIALING, _State.RELAYING):
            return
        idle_for = self._loop.time() - self._last_activity
        timeout = self._limits.idle_timeout
        if idle_for >= timeout:
            log.info("%s %s: idle for %.0f s, closing", self._peer, self._path, idle_for)
            self._finish("idle timeout")
        else:
            self._arm_idle_timer(timeout - idle_for)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _block_reading(self, reason: str) -> None:
        if not self._read_blocks and self._ws is not None:
            transport = self._ws.underlying_transport
            if not transport.is_closing():
                transport.pause_reading()
        self._read_blocks.add(reason)

    def _unblock_reading(self, reason: str) -> None:
        self._read_blocks.discard(reason)
        if not self._read_blocks:
            self._resume_ws_reading()

    def _resume_ws_reading(self) -> None:
        if self._ws is not None:
            transport = self._ws.underlying_transport
            if not transport.is_closing() and not transport.is_reading():
                transport.resume_reading()

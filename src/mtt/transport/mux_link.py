"""One multiplexed session over one WebSocket: the I/O loop the server's
tunnels (mtt.transport.mux: smux and Mux.Cool) and the client's smux session
(mtt.client.mux) share.

The protocols live in mtt.smux and mtt.muxcool (sans-I/O, both reporting in
smux's events); this driver owns the clock and the WebSocket: received
payloads go to the session with `now`, its events go to the streams (and to
the role's hooks for what only one side does), what it queued goes out, and
its receive budget pauses reading the WebSocket, the only back-pressure smux
v1 and Mux.Cool have (docs/protocol.md §5, §11); so does the user's upload
rate, when a meter says so. One timer serves the session's own deadline
(keepalive, idle end) and the sweep of idle streams. Each role says how its
bytes leave (the server counts them for delivery, the client cuts them into
messages) and what its streams do; the loop itself is written once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from picows import WSCloseCode, WSFrame, WSTransport

from mtt.core.rate import Direction
from mtt.errors import ProtocolError
from mtt.smux import (
    Event,
    SessionEnded,
    SmuxConfig,
    StreamData,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamWritable,
)
from mtt.transport.session_timer import SessionTimer

if TYPE_CHECKING:
    from mtt.core.meter import Meter


class LinkStream(Protocol):
    """What the driver hands a stream's events to."""

    last_activity: float

    def peer_data(self, data: bytes) -> None:
        """Bytes from the peer; they hold budget until `mux.consumed()`."""

    def peer_ended(self) -> None:
        """The peer sent FIN."""

    def writable(self) -> None:
        """smux v2: the peer's window opened again."""


class MuxSession(Protocol):
    """What the driver and the streams need of a session (SmuxSession and
    MuxCoolSession both are one)."""

    @property
    def closed(self) -> bool: ...

    @property
    def stream_count(self) -> int: ...

    @property
    def pending_output(self) -> int: ...

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]: ...

    def data_to_send(self) -> bytes: ...

    def reading_paused(self) -> bool: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> list[Event]: ...

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int: ...

    def consumed(self, stream_id: int, nbytes: int) -> None: ...

    def close_stream(self, stream_id: int, error: bool = False) -> None: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=LinkStream)
P = TypeVar("P", bound=MuxSession)


class MuxLink(Generic[S, P]):
    """Drives a session `mux` over one WebSocket; a role subclasses it before its
    listener class (``class Role(MuxLink[Stream, Session], WSListener)``).

    The role calls attach() once connected, on_message() for each data
    message, after_consume() whenever its streams free budget, and finish()
    to end; it overrides the hooks below for what differs.
    """

    def __init__(
        self,
        make_session: Callable[[float], P],
        idle_timeout: float,
        linger: float,
        sweep: SmuxConfig,
    ) -> None:
        # sweep: how often idle streams are looked for (SmuxConfig's settings, for
        # Mux.Cool sessions too)
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time()
        self._make_session = make_session
        self.mux = make_session(self.now)
        self.streams: dict[int, S] = {}
        # The user's meter, server side: what the peer sends is the user's upload.
        self.meter: Meter | None = None
        self.closed = False
        # Over the upload rate, or messages held: parse nothing new.
        self.hold_reading = False
        self._throttled_up = False
        # Messages picows handed over after the rate paused reading (the rest of
        # one read, which may be megabytes): parsed as the rate allows.
        self._held: deque[bytes] = deque()
        self._idle_timeout = idle_timeout
        self._linger_after = linger
        self._linger: asyncio.TimerHandle | None = None
        self._ws: WSTransport | None = None
        self._write: Callable[[bytes], None] = _nowhere
        self._flush_handle: asyncio.Handle | None = None
        self._flush_at = 0  # queued output that is sent at once, not at the iteration's end
        self._reading_paused = False
        self._timer = SessionTimer(self.loop, idle_timeout, sweep, self._on_timer)
        super().__init__()  # the role's listener

    @property
    def is_open(self) -> bool:
        """The WebSocket is up and the session not finished."""
        return self._ws is not None and not self.closed

    def attach(
        self, ws: WSTransport, write_high_water: int, write: Callable[[bytes], None]
    ) -> None:
        """The WebSocket is up: `write` sends what the session queued."""
        self._ws = ws
        ws.underlying_transport.set_write_buffer_limits(high=write_high_water)
        self._write = write
        self._flush_at = write_high_water

    def restart_session(self) -> None:
        """A fresh session whose clocks start now (a client's, once its WebSocket is up)."""
        self.now = self.loop.time()
        self.mux = self._make_session(self.now)

    def arm_timer(self) -> None:
        self._timer.rearm(self.mux.get_timer())

    # -- the loop ---------------------------------------------------------------

    def on_message(self, frame: WSFrame) -> None:
        """One data message from the peer: parse it (or hold it, over the rate)."""
        if self.hold_reading:
            self._held.append(frame.get_payload_as_bytes())
            return
        self.receive(frame.get_payload_as_memoryview())
        self.after_consume()

    def release_held(self, all_of_it: bool = False) -> None:
        """Parse held messages until the rate pauses again (or all of them: the
        peer is leaving, and what it sent before must still arrive)."""
        held = self._held
        while held and (all_of_it or not self._throttled_up) and not self.closed:
            data = held.popleft()
            self.hold_reading = self._throttled_up or bool(held)
            self.receive(data)
        if self.closed:
            held.clear()

    def throttle_pause(self, direction: Direction) -> None:
        """Over the upload rate (downloads are the streams' to charge)."""
        self._throttled_up = self.hold_reading = True
        self.after_consume()

    def throttle_resume(self, direction: Direction) -> None:
        self._throttled_up = False
        self.hold_reading = bool(self._held)
        self.release_held()
        self.after_consume()

    def receive(self, data: memoryview | bytes) -> None:
        """Feed one message from the peer; its events go to the streams."""
        self.now = now = self.loop.time()
        try:
            events = self.mux.receive_data(data, now)
        except ProtocolError as exc:
            self._protocol_error(exc)
            self.finish(WSCloseCode.PROTOCOL_ERROR)
            return
        if events:  # none for a message that only starts an smux frame
            self._dispatch(events)

    def _dispatch(self, events: list[Event]) -> None:
        """Hand events to the streams. Data is nearly every event: it is handled
        here, and the user's meter charged once for all of it (a pause that asks
        for holds the next message; this one is read already)."""
        streams = self.streams
        up = 0
        for event in events:
            if type(event) is StreamData:
                data = event.data
                up += len(data)
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.peer_data(data)
                else:
                    self.mux.consumed(event.stream_id, len(data))
            else:
                self._handle(event)
        meter = self.meter
        if up and meter is not None:
            meter.count_up(up, self)

    def _handle(self, event: Event) -> None:
        if isinstance(event, StreamOpened):
            self._stream_opened(event.stream_id)
        elif isinstance(event, StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.peer_ended()
        elif isinstance(event, StreamWritable):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.writable()
        elif isinstance(event, StreamRefused):
            self._stream_refused(event.stream_id, event.reason)
        elif isinstance(event, SessionEnded):
            self._session_ended(event.reason)
            self.finish(WSCloseCode.OK)

    def flush(self) -> None:
        """Send what the session queued, now."""
        out = self.mux.data_to_send()
        if out:
            ws = self._ws
            if ws is not None and not ws.underlying_transport.is_closing():
                self._write(out)

    def flush_soon(self) -> None:
        """Send what the session queued at the end of this loop iteration: what
        the streams queue in one iteration (replies, FINs, dst data) then
        leaves as one message, one TLS record and one send instead of one each.
        Past the write high-water mark it goes now, so back-pressure still
        comes from the transport's buffer."""
        if self._flush_handle is not None:
            if self.mux.pending_output >= self._flush_at:
                self.flush()
            return
        pending = self.mux.pending_output
        if not pending:
            return
        if pending >= self._flush_at:
            self.flush()
        else:
            self._flush_handle = self.loop.call_soon(self._flush_queued)

    def _flush_queued(self) -> None:
        self._flush_handle = None
        self.flush()

    def after_consume(self) -> None:
        """Pause or resume reading the WebSocket by the receive budget, then flush."""
        ws = self._ws
        if ws is None or self.closed:
            return
        mux = self.mux
        paused = mux.reading_paused() or self.hold_reading
        if paused != self._reading_paused:
            self._reading_paused = paused
            transport = ws.underlying_transport
            if not transport.is_closing():
                if paused:
                    transport.pause_reading()
                else:
                    transport.resume_reading()
        if self._flush_handle is not None or mux.pending_output:
            self.flush_soon()

    def _on_timer(self, now: float, sweep: bool) -> None:
        if self.closed:
            return
        self.now = now
        self._dispatch(self.mux.handle_timer(now))
        if sweep and not self.closed:
            timeout = self._idle_timeout
            for stream in [s for s in self.streams.values() if now - s.last_activity >= timeout]:
                self._close_idle(stream, now)
        self.flush()
        if not self.closed:
            self._timer.rearm(self.mux.get_timer())

    def finish(self, code: WSCloseCode) -> None:
        """End the streams, send what is queued, then close the WebSocket with `code`."""
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._end_streams()
        self.flush()
        self.mux.close()
        ws = self._ws
        if ws is not None and not ws.underlying_transport.is_closing():
            if not ws.is_close_frame_sent:
                ws.send_close(code)
            self._closing(ws)
            ws.disconnect()
            # A peer that never takes the last bytes is cut off.
            self._linger = self.loop.call_later(self._linger_after, ws.disconnect, False)

    def disconnected(self) -> None:
        """The WebSocket is gone."""
        self.finish(WSCloseCode.OK)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    # -- hooks -------------------------------------------------------------------

    def _stream_opened(self, stream_id: int) -> None:
        """The peer opened a stream (a client refuses them all: never called there)."""

    def _stream_refused(self, stream_id: int, reason: str) -> None:
        """A peer SYN (or New) was refused; the refusal is already queued."""

    def _protocol_error(self, exc: ProtocolError) -> None:
        """The peer's bytes broke the protocol; the session closes with 1002 next."""

    def _session_ended(self, reason: str) -> None:
        """The session ended on its own (keepalive timeout, idle); it closes with 1000 next."""

    def _close_idle(self, stream: S, now: float) -> None:
        """`stream` has been idle past the idle timeout: close it."""
        raise NotImplementedError

    def _end_streams(self) -> None:
        """finish(): close every stream, before the session's last bytes go out."""
        raise NotImplementedError

    def _closing(self, ws: WSTransport) -> None:
        """finish(): the close frame is queued and the WebSocket about to disconnect."""


def _nowhere(out: bytes) -> None:
    """The writer before attach(): flush() never calls it, having no WebSocket."""

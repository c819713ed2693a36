"""The server's side of a Mux.Cool session, sans-I/O (docs/protocol.md §11).

Theory of operation. The I/O layer owns the socket and the clock, exactly as
with mtt.smux, and gets the same events (StreamOpened, StreamData,
StreamEnded, StreamRefused, SessionEnded), so one driver runs both:

    receive_data(bytes, now) -> events      client frames in
    send_data / close_stream                our Keep and End frames queued
    consumed(stream, n)                     app took n bytes: frees budget
    data_to_send() -> bytes                 drain what is queued
    get_timer() / handle_timer(now)         the idle end of a session

Mux.Cool has no window and no flow control (v2ray's server blocks reading the
whole connection while one sub-connection's pipe is full). So memory is
bounded the only way it can be: every Data byte handed out in a StreamData
counts until consumed(), and ``reading_paused()`` tells the I/O layer to stop
reading the connection once the session holds ``receive_budget`` bytes or
one sub-connection holds ``stream_budget``: a dst that does not read stops
the session's uploads, as in v2ray.

As v2ray's ServerWorker (common/mux/server.go): New opens a sub-connection
(its target is parsed, never used: every one goes to the user's dst), Keep
carries data, End closes it, KeepAlive is read and ignored, and frames for a
sub-connection the server does not know are dropped with their data. We send
only Keep and End, never New or KeepAlive. Differences, each deliberate:
UDP sub-connections (and XUDP) are refused with End and option Error, and so
is any New beyond ``max_streams``; a Keep for an unknown sub-connection gets
no End back (v2ray sends one; we sent ours when we closed or refused it, and
answering every such frame lets a client that does not read grow our
output); a New for a sub-connection already open ends the session (v2ray
and Xray number them 1, 2, ... and open at most 128 per connection, so only
a broken peer reuses one); more than ``max_refusals`` refused New frames end
it too; data carried by an End is delivered (v2ray drops it; its clients
never send any). A session with no sub-connection open that receives nothing
for ``idle_timeout`` ends (v2ray clients close theirs after 16 s without
one; KeepAlive frames keep it open, as the protocol means them to).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtt.errors import MuxCoolProtocolError
from mtt.muxcool.frames import (
    MAX_METADATA,
    MAX_PAYLOAD,
    FrameDecoder,
    Network,
    Status,
    encode_data,
    encode_end,
)
from mtt.smux.session import (
    Event,
    SessionEnded,
    StreamData,
    StreamEnded,
    StreamOpened,
    StreamRefused,
)

__all__ = ["MuxCoolConfig", "MuxCoolSession"]

KiB = 1024
_NEW, _KEEP, _END = Status.NEW, Status.KEEP, Status.END


@dataclass(frozen=True, slots=True)
class MuxCoolConfig:
    """Every bound of one session (docs/protocol.md §11)."""

    # Open sub-connections. v2ray and Xray open at most 128 per connection in its
    # whole life (MaxConnection), so none of theirs is ever refused.
    max_streams: int = 128
    # Client bytes held for slow destinations, the session's and one
    # sub-connection's; past either the connection is not read.
    receive_budget: int = 256 * KiB
    stream_budget: int = 64 * KiB
    # Largest metadata (v2ray's own bound) and Data payload accepted (v2ray reads
    # any u16; it writes at most 8 KiB).
    max_metadata: int = MAX_METADATA
    max_payload: int = MAX_PAYLOAD
    # Our Data frames carry at most this, as v2ray's writer cuts them.
    write_chunk: int = 8 * KiB
    # Refused New frames (UDP, over max_streams) before the session ends.
    max_refusals: int = 1024
    # A session with no sub-connection and nothing received for this long ends.
    idle_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not 4 <= self.max_metadata <= MAX_METADATA:
            raise ValueError(f"max_metadata must be in 4..{MAX_METADATA}")
        if not 0 < self.max_payload <= MAX_PAYLOAD or not 0 < self.write_chunk <= MAX_PAYLOAD:
            raise ValueError(f"max_payload and write_chunk must be in 1..{MAX_PAYLOAD}")
        if self.receive_budget <= 0 or self.stream_budget <= 0 or self.max_streams < 0:
            raise ValueError("budgets must be positive, max_streams not negative")
        if self.max_refusals < 0 or self.idle_timeout <= 0:
            raise ValueError("max_refusals must not be negative, idle_timeout must be positive")


class _Stream:
    __slots__ = ("fin_received", "unconsumed")

    def __init__(self) -> None:
        self.fin_received = False  # the client sent End
        self.unconsumed = 0  # delivered in StreamData, not yet consumed()


class MuxCoolSession:
    """One Mux.Cool session over one byte stream; see the module docstring."""

    def __init__(self, config: MuxCoolConfig, now: float) -> None:
        self._config = config
        self._decoder = FrameDecoder(config.max_metadata, config.max_payload)
        self._streams: dict[int, _Stream] = {}
        # Bytes of sub-connections closed before the app consumed all they delivered.
        self._orphaned: dict[int, int] = {}
        self._over: set[int] = set()  # sub-connections holding stream_budget or more
        self._buffered = 0
        self._refusals = 0
        self._out = bytearray()
        self._closed = False
        self._last_received = now
        self._next_check = now + config.idle_timeout

    # -- properties ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after close(), a protocol error or the idle end."""
        return self._closed

    @property
    def stream_count(self) -> int:
        """Open sub-connections, including those the client has ended and we have not closed."""
        return len(self._streams)

    @property
    def buffered(self) -> int:
        """Bytes delivered in StreamData and not yet consumed(), all sub-connections."""
        return self._buffered

    @property
    def pending_output(self) -> int:
        return len(self._out)

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def reading_paused(self) -> bool:
        """Whether the I/O layer must stop reading: a budget is spent."""
        return self._buffered >= self._config.receive_budget or bool(self._over)

    # -- input --------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Feed client bytes; events in wire order. Bad bytes close the session."""
        if self._closed:
            raise MuxCoolProtocolError("Mux.Cool: session is closed")
        try:
            return self._receive(data, now)
        except MuxCoolProtocolError:
            self.close()
            raise

    def _receive(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        if len(data):
            self._last_received = now
        events: list[Event] = []
        streams = self._streams
        for frame in self._decoder.feed(data):
            status = frame.status
            sid = frame.session_id
            if status is _KEEP:
                stream = streams.get(sid)
                if stream is not None and not stream.fin_received:
                    self._deliver(sid, stream, frame.payload, events)
            elif status is _NEW:
                assert frame.target is not None  # the decoder parsed one
                if sid in streams:
                    raise MuxCoolProtocolError(
                        f"Mux.Cool: New for sub-connection {sid}, open already"
                    )
                if frame.target.network is Network.UDP:
                    self._refuse(sid, "UDP", events)
                elif len(streams) >= self._config.max_streams:
                    self._refuse(sid, f"{len(streams)} open", events)
                else:
                    stream = streams[sid] = _Stream()
                    events.append(StreamOpened(sid))
                    self._deliver(sid, stream, frame.payload, events)
            elif status is _END:
                stream = streams.get(sid)
                if stream is not None and not stream.fin_received:
                    self._deliver(sid, stream, frame.payload, events)
                    stream.fin_received = True
                    events.append(StreamEnded(sid))
            # KEEPALIVE: read and ignored, its data with it (v2ray's handleStatusKeepAlive).
        return events

    def _deliver(self, sid: int, stream: _Stream, payload: bytes, events: list[Event]) -> None:
        if not payload:
            return
        n = len(payload)
        stream.unconsumed += n
        self._buffered += n
        if stream.unconsumed >= self._config.stream_budget:
            self._over.add(sid)
        events.append(StreamData(sid, payload))

    def _refuse(self, sid: int, reason: str, events: list[Event]) -> None:
        self._refusals += 1
        if self._refusals > self._config.max_refusals:
            raise MuxCoolProtocolError(
                f"Mux.Cool: more than {self._config.max_refusals} sub-connections refused"
            )
        self._out += encode_end(sid, error=True)
        events.append(StreamRefused(sid, reason))

    # -- output -------------------------------------------------------------

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue Keep frames with the data, in write_chunk pieces; takes all of it
        (Mux.Cool has no window), 0 for an unknown sub-connection."""
        if stream_id not in self._streams or self._closed:
            return 0
        view = memoryview(data)
        if view.itemsize != 1 or view.ndim != 1:
            view = view.cast("B")
        out = self._out
        step = self._config.write_chunk
        for start in range(0, len(view), step):
            out += encode_data(stream_id, view[start : start + step])
        return len(view)

    def close_stream(self, stream_id: int, error: bool = False) -> None:
        """Queue End (with option Error when the sub-connection failed) and forget it.

        Budget is not freed here: the I/O layer may still hold the bytes and
        must call consumed() for them, even after this.
        """
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        self._over.discard(stream_id)
        if stream.unconsumed:
            self._orphaned[stream_id] = self._orphaned.get(stream_id, 0) + stream.unconsumed
        if not self._closed:
            self._out += encode_end(stream_id, error)

    def consumed(self, stream_id: int, nbytes: int) -> None:
        """The app took nbytes of this sub-connection: free budget."""
        if nbytes <= 0:
            return
        orphaned = self._orphaned.get(stream_id)
        if orphaned:
            take = min(nbytes, orphaned)
            if take == orphaned:
                del self._orphaned[stream_id]
            else:
                self._orphaned[stream_id] = orphaned - take
            self._buffered -= take
            nbytes -= take
            if not nbytes:
                return
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        take = min(nbytes, stream.unconsumed)
        stream.unconsumed -= take
        self._buffered -= take
        if stream.unconsumed < self._config.stream_budget:
            self._over.discard(stream_id)

    def data_to_send(self) -> bytes:
        """Everything queued so far; b"" when nothing is."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    # -- time ---------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When handle_timer() should run next; None once closed."""
        return None if self._closed else self._next_check

    def handle_timer(self, now: float) -> list[Event]:
        """End a session that has had no sub-connection and no byte for idle_timeout."""
        if self._closed:
            return []
        idle = self._config.idle_timeout
        if now < self._last_received + idle:
            self._next_check = self._last_received + idle
            return []
        if self._streams or self.reading_paused():
            # The sub-connections' own idle timeouts are the I/O layer's to keep.
            self._next_check = now + idle
            return []
        self.close()
        return [
            SessionEnded(
                f"nothing received for {now - self._last_received:g}s, no sub-connection open"
            )
        ]

    def close(self) -> None:
        """Mark the session closed; queued output stays drainable. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sid, stream in self._streams.items():
            if stream.unconsumed:
                self._orphaned[sid] = self._orphaned.get(sid, 0) + stream.unconsumed
        self._streams.clear()
        self._over.clear()

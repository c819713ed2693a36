"""A sans-I/O smux session, wire-compatible with xtaci/smux v1.5 (v1 and v2).

Theory of operation. The I/O layer owns the socket and the clock:

    receive_data(bytes, now) -> events      peer frames in
    send_data / open_stream / close_stream  our frames queued
    consumed(stream, n)                     app took n bytes: frees budget, v2 UPD
    data_to_send() -> bytes                 drain what is queued
    get_timer() / handle_timer(now)         keepalive NOPs and the receive timeout

Memory is bounded the way Go bounds it (Session.bucket): every PSH byte
delivered in a StreamData counts against ``receive_budget`` until consumed();
once ``reading_paused()`` the I/O layer stops reading the socket. Version 2
adds per-stream windows (Stream.writeV2 / tryReadv2): ``send_data`` takes at
most ``send_window()`` bytes, and consumed() sends UPD like Go's reader does.

Deliberate differences from Go, each for the server use of this package:
a server adopts the version of the peer's first frame (Go needs it
configured); it refuses SYNs beyond ``max_streams`` with a FIN; a client
refuses every SYN; PSH after the peer's FIN is dropped; the keepalive timeout
is measured from the last byte received instead of on a coarse ticker.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from mtt.errors import SmuxProtocolError
from mtt.smux.frames import MAX_PAYLOAD, Cmd, FrameDecoder, decode_upd

__all__ = [
    "INITIAL_PEER_WINDOW",
    "V1_SEND_WINDOW",
    "Event",
    "SessionEnded",
    "SmuxConfig",
    "SmuxSession",
    "StreamData",
    "StreamEnded",
    "StreamOpened",
    "StreamRefused",
    "StreamWritable",
]

_U32 = 0xFFFFFFFF
_I32_SIGN = 0x80000000

INITIAL_PEER_WINDOW = 262144
"""Go's initialPeerWindow: what a v2 sender assumes before the first UPD."""

V1_SEND_WINDOW = 0x7FFFFFFF
"""send_window() in version 1, which has no flow control."""

_HEADER = struct.Struct("<BBHI")
_UPD_PAYLOAD = struct.Struct("<II")
_SYN, _FIN, _PSH, _NOP, _UPD = (int(c) for c in Cmd)


@dataclass(frozen=True, slots=True)
class SmuxConfig:
    """Every limit of one session; defaults are mos-tls-tunnel's (docs/protocol.md §5)."""

    is_client: bool = False
    version: int = 1
    max_streams: int = 16
    receive_budget: int = 256 * 1024
    stream_window: int = 64 * 1024
    max_frame_size: int = 16 * 1024
    keepalive_interval: float = 30.0
    keepalive_timeout: float = 70.0
    # Ours, not smux's (the I/O layer's SessionTimer): a session's streams are checked for
    # idleness idle_sweeps times per tunnel idle timeout, so an idle stream closes within
    # 1 + 1/idle_sweeps of it; but at least every idle_sweep_max seconds and at most every
    # idle_sweep_min (a tiny idle timeout must not spin the loop).
    idle_sweeps: int = 4
    idle_sweep_min: float = 0.05
    idle_sweep_max: float = 15.0

    def __post_init__(self) -> None:
        # Same sanity rules as Go's VerifyConfig, so we never send what Go rejects.
        if self.version not in (1, 2):
            raise ValueError(f"smux version must be 1 or 2, not {self.version}")
        if not 0 < self.max_frame_size <= MAX_PAYLOAD:
            raise ValueError(f"max_frame_size must be in 1..{MAX_PAYLOAD}")
        if not 0 < self.stream_window <= 0x7FFFFFFF:
            raise ValueError("stream_window must be in 1..2**31-1")
        if self.receive_budget <= 0 or self.max_streams < 0:
            raise ValueError("receive_budget must be positive, max_streams not negative")
        if self.keepalive_interval <= 0 or self.keepalive_timeout < self.keepalive_interval:
            raise ValueError("need 0 < keepalive_interval <= keepalive_timeout")
        if self.idle_sweeps < 1 or not 0 < self.idle_sweep_min <= self.idle_sweep_max:
            raise ValueError("need idle_sweeps >= 1 and 0 < idle_sweep_min <= idle_sweep_max")


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream and we accepted it."""

    stream_id: int


@dataclass(slots=True)
class StreamData:
    """Bytes for a stream; call consumed() once they have left the process.

    Not frozen, unlike the other events: one is made per data frame, and a
    frozen dataclass's __init__ costs about three times a plain one's."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: it will send no more on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """A peer SYN (or Mux.Cool New) we did not accept; the refusal is already queued."""

    stream_id: int
    reason: str = ""  # for the log line, when "too many open" is not the whole story


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """v2: the peer's window for this stream opened again after reaching 0."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """The session ended on its own (keepalive timeout); the I/O layer closes."""

    reason: str


Event = StreamOpened | StreamData | StreamEnded | StreamRefused | StreamWritable | SessionEnded


class _Stream:
    """Per-stream counters; the v2 ones are u32 and wrap like Go's."""

    __slots__ = (
        "blocked",
        "fin_received",
        "incr",
        "num_read",
        "num_written",
        "peer_consumed",
        "peer_window",
        "unconsumed",
    )

    def __init__(self) -> None:
        self.fin_received = False
        self.unconsumed = 0  # delivered in StreamData, not yet consumed()
        self.num_read = 0  # v2: bytes consumed, reported in UPD
        self.incr = 0  # v2: consumed since the last UPD
        self.num_written = 0  # v2: PSH payload bytes sent
        self.peer_consumed = 0
        self.peer_window = INITIAL_PEER_WINDOW
        self.blocked = False  # v2: window seen at 0, StreamWritable owed


def _int32(value: int) -> int:
    """Reinterpret a u32 as Go's int32 cast does."""
    value &= _U32
    return value - 0x100000000 if value & _I32_SIGN else value


class SmuxSession:
    """One smux session over one byte stream; see the module docstring."""

    def __init__(self, config: SmuxConfig, now: float) -> None:
        self._config = config
        self._is_client = config.is_client
        self._version = config.version
        # A server does not know the peer's version until its first frame.
        self._adopted = config.is_client
        self._nop_owed = False
        self._decoder = FrameDecoder()
        self._streams: dict[int, _Stream] = {}
        # Bytes of streams closed before the app consumed all they delivered.
        self._orphaned: dict[int, int] = {}
        self._buffered = 0
        self._out = bytearray()
        self._closed = False
        # Go: nextStreamID starts at 1 (client) or 0 (server), +2 before use.
        self._next_id = 1 if config.is_client else 0
        self._go_away = False
        self._last_received = now
        self._next_nop = now + config.keepalive_interval

    # -- properties ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after close(), a protocol error or a keepalive timeout."""
        return self._closed

    @property
    def version(self) -> int:
        """Protocol version we send (a server's follows the peer once known)."""
        return self._version

    @property
    def stream_count(self) -> int:
        """Open streams, including those the peer has FINed but we have not closed."""
        return len(self._streams)

    @property
    def buffered(self) -> int:
        """Bytes delivered in StreamData and not yet consumed(), all streams."""
        return self._buffered

    @property
    def pending_output(self) -> int:
        """Bytes queued and not yet taken by data_to_send()."""
        return len(self._out)

    def is_open(self, stream_id: int) -> bool:
        """Whether the stream exists (a peer FIN does not close it, close_stream does)."""
        return stream_id in self._streams

    def reading_paused(self) -> bool:
        """Whether the I/O layer must stop reading (Go's recvLoop waits on the bucket)."""
        return self._buffered >= self._config.receive_budget

    # -- input --------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Feed peer bytes; events in wire order. Bad bytes close the session."""
        if self._closed:
            raise SmuxProtocolError("smux: session is closed")
        if len(data):
            # Any byte from the peer proves it is alive (Go: dataReady per header).
            self._last_received = now
        # One function for the whole message: it runs for every WebSocket frame.
        try:
            events: list[Event] = []
            streams = self._streams
            for version, cmd, sid, payload in self._decoder.feed_raw(data):
                if version != self._version or not self._adopted:
                    self._adopt(version)
                if cmd == _PSH:
                    stream = streams.get(sid)
                    # Unknown stream: Go reads and drops the payload. After FIN we drop
                    # too, since the I/O layer has already reported EOF to the app.
                    if stream is None or stream.fin_received or not payload:
                        continue
                    n = len(payload)
                    stream.unconsumed += n
                    self._buffered += n
                    events.append(StreamData(sid, payload))
                elif cmd == _NOP:
                    continue
                elif cmd == _SYN:
                    if sid in streams:
                        continue  # duplicate SYN: Go ignores it
                    if self._is_client or len(streams) >= self._config.max_streams:
                        self._queue(_FIN, sid)
                        events.append(StreamRefused(sid))
                    else:
                        streams[sid] = _Stream()
                        events.append(StreamOpened(sid))
                elif cmd == _FIN:
                    stream = streams.get(sid)
                    if stream is not None and not stream.fin_received:
                        stream.fin_received = True
                        events.append(StreamEnded(sid))
                else:  # UPD; the decoder already rejected it in version 1
                    stream = streams.get(sid)
                    if stream is None:
                        continue
                    stream.peer_consumed, stream.peer_window = decode_upd(payload)
                    if self._window(stream) > 0:
                        if stream.blocked:
                            stream.blocked = False
                            events.append(StreamWritable(sid))
                    else:
                        stream.blocked = True
        except SmuxProtocolError:
            self.close()
            raise
        return events

    def _adopt(self, version: int) -> None:
        """A server takes the version of the peer's first frame; after that a
        frame in the other version is an error."""
        if version != self._version:
            if self._adopted:
                raise SmuxProtocolError(
                    f"smux: version {version} frame in a version {self._version} session"
                )
            self._version = version
        if not self._adopted:
            self._adopted = True
            if self._nop_owed:
                self._nop_owed = False
                self._queue(_NOP, 0)

    # -- output -------------------------------------------------------------

    def _queue(self, cmd: int, stream_id: int) -> None:
        self._out += _HEADER.pack(self._version, cmd, 0, stream_id)

    def open_stream(self) -> int:
        """Queue a SYN for a new stream id (3, 5, 7, ... for a client, as in Go)."""
        if self._closed:
            raise SmuxProtocolError("smux: session is closed")
        if self._go_away:
            raise SmuxProtocolError("smux: stream ids exhausted")
        sid = (self._next_id + 2) & _U32
        if sid < 2:  # Go: sid == sid%2 means the u32 wrapped (ErrGoAway)
            self._go_away = True
            raise SmuxProtocolError("smux: stream ids exhausted")
        self._next_id = sid
        self._queue(_SYN, sid)
        self._streams[sid] = _Stream()
        return sid

    def _window(self, stream: _Stream) -> int:
        """Go's writeV2: int32(peerWindow) - int32(numWritten - peerConsumed)."""
        inflight = _int32(stream.num_written - stream.peer_consumed)
        if inflight < 0:
            return 0  # peer claims more consumed than sent: Go's ErrConsumed, no send
        return max(_int32(_int32(stream.peer_window) - inflight), 0)

    def send_window(self, stream_id: int) -> int:
        """Bytes send_data() would take now; 0 for an unknown stream."""
        stream = self._streams.get(stream_id)
        if stream is None or self._closed:
            return 0
        if self._version == 1:
            return V1_SEND_WINDOW
        window = self._window(stream)
        if window == 0:
            stream.blocked = True
        return window

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue PSH frames; returns how many bytes were taken (v2 stops at the window)."""
        stream = self._streams.get(stream_id)
        if stream is None or self._closed:
            return 0
        view = memoryview(data)
        if view.itemsize != 1 or view.ndim != 1:
            view = view.cast("B")
        take = len(view)
        if take == 0:
            return 0
        if self._version == 2:
            window = self._window(stream)
            if take >= window:
                take = window
                stream.blocked = True
            if take == 0:
                return 0
            stream.num_written = (stream.num_written + take) & _U32
            view = view[:take]
        out = self._out
        pack = _HEADER.pack
        version = self._version
        step = self._config.max_frame_size
        for start in range(0, take, step):
            chunk = view[start : start + step]
            out += pack(version, _PSH, len(chunk), stream_id)
            out += chunk
        return take

    def close_stream(self, stream_id: int, error: bool = False) -> None:
        """Queue FIN and forget the stream, like Go's Stream.Close. smux has no
        way to say the stream failed: ``error`` (Mux.Cool's) changes nothing.

        Budget is not freed here: the I/O layer may still hold the bytes and
        must call consumed() for them, even after this.
        """
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.unconsumed:
            self._orphaned[stream_id] = self._orphaned.get(stream_id, 0) + stream.unconsumed
        if not self._closed:
            self._queue(_FIN, stream_id)

    def consumed(self, stream_id: int, nbytes: int) -> None:
        """The app took nbytes of this stream: free budget, maybe send UPD (v2)."""
        if nbytes <= 0:
            return
        orphaned = self._orphaned.get(stream_id) if self._orphaned else None
        if orphaned:
            # A closed stream's bytes were delivered first, so they go first.
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
        # Never more than delivered, so budget and UPD counters stay truthful.
        take = nbytes if nbytes <= stream.unconsumed else stream.unconsumed
        if take <= 0:
            return
        stream.unconsumed -= take
        self._buffered -= take
        if self._version != 2 or self._closed:
            return
        # Go's tryReadv2: UPD when half the stream window was consumed since the
        # last one, or on the first read (numRead == n), carrying the total.
        stream.num_read = (stream.num_read + take) & _U32
        stream.incr = (stream.incr + take) & _U32
        if stream.incr >= self._config.stream_window // 2 or stream.num_read == take:
            stream.incr = 0
            if stream.num_read:
                self._out += _HEADER.pack(2, _UPD, 8, stream_id)
                self._out += _UPD_PAYLOAD.pack(stream.num_read, self._config.stream_window)

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
        if self._closed:
            return None
        return min(self._next_nop, self._last_received + self._config.keepalive_timeout)

    def handle_timer(self, now: float) -> list[Event]:
        """Send the periodic NOP and end the session on a silent peer."""
        if self._closed:
            return []
        config = self._config
        if now >= self._last_received + config.keepalive_timeout:
            if self.reading_paused():
                # Go: no timeout while recvLoop waits for budget; the silence is ours.
                self._last_received = now
            else:
                self.close()
                return [
                    SessionEnded(
                        f"keepalive timeout: nothing received for {now - self._last_received:g}s"
                    )
                ]
        if now >= self._next_nop:
            if self._adopted:
                self._queue(_NOP, 0)
            else:
                # A NOP in the wrong version would kill a Go peer; send it on adoption.
                self._nop_owed = True
            # Like Go's ticker: fixed period, missed ticks are dropped, not bunched.
            interval = config.keepalive_interval
            self._next_nop += interval * ((now - self._next_nop) // interval + 1)
        return []

    def close(self) -> None:
        """Mark the session closed; queued output stays drainable. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sid, stream in self._streams.items():
            if stream.unconsumed:
                self._orphaned[sid] = self._orphaned.get(sid, 0) + stream.unconsumed
        self._streams.clear()

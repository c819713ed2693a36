"""Local connections as streams of pooled smux sessions (smux_on).

Like the Go client, each local connection becomes one smux stream; a session
(one WebSocket) carries at most `-mux-max-stream` of them, a new session is
dialed when every session is full, and a session is closed as soon as its
last stream ends (docs/protocol.md §5). Streams that arrive while a session is
being dialed count against it and wait for it, so N simultaneous
connections open ceil(N / max) WebSockets, not N.

The protocol lives in mtt.smux (sans-I/O, version 1 as mos-tls-tunnel uses
it), and the loop driving it over the WebSocket in mtt.transport.mux_link,
which owns the clock (keepalive NOP every 30 s, session dropped after 70 s
without a byte from the server); this module relays the streams. Memory is
bounded like Go bounds it: server bytes count against the session's receive
budget until the local app's socket takes them, and past the budget the
WebSocket is not read. Toward the server, a WebSocket that cannot take more
pauses reading every local connection of its session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from functools import partial

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from mtt.client import ClientConfig
from mtt.client.dialer import SMUX_ON, Dialer, describe_error
from mtt.client.plain import DATA_TYPES, DIAL_ERRORS, Tunnels, local_peer, resume_reading
from mtt.errors import ProtocolError, SmuxProtocolError
from mtt.smux import HEADER_SIZE, SmuxSession
from mtt.transport.dst import DstConnection
from mtt.transport.mux_link import MuxLink
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.client")


def frame_messages(out: bytes, limit: int) -> Iterator[memoryview]:
    """Cut whole smux frames into WebSocket messages of at most `limit` bytes.

    The Go client writes each frame as its own message; packing small frames
    together is allowed (frames are a byte stream, docs/protocol.md §5) and cheaper.
    """
    view = memoryview(out)
    size = len(out)
    start = pos = 0
    while pos < size:
        if pos + HEADER_SIZE > size:
            pos = size
            break
        end = pos + HEADER_SIZE + (out[pos + 2] | out[pos + 3] << 8)
        if end - start > limit and pos > start:
            yield view[start:pos]
            start = pos
        pos = min(end, size)
    if start < size:
        yield view[start:size]


class MuxLocalStream:
    """One local connection carried by one smux stream."""

    __slots__ = (
        "_blocks",
        "_local",
        "_outbound",
        "_pending_down",
        "_pending_up",
        "_pending_up_size",
        "_pool",
        "_tunnels",
        "closed",
        "last_activity",
        "local_paused",
        "peer",
        "session",
        "sid",
    )

    def __init__(self, pool: MuxPool, tunnels: Tunnels) -> None:
        self._pool = pool
        self._tunnels = tunnels
        self.session: ClientSession | None = None
        self._local: DstConnection | None = None
        self.sid: int | None = None
        self.peer = "local"
        self.closed = False
        self.last_activity = 0.0
        self.local_paused = False  # the local socket's write buffer is full
        self._blocks: set[str] = set()  # why we are not reading the local socket
        self._pending_up: list[bytes] = []  # local bytes waiting for the session to open
        self._pending_up_size = 0
        self._pending_down: list[bytes] = []  # server bytes the local socket has not taken
        self._outbound = b""  # v2 only: local bytes beyond the server's window

    # -- local side (DstOwner) ---------------------------------------------

    def dst_connected(self, conn: DstConnection) -> None:
        """The local connection was accepted (DstConnection set its socket options)."""
        self._local = conn
        self.peer = local_peer(conn)
        self._tunnels.opened(self)
        self.last_activity = self._pool.attach(self).now

    def dst_data(self, data: bytes) -> None:
        session = self.session
        if self.closed or session is None:
            return
        self.last_activity = session.now = session.loop.time()
        if self.sid is None:
            self._pending_up.append(data)
            self._pending_up_size += len(data)
            if self._pending_up_size >= self._pool.limits.dial_buffer:
                self.block("dial")
            return
        self._send(data)
        session.flush()

    def dst_eof(self) -> None:
        self.close("local app closed")

    def dst_lost(self, exc: Exception | None) -> None:
        self.close("local app closed")

    def dst_pause_writing(self) -> None:
        self.local_paused = True

    def dst_resume_writing(self) -> None:
        self.local_paused = False
        session = self.session
        if self._pending_down and session is not None:
            pending = self._pending_down
            while pending and not self.local_paused:  # a write may pause us again
                self._deliver(pending.pop(0))
            session.after_consume()

    def shutdown(self) -> None:
        self.close("client shutting down")

    def abort(self) -> None:
        self.close("client exiting")
        if self._local is not None:
            self._local.abort()

    # -- the session's side ------------------------------------------------------

    def opened(self, sid: int) -> None:
        """The session is up and our SYN is queued: send what the app already wrote."""
        self.sid = sid
        pending, self._pending_up, self._pending_up_size = self._pending_up, [], 0
        for chunk in pending:
            self._send(chunk)
        self.unblock("dial")

    def dial_failed(self, reason: str, target: str) -> None:
        if not self.closed:
            log.warning("%s: cannot reach %s: %s", self.peer, target, reason)
            self.close("dial failed")

    def peer_data(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = self.session.now if self.session is not None else 0.0
        if self.local_paused or self._pending_down:
            self._pending_down.append(data)
        else:
            self._deliver(data)

    def peer_ended(self) -> None:
        """Server FIN: hand the app what is left, then close (Go closes both sides)."""
        self._flush_down()
        self.close("server ended the stream")

    def writable(self) -> None:
        """v2: the server's window opened again."""
        if self._outbound and self.session is not None:
            data, self._outbound = self._outbound, b""
            self._send(data)
            self.session.flush()

    def session_ended(self) -> None:
        """The whole session is gone: give the app what arrived, then close."""
        self._flush_down()
        self.close("session ended")

    # -- internals -------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        session = self.session
        assert session is not None and self.sid is not None
        smux = session.mux
        taken = smux.send_data(self.sid, data)
        if taken < len(data) and smux.is_open(self.sid):
            self._outbound = data[taken:]  # v2 window full: wait for StreamWritable
            self.block("window")
        elif not self._outbound:
            self.unblock("window")

    def _deliver(self, data: bytes) -> None:
        local = self._local
        session = self.session
        if local is not None:
            local.write(data)
        if session is not None and self.sid is not None:
            session.mux.consumed(self.sid, len(data))

    def _flush_down(self) -> None:
        pending, self._pending_down = self._pending_down, []
        for chunk in pending:
            self._deliver(chunk)

    def block(self, reason: str) -> None:
        if not self._blocks and self._local is not None:
            self._local.pause_reading()
        self._blocks.add(reason)

    def unblock(self, reason: str) -> None:
        if reason not in self._blocks:
            return
        self._blocks.discard(reason)
        if not self._blocks and self._local is not None:
            self._local.resume_reading()

    def close(self, reason: str) -> None:
        """End the stream both ways; budget held by undelivered bytes is freed."""
        if self.closed:
            return
        self.closed = True
        if self._local is not None:
            self._local.close()
        session = self.session
        if session is not None:
            smux = session.mux
            if self.sid is not None:
                for chunk in self._pending_down:
                    smux.consumed(self.sid, len(chunk))
                if not smux.closed:
                    smux.close_stream(self.sid)
            session.stream_closed(self, reason)
        self._pending_down = []
        self._pending_up = []
        self._outbound = b""
        self._tunnels.closed(self)


class ClientSession(MuxLink[MuxLocalStream, SmuxSession], WSListener):
    """The client's side of an smux session: local connections open its streams."""

    def __init__(self, pool: MuxPool, number: int) -> None:
        limits = pool.limits
        super().__init__(
            partial(SmuxSession, limits.smux), pool.idle_timeout, limits.close_linger, limits.smux
        )
        self._pool = pool
        self.number = number
        self.limits = limits
        self.waiting: list[MuxLocalStream] = []
        self._dial_task: asyncio.Task[None] | None = None
        self._writing_paused = False
        self._message_limit = limits.max_message + HEADER_SIZE

    @property
    def load(self) -> int:
        """Streams open or waiting for this session."""
        return len(self.waiting) + len(self.streams)

    def start(self) -> None:
        self._dial_task = spawn(
            self._dial(), name=f"dial smux session {self.number} to {self._pool.dialer.target}"
        )

    def add(self, stream: MuxLocalStream) -> None:
        stream.session = self
        if self.is_open:
            try:
                sid = self.mux.open_stream()
            except SmuxProtocolError as exc:  # stream ids exhausted: cannot happen in practice
                log.warning("%s: smux session %d: %s", stream.peer, self.number, exc)
                stream.close("no stream id")
                return
            self.streams[sid] = stream
            if self._writing_paused:
                stream.block("ws")
            stream.opened(sid)
            self.flush()
        else:
            self.waiting.append(stream)

    # -- dialing -------------------------------------------------------------------

    async def _dial(self) -> None:
        dialer = self._pool.dialer
        try:
            await dialer.dial(lambda: self, SMUX_ON)
        except DIAL_ERRORS as exc:
            reason = describe_error(exc, self.limits.handshake_timeout)
            waiting, self.waiting = self.waiting, []
            self.finish(WSCloseCode.OK)
            for stream in waiting:
                stream.dial_failed(reason, dialer.target)

    # -- WebSocket side -------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.closed:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        limit = self._message_limit
        send = transport.send

        def write(out: bytes) -> None:
            """Whole frames in messages of at most one full frame."""
            for message in frame_messages(out, limit):
                send(WSMsgType.BINARY, message)

        self.attach(transport, self.limits.write_high_water, write)
        self.restart_session()  # its keepalive clock starts with the WebSocket
        smux = self.mux
        waiting, self.waiting = self.waiting, []
        for stream in waiting:
            if not stream.closed:
                sid = smux.open_stream()
                self.streams[sid] = stream
                stream.opened(sid)
        self.flush()
        self.arm_timer()
        log.debug("smux session %d open to %s", self.number, self._pool.dialer.target)
        if not self.streams:
            self.finish(WSCloseCode.OK)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type in DATA_TYPES:
            # A close already sent may be picows' 1009 for a frame too big, which it
            # goes on parsing (and handing over) until it disconnects.
            if self.is_open and not transport.is_close_frame_sent:
                self.on_message(frame)
        elif msg_type is WSMsgType.CLOSE:
            if self.is_open and self.streams:
                self._log_end("server closed the WebSocket")
            self.finish(WSCloseCode.OK)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.is_open and self.streams:
            self._log_end("server disconnected")
        self.disconnected()

    def pause_writing(self) -> None:
        self._writing_paused = True
        for stream in self.streams.values():
            stream.block("ws")

    def resume_writing(self) -> None:
        self._writing_paused = False
        for stream in list(self.streams.values()):
            stream.unblock("ws")

    # -- session events (MuxLink hooks) ---------------------------------------------
    # StreamRefused: the server tried to open a stream; the session already said FIN.

    def _protocol_error(self, exc: ProtocolError) -> None:
        self._log_end(f"smux protocol error: {exc}")

    def _session_ended(self, reason: str) -> None:
        self._log_end(reason)

    def _close_idle(self, stream: MuxLocalStream, now: float) -> None:
        log.debug("%s: idle for %.0f s, closing", stream.peer, now - stream.last_activity)
        stream.close("idle timeout")

    def stream_closed(self, stream: MuxLocalStream, reason: str) -> None:
        if stream.sid is not None:
            self.streams.pop(stream.sid, None)
        elif stream in self.waiting:
            self.waiting.remove(stream)
        log.debug("%s: stream %s closed (%s)", stream.peer, stream.sid, reason)
        if self.closed:
            return
        if self.load == 0:
            # The Go client closes a session whose last stream ended.
            self.flush()
            self.finish(WSCloseCode.OK)
        else:
            self.after_consume()

    # -- ending ------------------------------------------------------------------------------

    def _log_end(self, reason: str) -> None:
        log.warning(
            "smux session %d to %s ended with %d streams open: %s",
            self.number,
            self._pool.dialer.target,
            len(self.streams),
            reason,
        )

    def _end_streams(self) -> None:
        self._pool.removed(self)
        if self._dial_task is not None and not self._dial_task.done():
            self._dial_task.cancel()
        for stream in list(self.streams.values()):
            stream.session_ended()
        for stream in list(self.waiting):
            stream.session_ended()

    def _closing(self, ws: WSTransport) -> None:
        resume_reading(ws)  # so TLS's close_notify is seen

    def finish(self, code: WSCloseCode) -> None:
        """Close the session, its streams and the WebSocket (after queued frames)."""
        if self.closed:
            return
        super().finish(code)
        log.debug("smux session %d closed", self.number)


class MuxPool:
    """The client's smux sessions; hands each new local connection a stream."""

    def __init__(self, config: ClientConfig, dialer: Dialer) -> None:
        self.limits = config.limits
        self.idle_timeout = config.idle_timeout
        self.max_streams = config.mux_max_stream
        self.dialer = dialer
        self.sessions: list[ClientSession] = []  # open or dialing, oldest first
        self.dialed = 0

    def attach(self, stream: MuxLocalStream) -> ClientSession:
        """Put the stream on a session with room, dialing a new one if all are full."""
        for session in self.sessions:
            if session.load < self.max_streams:
                session.add(stream)
                return session
        self.dialed += 1
        session = ClientSession(self, self.dialed)
        self.sessions.append(session)
        session.add(stream)
        session.start()
        return session

    def removed(self, session: ClientSession) -> None:
        """The session takes no new streams."""
        if session in self.sessions:
            self.sessions.remove(session)

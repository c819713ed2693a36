"""Length-prefixed JSON messages between the supervisor and its workers.

A trusted channel (a socketpair the supervisor made), but still bounded so a
confused peer cannot make the other allocate without limit.

The bytes are split into messages by FrameReader (sans-I/O) inside the
protocol's data_received, so a message costs no coroutine step: every tunnel
of a user with server-wide limits sends two of them and waits for a third.
What a side sends in one loop iteration leaves in one write (fewer system
calls, and fewer wakeups of the other process).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Callable
from typing import Any

from mtt.config import Limits
from mtt.errors import ProtocolError

_LENGTH = struct.Struct("!I")
_LIMITS = Limits()  # the defaults, not a worker's configuration: the same on both ends
# The encoder json.dumps would build anew for every call with these separators.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_DECODER = json.JSONDecoder()

Sink = Callable[[dict[str, Any]], None]


def encode_json(message: dict[str, Any]) -> bytes:
    """A message's compact JSON body, unframed."""
    return _ENCODER.encode(message).encode()


def encode(message: dict[str, Any]) -> bytes:
    return encode_body(encode_json(message))


def encode_body(body: bytes) -> bytes:
    """Frame an already encoded JSON object."""
    if len(body) > _LIMITS.max_worker_message:
        raise ValueError("control message too large")
    return _LENGTH.pack(len(body)) + body


def parse_body(body: bytes) -> dict[str, Any]:
    """One message's JSON object; ProtocolError for anything else."""
    try:
        message = _DECODER.decode(body.decode())
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON
        raise ProtocolError(f"control message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("control message is not an object")
    return message


class FrameReader:
    """Splits the channel's bytes into message bodies, whatever the reads'
    boundaries. A length above max_message is refused before its body is
    waited for, so what is buffered never exceeds one message."""

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_message: int) -> None:
        self._buffer = bytearray()
        self._max = max_message

    def feed(self, data: bytes) -> list[bytes]:
        """The bodies that these bytes complete, in order."""
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < 4 or len(buffer) < 4 + self._length(buffer, 0):
                return []  # a big message, still coming: appended, not copied again
            data = bytes(buffer)
            buffer.clear()
        bodies: list[bytes] = []
        at, size = 0, len(data)
        while size - at >= 4:
            end = at + 4 + self._length(data, at)
            if end > size:
                break
            bodies.append(data[at + 4 : end])
            at = end
        if at < size:
            buffer += memoryview(data)[at:]
        return bodies

    def _length(self, data: bytes | bytearray, at: int) -> int:
        """The body length in the header at `at`; ProtocolError above the bound."""
        (length,) = _LENGTH.unpack_from(data, at)
        if length > self._max:
            raise ProtocolError(f"control message of {length} bytes")
        return int(length)

    def mid_message(self) -> bool:
        """True when a message has begun and not ended."""
        return bool(self._buffer)


class ControlConnection(asyncio.Protocol):
    """One end of the channel: messages in (to the sink, once attached),
    framed bytes out (gathered per loop iteration).

    The first message (Init for a worker, Ready for the supervisor) is
    awaited with first(), before the RPC layer attaches; messages after it
    wait for attach(). A framing or JSON error ends the connection; `error`
    then says what it was."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = FrameReader(_LIMITS.max_worker_message)
        self._transport: asyncio.Transport | None = None
        self._first: asyncio.Future[dict[str, Any] | None] = self._loop.create_future()
        self._early: list[dict[str, Any]] = []
        self._sink: Sink | None = None
        self._out: list[bytes] = []
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.error: str | None = None  # why the connection ended, if the peer broke it

    # -- asyncio.Protocol --------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.closed.done():
            return
        try:
            for body in self._reader.feed(data):
                self._deliver(parse_body(body))
                if self.closed.done():
                    return
        except ProtocolError as exc:
            self._break(f"protocol error: {exc}")

    def eof_received(self) -> bool:
        if self._reader.mid_message():
            self._break("protocol error: control channel closed mid-message")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if exc is not None and self.error is None:
            self.error = str(exc) or type(exc).__name__
        if not self._first.done():
            self._first.set_result(None)
        self._wake_drained()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drained()

    # -- for the RPC layer ---------------------------------------------------

    async def first(self) -> dict[str, Any] | None:
        """The first message; None if the channel ended before one came."""
        return await self._first

    def attach(self, sink: Sink) -> None:
        """Deliver every later message to sink, the ones already here first."""
        self._sink = sink
        early, self._early = self._early, []
        try:
            for message in early:
                sink(message)
        except ProtocolError as exc:
            self._break(f"protocol error: {exc}")

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, frame: bytes) -> None:
        """Queue one framed message; the loop iteration's messages leave together."""
        if not self.is_open:
            return
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(frame)

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark
        (what is queued still leaves at the end of this iteration)."""
        if sum(map(len, self._out)) > _LIMITS.worker_write_at:
            self._flush()  # big messages: the transport says now whether that is too much
        if not self.is_open:
            raise ConnectionError("control channel closed")
        if self._writing_paused:
            if self._drained is None:
                self._drained = self._loop.create_future()
            await asyncio.shield(self._drained)
            if not self.is_open:
                raise ConnectionError("control channel closed")

    def close(self) -> None:
        """Send what is queued, then close."""
        self._flush()
        if self._transport is not None:
            self._transport.close()

    # -- inside --------------------------------------------------------------

    def _deliver(self, message: dict[str, Any]) -> None:
        if not self._first.done():
            self._first.set_result(message)
        elif self._sink is None:
            self._early.append(message)
        else:
            self._sink(message)

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _wake_drained(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _break(self, reason: str) -> None:
        self.error = reason
        self._out = []
        if self._transport is not None:
            self._transport.abort()
        if not self.closed.done():
            self.closed.set_result(None)


async def connect(sock: socket.socket) -> ControlConnection:
    """The channel over one end of the supervisor's socketpair."""
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_unix_connection(ControlConnection, sock=sock)
    return connection

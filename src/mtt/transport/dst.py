"""The TCP side of a tunnel: a connection to a user's dst (or, in the client,
the local application), driven by callbacks into the tunnel that owns it."""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from mtt.address import Destination


class DstOwner(Protocol):
    """What a tunnel (plain, or one smux stream) does with its TCP side's events."""

    def dst_connected(self, conn: DstConnection) -> None: ...
    def dst_data(self, data: bytes) -> None: ...
    def dst_eof(self) -> None: ...
    def dst_lost(self, exc: Exception | None) -> None: ...
    def dst_pause_writing(self) -> None: ...
    def dst_resume_writing(self) -> None: ...


class DstConnection(asyncio.Protocol):
    """Forwards a TCP transport's events to its owner; writes are guarded
    against a closing transport (uvloop raises where asyncio only warns).

    Writes are gathered until the end of the loop iteration and go out as one:
    one read of the client's socket holds many WebSocket messages (or smux
    frames), and a write syscall for each was a third of the upload's CPU.
    They go as a list (writev), not joined: a join was one more copy of every
    byte of a busy upload."""

    __slots__ = ("_high_water", "_loop", "_owner", "_pending", "transport")

    def __init__(
        self,
        owner: DstOwner,
        high_water: int | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._owner = owner
        self._high_water = high_water
        self.transport: asyncio.Transport | None = None
        self._pending: list[bytes] | None = None  # written, not yet handed to the transport
        # Given by those who have it: asyncio.get_running_loop() is a getpid() call.
        self._loop = loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; cast, don't check.
        # TCP_NODELAY is uvloop's (and asyncio's) default on TCP transports already.
        self.transport = t = cast(asyncio.Transport, transport)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._high_water is not None:
            t.set_write_buffer_limits(high=self._high_water)
        # Data can arrive in this same loop iteration: the owner must know us first.
        # What it wrote before the connection was up goes now, not an iteration later:
        # there is nothing to gather it with, and the first bytes are what a
        # connection's latency is.
        self._pending = []
        self._owner.dst_connected(self)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._owner.dst_data(data)

    def eof_received(self) -> bool:
        self._owner.dst_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._pending = None
        self._owner.dst_lost(exc)

    def pause_writing(self) -> None:
        self._owner.dst_pause_writing()

    def resume_writing(self) -> None:
        self._owner.dst_resume_writing()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        chunk = data if type(data) is bytes else bytes(data)  # the caller may reuse its buffer
        pending = self._pending
        if pending is not None:
            pending.append(chunk)
            return
        self._pending = [chunk]
        assert self._loop is not None
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand what was written in this loop iteration to the transport, at once."""
        pending = self._pending
        self._pending = None
        transport = self.transport
        if not pending or transport is None or transport.is_closing():
            return
        if len(pending) == 1:
            transport.write(pending[0])
        else:
            transport.writelines(pending)  # uvloop: one writev, no join into a new copy

    def pause_reading(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def close(self) -> None:
        """Flush what is buffered, then close."""
        if self.transport is not None:
            self._flush()
            self.transport.close()

    def abort(self) -> None:
        self._pending = None
        if self.transport is not None:
            self.transport.abort()

    def buffered(self) -> int:
        transport = self.transport
        if transport is None:
            return 0
        pending = self._pending
        waiting = sum(len(chunk) for chunk in pending) if pending else 0
        return transport.get_write_buffer_size() + waiting


async def dial(
    owner: DstOwner,
    dst: Destination,
    connect_timeout: float,
    high_water: int,
    loop: asyncio.AbstractEventLoop | None = None,
) -> DstConnection:
    """Connect to dst within connect_timeout; raises OSError or TimeoutError.

    The owner's dst_connected() runs before any of dst's data is delivered.
    The deadline is one timer that cancels this task, as asyncio.timeout()
    does, without its three get_running_loop() calls (getpid() each) and its
    context manager: a dial is made for every smux stream.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None, "dial() runs in a task"
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = loop.call_later(connect_timeout, expire)
    try:
        _, conn = await loop.create_connection(
            lambda: DstConnection(owner, high_water, loop), dst.host, dst.port
        )
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            raise TimeoutError(f"connect to {dst} timed out") from None
        raise
    finally:
        timer.cancel()
    return conn

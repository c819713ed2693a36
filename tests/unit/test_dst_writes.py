"""The dst side's writes: those of one loop iteration reach the transport as one
write (or one writelines), in order; a close sends what is pending first, an abort drops it."""

from __future__ import annotations

import asyncio
from typing import Any

from mtt.transport.dst import DstConnection


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        """One call for several chunks (a writev in uvloop): one write here."""
        assert not self.closed, "written after close"
        self.writes.append(b"".join(bytes(chunk) for chunk in chunks))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int) -> None:
        pass


class Owner:
    def dst_connected(self, conn: DstConnection) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *args: None


def connected() -> tuple[DstConnection, FakeTransport]:
    conn = DstConnection(Owner(), 1024)  # type: ignore[arg-type]
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def test_writes_of_one_iteration_go_out_as_one_in_order() -> None:
    async def run() -> FakeTransport:
        conn, transport = connected()
        buffer = bytearray(b"ab")
        conn.write(buffer)
        buffer[:] = b"XX"  # the caller reuses its buffer: what was written stays
        conn.write(memoryview(b"cd"))
        conn.write(b"ef")
        assert transport.writes == []
        assert conn.buffered() == 6
        await asyncio.sleep(0)
        assert transport.writes == [b"abcdef"]
        conn.write(b"g")
        await asyncio.sleep(0)
        return transport

    assert asyncio.run(run()).writes == [b"abcdef", b"g"]


def test_a_close_sends_what_is_pending_first() -> None:
    async def run() -> FakeTransport:
        conn, transport = connected()
        conn.write(b"last bytes")
        conn.close()
        await asyncio.sleep(0)
        return transport

    transport = asyncio.run(run())
    assert transport.writes == [b"last bytes"] and transport.closed


def test_an_abort_drops_what_is_pending() -> None:
    async def run() -> FakeTransport:
        conn, transport = connected()
        conn.write(b"never sent")
        conn.abort()
        await asyncio.sleep(0)
        conn.write(b"after the abort")
        await asyncio.sleep(0)
        return transport

    transport = asyncio.run(run())
    assert transport.writes == [] and transport.aborted

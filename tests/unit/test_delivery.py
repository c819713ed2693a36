"""What Delivery sees of bytes on their way to a client: the transport's buffer,
then the kernel's send queue, on TCP and on Unix sockets (-bind-unix)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from mtt.transport.delivery import Delivery, kernel_unsent, transport_buffered


class FakeTransport:
    """A transport whose write buffer the test sets, over a real socket."""

    def __init__(self, sock: socket.socket | None, buffered: int = 0, tls: int = 0) -> None:
        self.sock = sock
        self.buffered = buffered
        self.tls = tls
        self.written: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_local_write_buffer_size(self) -> int:
        return self.buffered + self.tls  # aiofastnet: plus the ciphertext not yet sent

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.written.extend(parts)

    def is_closing(self) -> bool:
        return self.closing


@pytest.fixture(params=["tcp", "unix"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(sender, receiver), the receiver with a small buffer so the sender's queue fills."""
    if request.param == "unix":
        sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            receiver = socket.socket()
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            receiver.connect(listener.getsockname())
            sender, _ = listener.accept()
    with sender, receiver:
        yield sender, receiver


def fill(sender: socket.socket) -> int:
    """Write until the kernel takes no more; returns the bytes written."""
    sender.setblocking(False)
    total = 0
    try:
        while total < 64 << 20:
            total += sender.send(b"x" * 65536)
    except BlockingIOError:
        pass
    return total


def read_all(receiver: socket.socket, size: int) -> None:
    receiver.settimeout(10)
    got = 0
    while got < size:
        chunk = receiver.recv(1 << 20)
        assert chunk
        got += len(chunk)


def eventually_zero(probe: Any, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while probe() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert probe() == 0


def test_kernel_queue_counts_until_the_peer_has_the_bytes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = pair
    transport = FakeTransport(sender)
    delivery = Delivery(transport)  # type: ignore[arg-type]
    assert kernel_unsent(transport) == 0
    sent = fill(sender)
    delivery.written = sent  # as if the transport had written it all
    assert kernel_unsent(transport) > 0
    assert not delivery.received(sent)
    read_all(receiver, sent)
    eventually_zero(lambda: kernel_unsent(transport))
    assert delivery.received(sent)


def test_transport_buffers_count_with_the_tls_layers_outgoing_bytes() -> None:
    transport = FakeTransport(None, buffered=100, tls=50)
    assert transport_buffered(transport) == 150
    delivery = Delivery(transport)  # type: ignore[arg-type]
    delivery.write_binary(b"y" * 200)
    assert delivery.written == 2 + 2 + 200  # header with a 16-bit length
    assert not delivery.received(delivery.written)
    transport.buffered = transport.tls = 0
    assert delivery.received(delivery.written)


def test_a_closing_or_socketless_transport_holds_nothing_back() -> None:
    closing = FakeTransport(None, buffered=10)
    delivery = Delivery(closing)  # type: ignore[arg-type]
    delivery.written = 10
    assert not delivery.received(10)
    closing.closing = True  # the client is gone: nothing to wait for
    assert delivery.received(10)
    assert kernel_unsent(FakeTransport(None)) == 0

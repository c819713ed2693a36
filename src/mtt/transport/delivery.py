"""How far the bytes a tunnel wrote toward its client have got.

A close (WebSocket close frame, smux FIN) that reaches a client right behind
the last data can cost that data: v2ray-plugin drops what it has received but
not yet delivered when it reads a close frame. So a tunnel whose dst ended
sends its close only once what it wrote before has left every buffer on our
side: the transport's (with TLS, the plaintext backlog and the ciphertext in
the TLS layer's outgoing buffer) and the kernel's send queue of the client
socket (TIOCOUTQ: bytes not yet acknowledged by the client's TCP, or for a
Unix socket, not yet read by the peer).

Counting is conservative: `written` counts only the frames the tunnel wrote
itself, while the buffers also hold pongs, TLS overhead and the like, so
``written - unsent()`` never overstates what the client has received.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import termios
from typing import Any

from mtt.transport.wsframe import write_binary

log = logging.getLogger("mtt.tunnel")


def transport_buffered(transport: Any) -> int:
    """Bytes still in a transport's own buffers, TLS layers included.

    aiofastnet's TLS transport on a socket leaves the ciphertext waiting in
    its outgoing buffer out of get_write_buffer_size() but counts it in
    get_local_write_buffer_size(); its TLS-over-transport variant (PROXY
    protocol) counts everything in get_write_buffer_size(). The larger of the
    two is the whole either way."""
    size = int(transport.get_write_buffer_size())
    local = getattr(transport, "get_local_write_buffer_size", None)
    if local is not None:
        size = max(size, int(local()))
    return size


def kernel_unsent(transport: Any) -> int:
    """Bytes in the kernel send queue of the transport's socket (0 when unknown)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    out = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out, True)
    except (OSError, ValueError):
        return 0  # not a socket that reports it: the transport's buffers must do
    return max(out[0], 0)


class Delivery:
    """The frames written to one client transport, and whether they have left us."""

    __slots__ = ("_transport", "written")

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self.written = 0

    def write_binary(self, data: bytes) -> None:
        """Queue one binary message toward the client, counting it."""
        self.written += write_binary(self._transport, data)

    def unsent(self) -> int:
        """Bytes written to the transport that the client has not yet received."""
        transport = self._transport
        if transport.is_closing():
            return 0
        return transport_buffered(transport) + kernel_unsent(transport)

    def received(self, mark: int) -> bool:
        """Whether the client has received the first `mark` bytes written."""
        return self.written - self.unsent() >= mark

"""Server-to-client binary frames written straight to the transport.

picows' server-side send() of a message over 8 KiB hands the transport a
memoryview of its own reusable header buffer; uvloop queues that view
without copying, so a second send() in the same loop iteration rewrites the
first frame's header before it reaches the socket (seen as "bad opcode" at
the client under load). Writing a fresh header object beside the payload
avoids that, and also skips picows' copy of the payload.
"""

from __future__ import annotations

import asyncio
import struct

_OP_BINARY_FIN = 0x82
_SHORT_HEADERS = tuple(bytes((_OP_BINARY_FIN, n)) for n in range(126))
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def binary_frame_header(size: int) -> bytes:
    """RFC 6455 §5.2 header of an unmasked, final binary frame of `size` bytes."""
    if size < 126:
        return _SHORT_HEADERS[size]
    if size < 65536:
        return _MEDIUM.pack(_OP_BINARY_FIN, 126, size)
    return _LONG.pack(_OP_BINARY_FIN, 127, size)


def write_binary(transport: asyncio.WriteTransport, data: bytes) -> int:
    """Queue one binary message; `data` must be immutable (it is not copied).
    Returns the frame's size on the wire."""
    header = binary_frame_header(len(data))
    transport.writelines((header, data))
    return len(header) + len(data)

"""Length-prefixed JSON messages between the supervisor and its workers.

A trusted channel (a socketpair the supervisor made), but still bounded so a
confused peer cannot make the other allocate without limit.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

from mtt.config import Limits
from mtt.errors import ProtocolError

_LENGTH = struct.Struct("!I")
_LIMITS = Limits()  # the defaults, not a worker's configuration: the same on both ends


def encode(message: dict[str, Any]) -> bytes:
    return encode_body(json.dumps(message, separators=(",", ":")).encode())


def encode_body(body: bytes) -> bytes:
    """Frame an already encoded JSON object."""
    if len(body) > _LIMITS.max_worker_message:
        raise ValueError("control message too large")
    return _LENGTH.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at a clean end of the channel."""
    try:
        header = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("control channel closed mid-message") from None
        return None
    (size,) = _LENGTH.unpack(header)
    if size > _LIMITS.max_worker_message:
        raise ProtocolError(f"control message of {size} bytes")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise ProtocolError("control channel closed mid-message") from None
    try:
        message = json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON
        raise ProtocolError(f"control message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("control message is not an object")
    return message

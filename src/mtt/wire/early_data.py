"""WebSocket early data in Sec-WebSocket-Protocol, as Xray's clients send it
(docs/protocol.md §10), sans-I/O.

A client with `ed=N` in its ws path does not open the WebSocket until its
first write; when that write fits in N bytes it goes, base64url-encoded
without padding, in the Sec-WebSocket-Protocol request header instead of in
a frame. The server decodes it, hands it to dst before any frame, and echoes
the header in its 101 (a browser closes a WebSocket whose 101 names no
sub-protocol it offered). Xray's server takes any header value that decodes,
after mapping the standard alphabet (`+`, `/`, `=` padding) onto the URL one;
so does this one, except our own sub-protocol names, which also decode.
"""

from __future__ import annotations

import binascii
import re
from base64 import urlsafe_b64decode
from dataclasses import dataclass

# The URL alphabet plus what Xray's server maps onto it (+ to -, / to _, = dropped).
_BASE64 = re.compile(r"[A-Za-z0-9_\-+/]+=*")
_TO_URL = str.maketrans("+/", "-_")


@dataclass(frozen=True, slots=True)
class EarlyData:
    """Early data to deliver first; `header` is the value to echo in the 101."""

    data: bytes
    header: str


@dataclass(frozen=True, slots=True)
class TooLarge:
    """An early-data header whose bytes exceed the server's bound."""

    size: int
    limit: int


def decoded_size(value: str) -> int:
    """How many bytes unpadded base64 of this length decodes to."""
    return len(value.rstrip("=")) * 3 // 4


def early_data(header: str | None, max_size: int) -> EarlyData | TooLarge | None:
    """What a Sec-WebSocket-Protocol value (all its lines joined by ", ")
    carries: early data, early data over max_size, or None when it is not
    early data (absent, empty, a list, not base64) and means what it always
    did. The caller has already taken smux_on and smux_off (they decode)."""
    if not header or _BASE64.fullmatch(header) is None:
        return None
    body = header.rstrip("=").translate(_TO_URL)
    if len(body) % 4 == 1:  # no base64 encoding ends with a lone sextet
        return None
    size = decoded_size(body)
    if size > max_size:  # judged from the length, before anything is decoded
        return TooLarge(size, max_size)
    try:
        data = urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        return None
    return EarlyData(data, header) if data else None

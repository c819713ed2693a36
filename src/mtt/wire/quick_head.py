"""The request head of a plain WebSocket upgrade, parsed without h11 (sans-I/O).

Nearly every connection that becomes a tunnel starts with a head of one
shape: `GET /path HTTP/1.1`, a few headers, the blank line, nothing else
until the 101. h11 parses it in about 40 us of pure Python, a few percent of
what a new tunnel costs; quick_head() takes a few. It accepts only heads h11
accepts, read the way h11 reads them (names lower-cased, values without the
whitespace around them); for anything else (another method, version or
target form, a line ending other than CRLF, a folded or odd header line, a
body announced, Host missing or repeated, a head not complete in the bytes
given) it returns None and h11 decides, so no answer anyone gets depends on
which parser read the head.
"""

from __future__ import annotations

import re

from mtt.wire.request_head import RequestHead

_REQUEST_LINE = re.compile(rb"GET (/[\x21-\x7e]*) HTTP/1\.1\r\n")
# h11's header-field: token ":" OWS field-value OWS, field-value possibly empty,
# its characters VCHAR or obs-text with single spaces or tabs between them.
_FIELD = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff](?:[\x20-\x7e\x80-\xff\t]*[\x21-\x7e\x80-\xff])?)?)"
    rb"[ \t]*\r\n"
)
# h11 checks these against each other and the method; leave such heads to it.
_H11_JUDGES = frozenset({b"content-length", b"transfer-encoding"})


def quick_head(data: bytes, max_head: int) -> tuple[RequestHead, int] | None:
    """(The head at the start of data, its length), or None to let h11 parse
    it. Only a head whole within max_head bytes is read here."""
    end = data.find(b"\r\n\r\n", 0, max_head)
    line = _REQUEST_LINE.match(data)
    if end < 0 or line is None:
        return None
    end += 4
    headers: list[tuple[bytes, bytes]] = []
    hosts = 0
    at = line.end()
    while at < end - 2:
        field = _FIELD.match(data, at, end)
        if field is None:
            return None
        name = field.group(1).lower()
        if name in _H11_JUDGES:
            return None
        hosts += name == b"host"
        headers.append((name, field.group(2)))
        at = field.end()
    if hosts != 1 or at != end - 2:
        return None
    return RequestHead(b"GET", line.group(1), b"1.1", headers), end

"""nginx's verdict on the start of a request line, byte by byte (sans-I/O).

nginx parses the request line as the bytes arrive
(ngx_http_parse_request_line) and answers 400 at the first byte that cannot
belong to one; h11 waits for the whole head first. Where the two must look
the same (plain HTTP sent to the TLS port: nmap's first probes) this decides
what nginx would: a bad byte now, an HTTP/0.9 request (no version: nginx
answers with a bare body), a version it does not serve (505), or a good HTTP/1
request line that h11 then parses with the headers.

Modelled on nginx 1.22: methods of A-Z, '_' and '-'; the target starts with
'/' or a scheme followed by "://"; no control byte in it; "HTTP/" then a
major version 1 (2 and up are 505) and a minor of at most two digits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_LINE = 16 * 1024


class Verdict(enum.Enum):
    NEED_MORE = "need more"
    INVALID = "invalid"  # 400
    VERSION = "version not supported"  # 505
    HTTP09 = "HTTP/0.9"
    HTTP1 = "HTTP/1"


@dataclass(frozen=True, slots=True)
class LineVerdict:
    verdict: Verdict
    method: bytes = b""
    start: int = 0  # where the request line starts (nginx skips empty lines before it)


_METHOD = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
_LETTERS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SCHEME = _LETTERS | frozenset(b"0123456789+-.")
_DIGITS = frozenset(b"0123456789")


def _target_byte_ok(byte: int) -> bool:
    return byte >= 0x20 and byte != 0x7F


def request_line_verdict(data: bytes | bytearray) -> LineVerdict:
    """What nginx makes of data as the start of a request."""
    i = 0
    n = len(data)
    while i < n and data[i] in b"\r\n":
        i += 1
    start = i
    # method
    while i < n and data[i] in _METHOD:
        i += 1
    if i == n:
        return _more(n)
    if data[i] != 0x20 or i == start:
        return LineVerdict(Verdict.INVALID)
    method = bytes(data[start:i])
    # spaces, then the target's first character
    while i < n and data[i] == 0x20:
        i += 1
    if i == n:
        return _more(n)
    if data[i] != ord("/"):
        if data[i] not in _LETTERS:
            return LineVerdict(Verdict.INVALID)
        while i < n and data[i] in _SCHEME:
            i += 1
        for expected in b"://":
            if i == n:
                return _more(n)
            if data[i] != expected:
                return LineVerdict(Verdict.INVALID)
            i += 1
    # the rest of the target
    while i < n and data[i] not in b" \r\n":
        if not _target_byte_ok(data[i]):
            return LineVerdict(Verdict.INVALID)
        i += 1
    if i == n:
        return _more(n)
    while i < n and data[i] == 0x20:
        i += 1
    if i == n:
        return _more(n)
    if data[i] in b"\r\n":  # no version: HTTP/0.9
        if data[i] == ord("\r"):
            if i + 1 == n:
                return _more(n)
            if data[i + 1] != ord("\n"):
                return LineVerdict(Verdict.INVALID)
        return LineVerdict(Verdict.HTTP09, method, start)
    return _version(data, i, method, start)


def _version(data: bytes | bytearray, i: int, method: bytes, start: int) -> LineVerdict:
    n = len(data)
    for expected in b"HTTP/":
        if i == n:
            return _more(n)
        if data[i] != expected:
            return LineVerdict(Verdict.INVALID)
        i += 1
    if i == n:
        return _more(n)
    if not (ord("1") <= data[i] <= ord("9")):
        return LineVerdict(Verdict.INVALID)
    if data[i] != ord("1"):
        return LineVerdict(Verdict.VERSION)
    i += 1
    if i == n:
        return _more(n)
    if data[i] in _DIGITS:  # 10 and up
        return LineVerdict(Verdict.VERSION)
    if data[i] != ord("."):
        return LineVerdict(Verdict.INVALID)
    i += 1
    digits = 0
    while i < n and data[i] in _DIGITS:
        digits += 1
        i += 1
    if digits > 2:
        return LineVerdict(Verdict.VERSION)
    if i == n:
        return _more(n)
    if digits == 0:
        return LineVerdict(Verdict.INVALID)
    while i < n and data[i] == 0x20:
        i += 1
    if i == n:
        return _more(n)
    if data[i] == ord("\r"):
        if i + 1 == n:
            return _more(n)
        i += 1
    if data[i] == ord("\n"):
        return LineVerdict(Verdict.HTTP1, method, start)
    return LineVerdict(Verdict.INVALID)


def _more(n: int) -> LineVerdict:
    return LineVerdict(Verdict.INVALID if n >= MAX_LINE else Verdict.NEED_MORE)

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
RequestLineReader resumes where the last bytes left it, so a line dribbled
a byte at a time costs each byte once; a line longer than its max_line
(the caller's request-head cap) is invalid.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


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


class _State(enum.Enum):
    START = enum.auto()  # empty lines before the request
    METHOD = enum.auto()
    BEFORE_TARGET = enum.auto()
    SCHEME = enum.auto()
    SCHEME_SLASHES = enum.auto()  # "://", self._matched of it so far
    TARGET = enum.auto()
    AFTER_TARGET = enum.auto()
    CR_09 = enum.auto()  # a CR ending an HTTP/0.9 line
    HTTP = enum.auto()  # "HTTP/", self._matched of it so far
    MAJOR = enum.auto()
    DOT = enum.auto()
    MINOR = enum.auto()
    AFTER_VERSION = enum.auto()
    CR = enum.auto()


_METHOD = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")
_LETTERS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_SCHEME = _LETTERS | frozenset(b"0123456789+-.")
_DIGITS = frozenset(b"0123456789")
_SP, _CR, _LF, _SLASH = 0x20, 0x0D, 0x0A, 0x2F


class RequestLineReader:
    """Feed it the bytes as they come; it answers as nginx's parser would."""

    def __init__(self, *, max_line: int) -> None:
        self._max_line = max_line
        self._state = _State.START
        self._seen = 0
        self._start = 0
        self._method = bytearray()
        self._matched = 0
        self._minor_digits = 0
        self._verdict = LineVerdict(Verdict.NEED_MORE)

    def feed(self, data: bytes | bytearray) -> LineVerdict:
        if self._verdict.verdict is not Verdict.NEED_MORE:
            return self._verdict
        for byte in data:
            verdict = self._step(byte)
            self._seen += 1
            if verdict is not None:
                self._verdict = LineVerdict(verdict, bytes(self._method), self._start)
                return self._verdict
            if self._seen >= self._max_line:
                self._verdict = LineVerdict(Verdict.INVALID)
                return self._verdict
        return self._verdict

    def _step(self, byte: int) -> Verdict | None:
        state = self._state
        if state is _State.START:
            if byte in (_CR, _LF):
                return None
            self._start = self._seen
            state = _State.METHOD
        if state is _State.METHOD:
            if byte in _METHOD:
                self._method.append(byte)
                self._state = state
                return None
            if byte != _SP or not self._method:
                return Verdict.INVALID
            self._state = _State.BEFORE_TARGET
            return None
        if state is _State.BEFORE_TARGET:
            if byte == _SP:
                return None
            if byte == _SLASH:
                self._state = _State.TARGET
                return None
            if byte in _LETTERS:
                self._state = _State.SCHEME
                return None
            return Verdict.INVALID
        if state is _State.SCHEME:
            if byte in _SCHEME:
                return None
            if byte != ord(":"):
                return Verdict.INVALID
            self._state, self._matched = _State.SCHEME_SLASHES, 1
            return None
        if state is _State.SCHEME_SLASHES:
            if byte != _SLASH:
                return Verdict.INVALID
            self._matched += 1
            if self._matched == 3:
                self._state = _State.TARGET
            return None
        if state is _State.TARGET:
            if byte == _SP:
                self._state = _State.AFTER_TARGET
                return None
            return self._line_end(byte, _State.CR_09, Verdict.HTTP09, target=True)
        if state is _State.AFTER_TARGET:
            if byte == _SP:
                return None
            if byte == ord("H"):
                self._state, self._matched = _State.HTTP, 1
                return None
            return self._line_end(byte, _State.CR_09, Verdict.HTTP09)
        if state is _State.CR_09:
            return Verdict.HTTP09 if byte == _LF else Verdict.INVALID
        if state is _State.HTTP:
            if byte != b"HTTP/"[self._matched]:
                return Verdict.INVALID
            self._matched += 1
            if self._matched == 5:
                self._state = _State.MAJOR
            return None
        if state is _State.MAJOR:
            if not ord("1") <= byte <= ord("9"):
                return Verdict.INVALID
            if byte != ord("1"):
                return Verdict.VERSION
            self._state = _State.DOT
            return None
        if state is _State.DOT:
            if byte in _DIGITS:  # 10 and up
                return Verdict.VERSION
            if byte != ord("."):
                return Verdict.INVALID
            self._state = _State.MINOR
            return None
        if state is _State.MINOR:
            if byte in _DIGITS:
                self._minor_digits += 1
                return Verdict.VERSION if self._minor_digits > 2 else None
            if not self._minor_digits:
                return Verdict.INVALID
            self._state = _State.AFTER_VERSION
        if self._state is _State.AFTER_VERSION:
            if byte == _SP:
                return None
            return self._line_end(byte, _State.CR, Verdict.HTTP1)
        # _State.CR
        return Verdict.HTTP1 if byte == _LF else Verdict.INVALID

    def _line_end(
        self, byte: int, after_cr: _State, verdict: Verdict, target: bool = False
    ) -> Verdict | None:
        """CR (then LF) or LF ends the line; in a target, other bytes continue it."""
        if byte == _LF:
            return verdict
        if byte == _CR:
            self._state = after_cr
            return None
        if target and byte >= 0x20 and byte != 0x7F:
            return None
        return Verdict.INVALID


def request_line_verdict(data: bytes | bytearray, *, max_line: int) -> LineVerdict:
    """What nginx makes of data as the start of a request."""
    return RequestLineReader(max_line=max_line).feed(data)

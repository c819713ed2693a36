"""nginx's verdict on a request line as it arrives (plain HTTP to the TLS port):
each case below was answered so by a real nginx 1.22 (the interop tests compare
the answers byte for byte)."""

from __future__ import annotations

import pytest

from mtt.config import Limits
from mtt.wire.request_line import LineVerdict, RequestLineReader, Verdict
from mtt.wire.request_line import request_line_verdict as verdict_with_cap

MAX_LINE = Limits().max_request_head  # the cap the front layer gives the reader


def request_line_verdict(data: bytes) -> LineVerdict:
    return verdict_with_cap(data, max_line=MAX_LINE)


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", Verdict.HTTP1),
        (b"GET / HTTP/1.0\n", Verdict.HTTP1),
        (b"OPTIONS / HTTP/1.0\r\n", Verdict.HTTP1),
        (b"A-_Z / HTTP/1.0\r\n", Verdict.HTTP1),
        (b"GET http://x/ HTTP/1.0\r\n", Verdict.HTTP1),
        (b"GET  /   HTTP/1.1  \r\n", Verdict.HTTP1),
        (b"\r\n\r\nGET / HTTP/1.0\r\n", Verdict.HTTP1),
        (b"GET /\r\n", Verdict.HTTP09),
        (b"GET /\n", Verdict.HTTP09),
        (b"POST /\r\n", Verdict.HTTP09),
        (b"GET / HTTP/2.0\r\n", Verdict.VERSION),
        (b"GET / HTTP/10.0\r\n", Verdict.VERSION),
        (b"GET / HTTP/1.100\r\n", Verdict.VERSION),
        (b"get / HTTP/1.0\r\n", Verdict.INVALID),
        (b" GET / HTTP/1.0\r\n", Verdict.INVALID),
        (b"HELP\r\n", Verdict.INVALID),
        (b"GARBAGE\r\n\r\n", Verdict.INVALID),
        (b"GX\x01", Verdict.INVALID),
        (b"\x00", Verdict.INVALID),
        (b"GET x HTTP/1.0\r\n", Verdict.INVALID),
        (b"GET /x y\r\n", Verdict.INVALID),
        (b"GET /\x01 HTTP/1.0\r\n", Verdict.INVALID),
        (b"OPTIONS / RTSP/1.0\r\n", Verdict.INVALID),
        (b"GET / HTTP/0.9\r\n", Verdict.INVALID),
        (b"GET / HTTP/1.\r\n", Verdict.INVALID),
        (b"GET / HTTP/1.1\rX", Verdict.INVALID),
        (b"", Verdict.NEED_MORE),
        (b"\r\n\r\n", Verdict.NEED_MORE),
        (b"G", Verdict.NEED_MORE),
        (b"GET ", Verdict.NEED_MORE),
        (b"GET /", Verdict.NEED_MORE),
        (b"GET / ", Verdict.NEED_MORE),
        (b"GET / HT", Verdict.NEED_MORE),
        (b"GET / HTTP/1.1", Verdict.NEED_MORE),
        (b"GET / HTTP/1.1\r", Verdict.NEED_MORE),
        (b"GET http:/", Verdict.NEED_MORE),
    ],
)
def test_verdicts(data: bytes, verdict: Verdict) -> None:
    assert request_line_verdict(data).verdict is verdict
    reader = RequestLineReader(max_line=MAX_LINE)  # the same, a byte at a time
    dribbled = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    assert (dribbled[-1] if dribbled else reader.feed(b"")) == request_line_verdict(data)


def test_method_and_start_are_reported() -> None:
    line = request_line_verdict(b"\r\nPOST /x HTTP/1.1\r\n")
    assert (line.method, line.start) == (b"POST", 2)
    assert request_line_verdict(b"GET /\r\n").method == b"GET"


def test_a_line_never_ending_is_refused_at_the_cap() -> None:
    assert request_line_verdict(b"GET /" + b"a" * MAX_LINE).verdict is Verdict.INVALID
    line = b"GET /" + b"a" * 100
    assert verdict_with_cap(line, max_line=len(line) + 1).verdict is Verdict.NEED_MORE
    assert verdict_with_cap(line, max_line=len(line)).verdict is Verdict.INVALID


def test_every_prefix_of_a_good_line_needs_more() -> None:
    line = b"GET /index.html?q=1 HTTP/1.1\r\n"
    for n in range(len(line)):
        assert request_line_verdict(line[:n]).verdict is Verdict.NEED_MORE, line[:n]

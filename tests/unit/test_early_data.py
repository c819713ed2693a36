"""Early data in Sec-WebSocket-Protocol, as a table: header value as sent ->
what it carries (docs/protocol.md §10). Xray's dialer encodes with Go's
base64.RawURLEncoding; its server maps the standard alphabet onto the URL one
and drops padding before decoding, so both spellings are taken."""

from __future__ import annotations

from base64 import b64encode, urlsafe_b64encode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtt.wire.early_data import EarlyData, TooLarge, decoded_size, early_data

LIMIT = 3072


def raw_url(data: bytes) -> str:
    """base64.RawURLEncoding.EncodeToString, as Xray's and v2fly's dialers call it."""
    return urlsafe_b64encode(data).decode().rstrip("=")


TABLE: list[tuple[str, str | None, EarlyData | TooLarge | None]] = [
    ("absent", None, None),
    ("empty", "", None),
    ("one byte", "AA", EarlyData(b"\x00", "AA")),
    ("the URL alphabet's - and _", "-_8", EarlyData(b"\xfb\xff", "-_8")),
    ("the standard alphabet, padded", "+/8=", EarlyData(b"\xfb\xff", "+/8=")),
    ("padding alone", "==", None),
    ("a lone sextet at the end", "AAAAA", None),
    ("a list", "chat, superchat", None),
    ("a dot", "v1.chat", None),
    ("a space", "AA AA", None),
    ("padding inside", "AA=A", None),
    ("a name that decodes", "chat", EarlyData(b"r\x16\xad", "chat")),
    (
        "at the bound",
        raw_url(b"\xff" * LIMIT),
        EarlyData(b"\xff" * LIMIT, raw_url(b"\xff" * LIMIT)),
    ),
    ("one byte over", raw_url(b"\xff" * (LIMIT + 1)), TooLarge(LIMIT + 1, LIMIT)),
    ("over, in the standard alphabet", b64encode(b"\xff" * 4000).decode(), TooLarge(4000, LIMIT)),
]


@pytest.mark.parametrize(("header", "expected"), [r[1:] for r in TABLE], ids=[r[0] for r in TABLE])
def test_early_data(header: str | None, expected: EarlyData | TooLarge | None) -> None:
    assert early_data(header, LIMIT) == expected


@given(st.binary(min_size=1, max_size=LIMIT))
def test_what_xrays_dialer_sends_comes_back_whole(data: bytes) -> None:
    header = raw_url(data)
    assert decoded_size(header) == len(data)
    assert early_data(header, LIMIT) == EarlyData(data, header)


@given(st.binary(min_size=1, max_size=64))
def test_the_standard_spelling_decodes_to_the_same(data: bytes) -> None:
    header = b64encode(data).decode()
    assert early_data(header, LIMIT) == EarlyData(data, header)


@given(st.text(max_size=40))
def test_any_text_gets_an_answer(header: str) -> None:
    """No header value raises, and decoded early data is never over the bound."""
    found = early_data(header, 8)
    assert found is None or isinstance(found, TooLarge) or 0 < len(found.data) <= 8

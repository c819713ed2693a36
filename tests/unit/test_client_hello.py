"""SNI and ALPN read from ClientHello bytes (wire/client_hello.py): real clients'
hellos, split over records, and hostile bytes that must give None, never raise."""

from __future__ import annotations

import contextlib
import ssl

from hypothesis import given, settings
from hypothesis import strategies as st

from mtt.config import Limits
from mtt.wire.client_hello import HelloNames
from mtt.wire.client_hello import hello_names as names_within


def hello_names(data: bytes | bytearray) -> HelloNames | None:
    """As first_bytes.py asks: within the ClientHello bound it reads before TLS."""
    return names_within(data, Limits().max_client_hello)


def client_hello(
    server_name: str | None = "tunnel.test",
    alpn: list[str] | None = None,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> bytes:
    """The first flight of CPython's OpenSSL client (one ClientHello record)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = minimum
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def split_records(record: bytes, sizes: list[int]) -> bytes:
    """The same handshake payload cut into records of the given sizes (and the rest)."""
    header, payload = record[:3], record[5:]
    out = b""
    for size in [*sizes, len(payload)]:
        piece, payload = payload[:size], payload[size:]
        if piece:
            out += header + len(piece).to_bytes(2, "big") + piece
    return out


def test_a_real_hello_gives_its_name_and_protocols_in_order() -> None:
    hello = client_hello("Tunnel.Test", ["acme-tls/1", "http/1.1"])
    assert hello_names(hello) == HelloNames("tunnel.test", (b"acme-tls/1", b"http/1.1"))


def test_no_sni_and_no_alpn() -> None:
    assert hello_names(client_hello(None)) == HelloNames(None, ())


def test_a_hello_over_many_records_reads_the_same() -> None:
    hello = client_hello("a.example", ["acme-tls/1"])
    expected = hello_names(hello)
    for sizes in ([1], [4], [5, 1, 1], [40, 40], [len(hello) - 10]):
        assert hello_names(split_records(hello, sizes)) == expected


def test_a_truncated_hello_gives_none_at_every_length() -> None:
    hello = client_hello("a.example", ["acme-tls/1"])
    assert all(hello_names(hello[:n]) is None for n in range(len(hello)))


def test_bytes_after_the_hello_do_not_matter() -> None:
    hello = client_hello("a.example", ["h2"])
    assert hello_names(hello + b"\x17\x03\x03\x00\x05hello") == HelloNames("a.example", (b"h2",))


def test_not_a_handshake_gives_none() -> None:
    assert hello_names(b"GET / HTTP/1.1\r\n\r\n") is None
    assert hello_names(b"\x15\x03\x03\x00\x02\x02\x28") is None  # an alert
    assert hello_names(b"") is None


def test_a_server_hello_is_not_a_client_hello() -> None:
    hello = bytearray(client_hello())
    hello[5] = 0x02
    assert hello_names(bytes(hello)) is None


def _with_extensions(extensions: bytes) -> bytes:
    """A minimal TLS 1.2 ClientHello with these extension bytes."""
    body = (
        b"\x03\x03"
        + b"\x00" * 32
        + b"\x00"  # no session id
        + b"\x00\x02\x00\x2f"  # one cipher suite
        + b"\x01\x00"  # null compression
        + len(extensions).to_bytes(2, "big")
        + extensions
    )
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def _extension(kind: int, content: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(content).to_bytes(2, "big") + content


def _sni(name: bytes) -> bytes:
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    return _extension(0, len(entry).to_bytes(2, "big") + entry)


def _alpn(*names: bytes) -> bytes:
    entries = b"".join(len(n).to_bytes(1, "big") + n for n in names)
    return _extension(16, len(entries).to_bytes(2, "big") + entries)


def test_hand_made_extensions_parse() -> None:
    hello = _with_extensions(_sni(b"x.example.") + _alpn(b"acme-tls/1"))
    assert hello_names(hello) == HelloNames("x.example", (b"acme-tls/1",))


def test_a_hello_without_extensions_has_no_names() -> None:
    body = b"\x03\x01" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    hello = b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message
    assert hello_names(hello) == HelloNames(None, ())


def test_malformed_extensions_give_none() -> None:
    cases = [
        _sni(b"x.example") + _sni(b"y.example"),  # the same extension twice
        _alpn(b""),  # an empty protocol name (RFC 7301 §3.1)
        _sni(b"bad\x00name"),
        _sni("ünïcode.example".encode()),
        _extension(0, b"\x00\x10\x00"),  # a list longer than the extension
        _extension(16, b"\x00\x03\x05ab"),  # a name longer than the list
        b"\x00\x00\x00\x09abc",  # an extension longer than the block
    ]
    for extensions in cases:
        assert hello_names(_with_extensions(extensions)) is None, extensions


def test_unknown_name_types_are_skipped() -> None:
    entry = b"\x01\x00\x03abc" + b"\x00\x00\x09x.example"
    ext = _extension(0, len(entry).to_bytes(2, "big") + entry)
    assert hello_names(_with_extensions(ext)) == HelloNames("x.example", ())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    result = hello_names(b"\x16\x03\x01" + data)
    assert result is None or isinstance(result, HelloNames)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=400), st.integers(min_value=0, max_value=255))
def test_one_flipped_byte_never_raises(at: int, value: int) -> None:
    hello = bytearray(client_hello("a.example", ["acme-tls/1", "http/1.1"]))
    hello[at % len(hello)] = value
    result = hello_names(bytes(hello))
    assert result is None or isinstance(result, HelloNames)


def test_input_past_the_limit_is_not_read() -> None:
    hello = client_hello("a.example", ["acme-tls/1"])
    assert names_within(hello, limit=len(hello) - 1) is None
    assert names_within(hello, limit=len(hello)) == HelloNames("a.example", (b"acme-tls/1",))

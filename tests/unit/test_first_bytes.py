"""The first-bytes step of the TLS listener, sans I/O: which bytes start TLS,
when a ClientHello is whole, and what OpenSSL answers one it refuses."""

from __future__ import annotations

import contextlib
import ssl

import pytest

from mtt.accept.first_bytes import (
    ClientHelloReader,
    Start,
    classify,
    client_hello_complete,
    refusal_reply,
)
from mtt.config import Limits
from mtt.transport.tls import context_from_pem, self_signed_pem

MAX_HELLO = Limits().max_client_hello  # what the TLS listener gives the reader

# nmap's SSLSessionReq probe: an SSLv3 ClientHello
SSLV3_HELLO = (
    b"\x16\x03\x00\x00S\x01\x00\x00O\x03\x00?G\xd7\xf7\xba,\xee\xea\xb2`~\xf3\x00\xfd\x82{\xb9"
    b"\xd5\x96\xc8w\x9b\xe6\xc4\xdb<=\xdbo\xef\x10n\x00\x00(\x00\x16\x00\x13\x00\x0a\x00f\x00"
    b"\x05\x00\x04\x00e\x00d\x00c\x00b\x00a\x00`\x00\x15\x00\x12\x00\x09\x00\x14\x00\x11\x00"
    b"\x08\x00\x06\x00\x03\x01\x00"
)


def client_hello(alpn: list[str] | None = None) -> bytes:
    """A real client's first flight (one ClientHello record)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="tunnel.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def refragment(record: bytes, at: int) -> bytes:
    """The same handshake message in two records, split `at` bytes into it."""
    header, payload = record[:3], record[5:]
    first, second = payload[:at], payload[at:]
    return (
        header
        + len(first).to_bytes(2, "big")
        + first
        + header
        + len(second).to_bytes(2, "big")
        + second
    )


@pytest.fixture(scope="module")
def server_ctx() -> ssl.SSLContext:
    return context_from_pem(*self_signed_pem("tunnel.test"))


@pytest.mark.parametrize(
    ("first", "start"),
    [
        (0x16, Start.TLS),  # a handshake record
        (0x80, Start.TLS),  # SSLv2-style hello
        (0xFF, Start.TLS),
        (ord("G"), Start.PLAIN),
        (0x00, Start.PLAIN),
        (0x15, Start.PLAIN),  # an alert first: nginx takes it for plain HTTP too
        (0x17, Start.PLAIN),
    ],
)
def test_classify_follows_nginx(first: int, start: Start) -> None:
    assert classify(first) is start


def test_a_client_hello_is_whole_only_at_its_last_byte() -> None:
    hello = client_hello()
    assert all(not client_hello_complete(hello[:n], MAX_HELLO) for n in range(len(hello)))
    assert client_hello_complete(hello, MAX_HELLO)


@pytest.mark.parametrize("at", [1, 3, 4, 100])
def test_a_hello_over_two_records_is_whole_only_at_the_end(at: int) -> None:
    hello = refragment(client_hello(), at)
    assert all(not client_hello_complete(hello[:n], MAX_HELLO) for n in range(len(hello)))
    assert client_hello_complete(hello, MAX_HELLO)


@pytest.mark.parametrize("at", [0, 1, 3, 4, 100])
def test_the_reader_fed_byte_by_byte_agrees(at: int) -> None:
    """The reader resumes where it was: the same verdicts as reading at once."""
    hello = refragment(client_hello(), at) if at else client_hello()
    reader = ClientHelloReader(MAX_HELLO)
    verdicts = [reader.complete(hello[:n]) for n in range(1, len(hello) + 1)]
    assert verdicts == [False] * (len(hello) - 1) + [True]


def test_a_hello_longer_than_the_cap_is_handed_on_at_the_cap() -> None:
    hello = client_hello()
    assert not client_hello_complete(hello[:100], len(hello))
    assert client_hello_complete(hello[:100], 100)
    assert not ClientHelloReader(101).complete(hello[:100])


@pytest.mark.parametrize(
    "data",
    [
        b"\x17\x03\x03\x00\x05",  # an application-data record first
        b"\x16\x03\x01\x00\x05hello",  # a handshake record that is no ClientHello
        b"\x16\x03\x01\x00\x00",  # an empty record
        b"\x16\x03\x01\xff\xff",  # longer than any TLS record
    ],
)
def test_what_is_no_hello_is_handed_on_at_once(data: bytes) -> None:
    assert client_hello_complete(data, MAX_HELLO)


def test_sslv2_hello_is_whole_at_its_length() -> None:
    record = b"\x80\x0b" + b"\x01\x03\x01\x00\x00\x00\x00\x00\x00\x00\x00"
    assert all(not client_hello_complete(record[:n], MAX_HELLO) for n in range(len(record)))
    assert client_hello_complete(record, MAX_HELLO)


@pytest.mark.parametrize(
    "data",
    [
        b"\xc2\xe5\xe5\xe5\x9e",  # top bit set, but no SSLv2 ClientHello
        b"\x80\x02\x01\x03\x01",  # an SSLv2 ClientHello too short to be one
        b"\x16\x04\x00\x00\x05",  # a handshake record of no TLS version
    ],
)
def test_headers_openssl_refuses_are_handed_on_at_once(data: bytes) -> None:
    assert client_hello_complete(data, MAX_HELLO)
    assert not client_hello_complete(data[:4], MAX_HELLO)  # a header is 5 bytes


def test_a_good_hello_is_no_refusal(server_ctx: ssl.SSLContext) -> None:
    assert refusal_reply(server_ctx, client_hello()) == (b"", "")


def test_sslv3_hello_gets_a_handshake_failure_alert(server_ctx: ssl.SSLContext) -> None:
    reply, reason = refusal_reply(server_ctx, SSLV3_HELLO)
    assert reply == b"\x15\x03\x00\x00\x02\x02\x28"  # fatal handshake_failure, as nginx
    assert reason


def test_alpn_offering_only_h2_is_refused(server_ctx: ssl.SSLContext) -> None:
    """nginx without http2 refuses, alert no_application_protocol (120)."""
    reply, _ = refusal_reply(server_ctx, client_hello(["h2"]))
    assert reply == b"\x15\x03\x03\x00\x02\x02\x78"


def test_garbage_after_a_good_hello_gets_the_flight_then_an_alert(
    server_ctx: ssl.SSLContext,
) -> None:
    reply, _ = refusal_reply(server_ctx, client_hello() + b"GARBAGE" * 4)
    assert reply.startswith(b"\x16\x03\x03")  # the ServerHello, then encrypted records
    assert len(reply) > 500

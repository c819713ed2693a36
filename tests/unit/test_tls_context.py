"""The listener's TLS context is set up as nginx sets up its own: checked here on
the records a handshake in memory produces (the interop tests compare with a
real nginx), and without libssl reachable, where Python's behaviour remains."""

from __future__ import annotations

import contextlib
import logging
import ssl

import pytest

from mtt.transport import libssl, tls
from mtt.transport.tls import NGINX_OPTIONS, context_from_pem, self_signed_pem

CERT, KEY = self_signed_pem("tunnel.test")


def records(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while len(data) >= 5:
        length = int.from_bytes(data[3:5], "big")
        out.append((data[0], data[5 : 5 + length]))
        data = data[5 + length :]
    return out


def server_hello_extensions(record: bytes) -> dict[int, bytes]:
    """The extensions of the ServerHello that starts a handshake record."""
    assert record[0] == 2, "not a ServerHello"
    body = record[4:]
    at = 2 + 32  # version, random
    at += 1 + body[at]  # session id
    at += 2 + 1  # cipher, compression
    end = at + 2 + int.from_bytes(body[at : at + 2], "big")
    at += 2
    found = {}
    while at < end:
        kind, length = (
            int.from_bytes(body[at : at + 2], "big"),
            int.from_bytes(body[at + 2 : at + 4], "big"),
        )
        found[kind] = body[at + 4 : at + 4 + length]
        at += 4 + length
    return found


def handshake_tls12(
    server_ctx: ssl.SSLContext, alpn: list[str]
) -> tuple[list[bytes], ssl.SSLObject]:
    """A TLS 1.2 handshake in memory; the server's plaintext handshake records."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    client_ctx.set_alpn_protocols(alpn)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="tunnel.test")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    seen: list[bytes] = []
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        sent = s_out.read()
        seen += [payload for kind, payload in records(sent) if kind == 0x16]
        c_in.write(sent)
        if client.version() and server.version():
            break
    return seen, client


@pytest.fixture
def server_ctx() -> ssl.SSLContext:
    return context_from_pem(CERT, KEY)


def test_options_session_and_level_are_nginx_ones(server_ctx: ssl.SSLContext) -> None:
    assert int(server_ctx.options) == libssl.default_options() | NGINX_OPTIONS
    assert server_ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert libssl.session_timeout(server_ctx) == 300
    assert libssl.session_cache_mode(server_ctx) == 0x282  # SERVER|NO_AUTO_CLEAR|NO_INTERNAL_STORE
    assert server_ctx.security_level == libssl.default_security_level()
    assert server_ctx.minimum_version is ssl.TLSVersion.MINIMUM_SUPPORTED


def test_sni_is_acknowledged_and_tickets_live_300_s(server_ctx: ssl.SSLContext) -> None:
    seen, client = handshake_tls12(server_ctx, ["http/1.1"])
    extensions = server_hello_extensions(seen[0])
    assert extensions[0] == b""  # an empty server_name: the name was accepted
    ticket = next(message for message in seen if message[0] == 4)  # NewSessionTicket
    assert int.from_bytes(ticket[4:8], "big") == 300
    assert client.cipher()[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"  # the server's order
    assert client.selected_alpn_protocol() == "http/1.1"


def test_alpn_is_chosen_from_nginx_list(server_ctx: ssl.SSLContext) -> None:
    _, client = handshake_tls12(server_ctx, ["h2", "http/1.0"])
    assert client.selected_alpn_protocol() == "http/1.0"


def test_without_libssl_python_defaults_remain(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unreachable() -> None:
        raise OSError("statically linked")

    monkeypatch.setattr(libssl, "_libssl", unreachable)
    tls._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, "mtt.server"):
        ctx = context_from_pem(CERT, KEY)
    assert "libssl not reachable: statically linked" in caplog.text
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    seen, client = handshake_tls12(ctx, ["h2", "http/1.1"])
    assert client.selected_alpn_protocol() == "http/1.1"
    assert 0 not in server_hello_extensions(seen[0])  # Python's: no SNI callback
    tls._warn_once.cache_clear()


def memory_handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    name: str = "tunnel.test",
    session: ssl.SSLSession | None = None,
) -> tuple[ssl.SSLObject, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A handshake in memory: (client, server, the client's incoming BIO, the
    server's outgoing one), for whatever the caller sends after it."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=name, session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client.version() and server.version():
            break
    return client, server, c_in, s_out


def _resumes(issuer: ssl.SSLContext, other: ssl.SSLContext, version: ssl.TLSVersion) -> bool:
    """Whether a session `issuer` gave a client resumes on `other` (in memory)."""
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.maximum_version = version
    session = None
    for server_ctx in (issuer, other):
        client, server, c_in, s_out = memory_handshake(server_ctx, client_ctx, session=session)
        server.write(b"x")  # TLS 1.3 tickets come after the handshake, with data
        c_in.write(s_out.read())
        assert client.read(1) == b"x"
        session = client.session
    return bool(client.session_reused)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_contexts_of_one_spec_resume_each_others_sessions(version: ssl.TLSVersion) -> None:
    from mtt.accept.tls_setup import new_ticket_keys, tls_context, with_ticket_keys

    spec = {"cert_pem": CERT.decode(), "key_pem": KEY.decode(), "origin": "test"}
    keys = new_ticket_keys()
    worker1, worker2 = (tls_context(with_ticket_keys(spec, keys)) for _ in range(2))
    assert worker1 is not None and worker2 is not None
    assert libssl.ticket_keys(worker1) == bytes.fromhex(keys) == libssl.ticket_keys(worker2)
    assert _resumes(worker1, worker2, version)
    # Without shared keys (each context its own, as OpenSSL makes them) nothing resumes.
    alone1, alone2 = (tls_context(spec) for _ in range(2))
    assert alone1 is not None and alone2 is not None
    assert _resumes(alone1, alone1, version)
    assert not _resumes(alone1, alone2, version)


def test_ticket_keys_of_the_wrong_size_are_refused(server_ctx: ssl.SSLContext) -> None:
    with pytest.raises(ValueError, match="80 bytes"):
        libssl.set_ticket_keys(server_ctx, b"short")

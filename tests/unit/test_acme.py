"""ACME's pieces without a CA: the challenge bytes (wire/acme.py), the renewal
schedule (core/renewal.py), the TLS-ALPN-01 certificate and the context chosen
for a ClientHello, the state directory's files and lock, and the -acme flags."""

from __future__ import annotations

import hashlib
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mtt.accept.first_bytes import challenge_domain
from mtt.autocert.state import AcmeState, OrderLock, acme_root, ca_folder, parse_kept
from mtt.config import Limits
from mtt.core.renewal import Backoff, due, renewal_time
from mtt.errors import AcmeError, ConfigError
from mtt.server.main import LETS_ENCRYPT, build_flags, config_from_flags
from mtt.transport.tls import alpn_challenge_pem, challenge_context, self_signed_pem
from mtt.wire.acme import (
    acme_identifier_value,
    domain_problem,
    http01_reply,
    http01_token,
)
from tests.unit.test_client_hello import client_hello
from tests.unit.test_tls_context import memory_handshake

DAY = 86400.0
MAX_HELLO = Limits().max_client_hello
FRACTION = Limits().acme_renew_fraction
KEY_AUTHZ = (
    "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"
)


# -- wire/acme.py --------------------------------------------------------------------


def test_the_acme_identifier_is_a_der_octet_string_of_the_sha256() -> None:
    value = acme_identifier_value(KEY_AUTHZ)
    assert value[:2] == b"\x04\x20"
    assert value[2:] == hashlib.sha256(KEY_AUTHZ.encode()).digest()


@pytest.mark.parametrize(
    ("target", "token"),
    [
        (b"/.well-known/acme-challenge/abc-DEF_123", "abc-DEF_123"),
        (b"/.well-known/acme-challenge/", None),
        (b"/.well-known/acme-challenge/a/b", None),
        (b"/.well-known/acme-challenge/a?x=1", None),
        (b"/.well-known/acme-challenge/..", None),
        (b"/.well-known/acme-challenge/a%2Fb", None),
        (b"/index.html", None),
    ],
)
def test_http01_tokens_are_base64url_only(target: bytes, token: str | None) -> None:
    assert http01_token(target) == token


DATE = "Tue, 01 Dec 2026 12:00:00 GMT"


def test_http01_answers_a_pending_token_with_its_key_authorization() -> None:
    status, reply = http01_reply(
        b"GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: a.example",
        {"tok": KEY_AUTHZ},
        DATE,
    )
    assert status == 200
    head, body = reply.split(b"\r\n\r\n", 1)
    assert body == KEY_AUTHZ.encode()
    assert head.startswith(b"HTTP/1.1 200 OK\r\nServer: nginx\r\n")
    assert f"Content-Length: {len(KEY_AUTHZ)}".encode() in head
    assert b"Connection: close" in head


def test_http01_gives_nginx_pages_for_everything_else() -> None:
    answers = {"tok": KEY_AUTHZ}
    for head, status in [
        (b"GET /.well-known/acme-challenge/other HTTP/1.1", 404),
        (b"GET / HTTP/1.1", 404),
        (b"POST /.well-known/acme-challenge/tok HTTP/1.1", 404),
        (b"GET /.well-known/acme-challenge/tok", 400),
        (b"GET http://a.example/x HTTP/1.1", 400),
        (b"\x16\x03\x01\x00", 400),
    ]:
        got, reply = http01_reply(head, answers, DATE)
        assert got == status, head
        assert KEY_AUTHZ.encode() not in reply
        assert b"<center>nginx</center>" in reply


def test_http01_head_gets_no_body() -> None:
    status, reply = http01_reply(
        b"HEAD /.well-known/acme-challenge/tok HTTP/1.1", {"tok": KEY_AUTHZ}, DATE
    )
    assert status == 200
    assert reply.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("tunnel.example.com", None),
        ("xn--bcher-kva.example", None),
        ("*.example.com", "wildcards"),
        ("localhost", "two labels"),
        ("192.0.2.1", "IP addresses"),
        ("Tunnel.example", "lowercase"),
        ("a_b.example", "labels"),
        ("-a.example", "labels"),
        ("a..example", "labels"),
        ("", "1 to 253"),
        ("a." * 127 + "com", "1 to 253"),
    ],
)
def test_acme_names_are_checked(name: str, problem: str | None) -> None:
    found = domain_problem(name)
    assert (found is None) if problem is None else (found is not None and problem in found)


# -- core/renewal.py ----------------------------------------------------------------


def test_renewal_is_at_two_thirds_of_the_lifetime_or_30_days_before_the_end() -> None:
    ahead = 30 * DAY
    assert renewal_time(0, 90 * DAY, ahead, FRACTION) == 60 * DAY  # Let's Encrypt's 90 days
    assert renewal_time(0, 6 * DAY, ahead, FRACTION) == 4 * DAY  # short-lived: a third left
    assert renewal_time(0, 365 * DAY, ahead, FRACTION) == 335 * DAY  # a year: 30 days left
    assert renewal_time(100, 130, ahead, FRACTION) == 120  # a test CA's 30 s
    assert not due(119.9, 100, 130, ahead, FRACTION)
    assert due(120, 100, 130, ahead, FRACTION)


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(first=120, cap=3600)
    assert [backoff.delay(n) for n in range(8)] == [0, 120, 240, 480, 960, 1920, 3600, 3600]
    assert backoff.delay(10**6) == 3600


# -- the TLS-ALPN-01 certificate and the context a ClientHello gets --------------------


def test_the_challenge_certificate_is_what_rfc_8737_asks_for() -> None:
    cert_pem, _ = alpn_challenge_pem("a.example", KEY_AUTHZ)
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example"]
    ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31"))
    assert ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(KEY_AUTHZ.encode()).digest()


def handshake(ctx: ssl.SSLContext, alpn: list[str], name: str) -> ssl.SSLObject:
    """A client handshake against ctx in memory; the client's SSLObject."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.set_alpn_protocols(alpn)
    return memory_handshake(ctx, client, name)[0]


def test_the_challenge_context_negotiates_acme_tls_1_with_the_challenge_cert() -> None:
    cert_pem, key_pem = alpn_challenge_pem("a.example", KEY_AUTHZ)
    cobj = handshake(challenge_context(cert_pem, key_pem, "a.example"), ["acme-tls/1"], "a.example")
    assert cobj.selected_alpn_protocol() == "acme-tls/1"
    der = cobj.getpeercert(binary_form=True)
    assert der == x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)


def test_only_a_hello_offering_acme_tls_1_for_a_pending_name_gets_the_challenge() -> None:
    ctx = challenge_context(*alpn_challenge_pem("a.example", KEY_AUTHZ), "a.example")
    pending = {"a.example": ctx}
    assert (
        challenge_domain(client_hello("a.example", ["acme-tls/1"]), pending, MAX_HELLO)
        == "a.example"
    )
    assert (
        challenge_domain(client_hello("A.Example", ["acme-tls/1"]), pending, MAX_HELLO)
        == "a.example"
    )
    assert challenge_domain(client_hello("a.example", ["http/1.1"]), pending, MAX_HELLO) is None
    assert challenge_domain(client_hello("a.example"), pending, MAX_HELLO) is None
    assert challenge_domain(client_hello("b.example", ["acme-tls/1"]), pending, MAX_HELLO) is None
    assert challenge_domain(client_hello(None, ["acme-tls/1"]), pending, MAX_HELLO) is None
    assert challenge_domain(client_hello("a.example", ["acme-tls/1"]), {}, MAX_HELLO) is None
    assert challenge_domain(b"\x16\x03\x01\x00\x01\x01", pending, MAX_HELLO) is None


# -- the state directory -----------------------------------------------------------


def test_the_state_directory_is_the_dbs() -> None:
    assert acme_root("/var/lib/mtt-mu-server/users.db") == "/var/lib/mtt-mu-server/acme"
    assert acme_root("memory").endswith("mtt-mu-server/acme")
    assert ca_folder(LETS_ENCRYPT) == "acme-v02.api.letsencrypt.org"
    assert ca_folder("https://127.0.0.1:14000/dir") == "127.0.0.1_14000"
    assert ca_folder("https://user@x.example/../../etc") == "x.example"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_account_key_and_certificate_are_private_and_reread(tmp_path: Path) -> None:
    root = tmp_path / "state" / "acme"
    state = AcmeState(str(root), "https://ca.example/dir", ("a.example", "b.example"))
    state.prepare()
    key = state.account_key()
    assert state.account_key() == key  # made once, then read
    assert mode(tmp_path / "state") == mode(root) == mode(root / "ca.example") == 0o700
    assert mode(root / "ca.example" / "account.key") == 0o600
    assert state.kept() is None

    with pytest.raises(AcmeError, match=r"not for all of a\.example, b\.example"):
        state.save(*self_signed_pem("a.example"))  # a CA that left a name out
    assert state.kept() is None
    state = AcmeState(str(root), "https://ca.example/dir", ("a.example",))
    cert_pem, key_pem = self_signed_pem("a.example")
    kept = state.save(cert_pem, key_pem)
    path = root / "ca.example" / "a.example.pem"
    assert mode(path) == 0o600
    again = state.kept()
    assert again == kept
    assert again.names == ("a.example",)
    assert again.covers(("a.example",))
    assert not again.covers(("a.example", "b.example"))
    assert [p.name for p in (root / "ca.example").iterdir() if p.name.startswith(".")] == []


def test_a_broken_kept_certificate_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = AcmeState(str(tmp_path / "acme"), "https://ca.example/dir", ("a.example",))
    state.prepare()
    cert_a, _ = self_signed_pem("a.example")
    _, key_b = self_signed_pem("a.example")
    Path(state.cert_path).write_bytes(key_b + cert_a)  # a key that is not the cert's
    assert state.kept() is None
    assert "ignoring the kept certificate" in caplog.text
    with pytest.raises(ConfigError, match="one private key"):
        parse_kept(cert_a, "x")


def test_the_order_lock_is_held_by_one_process_and_names_it(tmp_path: Path) -> None:
    first, second = OrderLock(str(tmp_path / "lock")), OrderLock(str(tmp_path / "lock"))
    assert first.acquire() is None
    assert second.acquire() == os.getpid()  # flock: a second descriptor is refused too
    first.release()
    assert second.acquire() is None
    second.release()


def test_an_unwritable_state_directory_stops_the_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    state = AcmeState(str(blocker / "acme"), "https://ca.example/dir", ("a.example",))
    with pytest.raises(ConfigError, match="ACME state"):
        state.prepare()


# -- flags ---------------------------------------------------------------------------


def test_acme_flags(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("x")
    argv = [
        "-acme",
        "Tunnel.Example.",
        "-acme",
        "www.tunnel.example",
        "-acme",
        "tunnel.example",
        "-acme-email",
        "ops@tunnel.example",
        "-acme-http",
        ":80",
        "-acme-ca-bundle",
        str(bundle),
        "-db",
        str(tmp_path / "users.db"),
    ]
    config = config_from_flags(build_flags().parse(argv))
    assert config.acme_domains == ("tunnel.example", "www.tunnel.example")
    assert config.acme_directory == LETS_ENCRYPT
    assert (config.acme_email, config.acme_http) == ("ops@tunnel.example", ":80")
    assert config.acme_ca_bundle == str(bundle)
    assert config.acme_dir == str(tmp_path / "acme")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-acme", "*.example.com"], "wildcards"),
        (["-acme-http", ":80"], "-acme-http needs -acme"),
        (["-acme", "a.example", "-cert", "c", "-key", "k"], "not both"),
        (["-acme", "a.example", "-disable-tls"], "drop -disable-tls"),
        (["-acme", "a.example", "-bind-unix"], "-bind-unix"),
        (["-acme", "a.example", "-acme-directory", "http://ca/dir"], "https://"),
        (["-acme", "a.example", "-acme-ca-bundle", "/nonexistent.pem"], "cannot read"),
        (["-acme", "a.example", "-acme-email", "ops.example"], "not a mail address"),
    ],
)
def test_acme_flag_combinations_are_checked(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_flags(build_flags().parse(argv))

"""TLS contexts for the tunnel listener.

The listener must look like nginx to anyone who is not a user, and TLS is
the first thing a prober sees, so the context is set up as Debian's nginx
sets up its own: OpenSSL's defaults plus nginx's (ssl_ciphers
HIGH:!aNULL:!MD5 with the server's preference, ssl_protocols TLSv1 to
TLSv1.3 as /etc/nginx/nginx.conf has them, the options of ngx_ssl_create)
and, through libssl.py, its session timeout, session cache, SNI and ALPN
callbacks. With the same OpenSSL and certificate the handshakes are then
the same; the tests compare JARM fingerprints with a real nginx's.

The server's preference gives TLS 1.3 clients AES-256-GCM where a Go client
would pick AES-128-GCM: a little more CPU per byte, the price of answering
like nginx.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import logging
import os
import secrets
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mtt.config import Limits
from mtt.errors import ConfigError
from mtt.transport import libssl
from mtt.wire.acme import ACME_IDENTIFIER_OID, ACME_TLS_ALPN, acme_identifier_value

log = logging.getLogger("mtt.server")
_LIMITS = Limits()

NGINX_CIPHERS = "HIGH:!aNULL:!MD5"  # ssl_ciphers' default
# What ngx_ssl_create and ssl_prefer_server_ciphers on add to OpenSSL's
# defaults (OpenSSL 3 names; the 0.9.8-era bug options are 0 there).
_SSL_OP_DONT_INSERT_EMPTY_FRAGMENTS = 0x800
_SSL_OP_NO_ANTI_REPLAY = 0x1000000
NGINX_OPTIONS = (
    _SSL_OP_DONT_INSERT_EMPTY_FRAGMENTS
    | ssl.OP_NO_SSLv3
    | ssl.OP_NO_COMPRESSION
    | _SSL_OP_NO_ANTI_REPLAY
    | ssl.OP_IGNORE_UNEXPECTED_EOF
    | ssl.OP_CIPHER_SERVER_PREFERENCE
)
_OPENSSL_DEFAULT_OPTIONS = ssl.OP_ENABLE_MIDDLEBOX_COMPAT | ssl.OP_NO_COMPRESSION

_WORDS = ("cdn", "static", "img", "api", "www", "assets", "media", "mail", "docs", "app")
_TLDS = ("com", "net", "org", "io")


def random_host_name() -> str:
    """A plausible host name for a self-signed certificate when none was given."""
    label = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))
    return f"{secrets.choice(_WORDS)}.{label}.{secrets.choice(_TLDS)}"


def self_signed_pem(server_name: str) -> tuple[bytes, bytes]:
    """An ECDSA P-256 certificate and key (PEM) valid for server_name."""
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        alt = x509.DNSName(server_name)
    return _self_signed(
        server_name,
        alt,
        365,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )


def alpn_challenge_pem(domain: str, key_authorization: str) -> tuple[bytes, bytes]:
    """The TLS-ALPN-01 certificate for domain (RFC 8737 §3): self-signed, the
    domain as its only name, the critical acmeIdentifier extension."""
    identifier = x509.UnrecognizedExtension(
        x509.ObjectIdentifier(ACME_IDENTIFIER_OID), acme_identifier_value(key_authorization)
    )
    return _self_signed(domain, x509.DNSName(domain), 7, [(identifier, True)])


def _self_signed(
    name: str,
    alt: x509.GeneralName,
    days: int,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key and a certificate it signs for itself: `name` as
    subject, `alt` its one subject alternative name, valid from a day ago for
    `days`, with these (extension, critical) after the name."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def challenge_context(cert_pem: bytes, key_pem: bytes, domain: str) -> ssl.SSLContext:
    """The context a TLS-ALPN-01 validation handshake gets: the challenge
    certificate and ALPN acme-tls/1 only (RFC 8737 §3 wants TLS 1.2 or later).
    Python's own ALPN callback is enough here: it reads the protocols from
    the context, not from a Python SSL object (see libssl.py for the ones that
    do not work on aiofastnet's connections)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ACME_TLS_ALPN.decode()])
    load_pem_into(ctx, cert_pem, key_pem, f"the TLS-ALPN-01 certificate for {domain}")
    return ctx


def _base_server_context() -> ssl.SSLContext:
    """A server context with Debian's nginx defaults (see the module's doc)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED  # ssl_protocols TLSv1 ...
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(NGINX_CIPHERS)
    try:
        defaults = libssl.default_options()
    except (OSError, AttributeError, ImportError):
        defaults = _OPENSSL_DEFAULT_OPTIONS
    ctx.options = ssl.Options(defaults | NGINX_OPTIONS)
    problem = libssl.apply(ctx, _LIMITS.tls_session_timeout)
    if problem is not None:
        ctx.set_alpn_protocols(["http/1.1", "http/1.0", "http/0.9"])
        _warn_once(problem)
    return ctx


@functools.cache
def _warn_once(problem: str) -> None:
    log.warning(
        "TLS: %s; the session timeout (7200 s), SNI and ALPN answers differ from nginx's",
        problem,
    )


def read_pem_files(cert_file: str, key_file: str) -> tuple[bytes, bytes]:
    """Read a certificate chain and key; a ConfigError names the file that failed."""
    out = []
    for path in (cert_file, key_file):
        try:
            with open(path, "rb") as fh:
                out.append(fh.read(_LIMITS.max_pem_file))
        except FileNotFoundError:
            raise ConfigError(f"cannot read {path}: no such file") from None
        except PermissionError:
            raise ConfigError(f"cannot read {path}: permission denied") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    return out[0], out[1]


def context_from_pem(
    cert_pem: bytes, key_pem: bytes, origin: str = "certificate"
) -> ssl.SSLContext:
    """A server context from PEM bytes; ConfigError if they do not form a usable pair."""
    ctx = _base_server_context()
    load_pem_into(ctx, cert_pem, key_pem, origin)
    return ctx


def load_pem_into(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes, origin: str) -> None:
    """(Re)load a certificate into a live context: new handshakes use it, and
    established connections are untouched (certificate renewals)."""
    # ssl can only load a chain from files; keep them private and short-lived.
    with tempfile.TemporaryDirectory(prefix="mtt-tls-") as tmp:
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        with open(cert_path, "wb") as fh:
            fh.write(cert_pem)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load {origin}: {exc.strerror or exc}") from None

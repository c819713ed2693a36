"""The bytes of ACME's two challenges the server answers (sans-I/O).

TLS-ALPN-01 (RFC 8737 §3): a self-signed certificate for the name, with the
critical acmeIdentifier extension (id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31)
whose value is the DER OCTET STRING of the SHA-256 digest of the key
authorization, served on a handshake that negotiates ALPN "acme-tls/1".

HTTP-01 (RFC 8555 §8.3): GET /.well-known/acme-challenge/TOKEN on port 80
answers the key authorization, token "." thumbprint.

Domain names given to -acme are checked here too: TLS-ALPN-01 and HTTP-01
can validate DNS names only, and no wildcard (RFC 8555 §7.1.3, §8).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from mtt.wire.nginx_pages import http_response

ACME_TLS_ALPN = b"acme-tls/1"
ACME_IDENTIFIER_OID = "1.3.6.1.5.5.7.1.31"
HTTP01_PREFIX = b"/.well-known/acme-challenge/"
_TOKEN = re.compile(rb"[A-Za-z0-9_-]{1,256}")  # base64url, RFC 8555 §8.1
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
MAX_DOMAIN = 253


def acme_identifier_value(key_authorization: str) -> bytes:
    """The acmeIdentifier extension's DER value: OCTET STRING (0x04), length 32,
    SHA-256 of the key authorization (RFC 8737 §3)."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    return b"\x04\x20" + digest


def offers_acme_alpn(alpn: tuple[bytes, ...]) -> bool:
    """RFC 8737 §3: a validation client offers acme-tls/1."""
    return ACME_TLS_ALPN in alpn


def http01_token(target: bytes) -> str | None:
    """The token a request target asks for, or None if it is not a well-formed
    HTTP-01 challenge path (no query, no further path segments)."""
    if not target.startswith(HTTP01_PREFIX):
        return None
    token = target[len(HTTP01_PREFIX) :]
    if not _TOKEN.fullmatch(token):
        return None
    return token.decode("ascii")


def http01_answer(target: bytes, answers: Mapping[str, str]) -> str | None:
    """The key authorization to send for a request target, if it is pending."""
    token = http01_token(target)
    return None if token is None else answers.get(token)


def http01_reply(head: bytes, answers: Mapping[str, str], date: str) -> tuple[int, bytes]:
    """(status, response) for a whole request head on the HTTP-01 listener:
    the key authorization for a pending token (GET or HEAD), nginx's 404 for
    anything else, its 400 for a head that is not an HTTP/1 request. Every
    response closes the connection."""
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
        return 400, http_response(400, date)
    method, target = parts[0], parts[1]
    head_only = method == b"HEAD"
    answer = http01_answer(target, answers) if method in (b"GET", b"HEAD") else None
    if answer is None:
        return 404, http_response(404, date, head_only=head_only)
    body = answer.encode("ascii")
    response = (
        "HTTP/1.1 200 OK\r\n"
        "Server: nginx\r\n"
        f"Date: {date}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return 200, response if head_only else response + body


def domain_problem(name: str) -> str | None:
    """Why name cannot be ordered with TLS-ALPN-01 or HTTP-01, or None."""
    if not name or len(name) > MAX_DOMAIN:
        return "must be a DNS name of 1 to 253 characters"
    if name.startswith("*."):
        return "wildcards need the DNS-01 challenge, which this server does not answer"
    if name != name.lower():
        return "must be lowercase"
    labels = name.split(".")
    if len(labels) < 2:
        return "must have at least two labels (a public CA issues no single-label names)"
    if not all(_LABEL.fullmatch(label) for label in labels):
        return "labels must be letters, digits and inner hyphens, 1 to 63 characters"
    if all(label.isdigit() for label in labels):
        return "IP addresses are not supported; give a DNS name"
    return None

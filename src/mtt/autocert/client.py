"""One ACME order, RFC 8555 §7.4, through certbot's `acme` library.

The library is synchronous (requests underneath): every function here
blocks, and manager.py runs each in a thread of its own, never on the event
loop. Every HTTP request is bounded by the network timeout given, every
poll by the order's deadline.

The library no longer carries TLS-ALPN-01 (it left in acme 4.0); its
challenge and response types are registered here the way the library's own
HTTP-01 is, so a "tls-alpn-01" challenge parses into something with a token
and a key authorization. Its certificate is made in transport/tls.py.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256, RS256, JWASignature
from josepy.jwk import JWK, JWKEC, JWKRSA

from mtt.errors import AcmeError, MttError

log = logging.getLogger("mtt.acme")

TLS_ALPN_01 = "tls-alpn-01"
HTTP_01 = "http-01"
USER_AGENT = "mtt-mu-server"


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The answer to a tls-alpn-01 challenge: an empty object (RFC 8555 §7.5.1)."""

    typ = TLS_ALPN_01


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """RFC 8737's challenge: a token, validated over TLS with ALPN acme-tls/1."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: JWK, **unused_kwargs: Any) -> str:
        return self.key_authorization(account_key)


@dataclass(frozen=True, slots=True)
class Challenge:
    """A challenge this server answers for one name of the order."""

    domain: str
    kind: str  # TLS_ALPN_01 or HTTP_01
    token: str
    key_authorization: str


@dataclass
class Pending:
    """An order waiting for its challenges to be answered."""

    order: messages.OrderResource
    key_pem: bytes  # the new certificate's key
    challenges: list[Challenge] = field(default_factory=list)
    bodies: list[messages.ChallengeBody] = field(default_factory=list)


class Account:
    """An ACME account at one CA, found or made from the kept account key."""

    def __init__(
        self,
        directory_url: str,
        account_key_pem: bytes,
        email: str,
        verify: str | bool,
        timeout: float,
    ) -> None:
        key = serialization.load_pem_private_key(account_key_pem, password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            self.key: JWK = JWKEC(key=key)
            alg: JWASignature = ES256
        else:
            self.key = JWKRSA(key=key)
            alg = RS256
        # The library hands verify_ssl to requests as verify=, which takes a CA
        # bundle's path too, though the hint says bool (docs/dependencies.md).
        self.net = client.ClientNetwork(
            self.key,
            alg=alg,
            verify_ssl=cast(bool, verify),
            user_agent=USER_AGENT,
            timeout=int(timeout),
        )
        self.directory_url = directory_url
        self.email = email
        self.acme: client.ClientV2 | None = None
        self.uri = ""

    def open(self) -> str:
        """Fetch the directory and register (or find) the account: its URI."""
        directory = client.ClientV2.get_directory(self.directory_url, self.net)
        self.acme = client.ClientV2(directory, self.net)
        registration = messages.NewRegistration.from_data(
            email=self.email or None, terms_of_service_agreed=True
        )
        try:
            self.uri = self.acme.new_account(registration).uri
        except errors.ConflictError as exc:  # the key already has an account: use it
            self.uri = str(exc.location)
            self.net.account = messages.RegistrationResource(
                uri=self.uri, body=messages.Registration()
            )
        return self.uri

    def new_order(self, domains: tuple[str, ...], prefer: tuple[str, ...]) -> Pending:
        """Ask for a certificate for domains; the challenges to answer, of the
        first kind in `prefer` the CA offers for each name."""
        assert self.acme is not None
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        order = self.acme.new_order(crypto_util.make_csr(key_pem, list(domains)))
        pending = Pending(order, key_pem)
        for authz in order.authorizations:
            body = authz.body
            domain = str(body.identifier.value)
            if body.status == messages.STATUS_VALID:
                log.info("ACME: %s: already authorized at the CA, no challenge needed", domain)
                continue
            offered = {getattr(c.chall, "typ", ""): c for c in body.challenges}
            kind = next((k for k in prefer if k in offered), None)
            if kind is None:
                names = ", ".join(sorted(k for k in offered if k)) or "none"
                raise AcmeError(
                    f"{domain}: the CA offers no challenge this server answers"
                    f" (wanted {' or '.join(prefer)}, offered {names})"
                )
            chall = offered[kind]
            assert isinstance(chall.chall, challenges.KeyAuthorizationChallenge)
            pending.bodies.append(chall)
            pending.challenges.append(
                Challenge(
                    domain,
                    kind,
                    chall.chall.encode("token"),
                    chall.chall.key_authorization(self.key),
                )
            )
        return pending

    def finish(self, pending: Pending, within: float) -> str:
        """Tell the CA the challenges are ready, wait for the validations and
        the certificate: the PEM chain."""
        assert self.acme is not None
        for body in pending.bodies:
            assert isinstance(body.chall, challenges.KeyAuthorizationChallenge)
            self.acme.answer_challenge(body, body.chall.response(self.key))
        # The library compares with naive local time.
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=within)
        done = self.acme.poll_and_finalize(pending.order, deadline)
        return str(done.fullchain_pem)


def describe(exc: BaseException, within: float) -> str:
    """One line saying why an order failed."""
    if isinstance(exc, MttError):  # ours: AcmeError, a ConfigError of the state directory
        return str(exc)
    if isinstance(exc, errors.ValidationError):
        parts = []
        for authzr in exc.failed_authzrs:
            for chall in authzr.body.challenges:
                if chall.error is not None:
                    typ = getattr(chall.chall, "typ", "?")
                    parts.append(
                        f"{authzr.body.identifier.value}: {typ} failed: {_problem(chall.error)}"
                    )
        return "; ".join(parts) or "validation failed"
    if isinstance(exc, errors.TimeoutError):
        return f"the CA did not validate and issue within {within:.0f} s"
    if isinstance(exc, errors.IssuanceError):
        return f"the CA refused to issue: {_problem(exc.error)}"
    if isinstance(exc, messages.Error):
        return f"the CA answered: {_problem(exc)}"
    if isinstance(exc, TimeoutError):  # our own bound on a call (manager.in_thread)
        return "the CA did not answer in time"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS to the CA failed (-acme-ca-bundle for a private CA): {_first_line(exc)}"
    if isinstance(exc, requests.exceptions.RequestException):
        return f"cannot reach the CA: {_first_line(exc)}"
    if isinstance(exc, errors.Error):
        return f"ACME error: {_first_line(exc)}"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _problem(error: messages.Error) -> str:
    """An RFC 7807 problem document in one line: its type's last part and detail."""
    typ = str(error.typ or "").rsplit(":", 1)[-1]
    detail = error.detail or error.title or ""
    return f"{typ}: {detail}" if typ and detail else typ or detail or str(error)


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:500]

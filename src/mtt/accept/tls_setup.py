"""Which TLS the tunnel listener serves, decided once by the supervisor and
handed to every worker as PEM text, so all present the same certificate;
with it go the session ticket keys, made once per run, so a client resumes
its session on whichever worker its next connection reaches, as it does
with nginx's workers."""

from __future__ import annotations

import functools
import logging
import secrets
import ssl

from mtt.config import ServerConfig
from mtt.transport import libssl
from mtt.transport.tls import context_from_pem, random_host_name, read_pem_files, self_signed_pem

log = logging.getLogger("mtt.server")

TlsSpec = dict[str, str]
TICKET_KEYS = "ticket_keys"  # the spec's entry for them, hex


def new_ticket_keys() -> str:
    """Fresh session ticket keys, hex, for every process of this run."""
    return secrets.token_hex(libssl.TICKET_KEYS_SIZE)


def with_ticket_keys(spec: TlsSpec, keys: str) -> TlsSpec:
    """The spec with this run's ticket keys (certificate reloads keep them)."""
    return {**spec, TICKET_KEYS: keys}


def resolve_tls(config: ServerConfig) -> tuple[TlsSpec | None, str]:
    """(PEM material or None for plain HTTP, a description for the start-up line)."""
    if config.disable_tls:
        return None, "plain HTTP"
    if config.cert:
        cert, key = read_pem_files(config.cert, config.key)
        spec = {
            "cert_pem": cert.decode("latin-1"),
            "key_pem": key.decode("latin-1"),
            "origin": f"certificate {config.cert} with key {config.key}",
        }
        tls_context(spec)  # fail at start, with the file names, not in a worker
        return spec, f"TLS with {config.cert}"
    if config.acme_domains:  # until the CA issues one (autocert/manager.py)
        name = config.acme_domains[0]
        cert, key = self_signed_pem(name)
        origin = "self-signed, until the ACME certificate is issued"
        spec = {"cert_pem": cert.decode(), "key_pem": key.decode(), "origin": origin}
        return spec, f"TLS with a self-signed certificate for {name} until ACME issues one"
    if config.force_tls:
        name = config.server_name or random_host_name()
        cert, key = self_signed_pem(name)
        log.warning("using a self-signed certificate for %s: clients need -sv", name)
        spec = {"cert_pem": cert.decode(), "key_pem": key.decode(), "origin": "self-signed"}
        return spec, f"TLS with a self-signed certificate for {name}"
    return None, "plain HTTP (put a TLS reverse proxy in front)"


def tls_context(spec: TlsSpec | None) -> ssl.SSLContext | None:
    """The listener's context; with the spec's ticket keys when it has them
    (where libssl cannot be reached, OpenSSL's own keys, logged once)."""
    if spec is None:
        return None
    ctx = context_from_pem(
        spec["cert_pem"].encode("latin-1"), spec["key_pem"].encode("latin-1"), spec["origin"]
    )
    keys = spec.get(TICKET_KEYS)
    if keys is not None:
        try:
            libssl.set_ticket_keys(ctx, bytes.fromhex(keys))
        except (OSError, ValueError) as exc:
            _warn_keys_once(str(exc))
    return ctx


@functools.cache
def _warn_keys_once(problem: str) -> None:
    log.warning("TLS: sessions resume only on the worker that issued them: %s", problem)

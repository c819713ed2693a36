"""What nginx sets on its SSL_CTX and Python's ssl module has no API for,
reached through ctypes in the very libssl the ssl module is linked to.

nginx (ngx_ssl_create, ngx_ssl_session_cache, ngx_http_ssl_module) differs
from Python's defaults in ways a client can see:

- a servername callback that accepts every name, so OpenSSL acknowledges
  SNI with an empty server_name extension (Python's sni_callback cannot be
  used: its C callback expects the Python SSL object that aiofastnet's
  connections do not have);
- an ALPN callback choosing from http/1.1, http/1.0, http/0.9 and refusing
  the handshake (alert no_application_protocol) when none is offered, where
  Python's just leaves ALPN out;
- a session timeout of 300 s (ssl_session_timeout 5m, the caller's
  Limits.tls_session_timeout), which is also the lifetime hint of session
  tickets; OpenSSL's default is 7200 s;
- the session cache mode of `ssl_session_cache none` (sessions announced,
  none stored) and SSL_MODE_NO_AUTO_CHAIN;
- OpenSSL's default security level (Python's cipher string pins level 2);
- one session ticket key for every process serving the port: nginx makes
  its SSL_CTX in the master, before the workers fork, so a ticket one
  worker issued resumes on any other (set_ticket_keys()).

The SSL_CTX pointer is read from the SSLContext object the way aiofastnet
itself does (it drives every connection through it), and checked against the
context's options before anything is written. Where libssl cannot be
reached (a Python linked statically against OpenSSL), apply() reports what
it could not set and the caller keeps Python's behaviour for those.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import logging
import ssl
from typing import Any

log = logging.getLogger("mtt.server")

NGINX_ALPN = b"\x08http/1.1\x08http/1.0\x08http/0.9"  # NGX_HTTP_ALPN_PROTOS, without h2

# openssl/ssl.h
_SSL_CTRL_MODE = 33
_SSL_CTRL_SET_SESS_CACHE_SIZE = 42
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_CTRL_SET_TLSEXT_SERVERNAME_CB = 53
_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
TICKET_KEYS_SIZE = 80  # key name 16, HMAC secret 32, AES key 32 (OpenSSL >= 1.1.0)
_SSL_MODE_NO_AUTO_CHAIN = 0x8
_SSL_SESS_CACHE_SERVER = 0x2
_SSL_SESS_CACHE_NO_AUTO_CLEAR = 0x80
_SSL_SESS_CACHE_NO_INTERNAL_STORE = 0x200
_SSL_TLSEXT_ERR_OK = 0
_SSL_TLSEXT_ERR_ALERT_FATAL = 2
_OPENSSL_NPN_NEGOTIATED = 1

_SERVERNAME_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_ALPN_CB = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # SSL *
    ctypes.c_void_p,  # const unsigned char **out
    ctypes.c_void_p,  # unsigned char *outlen
    ctypes.c_void_p,  # const unsigned char *in
    ctypes.c_uint,  # inlen
    ctypes.c_void_p,  # arg
)


@functools.cache
def _libssl() -> Any:
    """libssl's functions, looked up through the _ssl extension (dlsym on a
    library handle also searches the libraries it depends on)."""
    lib = ctypes.CDLL(_ssl.__file__)
    vp, c_long, c_int, c_uint = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_uint
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "TLS_server_method": (vp, []),
        "SSL_CTX_new": (vp, [vp]),
        "SSL_CTX_free": (None, [vp]),
        "SSL_CTX_get_options": (ctypes.c_uint64, [vp]),
        "SSL_CTX_ctrl": (c_long, [vp, c_int, c_long, vp]),
        "SSL_CTX_callback_ctrl": (c_long, [vp, c_int, vp]),
        "SSL_CTX_set_timeout": (c_long, [vp, c_long]),
        "SSL_CTX_get_timeout": (c_long, [vp]),
        "SSL_CTX_get_security_level": (c_int, [vp]),
        "SSL_CTX_set_security_level": (None, [vp, c_int]),
        "SSL_CTX_set_alpn_select_cb": (None, [vp, vp, vp]),
        "SSL_select_next_proto": (c_int, [vp, vp, ctypes.c_char_p, c_uint, vp, c_uint]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    return lib


def _accept_any_name(ssl_conn: int | None, alert: int | None, arg: int | None) -> int:
    """nginx's servername callback: any name (or none) is accepted."""
    return _SSL_TLSEXT_ERR_OK


_NGINX_ALPN_BUFFER = ctypes.create_string_buffer(NGINX_ALPN, len(NGINX_ALPN))


def _select_like_nginx(  # noqa: PLR0917 (OpenSSL's callback signature)
    ssl_conn: int | None,
    out: int | None,
    outlen: int | None,
    offered: int | None,
    offered_len: int,
    arg: int | None,
) -> int:
    """nginx's ALPN callback: the first of its protocols the client offers,
    or a fatal alert (no_application_protocol) if it offers none of them."""
    try:
        chosen = _libssl().SSL_select_next_proto(
            out, outlen, _NGINX_ALPN_BUFFER, len(NGINX_ALPN), offered, offered_len
        )
    except Exception:  # never let an exception cross into OpenSSL
        return _SSL_TLSEXT_ERR_ALERT_FATAL
    return _SSL_TLSEXT_ERR_OK if chosen == _OPENSSL_NPN_NEGOTIATED else _SSL_TLSEXT_ERR_ALERT_FATAL


# Kept for the life of the process: OpenSSL holds raw pointers to them.
_SERVERNAME_CALLBACK = _SERVERNAME_CB(_accept_any_name)
_ALPN_CALLBACK = _ALPN_CB(_select_like_nginx)


def ssl_ctx_pointer(ctx: ssl.SSLContext) -> int:
    """The SSL_CTX * inside an SSLContext (CPython's PySSLContext starts with
    PyObject_HEAD and then that pointer), checked against its options."""
    address = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not address or _libssl().SSL_CTX_get_options(address) != int(ctx.options):
        raise OSError("the SSLContext layout is not the expected one")
    return address


@functools.cache
def _fresh_defaults() -> tuple[int, int]:
    """(options, security level) of a fresh SSL_CTX from this OpenSSL and its
    configuration: what nginx starts from."""
    lib = _libssl()
    fresh = lib.SSL_CTX_new(lib.TLS_server_method())
    if not fresh:
        raise OSError("SSL_CTX_new failed")
    try:
        return int(lib.SSL_CTX_get_options(fresh)), int(lib.SSL_CTX_get_security_level(fresh))
    finally:
        lib.SSL_CTX_free(fresh)


def default_options() -> int:
    """The options OpenSSL gives a new SSL_CTX (nginx adds its own to them)."""
    return _fresh_defaults()[0]


def default_security_level() -> int:
    """The security level of a new SSL_CTX: nginx sets none, so runs at it."""
    return _fresh_defaults()[1]


def apply(ctx: ssl.SSLContext, session_timeout: int) -> str | None:
    """Set nginx's session timeout (session_timeout seconds), session cache
    mode, SNI and ALPN callbacks and security level on ctx; None if all of
    them are set, or why they are not (then ctx keeps Python's behaviour for
    them)."""
    try:
        lib = _libssl()
        pointer = ssl_ctx_pointer(ctx)
        level = default_security_level()
    except (OSError, AttributeError, ImportError) as exc:
        return f"libssl not reachable: {exc}"
    lib.SSL_CTX_set_timeout(pointer, session_timeout)
    cache_mode = (
        _SSL_SESS_CACHE_SERVER | _SSL_SESS_CACHE_NO_AUTO_CLEAR | _SSL_SESS_CACHE_NO_INTERNAL_STORE
    )
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, cache_mode, None)
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_SIZE, 1, None)
    lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, None)
    lib.SSL_CTX_set_security_level(pointer, level)
    servername = ctypes.cast(_SERVERNAME_CALLBACK, ctypes.c_void_p)
    lib.SSL_CTX_callback_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_SERVERNAME_CB, servername)
    lib.SSL_CTX_set_alpn_select_cb(pointer, ctypes.cast(_ALPN_CALLBACK, ctypes.c_void_p), None)
    if lib.SSL_CTX_get_timeout(pointer) != session_timeout:
        return "SSL_CTX_set_timeout did not take"
    return None


def session_timeout(ctx: ssl.SSLContext) -> int:
    """The context's session timeout in seconds (for tests and checks)."""
    return int(_libssl().SSL_CTX_get_timeout(ssl_ctx_pointer(ctx)))


def session_cache_mode(ctx: ssl.SSLContext) -> int:
    return int(_libssl().SSL_CTX_ctrl(ssl_ctx_pointer(ctx), _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None))


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> None:
    """Encrypt and check session tickets with `keys` (TICKET_KEYS_SIZE bytes)
    instead of the random ones OpenSSL gave this context; OSError if libssl
    cannot be reached or refuses them."""
    if len(keys) != TICKET_KEYS_SIZE:
        raise ValueError(f"session ticket keys are {TICKET_KEYS_SIZE} bytes, not {len(keys)}")
    buffer = ctypes.create_string_buffer(keys, len(keys))
    try:
        lib, pointer = _libssl(), ssl_ctx_pointer(ctx)
    except (AttributeError, ImportError) as exc:
        raise OSError(f"libssl not reachable: {exc}") from None
    if lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(keys), buffer) != 1:
        raise OSError("SSL_CTX_set_tlsext_ticket_keys failed")


def ticket_keys(ctx: ssl.SSLContext) -> bytes:
    """The context's session ticket keys (for tests and checks)."""
    buffer = ctypes.create_string_buffer(TICKET_KEYS_SIZE)
    pointer = ssl_ctx_pointer(ctx)
    if (
        _libssl().SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, TICKET_KEYS_SIZE, buffer)
        != 1
    ):
        raise OSError("SSL_CTX_get_tlsext_ticket_keys failed")
    return buffer.raw

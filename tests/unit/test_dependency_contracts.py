"""What mtt assumes of its dependencies beyond their documented API, without a loop.

Each test checks one assumption one of our modules makes of a private name, an
undocumented module or a C layout (docs/dependencies.md lists them all); an
upgrade that breaks it fails here with a message naming the module that relies
on it. The ones that need a loop or a socket are in
tests/integration/test_dependency_contracts.py.
"""

from __future__ import annotations

import ctypes
import inspect
import ssl

import pytest

from mtt.config import Limits


def relied_on_by(module: str, what: str) -> str:
    return f"{module} relies on {what}; see docs/dependencies.md"


# --- acme (certbot's library) ---------------------------------------------------


def test_acme_client_network_hands_verify_ssl_to_requests_as_verify() -> None:
    from acme import client
    from cryptography.hazmat.primitives.asymmetric import ec
    from josepy.jwa import ES256
    from josepy.jwk import JWKEC

    why = relied_on_by(
        "mtt.autocert.client.Account",
        "ClientNetwork passing verify_ssl (a CA bundle's path for -acme-ca-bundle) to "
        "requests as verify=",
    )
    net = client.ClientNetwork(
        JWKEC(key=ec.generate_private_key(ec.SECP256R1())),
        alg=ES256,
        verify_ssl="/etc/ca.pem",  # type: ignore[arg-type]
        timeout=7,
    )
    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def request(method: str, url: str, **kwargs: object) -> None:
        seen.update(kwargs)
        raise Stop

    net.session.request = request  # type: ignore[assignment,method-assign]
    with pytest.raises(Stop):
        net.get("https://ca.example/dir")
    assert seen["verify"] == "/etc/ca.pem", why
    assert seen["timeout"] == 7, why


def test_acme_parses_tls_alpn_01_through_the_registered_type() -> None:
    from acme import messages

    from mtt.autocert.client import TLSALPN01, TLSALPN01Response

    why = relied_on_by(
        "mtt.autocert.client",
        "acme's Challenge/ChallengeResponse registries (TLS-ALPN-01 left the library in 4.0)",
    )
    body = messages.ChallengeBody.from_json(
        {
            "type": "tls-alpn-01",
            "url": "https://ca.example/chall/1",
            "status": "pending",
            "token": "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA",
        }
    )
    assert isinstance(body.chall, TLSALPN01), why
    response = TLSALPN01Response(key_authorization="t.k")
    assert response.to_partial_json() == {}, why  # RFC 8555 §7.5.1: an empty object


# --- aiofastnet ---------------------------------------------------------------


def test_aiofastnet_bio_and_timeout_defaults_have_the_keys_first_bytes_reads() -> None:
    from aiofastnet import constants

    why = relied_on_by(
        "mtt.accept.first_bytes", "aiofastnet.constants.SSL_*_DEFAULTS (the sizes start_tls uses)"
    )
    assert constants.SSL_TIMEOUT_DEFAULTS["ssl_shutdown_timeout"] > 0, why
    assert constants.SSL_BIO_SIZE_DEFAULTS["ssl_incoming_bio_size"] > 0, why
    assert constants.SSL_BIO_SIZE_DEFAULTS["ssl_outgoing_bio_size"] > 0, why


def test_aiofastnet_tls_over_a_transport_class_has_the_hooks_first_bytes_uses() -> None:
    from aiofastnet.ssl_transport import SSLTransport_Transport

    why = relied_on_by(
        "mtt.accept.first_bytes._AlertingTLS",
        "aiofastnet.ssl_transport.SSLTransport_Transport (_force_close, get_tls_protocol)",
    )
    assert callable(getattr(SSLTransport_Transport, "_force_close", None)), why
    assert callable(getattr(SSLTransport_Transport, "get_tls_protocol", None)), why
    # Our subclass (defined at import) can add slots to the Cython class.
    from mtt.accept.first_bytes import _AlertingTLS

    assert issubclass(_AlertingTLS, SSLTransport_Transport), why


def test_aiofastnet_tls_transports_report_their_local_buffer() -> None:
    from aiofastnet.ssl_transport import SSLTransport_Socket, SSLTransport_Transport

    why = relied_on_by(
        "mtt.transport.delivery.transport_buffered",
        "get_local_write_buffer_size() on aiofastnet's TLS transports (the ciphertext not yet sent)",
    )
    for cls in (SSLTransport_Socket, SSLTransport_Transport):
        assert callable(getattr(cls, "get_local_write_buffer_size", None)), (cls, why)


# --- picows -------------------------------------------------------------------


def test_picows_protocol_class_is_importable_and_buffered() -> None:
    from picows.picows import WSProtocol  # type: ignore[attr-defined]

    why = relied_on_by(
        "mtt.accept.tunnel_server (WSProtocol, _UnixWSProtocol) and mtt.accept.front._hand_over",
        "picows.picows.WSProtocol, a buffered protocol built per connection",
    )
    for name in ("connection_made", "get_buffer", "buffer_updated", "connection_lost"):
        assert callable(getattr(WSProtocol, name, None)), (name, why)


# --- aiohttp ------------------------------------------------------------------


def test_aiohttp_request_handler_error_hook_keeps_its_signature() -> None:
    from aiohttp import web

    why = relied_on_by(
        "mtt.controller.http._ControllerHandler.handle_error",
        "RequestHandler.handle_error(request, status, exc, message), the one hook for parser errors",
    )
    params = list(inspect.signature(web.RequestHandler.handle_error).parameters)
    assert params == ["self", "request", "status", "exc", "message"], why
    for name in ("connection_made", "connection_lost", "data_received", "force_close"):
        assert callable(getattr(web.RequestHandler, name, None)), (name, why)


def test_aiohttp_server_and_runner_keep_the_members_the_controller_copies() -> None:
    from aiohttp import web

    why = relied_on_by(
        "mtt.controller.http._ControllerRunner/_ControllerServer",
        "AppRunner._make_server and web.Server(request_handler, request_factory=, "
        "handler_cancellation=, loop=, **kwargs) with ._loop and ._kwargs",
    )
    assert inspect.iscoroutinefunction(web.AppRunner._make_server), why
    params = inspect.signature(web.Server.__init__).parameters
    for name in ("handler", "request_factory", "handler_cancellation", "loop", "kwargs"):
        assert name in params, (name, why)
    # The members themselves are read off a live server in the integration test.


# --- CPython's ssl module and libssl, through ctypes ----------------------------

_SSL_CTRL_GET_SESS_CACHE_SIZE = 43  # openssl/ssl.h


@pytest.fixture
def fresh_ctx() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


def test_the_ssl_ctx_pointer_is_where_libssl_py_reads_it(fresh_ctx: ssl.SSLContext) -> None:
    from mtt.transport import libssl

    why = relied_on_by(
        "mtt.transport.libssl.ssl_ctx_pointer",
        "CPython's PySSLContext layout (SSL_CTX * right after PyObject_HEAD)",
    )
    pointer = libssl.ssl_ctx_pointer(fresh_ctx)  # raises OSError when the layout moved
    fresh_ctx.options |= ssl.OP_NO_TICKET  # the pointer is to this very context
    assert libssl._libssl().SSL_CTX_get_options(pointer) == int(fresh_ctx.options), why


def test_libssl_is_reachable_through_the_ssl_extension() -> None:
    import _ssl

    why = relied_on_by("mtt.transport.libssl._libssl", "dlsym through _ssl.__file__")
    lib = ctypes.CDLL(_ssl.__file__)
    for name in ("SSL_CTX_ctrl", "SSL_CTX_callback_ctrl", "SSL_CTX_set_alpn_select_cb"):
        assert hasattr(lib, name), (name, why)


def test_openssl_ctrl_numbers_do_what_libssl_py_means(fresh_ctx: ssl.SSLContext) -> None:
    from mtt.transport import libssl

    why = relied_on_by("mtt.transport.libssl.apply", "the SSL_CTRL_* numbers of openssl/ssl.h")
    session_timeout = Limits().tls_session_timeout
    assert libssl.apply(fresh_ctx, session_timeout) is None, why
    lib, pointer = libssl._libssl(), libssl.ssl_ctx_pointer(fresh_ctx)
    assert libssl.session_timeout(fresh_ctx) == session_timeout, why
    expected_cache = (
        libssl._SSL_SESS_CACHE_SERVER
        | libssl._SSL_SESS_CACHE_NO_AUTO_CLEAR
        | libssl._SSL_SESS_CACHE_NO_INTERNAL_STORE
    )
    assert libssl.session_cache_mode(fresh_ctx) == expected_cache, why
    assert lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None) == 1, why
    mode = lib.SSL_CTX_ctrl(pointer, libssl._SSL_CTRL_MODE, 0, None)  # SSL_CTX_get_mode
    assert mode & libssl._SSL_MODE_NO_AUTO_CHAIN, why
    assert lib.SSL_CTX_get_security_level(pointer) == libssl.default_security_level(), why


# --- glibc, through ctypes -----------------------------------------------------


def test_mallinfo2_fields_are_in_glibcs_order() -> None:
    from mtt.workers.heap import Heap

    heap = Heap.load()
    if heap is None:
        pytest.skip("not glibc 2.33+: heap.py is a no-op here")
    why = relied_on_by("mtt.workers.heap.Heap.usage", "struct mallinfo2's field order")
    in_use_before, _ = heap.usage()
    blocks = [bytearray(16 * 1024) for _ in range(512)]  # 8 MiB, below the mmap threshold
    in_use_after, _ = heap.usage()
    assert in_use_after - in_use_before >= 6 << 20, why
    del blocks
    in_use_freed, free = heap.usage()
    assert in_use_freed < in_use_after and free >= 0, why
    heap.trim()  # malloc_trim(0) takes a size_t and returns

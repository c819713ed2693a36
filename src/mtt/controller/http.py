"""The controller's HTTP face: POST a JSON command, get a JSON reply.

Status codes say what went wrong (405, 413, 400) while the body keeps the
original reply shape, so panels written for the Go server, which read only
`res` and `current_users`, keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.resources
import ipaddress
import json
import logging
import os
import resource
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from prometheus_client import CONTENT_TYPE_LATEST

from mtt.address import format_hostport
from mtt.config import Limits
from mtt.controller.health import Readiness
from mtt.controller.metrics import render_metrics
from mtt.controller.replies import error_reply, result_reply
from mtt.core.commands import CHANGES, Opt, parse_command
from mtt.core.policy import DstPolicy
from mtt.errors import ConfigError, ControlError, StoreError
from mtt.service.gc_pause import PAUSE
from mtt.service.results import HarvestRefused
from mtt.service.user_service import UserService
from mtt.transport.listen import split_host_port

log = logging.getLogger("mtt.controller")

_SERVICE: web.AppKey[UserService] = web.AppKey("service")
# Logged at info: what changes the table, closes tunnels or moves counters.
_LOGGED = CHANGES | {Opt.KICK, Opt.HARVEST, Opt.ACK}
TOKEN_ENV = "MTT_CONTROLLER_TOKEN"
_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """How the controller guards itself; its bounds are Limits.max_control_body
    and Limits.controller_*, read from the one Limits, never copied."""

    token: str = ""
    policy: DstPolicy = field(default_factory=DstPolicy)
    metrics_per_user: bool = False
    limits: Limits = field(default_factory=Limits)


_SETTINGS: web.AppKey[ControllerSettings] = web.AppKey("settings", ControllerSettings)
_READINESS: web.AppKey[Readiness] = web.AppKey("readiness", Readiness)


def is_loopback_only(address: str) -> bool:
    """True for a Unix socket path or a host:port bound to loopback only."""
    if "/" in address:
        return True
    host, _ = split_host_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (every address) or a host name


def check_exposure(address: str, token: str, insecure: bool) -> None:
    """Refuse an open controller reachable from the network (it can route tunnels anywhere)."""
    if token or insecure or is_loopback_only(address):
        return
    raise ConfigError(
        f"the controller on {address} is reachable from the network without a token: "
        f"add -c-token TOKEN (or set {TOKEN_ENV}), or -c-insecure to accept the risk"
    )


def _authorized(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
    )


async def _read_capped(request: web.Request, cap: int) -> bytes | None:
    """The body, or None when it is larger than cap; never buffers more than cap."""
    if request.content_length is not None and request.content_length > cap:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)


async def _reply_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send response, then close at once.

    aiohttp would otherwise keep reading the rest of an unread body for its
    lingering time (10 s) before closing: not for a body already too late.
    """
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


async def _handle(request: web.Request) -> web.Response:
    service = request.app[_SERVICE]
    settings = request.app[_SETTINGS]
    peer = request.remote or "unix"
    if settings.token and not _authorized(request, settings.token):
        log.warning("controller: %s: missing or wrong bearer token", peer)
        response = _json(401, error_reply(service, "missing or wrong bearer token"))
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    if request.method != "POST":
        log.warning("controller: %s: method %s not allowed", peer, request.method)
        response = _json(
            405, error_reply(service, f"method {request.method} not allowed, use POST")
        )
        response.headers["Allow"] = "POST"
        return response
    cap = settings.limits.max_control_body
    try:  # a peer trickling or stalling its body must not hold the connection
        async with asyncio.timeout(settings.limits.controller_body_timeout):
            body = await _read_capped(request, cap)
    except TimeoutError:
        log.warning(
            "controller: %s: body not complete within %g s, closed",
            peer,
            settings.limits.controller_body_timeout,
        )
        late = f"body not complete within {settings.limits.controller_body_timeout:g} s"
        return await _reply_and_close(request, _json(408, error_reply(service, late)))
    if body is None:
        log.warning("controller: %s: body larger than %d bytes", peer, cap)
        return _json(413, error_reply(service, f"body larger than {cap} bytes"))
    with PAUSE.paused():  # a bulk add makes 200,000 objects, none of them cyclic garbage
        try:
            command = parse_command(
                body,
                settings.policy,
                max_path=settings.limits.max_user_path,
                harvest=settings.limits.harvest,
            )
        except ControlError as exc:
            log.warning("controller: %s: rejected: %s", peer, exc)
            return _json(400, error_reply(service, str(exc)))
        try:
            result = await service.execute(command)
            # 409: a harvest under another id is pending, or this id was acknowledged.
            status = 409 if isinstance(result, HarvestRefused) else 200
            answer = result_reply(result)
        except StoreError as exc:
            if command.opt in _LOGGED:
                log.error("controller: %s: opt %d not applied: %s", peer, command.opt, exc)
            status, answer = 503, error_reply(service, f"user store unavailable: {exc}")
        if status == 409:
            log.warning(
                "controller: %s: opt %d refused: %s", peer, command.opt, answer["err_string"]
            )
        log.log(
            logging.INFO if command.opt in _LOGGED else logging.DEBUG,
            "controller: %s: opt %d: res %d, %d users, revision %d",
            peer,
            command.opt,
            answer["res"],
            answer["current_users"],
            answer["revision"],
        )
        # Sent while the pause holds: the collection it put off (the objects of a
        # whole bulk add, some 20 ms) runs after the reply is out, not before it.
        response = _json(status, answer)
        await response.prepare(request)
        await response.write_eof()
    return response


def _openapi_document() -> bytes:
    """The OpenAPI 3.1 description of this API, shipped inside the package."""
    return importlib.resources.files("mtt.controller").joinpath("openapi.json").read_bytes()


def _unauthorized(request: web.Request) -> web.Response | None:
    """The 401 reply when a token is set and the request lacks it, else None."""
    settings = request.app[_SETTINGS]
    if not settings.token or _authorized(request, settings.token):
        return None
    log.warning("controller: %s: missing or wrong bearer token", request.remote or "unix")
    service = request.app[_SERVICE]
    response = _json(401, error_reply(service, "missing or wrong bearer token"))
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def _openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: guarded by the token like every other answer."""
    refusal = _unauthorized(request)
    if refusal is not None:
        return refusal
    return web.Response(body=_openapi_document(), content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format, behind the token when one is set."""
    refusal = _unauthorized(request)
    if refusal is not None:
        return refusal
    settings = request.app[_SETTINGS]
    body = await render_metrics(request.app[_SERVICE], settings.metrics_per_user)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    """GET /healthz: the event loop answers. No token (mtt.controller.health)."""
    response = _json(200, {"status": "ok"})
    response.headers["Cache-Control"] = "no-store"
    return response


async def _readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when ready, else 503 with generic reasons. No token."""
    status, body = request.app[_READINESS].answer()
    response = _json(status, body)
    response.headers["Cache-Control"] = "no-store"
    return response


_ErrorReply = Callable[[int, str], web.Response]


def connection_cap(wanted: int) -> int:
    """wanted, lowered to 1/Limits.controller_fd_share of this process's descriptor limit.

    Read as the controller starts (after any raise of the soft limit): a flood
    of controller connections then leaves the tunnel listener, which shares
    the process with -workers 1, the descriptors it needs to accept.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft // _LIMITS.controller_fd_share))


def _peer_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unix"


class _ConnectionCap:
    """Counts open controller connections and refuses those past the cap.

    A flood is one warning, then at most one per Limits.controller_refusal_log_interval with the
    number refused meanwhile, never a line per connection.
    """

    __slots__ = ("_next_log", "_refused", "cap", "open")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0
        self._refused = 0
        self._next_log = 0.0

    def admit(self, peer: str) -> bool:
        if self.open < self.cap:
            self.open += 1
            return True
        self._refused += 1
        now = time.monotonic()
        if now >= self._next_log:
            log.warning(
                "controller: %d connections open (the cap): refusing new ones, "
                "%d since the last such line, the latest from %s",
                self.cap,
                self._refused,
                peer,
            )
            self._refused = 0
            self._next_log = now + _LIMITS.controller_refusal_log_interval
        return False

    def release(self) -> None:
        self.open -= 1


class _ControllerHandler(web.RequestHandler):
    """One controller connection: the cap, a deadline for the first head, JSON errors.

    aiohttp bounds only the wait for a request head after a reply (and from the
    connect: keepalive_timeout), so a peer sending nothing or a head byte by
    byte keeps its connection that long; the head timer, armed at connect and
    cancelled when the first head is parsed, bounds that on its own.

    A request its parser refuses (a lying Content-Length, broken chunking, a
    bad request line) never reaches a route or a middleware: aiohttp answers it
    from RequestHandler.handle_error with a text/plain page and logs a
    traceback. That method is the only hook, hence this subclass.
    """

    __slots__ = (
        "_admitted",
        "_cap",
        "_error_reply",
        "_head_bytes",
        "_head_timeout",
        "_head_timer",
        "_peer",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        error_reply: _ErrorReply,
        cap: _ConnectionCap,
        head_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._error_reply = error_reply
        self._cap = cap
        self._admitted = False
        self._peer = "unix"
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._peer = _peer_of(transport)
        if not self._cap.admit(self._peer):
            body = self._error_reply(
                503, f"more than {self._cap.cap} controller connections open, try again later"
            ).body
            assert isinstance(body, bytes)
            cast(asyncio.Transport, transport).write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._head_timer = self._loop.call_later(self._head_timeout, self._head_expired)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return  # refused in connection_made: aiohttp never saw it
        self._admitted = False
        self._cap.release()
        self.head_parsed()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)

    def head_parsed(self) -> None:
        """The first request head is complete: the head deadline no longer applies."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        log.warning(
            "controller: %s: no complete request head within %g s (%d bytes received), closed",
            self._peer,
            self._head_timeout,
            self._head_bytes,
        )
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        peer = request.remote or "unix"
        if isinstance(exc, ConnectionError):  # the body was cut short: nobody to answer
            log.debug("controller: %s: connection lost mid-request: %r", peer, exc)
            text = "connection lost"
        elif status == 500:
            log.error("controller: %s: internal error", peer, exc_info=exc)
            text = "internal error"
        else:
            detail = message or (exc.message if isinstance(exc, HttpProcessingError) else "")
            first = (detail or "").splitlines()[0].strip().rstrip(":") if detail else ""
            text = f"malformed HTTP request: {first or status}"
            log.warning("controller: %s: %s", peer, text)
        if request.writer.output_size > 0:
            raise ConnectionError("a reply was already being sent")
        response = self._error_reply(status, text)
        response.force_close()
        return response


class _ControllerServer(web.Server):
    """Builds _ControllerHandler connections instead of aiohttp's own.

    Its request factory tells the connection its head is parsed: the one point
    aiohttp exposes between a complete head and the handler.
    """

    def __init__(
        self,
        *args: Any,
        error_reply: _ErrorReply,
        cap: _ConnectionCap,
        head_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._error_reply = error_reply
        self._cap = cap
        self._head_timeout = head_timeout
        build_request = self.request_factory

        def request_factory(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: web.RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            if isinstance(protocol, _ControllerHandler):
                protocol.head_parsed()
            return build_request(message, payload, protocol, writer, task)

        self.request_factory = request_factory

    def __call__(self) -> web.RequestHandler:
        return _ControllerHandler(
            self,
            loop=self._loop,
            error_reply=self._error_reply,
            cap=self._cap,
            head_timeout=self._head_timeout,
            **self._kwargs,
        )


class _ControllerRunner(web.AppRunner):
    """An AppRunner whose server is a _ControllerServer (same app, same settings)."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        service = self.app[_SERVICE]
        settings = self.app[_SETTINGS]

        def error_response(status: int, text: str) -> web.Response:
            return _json(status, error_reply(service, text))

        cap = connection_cap(settings.limits.controller_max_connections)
        log.debug("controller: at most %d connections", cap)
        return _ControllerServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            error_reply=error_response,
            cap=_ConnectionCap(cap),
            head_timeout=settings.limits.controller_head_timeout,
            **plain._kwargs,
        )


def make_app(
    service: UserService, settings: ControllerSettings, readiness: Readiness | None = None
) -> web.Application:
    """The controller application; every path answers the same command endpoint.

    GET /openapi.json, /metrics, /healthz and /readyz are the exceptions; POST
    there is still a command, so a Go panel posting to any path keeps working.
    """
    app = web.Application(client_max_size=settings.limits.max_control_body)
    app[_SERVICE] = service
    app[_SETTINGS] = settings
    app[_READINESS] = readiness if readiness is not None else Readiness(started=True)
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


async def start_controller(
    address: str,
    service: UserService,
    settings: ControllerSettings,
    readiness: Readiness | None = None,
) -> tuple[web.AppRunner, str]:
    """Listen on host:port, or on a Unix socket when address is a path."""
    runner = _ControllerRunner(
        make_app(service, settings, readiness),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=settings.limits.controller_keepalive,
        shutdown_timeout=settings.limits.controller_shutdown_wait,
    )
    await runner.setup()
    site: web.BaseSite
    if "/" in address:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(address).st_mode):
                os.unlink(address)
        site = web.UnixSite(runner, address)
    else:
        host, port = split_host_port(address)
        site = web.TCPSite(runner, host or None, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot listen on controller address {address}: {exc.strerror or exc}"
        ) from None
    if "/" in address:
        os.chmod(address, 0o660)  # the panel's group may use it, nobody else
        return runner, address
    bound = runner.addresses[0]
    return runner, format_hostport(bound[0], bound[1])

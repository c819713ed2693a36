"""The controller's HTTP face: POST a JSON command, get a JSON reply.

Status codes say what went wrong (405, 413, 400) while the body keeps the
original reply shape, so panels written for the Go server, which read only
`res` and `current_users`, keep working.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.resources
import ipaddress
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from mtt.controller.api import CHANGES, RES_ERR, Opt, parse_command
from mtt.controller.metrics import render_metrics
from mtt.controller.policy import DstPolicy
from mtt.errors import ConfigError, ControlError
from mtt.server.listen import split_host_port
from mtt.server.service import UserService

log = logging.getLogger("mtt.controller")

_SERVICE: web.AppKey[UserService] = web.AppKey("service")
TOKEN_ENV = "MTT_CONTROLLER_TOKEN"


@dataclass(frozen=True, slots=True)
class ControllerSettings:
    """How the controller guards itself."""

    max_body: int = 2 * 1024 * 1024
    token: str = ""
    policy: DstPolicy = field(default_factory=DstPolicy)
    metrics_per_user: bool = False


_SETTINGS: web.AppKey[ControllerSettings] = web.AppKey("settings", ControllerSettings)


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


async def _handle(request: web.Request) -> web.Response:
    service = request.app[_SERVICE]
    settings = request.app[_SETTINGS]
    peer = request.remote or "unix"
    if settings.token and not _authorized(request, settings.token):
        log.warning("controller: %s: missing or wrong bearer token", peer)
        response = _json(401, service.reply(RES_ERR, "missing or wrong bearer token"))
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    if request.method != "POST":
        log.warning("controller: %s: method %s not allowed", peer, request.method)
        response = _json(
            405, service.reply(RES_ERR, f"method {request.method} not allowed, use POST")
        )
        response.headers["Allow"] = "POST"
        return response
    cap = settings.max_body
    body = await _read_capped(request, cap)
    if body is None:
        log.warning("controller: %s: body larger than %d bytes", peer, cap)
        return _json(413, service.reply(RES_ERR, f"body larger than {cap} bytes"))
    try:
        command = parse_command(body, settings.policy)
    except ControlError as exc:
        log.warning("controller: %s: rejected: %s", peer, exc)
        return _json(400, service.reply(RES_ERR, str(exc)))
    status, answer = await service.execute(command)
    log.log(
        logging.INFO if command.opt in CHANGES or command.opt is Opt.KICK else logging.DEBUG,
        "controller: %s: opt %d: res %d, %d users, revision %d",
        peer,
        command.opt,
        answer["res"],
        answer["current_users"],
        answer["revision"],
    )
    return _json(status, answer)


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
    response = _json(401, service.reply(RES_ERR, "missing or wrong bearer token"))
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


_ErrorReply = Callable[[int, str], web.Response]


class _JsonErrorHandler(web.RequestHandler):
    """Answers what aiohttp rejects itself in the controller's JSON shape.

    A request its parser refuses (a lying Content-Length, broken chunking, a
    bad request line) never reaches a route or a middleware: aiohttp answers it
    from RequestHandler.handle_error with a text/plain page and logs a
    traceback. That method is the only hook, hence this subclass.
    """

    __slots__ = ("_error_reply",)

    def __init__(self, manager: web.Server, *, error_reply: _ErrorReply, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._error_reply = error_reply

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


class _JsonErrorServer(web.Server):
    """Builds _JsonErrorHandler connections instead of aiohttp's own."""

    def __init__(self, *args: Any, error_reply: _ErrorReply, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._error_reply = error_reply

    def __call__(self) -> web.RequestHandler:
        return _JsonErrorHandler(
            self, loop=self._loop, error_reply=self._error_reply, **self._kwargs
        )


class _ControllerRunner(web.AppRunner):
    """An AppRunner whose server is a _JsonErrorServer (same app, same settings)."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        service = self.app[_SERVICE]

        def error_reply(status: int, text: str) -> web.Response:
            return _json(status, service.reply(RES_ERR, text))

        return _JsonErrorServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            error_reply=error_reply,
            **plain._kwargs,
        )


def make_app(service: UserService, settings: ControllerSettings) -> web.Application:
    """The controller application; every path answers the same command endpoint.

    GET /openapi.json is the one exception; POST there is still a command, so a
    Go panel posting to any path keeps working.
    """
    app = web.Application(client_max_size=settings.max_body)
    app[_SERVICE] = service
    app[_SETTINGS] = settings
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/metrics", _metrics)
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


async def start_controller(
    address: str, service: UserService, settings: ControllerSettings
) -> tuple[web.AppRunner, str]:
    """Listen on host:port, or on a Unix socket when address is a path."""
    runner = _ControllerRunner(make_app(service, settings), access_log=None, handle_signals=False)
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
    return runner, f"{bound[0]}:{bound[1]}"

"""The controller's HTTP face: POST a JSON command, get a JSON reply.

Status codes say what went wrong (405, 413, 400) while the body keeps the
original reply shape, so panels written for the Go server, which read only
`res` and `current_users`, keep working.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from mtt.controller.api import RES_ERR, RES_OK, parse_command, reply
from mtt.errors import ConfigError, ControlError
from mtt.server.listen import split_host_port
from mtt.server.store import UserStore

log = logging.getLogger("mtt.controller")

_STORE: web.AppKey[UserStore] = web.AppKey("store")
_MAX_BODY: web.AppKey[int] = web.AppKey("max_body", int)


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
    store = request.app[_STORE]
    peer = request.remote or "unix"
    if request.method != "POST":
        log.warning("controller: %s: method %s not allowed", peer, request.method)
        response = _json(
            405, reply(RES_ERR, store.count(), f"method {request.method} not allowed, use POST")
        )
        response.headers["Allow"] = "POST"
        return response
    cap = request.app[_MAX_BODY]
    body = await _read_capped(request, cap)
    if body is None:
        log.warning("controller: %s: body larger than %d bytes", peer, cap)
        return _json(413, reply(RES_ERR, store.count(), f"body larger than {cap} bytes"))
    try:
        command = parse_command(body)
    except ControlError as exc:
        log.warning("controller: %s: rejected: %s", peer, exc)
        return _json(400, reply(RES_ERR, store.count(), str(exc)))
    await store.apply(command)
    log.info("controller: %s: opt %d applied, %d users", peer, command.opt, store.count())
    return _json(200, reply(RES_OK, store.count()))


def make_app(store: UserStore, max_body: int) -> web.Application:
    """The controller application; every path answers the same command endpoint."""
    app = web.Application(client_max_size=max_body)
    app[_STORE] = store
    app[_MAX_BODY] = max_body
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app


async def start_controller(
    address: str, store: UserStore, max_body: int
) -> tuple[web.AppRunner, str]:
    """Listen on host:port; returns the runner and the bound address."""
    host, port = split_host_port(address)
    runner = web.AppRunner(make_app(store, max_body), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host or None, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot listen on controller address {address}: {exc.strerror or exc}"
        ) from None
    bound = runner.addresses[0] if runner.addresses else (host, port)
    return runner, f"{bound[0]}:{bound[1]}"

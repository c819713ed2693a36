"""-fallback: non-tunnel requests reach a decoy site, tunnels still work."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientSession, TCPConnector, web

from tests.integration.test_tunnel import echo_roundtrip, opener
from tests.support import echo_server, pattern, running_server

MiB = 1024 * 1024


@pytest.fixture
async def decoy() -> AsyncIterator[int]:
    """A small web site: a page, and an endpoint hashing a streamed upload."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            text=f"decoy {request.method} {request.path_qs}", headers={"X-Decoy": "1"}
        )

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            digest.update(chunk)
        return web.Response(text=digest.hexdigest())

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(pattern(5, 8 * MiB))
        await response.write_eof()
        return response

    app = web.Application(client_max_size=64 * MiB)
    app.router.add_post("/upload", upload)
    app.router.add_get("/big", big)
    app.router.add_route("*", "/{tail:.*}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def test_decoy_serves_everything_that_is_not_a_tunnel(decoy: int) -> None:
    with running_server("-force-tls", "-fallback", f"http://127.0.0.1:{decoy}") as server:
        async with echo_server() as echo:
            server.add("/tunnel", echo.addr)
            base = f"https://127.0.0.1:{server.port}"
            async with ClientSession(connector=TCPConnector(ssl=insecure())) as http:
                for method, path in (
                    ("GET", "/"),
                    ("GET", "/tunnel"),
                    ("DELETE", "/x?y=1"),
                    ("GET", "/nobody"),
                ):
                    async with http.request(method, base + path) as resp:
                        assert resp.status == 200
                        assert resp.headers["X-Decoy"] == "1"
                        assert await resp.text() == f"decoy {method} {path}"
                body = pattern(3, 6 * MiB)
                async with http.post(base + "/upload", data=body) as resp:
                    assert await resp.text() == hashlib.sha256(body).hexdigest()
                async with http.get(base + "/big") as resp:
                    got = await resp.read()
                    assert (
                        hashlib.sha256(got).digest() == hashlib.sha256(pattern(5, 8 * MiB)).digest()
                    )
            # A tunnel on the same port still works.
            async with opener(server, insecure(), "/tunnel") as ws:
                payload = pattern(1, MiB)
                assert await echo_roundtrip(ws, payload) == payload


async def test_unreachable_decoy_closes_the_connection() -> None:
    with running_server("-force-tls", "-fallback", "http://127.0.0.1:1") as server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=insecure(), server_hostname="tunnel.test"
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 15) == b""
        writer.close()
        await asyncio.sleep(0.2)
        assert "fallback 127.0.0.1:1 unreachable" in server.log_text()


def test_bad_fallback_url_is_one_line() -> None:
    from tests.support import run_cli

    result = run_cli("-fallback", "ftp://x")
    assert result.returncode in {1, 2}
    assert "bad -fallback" in result.stderr and "Traceback" not in result.stderr

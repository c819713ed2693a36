"""-allow-origin against the server as a process, with real upgrade requests:
by default any Origin gets its tunnel; with the flag a browser's Origin must
be listed (403 and a log line otherwise), and a request without Origin, a
non-browser client's, still gets its tunnel (docs/security.md, "Origin")."""

from __future__ import annotations

import http.client

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.integration.accounting_support import add, layout_server, until
from tests.support import ServerProcess, echo_server

PANEL = "https://panel.example.com"


def ws_from(server: ServerProcess, path: str, origin: str | None) -> connect:
    return connect(
        f"ws://tunnel.test:{server.port}{path}",
        host="127.0.0.1",
        port=server.port,
        subprotocols=["smux_off"],  # type: ignore[list-item]
        origin=origin,  # type: ignore[arg-type]
        open_timeout=10,
    )


async def ping(server: ServerProcess, origin: str | None) -> bytes:
    async with ws_from(server, "/o", origin) as ws:
        await ws.send(b"ping")
        reply = await ws.recv()
        assert isinstance(reply, bytes)
        return reply


async def test_any_origin_by_default() -> None:
    with layout_server(("-workers", "1")) as server:
        async with echo_server() as echo:
            add(server, "/o", echo.addr)
            for origin in ("https://elsewhere.example", "null", "not an origin", None):
                assert await ping(server, origin) == b"ping"


@pytest.mark.parametrize("layout", [("-workers", "1"), ("-workers", "2")], ids=["1", "2"])
async def test_allow_origin_limits_browsers(layout: tuple[str, ...]) -> None:
    args = ("-allow-origin", PANEL, "-allow-origin", "http://127.0.0.1:8000")
    with layout_server(layout, *args) as server:
        async with echo_server() as echo:
            add(server, "/o", echo.addr)
            assert await ping(server, PANEL) == b"ping"
            assert await ping(server, "HTTPS://PANEL.example.com") == b"ping"
            assert await ping(server, "http://127.0.0.1:8000") == b"ping"
            assert await ping(server, None) == b"ping"  # not a browser
            for origin in ("https://elsewhere.example", "http://127.0.0.1:8001", "null"):
                with pytest.raises(InvalidStatus) as info:
                    await ping(server, origin)
                assert info.value.response.status_code == 403
                line = f'/o: origin "{origin}" not allowed'
                await until(lambda line=line: line in server.log_text())
            assert echo.connections == 4


def test_a_refused_origin_gets_nginx_403_page() -> None:
    """The refusal is the page nginx sends for 403, as for any refused upgrade."""
    with layout_server(("-workers", "1"), "-allow-origin", PANEL) as server:
        add(server, "/o", "127.0.0.1:9")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request(
            "GET",
            "/o",
            headers={
                "Host": "tunnel.test",
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
                "Origin": "https://elsewhere.example",
            },
        )
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert (resp.status, resp.getheader("Server")) == (403, "nginx")
        assert b"<title>403 Forbidden</title>" in body

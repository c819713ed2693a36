"""The plain tunnel over real sockets and TLS, driven by a WebSocket library."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support import ServerProcess, echo_server, pattern, running_server, tagged_server

MiB = 1024 * 1024


def url(server: ServerProcess, path: str, tls: bool = True) -> str:
    return f"{'wss' if tls else 'ws'}://tunnel.test:{server.port}{path}"


def opener(server: ServerProcess, ctx: ssl.SSLContext | None, path: str, **kw: object) -> connect:
    """A connect() that reaches 127.0.0.1 while SNI and Host say tunnel.test, as the Go client."""
    return connect(
        url(server, path, ctx is not None),
        ssl=ctx,
        host="127.0.0.1",
        port=server.port,
        server_hostname="tunnel.test" if ctx is not None else None,
        subprotocols=kw.pop("subprotocols", ["smux_off"]),  # type: ignore[arg-type]
        max_size=None,
        compression=None,
        **kw,  # type: ignore[arg-type]
    )


async def echo_roundtrip(ws: ClientConnection, payload: bytes, chunk: int = 16384) -> bytes:
    """Send payload in chunks while reading back the same number of bytes."""

    async def send() -> None:
        for i in range(0, len(payload), chunk):
            await ws.send(payload[i : i + chunk])

    sender = asyncio.ensure_future(send())
    received = bytearray()
    while len(received) < len(payload):
        received += await asyncio.wait_for(ws.recv(), 30)
    await sender
    return bytes(received)


async def test_tls_relay_is_byte_exact_both_ways(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    async with echo_server() as echo:
        tls_server.add("/p1", echo.addr)
        payload = pattern(1, 8 * MiB)
        async with opener(tls_server, client_tls, "/p1") as ws:
            assert ws.subprotocol == "smux_off"
            back = await echo_roundtrip(ws, payload)
        assert hashlib.sha256(back).hexdigest() == hashlib.sha256(payload).hexdigest()


async def test_many_parallel_tunnels(tls_server: ServerProcess, client_tls: ssl.SSLContext) -> None:
    async with echo_server() as echo:
        tls_server.add("/many", echo.addr)

        async def one(i: int) -> bool:
            payload = pattern(i, 64 * 1024 + i)
            async with opener(tls_server, client_tls, "/many") as ws:
                return await echo_roundtrip(ws, payload, chunk=4000) == payload

        results = await asyncio.gather(*(one(i) for i in range(64)))
        assert all(results)
        assert echo.connections == 64


async def test_query_string_is_not_part_of_the_route(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    async with tagged_server(b"u1") as dst:
        tls_server.add("/u1", dst)
        async with opener(tls_server, client_tls, "/u1?x=1&y=2") as ws:
            assert await asyncio.wait_for(ws.recv(), 10) == b"u1"


async def test_unknown_path_and_trailing_slash_are_not_found(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    tls_server.add("/path_1", "127.0.0.1:9")
    for path in ("/path_1/", "/nobody", "/path_%"):
        with pytest.raises(InvalidStatus) as info:
            async with opener(tls_server, client_tls, path):
                pass
        assert info.value.response.status_code == 404
    assert 'no user for path "/nobody"' in tls_server.log_text()


async def test_overwrite_delete_and_reset(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    async with tagged_server(b"first") as first, tagged_server(b"second") as second:
        tls_server.add("/u", first)
        async with opener(tls_server, client_tls, "/u") as ws:
            assert await ws.recv() == b"first"
        tls_server.add("/u", second)
        async with opener(tls_server, client_tls, "/u") as ws:
            assert await ws.recv() == b"second"
        revision = tls_server.control({"opt": 9})[1]["revision"]
        status, reply = tls_server.control({"opt": 2, "args_bunch": [{"path": "/u"}]})
        assert (status, reply) == (
            200,
            {"res": 1, "err_string": "", "current_users": 0, "revision": revision + 1},
        )
        with pytest.raises(InvalidStatus):
            async with opener(tls_server, client_tls, "/u"):
                pass
        tls_server.add("/a", first)
        tls_server.add("/b", second)
        assert tls_server.control({"opt": 3})[1] == {
            "res": 1,
            "err_string": "",
            "current_users": 0,
            "revision": revision + 4,
        }
        for path in ("/a", "/b"):
            with pytest.raises(InvalidStatus):
                async with opener(tls_server, client_tls, path):
                    pass


async def test_established_tunnel_survives_deleting_its_user(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    async with echo_server() as echo:
        tls_server.add("/stay", echo.addr)
        async with opener(tls_server, client_tls, "/stay") as ws:
            assert await echo_roundtrip(ws, b"before") == b"before"
            tls_server.control({"opt": 2, "args_bunch": [{"path": "/stay"}]})
            tls_server.control({"opt": 3})
            payload = pattern(7, MiB)
            assert await echo_roundtrip(ws, payload) == payload


async def test_idle_timeout_closes_idle_tunnel_but_not_busy_one(cert_files: tuple) -> None:  # type: ignore[type-arg]
    ctx = ssl.create_default_context(cafile=str(cert_files[0]))
    with running_server(
        "-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-timeout", "1s"
    ) as server:
        async with echo_server() as echo:
            server.add("/idle", echo.addr)
            async with opener(server, ctx, "/idle") as idle, opener(server, ctx, "/idle") as busy:
                started = time.monotonic()
                # The busy tunnel moves a byte every 300 ms for 3 s: three timeouts' worth.
                for i in range(10):
                    assert await echo_roundtrip(busy, bytes([i])) == bytes([i])
                    await asyncio.sleep(0.3)
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(idle.recv(), 5)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1000
                assert time.monotonic() - started >= 1.0
                assert await echo_roundtrip(busy, b"still here") == b"still here"


async def test_dst_closing_first_sends_close_1000_after_its_data(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    async with tagged_server(b"x" * 300_000) as dst:
        tls_server.add("/bye", dst)
        async with opener(tls_server, client_tls, "/bye") as ws:
            got = bytearray()
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    got += await asyncio.wait_for(ws.recv(), 10)
            assert len(got) == 300_000
            assert info.value.rcvd is not None and info.value.rcvd.code == 1000


async def test_dial_failure_closes_the_tunnel_and_logs_why(
    tls_server: ServerProcess, client_tls: ssl.SSLContext
) -> None:
    tls_server.add("/down", "127.0.0.1:1")
    async with opener(tls_server, client_tls, "/down") as ws:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    await asyncio.sleep(0.2)
    assert "dial 127.0.0.1:1 failed" in tls_server.log_text()


async def test_self_signed_mode_uses_the_server_name(tmp_path: object) -> None:
    with running_server("-force-tls", "-n", "edge.example.org") as server:
        async with echo_server() as echo:
            server.add("/s", echo.addr)
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            async with opener(server, ctx, "/s") as ws:
                assert await echo_roundtrip(ws, b"hello") == b"hello"
                ssl_obj = ws.transport.get_extra_info("ssl_object")
                der = ssl_obj.getpeercert(binary_form=True)
                assert ssl_obj.version() in ("TLSv1.2", "TLSv1.3")
                assert ssl_obj.selected_alpn_protocol() in (None, "http/1.1")
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["edge.example.org"]
        assert "self-signed" in server.log_text()


async def test_plain_http_mode() -> None:
    with running_server() as server:
        async with echo_server() as echo:
            server.add("/plain", echo.addr)
            async with opener(server, None, "/plain") as ws:
                payload = pattern(3, 2 * MiB)
                assert await echo_roundtrip(ws, payload) == payload


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_tls_below_1_2_is_refused(tls_server: ServerProcess) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer TLS 1.0/1.1
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", tls_server.port, ssl=ctx, server_hostname="tunnel.test"
            ),
            10,
        )


@pytest.mark.parametrize(
    ("offered", "mux_flag", "echoed"),
    [(["smux_off"], True, "smux_off"), (None, False, None), (["v1.chat"], False, None)],
)
async def test_subprotocol_is_echoed(
    cert_files: tuple,
    offered: list[str] | None,
    mux_flag: bool,
    echoed: str | None,  # type: ignore[type-arg]
) -> None:
    ctx = ssl.create_default_context(cafile=str(cert_files[0]))
    extra = ["-mux"] if mux_flag else []
    with running_server("-cert", str(cert_files[0]), "-key", str(cert_files[1]), *extra) as server:
        async with echo_server() as echo:
            server.add("/sp", echo.addr)
            async with opener(server, ctx, "/sp", subprotocols=offered) as ws:
                assert ws.subprotocol == echoed
                assert await echo_roundtrip(ws, b"ping") == b"ping"


@pytest.mark.slow
async def test_handshake_is_bounded(tls_server: ServerProcess) -> None:
    """A TCP connection that never finishes TLS is dropped (10 s bound)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_server.port)
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 30)
    assert data == b""
    assert 8 <= time.monotonic() - started <= 25
    writer.close()

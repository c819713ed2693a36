"""-acme against a real ACME CA: Debian's pebble (Let's Encrypt's test server) on
loopback, its validation authority resolving every name to 127.0.0.1 through
pebble-challtestsrv's DNS, and connecting for challenges to our ports.

Issued by TLS-ALPN-01 on the tunnel port (2 workers) and by HTTP-01 on
-acme-http; served (a client verifying against pebble's root gets the issued
certificate, and a tunnel through it is byte-exact); renewed (pebble's
certificates live 30 s, so renewal comes after 20 s) while an open tunnel keeps
working; kept (a restart serves the kept certificate at once); a failed order
logs its reason and next try; and the order lock and pick-up without a CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import ClientConnection, connect

from mtt.autocert.http01 import Http01Listener
from mtt.autocert.manager import CertManager
from mtt.autocert.state import AcmeState, OrderLock, ca_folder
from mtt.config import Limits, ServerConfig
from mtt.transport.tls import self_signed_pem
from tests.client_support import eventually
from tests.support import ServerProcess, echo_server, pattern, running_server

needs_pebble = pytest.mark.skipif(
    shutil.which("pebble") is None or shutil.which("pebble-challtestsrv") is None,
    reason="needs pebble (Debian package)",
)

DOMAIN = "tunnel.test"
LIFETIME = 30  # seconds: pebble's certificateValidityPeriod; renewal after 20 s
ISSUED = re.compile(r"ACME: certificate for (.+?) issued, valid until \S+ \(serial ([0-9a-f]+)\)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wfe_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for pebble's own HTTPS (the directory and management API)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble on loopback")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "wfe.pem", folder / "wfe.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Pebble:
    directory: str
    ca_bundle: Path  # trust root for the directory's HTTPS
    management: str
    tunnel_port: int  # where its validation authority connects for TLS-ALPN-01 ...
    http_port: int  # ... and for HTTP-01
    output: Path

    def issuing_root(self) -> str:
        """The root pebble issues under, from its management API."""
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        with urllib.request.urlopen(f"{self.management}/roots/0", context=ctx, timeout=10) as r:
            return str(r.read().decode())

    def args(self, *extra: str) -> list[str]:
        return [
            "-acme",
            DOMAIN,
            "-acme-directory",
            self.directory,
            "-acme-ca-bundle",
            str(self.ca_bundle),
            "-acme-email",
            "ops@tunnel.test",
            *extra,
        ]


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    folder = tmp_path_factory.mktemp("pebble")
    cert, key = _wfe_certificate(folder)
    acme, management, dns, dns_management = (free_port() for _ in range(4))
    tunnel_port, http_port = free_port(), free_port()
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{acme}",
            "managementListenAddress": f"127.0.0.1:{management}",
            "certificate": str(cert),
            "privateKey": str(key),
            "httpPort": http_port,
            "tlsPort": tunnel_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": LIFETIME,
        }
    }
    (folder / "pebble.json").write_text(json.dumps(config))
    output = folder / "pebble.log"
    env = {
        **os.environ,
        "PEBBLE_VA_NOSLEEP": "1",  # no random sleep before each validation
        "PEBBLE_VA_ALWAYS_VALID": "0",  # really connect to our ports
        "PEBBLE_WFE_NONCEREJECT": "0",  # no bad-nonce errors on purpose
        "PEBBLE_AUTHZREUSE": "0",  # a renewal is validated again, with a tunnel open
    }
    with open(output, "wb") as log:
        dns_server = subprocess.Popen(
            [
                "pebble-challtestsrv",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                f"127.0.0.1:{dns}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                f"127.0.0.1:{dns_management}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        ca = subprocess.Popen(
            [
                "pebble",
                "-config",
                str(folder / "pebble.json"),
                "-dnsserver",
                f"127.0.0.1:{dns}",
                "-strict=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        server = Pebble(
            f"https://127.0.0.1:{acme}/dir",
            cert,
            f"https://127.0.0.1:{management}",
            tunnel_port,
            http_port,
            output,
        )
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError):
                server.issuing_root()
                break
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
        yield server
    finally:
        for proc in (ca, dns_server):
            proc.terminate()
        for proc in (ca, dns_server):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_for_log(
    server: ServerProcess, pattern_: re.Pattern[str], count: int, within: float
) -> list[re.Match[str]]:
    """The first `count` matches of pattern_ in the server's log, waiting up to `within` s."""
    deadline = time.monotonic() + within
    while True:
        found = [m for line in list(server.lines) if (m := pattern_.search(line))]
        if len(found) >= count:
            return found[:count]
        assert time.monotonic() < deadline, server.log_text()
        await asyncio.sleep(0.1)


def verifying(root_pem: str) -> ssl.SSLContext:
    """A client context that trusts only pebble's issuing root."""
    ctx = ssl.create_default_context(cadata=root_pem)
    ctx.check_hostname = True
    return ctx


async def served_certificate(
    port: int, ctx: ssl.SSLContext, name: str = DOMAIN
) -> x509.Certificate:
    """The leaf certificate of a verified handshake with SNI `name`."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name), 10
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def tunnel(
    server: ServerProcess, ctx: ssl.SSLContext, path: str
) -> AsyncIterator[ClientConnection]:
    async with connect(
        f"wss://{DOMAIN}:{server.port}{path}",
        ssl=ctx,
        host="127.0.0.1",
        port=server.port,
        server_hostname=DOMAIN,
        subprotocols=["smux_off"],  # type: ignore[list-item]
        max_size=None,
        compression=None,
        open_timeout=10,
    ) as ws:
        yield ws


async def round_trip(ws: ClientConnection, payload: bytes) -> str:
    """Send payload through an echoing tunnel; the sha256 of what comes back."""
    for i in range(0, len(payload), 16384):
        await ws.send(payload[i : i + 16384])
    received = bytearray()
    while len(received) < len(payload):
        received += await asyncio.wait_for(ws.recv(), 10)
    return hashlib.sha256(received).hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@needs_pebble
@pytest.mark.slow
async def test_tls_alpn_01_issues_serves_and_renews_under_an_open_tunnel(
    pebble: Pebble, tmp_path: Path
) -> None:
    args = pebble.args("-workers", "2", "-db", str(tmp_path / "users.db"))
    with running_server(*args, bind=f"127.0.0.1:{pebble.tunnel_port}") as server:
        assert "self-signed certificate for tunnel.test until ACME issues one" in server.log_text()
        [first] = await wait_for_log(server, ISSUED, 1, 20)
        assert first.group(1) == DOMAIN
        ctx = verifying(pebble.issuing_root())
        cert = await served_certificate(server.port, ctx)
        assert format(cert.serial_number, "x") == first.group(2)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [DOMAIN]
        assert "answering TLS-ALPN-01 on the tunnel port" in server.log_text()
        assert "TLS-ALPN-01 validation handshake for tunnel.test" in server.log_text()

        async with echo_server() as echo:
            server.add("/p1", echo.addr)
            async with tunnel(server, ctx, "/p1") as ws:
                payload = pattern(1, 256 * 1024)
                assert await round_trip(ws, payload) == sha(payload)
                # pebble's 30 s certificate is renewed 20 s after it was issued
                _, second = await wait_for_log(server, ISSUED, 2, LIFETIME)
                assert second.group(2) != first.group(2)
                payload = pattern(2, 256 * 1024)
                assert await round_trip(ws, payload) == sha(payload)  # the open tunnel lives on
            # every worker serves the new certificate (16 connections: both, but for 2**-15)
            serials = {
                format((await served_certificate(server.port, ctx)).serial_number, "x")
                for _ in range(16)
            }
            assert serials == {second.group(2)}
            async with tunnel(server, ctx, "/p1") as ws:
                payload = pattern(3, 64 * 1024)
                assert await round_trip(ws, payload) == sha(payload)
        assert "renewal scheduled at" in server.log_text()


@needs_pebble
async def test_tls_alpn_01_for_two_names_with_one_process_serving(
    pebble: Pebble, tmp_path: Path
) -> None:
    args = pebble.args("-acme", "www.tunnel.test", "-workers", "1", "-db", str(tmp_path / "u.db"))
    with running_server(*args, bind=f"127.0.0.1:{pebble.tunnel_port}") as server:
        [issued] = await wait_for_log(server, ISSUED, 1, 20)
        assert sorted(issued.group(1).split(", ")) == [DOMAIN, "www.tunnel.test"]
        text = server.log_text()
        for name in (DOMAIN, "www.tunnel.test"):
            assert f"ACME: {name}: answering TLS-ALPN-01" in text
            assert f"TLS-ALPN-01 validation handshake for {name}" in text
        ctx = verifying(pebble.issuing_root())
        for name in (DOMAIN, "www.tunnel.test"):
            cert = await served_certificate(server.port, ctx, name)
            assert format(cert.serial_number, "x") == issued.group(2)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(san.get_values_for_type(x509.DNSName)) == [DOMAIN, "www.tunnel.test"]
        server.proc.send_signal(signal.SIGHUP)  # the unit's ExecReload: logged, not fatal
        await wait_for_log(server, re.compile("SIGHUP: nothing to reload"), 1, 10)
        assert server.proc.poll() is None


@needs_pebble
async def test_http_01_issues_and_a_restart_serves_the_kept_certificate_at_once(
    pebble: Pebble, tmp_path: Path
) -> None:
    args = pebble.args(
        "-workers",
        "1",
        "-db",
        str(tmp_path / "users.db"),
        "-acme-http",
        f"127.0.0.1:{pebble.http_port}",
    )
    bind = f"127.0.0.1:{pebble.tunnel_port}"
    with running_server(*args, bind=bind) as server:
        [issued] = await wait_for_log(server, ISSUED, 1, 20)
        text = server.log_text()
        assert "answering HTTP-01 on 127.0.0.1:" in text
        assert "answered HTTP-01 (GET /.well-known/acme-challenge/" in text
        assert "TLS-ALPN-01" not in text
        ctx = verifying(pebble.issuing_root())
        cert = await served_certificate(server.port, ctx)
        assert format(cert.serial_number, "x") == issued.group(2)
        async with echo_server() as echo:
            server.add("/p2", echo.addr)
            async with tunnel(server, ctx, "/p2") as ws:
                payload = pattern(4, 128 * 1024)
                assert await round_trip(ws, payload) == sha(payload)

    acme_dir = tmp_path / "acme"
    assert oct(acme_dir.stat().st_mode & 0o777) == "0o700"
    files = sorted(p.relative_to(acme_dir).as_posix() for p in acme_dir.rglob("*") if p.is_file())
    ca = ca_folder(pebble.directory)
    assert files == [f"{ca}/account.key", f"{ca}/tunnel.test.pem", "lock"]
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in acme_dir.rglob("*") if p.is_file())

    # A restart serves the kept certificate from the first handshake on, no order first.
    with running_server(*args, bind=bind) as server:
        assert "using the kept certificate for tunnel.test" in server.log_text()
        cert = await served_certificate(server.port, verifying(pebble.issuing_root()))
        assert format(cert.serial_number, "x") == issued.group(2)
        assert "ordering a certificate" not in server.log_text().split("tunnel listener on")[0]


@needs_pebble
async def test_a_failed_validation_is_logged_with_its_reason_and_next_try(
    pebble: Pebble, tmp_path: Path
) -> None:
    """HTTP-01 answered on a port the CA does not connect to: the order fails,
    the self-signed certificate stays, the next try is two minutes off."""
    args = pebble.args(
        "-workers", "1", "-db", str(tmp_path / "users.db"), "-acme-http", "127.0.0.1:0"
    )
    with running_server(*args, bind=f"127.0.0.1:{pebble.tunnel_port}") as server:
        failed = re.compile(
            r"ordering a certificate for tunnel.test failed: tunnel.test: http-01 failed:"
            r" (\S+): .*; next try in 120 s, at \S+ \(failure 1 in a row\)"
        )
        [line] = await wait_for_log(server, failed, 1, 20)
        assert line.group(1) == "connection", line.group(0)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        cert = await served_certificate(server.port, ctx)
        assert cert.issuer == cert.subject  # still the self-signed one


# -- the order lock and picking up another process's certificate (no CA) ------------


def _manager(tmp_path: Path, installed: list[dict[str, str]]) -> CertManager:
    config = ServerConfig(
        acme_domains=(DOMAIN,),
        acme_directory=f"https://127.0.0.1:{free_port()}/dir",  # nothing listens there
        acme_dir=str(tmp_path / "acme"),
    )

    async def install(spec: dict[str, str]) -> None:
        installed.append(spec)

    async def set_challenges(specs: dict[str, dict[str, str]]) -> None:
        raise AssertionError("no challenge without an order")

    return CertManager(config, install, set_challenges)


async def test_a_server_waits_while_another_orders_then_picks_up_its_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mtt.acme")
    installed: list[dict[str, str]] = []
    manager = _manager(tmp_path, installed)
    assert manager.prepare() is None  # nothing kept: the self-signed one is served

    other = OrderLock(str(tmp_path / "acme" / "lock"))  # another server ordering
    assert other.acquire() is None
    assert await manager.attempt() is None
    assert f"(pid {os.getpid()}) is ordering for" in caplog.text
    assert manager.wait(time.time()) > 100  # looks again in acme_retry_first
    assert installed == []

    # The other one got a certificate and let go: it is taken, no order is made.
    state = AcmeState(str(tmp_path / "acme"), manager.config.acme_directory, (DOMAIN,))
    kept = state.save(*self_signed_pem(DOMAIN))
    other.release()
    got = await manager.attempt()
    assert got is not None and got.serial == kept.serial
    assert [spec["cert_pem"] for spec in installed] == [kept.chain_pem.decode()]
    assert "picked up the certificate another process renewed" in caplog.text
    assert "ordering a certificate" not in caplog.text


async def test_an_unreachable_ca_is_a_logged_failure_with_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mtt.acme")
    manager = _manager(tmp_path, [])
    manager.prepare()
    for failures, delay in ((1, 120), (2, 240), (3, 480)):
        assert await manager.attempt() is None
        assert f"next try in {delay} s" in caplog.text
        assert f"(failure {failures} in a row)" in caplog.text
        assert "cannot reach the CA" in caplog.text
        manager.next_try = time.time()  # the test does not wait out the backoff


# -- the HTTP-01 listener's bounds (no CA) -------------------------------------------


@contextlib.asynccontextmanager
async def http01_listener(**bounds: float) -> AsyncIterator[tuple[Http01Listener, int]]:
    limits = dataclasses.replace(Limits(), **{f"acme_http_{k}": v for k, v in bounds.items()})
    listener = Http01Listener(limits)
    sock = socket.create_server(("127.0.0.1", 0))
    await listener.start(sock)
    try:
        yield listener, int(sock.getsockname()[1])
    finally:
        listener.close()


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_http01_listener_answers_pending_tokens_and_nothing_else() -> None:
    async with http01_listener() as (listener, port):
        listener.answers["tok-1"] = "tok-1.thumb"
        reply = await exchange(port, b"GET /.well-known/acme-challenge/tok-1 HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\ntok-1.thumb")
        reply = await exchange(port, b"GET /.well-known/acme-challenge/tok-2 HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 404 Not Found\r\nServer: nginx\r\n")
        listener.answers.clear()
        reply = await exchange(port, b"GET /.well-known/acme-challenge/tok-1 HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 404 ")


async def test_http01_listener_bounds_the_head_the_wait_and_the_connections() -> None:
    async with http01_listener(max_head=1024, timeout=0.3, max_connections=2) as (listener, port):
        reply = await exchange(port, b"GET /" + b"a" * 2000)
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        # silence: closed when the wait is over, with nothing sent
        started = time.monotonic()
        assert await exchange(port, b"GET / HTTP/1.1\r\n") == b""
        assert 0.2 < time.monotonic() - started < 5
        # two connections open: a third is closed at once, then one fits again
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert listener.open == 2
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        for _, w in held:
            w.close()
        await eventually(lambda: listener.open == 0, 5)
        reply = await exchange(port, b"GET / HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 404 ")

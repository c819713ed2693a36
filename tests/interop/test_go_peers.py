"""Go-to-Go sanity of the test peers themselves (no Python tunnel server involved).

gorelay + wsload (plain, mux v1, mux v2; echo, upload, download) and
gorelay + mttclient with a Python TCP client through mttclient's local port.
If these fail, the peers (or the Debian Go packages) are broken, not our server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import random
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import gopeers
from harness.gopeers import (
    Peer,
    go_binary,
    run_wsload,
    start_peer,
)

pytestmark = pytest.mark.interop

MiB = 1 << 20
CHUNK = 64 * 1024

StartPeer = Callable[[list[str]], tuple[Peer, str]]


def _routes(dsts: dict[str, int]) -> list[str]:
    args = []
    for name, port in dsts.items():
        args += ["-route", f"/{name}=127.0.0.1:{port}"]
    return args


def _assert_alive(proc: Peer) -> None:
    assert proc.poll() is None, f"peer died (rc={proc.returncode}):\n{proc.stderr_text()}"


MODES = {
    "plain": ["-mode", "plain"],
    "mux-v1": ["-mode", "mux", "-smux-version", "1"],
    "mux-v2": ["-mode", "mux", "-smux-version", "2"],
}
PATTERNS = {
    # pattern: (plain conns, mux conns, mux streams per conn, bytes per stream)
    "echo": (8, 2, 4, MiB),
    "upload": (1, 1, 1, 4 * MiB),
    "download": (1, 1, 1, 4 * MiB),
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mode", MODES)
async def test_wsload_through_gorelay(
    go_bins: dict[str, Path],
    go_peer: StartPeer,
    dsts: dict[str, int],
    mode: str,
    pattern: str,
) -> None:
    version = "2" if mode == "mux-v2" else "1"
    relay, addr = go_peer(
        [
            str(go_bins["gorelay"]),
            *("-b", "127.0.0.1:0", "-self-signed", "-smux-version", version),
            *_routes(dsts),
        ]
    )
    plain_conns, mux_conns, streams, size = PATTERNS[pattern]
    conns = plain_conns if mode == "plain" else mux_conns
    result = await run_wsload(
        [
            "-url",
            f"wss://localhost/{pattern}",
            "-connect",
            addr,
            "-sv",
            *MODES[mode],
            "-conns",
            str(conns),
            "-streams",
            str(streams),
            "-bytes",
            str(size),
            "-pattern",
            pattern,
            "-timeout",
            "30s",
        ],
        limit_s=45,
    )
    assert result["ok"], result
    assert result["returncode"] == 0
    n_streams = conns * (streams if mode != "plain" else 1)
    assert result["streams"] == result["streams_ok"] == n_streams
    per_stream = 2 * size if pattern == "echo" else size
    assert result["bytes_total"] == n_streams * per_stream
    _assert_alive(relay)


@pytest.mark.parametrize("pattern", PATTERNS)
async def test_wsload_idle_then_transfer(
    go_bins: dict[str, Path], go_peer: StartPeer, dsts: dict[str, int], pattern: str
) -> None:
    _, addr = go_peer([str(go_bins["gorelay"]), "-b", "127.0.0.1:0", *_routes(dsts)])
    result = await run_wsload(
        [
            *("-url", f"ws://{addr}/{pattern}", "-mode", "mux", "-conns", "2", "-streams", "2"),
            *("-bytes", str(300_000), "-pattern", pattern, "-idle", "1s", "-timeout", "20s"),
        ],
        limit_s=30,
    )
    assert result["ok"], result
    assert result["elapsed_s"] >= 1.0


async def test_wsload_plain_http_no_subprotocol_uses_server_mux(
    go_bins: dict[str, Path], go_peer: StartPeer, dsts: dict[str, int]
) -> None:
    _, addr = go_peer([str(go_bins["gorelay"]), "-b", "127.0.0.1:0", "-mux", *_routes(dsts)])
    base = ["-url", f"ws://{addr}/echo", "-pattern", "echo", "-bytes", str(256 * 1024)]
    muxed = await run_wsload(
        [*base, "-mode", "mux", "-subprotocol", "none", "-streams", "3"], limit_s=30
    )
    assert muxed["ok"], muxed
    # A plain stream where the server expects smux: the session dies on the bad frame.
    wrong = await run_wsload(
        [*base, "-mode", "plain", "-subprotocol", "none", "-timeout", "5s"], limit_s=30
    )
    assert not wrong["ok"]


async def test_wsload_unknown_path_is_404(
    go_bins: dict[str, Path], go_peer: StartPeer, dsts: dict[str, int]
) -> None:
    _, addr = go_peer([str(go_bins["gorelay"]), "-b", "127.0.0.1:0", *_routes(dsts)])
    for path in ("/nope", "/echo/"):
        result = await run_wsload(["-url", f"ws://{addr}{path}", "-bytes", "10"], limit_s=30)
        assert not result["ok"]
        assert result["returncode"] == 1
        assert "404" in " ".join(result["errors"]), result


def _make_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed cert for 'tunnel.test', usable as its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunnel.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("tunnel.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_wsload_verifies_certificate_with_ca(
    go_bins: dict[str, Path], go_peer: StartPeer, dsts: dict[str, int], tmp_path: Path
) -> None:
    cert, key = _make_cert(tmp_path)
    _, addr = go_peer(
        [
            str(go_bins["gorelay"]),
            *("-b", "127.0.0.1:0", "-cert", str(cert), "-key", str(key)),
            *_routes(dsts),
        ]
    )
    base = ["-url", "wss://tunnel.test/echo", "-connect", addr, "-bytes", "100000"]
    good = await run_wsload([*base, "-ca", str(cert)], limit_s=30)
    assert good["ok"], good
    untrusted = await run_wsload(base, limit_s=30)
    assert not untrusted["ok"]
    wrong_name = await run_wsload([*base, "-ca", str(cert), "-sni", "other.test"], limit_s=30)
    assert not wrong_name["ok"]


async def _echo_through(host: str, port: int, size: int, seed: int) -> None:
    data = random.Random(seed).randbytes(size)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    try:

        async def send() -> None:
            for i in range(0, size, CHUNK):
                writer.write(data[i : i + CHUNK])
                await writer.drain()

        async def receive() -> tuple[int, bytes]:
            h, got = hashlib.sha256(), 0
            while got < size:
                chunk = await reader.read(CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                got += len(chunk)
            return got, h.digest()

        _, (got, digest) = await asyncio.wait_for(asyncio.gather(send(), receive()), 30)
    finally:
        writer.close()
    assert got == size
    assert digest == hashlib.sha256(data).digest()


@pytest.mark.parametrize("mux", [False, True], ids=["plain", "mux"])
async def test_mttclient_through_gorelay(
    go_bins: dict[str, Path], go_peer: StartPeer, dsts: dict[str, int], mux: bool
) -> None:
    relay, relay_addr = go_peer(
        [str(go_bins["gorelay"]), "-b", "127.0.0.1:0", "-self-signed", *_routes(dsts)]
    )
    client_args = [
        str(go_bins["mttclient"]),
        "-b",
        "127.0.0.1:0",
        "-s",
        relay_addr,
        "-n",
        "localhost",
        "-wss-path",
        "echo",  # no leading slash: the client adds it, as the original does
        "-sv",
    ]
    if mux:
        client_args += ["-mux", "-mux-max-stream", "2"]
    client, local = go_peer(client_args)
    host, port = local.rsplit(":", 1)

    await _echo_through(host, int(port), 2 * MiB, seed=1)
    # A few at once: with -mux-max-stream 2 this needs a second session.
    await asyncio.gather(*(_echo_through(host, int(port), 2 * MiB, seed=s) for s in (2, 3, 4)))

    _assert_alive(client)
    _assert_alive(relay)
    assert "panic" not in client.stderr_text()


async def _naive_wss_server(
    cert: Path, key: Path
) -> tuple[asyncio.Server, int, list[asyncio.StreamWriter]]:
    """A WebSocket server that reads a little, stops reading while the client uploads,
    then sends a close frame (1000) and, 2 s later, closes the connection."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            ws_key = next(
                line.split(b":", 1)[1].strip()
                for line in request.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(
                hashlib.sha1(ws_key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
            )
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Protocol: smux_off\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            await reader.read(CHUNK)
            await asyncio.sleep(2)  # the client's upload blocks on full buffers
            writer.write(b"\x88\x02\x03\xe8")  # close frame, code 1000
            await writer.drain()
            await asyncio.sleep(2)
        writer.close()

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1], writers


async def test_mttclient_panics_like_the_original_when_closed_under_upload(
    go_bins: dict[str, Path], go_peer: StartPeer, tmp_path: Path
) -> None:
    """The stand-in keeps the real client's hazard: a server that closes the WebSocket
    while the client is blocked uploading makes it panic with "concurrent write to
    websocket connection" and die. Tests that show our server never provokes this
    would prove nothing if the stand-in could not panic."""
    cert, key = _make_cert(tmp_path)
    server, port, writers = await _naive_wss_server(cert, key)
    try:
        client, local = go_peer(
            [
                str(go_bins["mttclient"]),
                *("-s", f"127.0.0.1:{port}", "-n", "tunnel.test", "-ca", str(cert)),
            ]
        )
        host, local_port = local.rsplit(":", 1)
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(local_port)), 10)
        block = b"u" * CHUNK

        async def upload() -> None:
            with contextlib.suppress(ConnectionError):
                while client.poll() is None:
                    writer.write(block)
                    await writer.drain()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(upload(), 15)
        writer.close()
        rc = await asyncio.to_thread(client.wait, 10)
        assert rc != 0
        assert "concurrent write to websocket connection" in client.stderr_text()
    finally:
        server.close()
        for w in writers:
            w.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


def test_start_peer_reports_early_exit(go_bins: dict[str, Path]) -> None:
    with pytest.raises(RuntimeError, match="before listening"):
        start_peer([str(go_bins["mttclient"])])  # no -s: exits with an error


def test_go_binary_is_cached(go_bins: dict[str, Path]) -> None:
    assert go_binary("wsload") == go_bins["wsload"]
    out = subprocess.run(
        [str(go_bins["wsload"]), "-mode", "bogus"], capture_output=True, timeout=10, check=False
    )
    assert out.returncode == 1
    assert b'"ok":false' in out.stdout


def test_go_binary_fails_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = tmp_path / "src" / "broken"
    src.mkdir(parents=True)
    (src / "main.go").write_text("package main\n\nfunc main() { undefinedThing() }\n")
    monkeypatch.setattr(gopeers, "GO_SRC_DIR", tmp_path / "src")
    monkeypatch.setattr(gopeers, "BUILD_DIR", tmp_path / "build")
    with pytest.raises(RuntimeError, match=r"(?s)go build broken failed.*undefinedThing"):
        go_binary("broken")
    monkeypatch.setattr(gopeers.shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="`go` not found"):
        go_binary("broken")

"""A real browser as the client: Debian's Chromium, headless, its own WebSocket API.

    page in Chromium --wss/ws--> mtt-mu-server --> echo (the user's dst)

The page comes from a small HTTP server on loopback, so the browser sends the
Origin a panel's page would (http://127.0.0.1:PORT). The test drives the tab
through the DevTools protocol: it evaluates a script that opens the WebSocket,
sends a payload in binary messages and returns what came back, checked by
sha256. Over TLS the browser is told to accept the self-signed certificate
(--ignore-certificate-errors), as it would accept a real one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.server
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.support import echo_server, pattern, running_server

pytestmark = pytest.mark.interop

# Open a WebSocket, send the payload in 64 KiB binary messages, collect the echo;
# resolves to the echo as base64, or to "refused: <close code>".
SCRIPT = """
(async () => {
  const payload = Uint8Array.from(atob(%(payload)s), c => c.charCodeAt(0));
  const ws = new WebSocket(%(url)s);
  ws.binaryType = "arraybuffer";
  const chunks = [];
  let got = 0;
  const result = await new Promise((resolve) => {
    ws.onclose = (e) => resolve("refused: " + e.code);
    ws.onopen = () => {
      for (let at = 0; at < payload.length; at += 65536) ws.send(payload.subarray(at, at + 65536));
    };
    ws.onmessage = (e) => {
      const part = new Uint8Array(e.data);
      chunks.push(part);
      got += part.length;
      if (got >= payload.length) resolve(null);
    };
  });
  if (result !== null) return result;
  ws.close(1000);
  let text = "";
  for (const part of chunks)
    for (let at = 0; at < part.length; at += 8192)
      text += String.fromCharCode.apply(null, part.subarray(at, at + 8192));
  return btoa(text);
})()
"""


@contextlib.contextmanager
def page_server() -> Iterator[str]:
    """An empty page on loopback: the origin the browser's WebSocket comes from."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>panel</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class Tab:
    """One Chromium tab driven over the DevTools protocol."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        await self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            reply = json.loads(await asyncio.wait_for(self._ws.recv(), 30))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")


@contextlib.contextmanager
def launch_chromium(tmp_path: Path, start_url: str) -> Iterator[str]:
    """Chromium showing start_url; yields the tab's DevTools WebSocket address."""
    exe = shutil.which("chromium")
    if exe is None:
        raise RuntimeError("chromium not found: this test needs Debian's chromium package")
    port_file = tmp_path / "profile" / "DevToolsActivePort"
    proc = subprocess.Popen(
        [
            exe,
            "--headless=new",
            "--no-sandbox",  # the tests run as root in CI
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--remote-debugging-port=0",
            "--ignore-certificate-errors",
            start_url,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().split()) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = json.loads(r.read())
            page = next((t for t in targets if t["type"] == "page"), None)
            if page is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("chromium opened no page")
            time.sleep(0.1)
        yield str(page["webSocketDebuggerUrl"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path, start_url: str) -> AsyncIterator[Tab]:
    """A tab that has loaded start_url."""
    with launch_chromium(tmp_path, start_url) as devtools:
        async with connect(devtools, max_size=None) as ws:
            tab = Tab(ws)
            deadline = time.monotonic() + 30
            while await tab.evaluate("document.readyState") != "complete":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not load {start_url}")
                await asyncio.sleep(0.1)
            yield tab


async def echo_in_browser(tab: Tab, url: str, payload: bytes) -> bytes | str:
    """The echo the browser got back, or "refused: <code>"."""
    b64 = base64.b64encode(payload).decode()
    value = await tab.evaluate(SCRIPT % {"payload": json.dumps(b64), "url": json.dumps(url)})
    assert isinstance(value, str), value
    return value if value.startswith("refused") else base64.b64decode(value)


async def test_a_browser_tunnels_over_wss(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    payload = pattern(7, 1 << 20)
    cert, key = tls_files
    with (
        page_server() as page,
        running_server("-cert", str(cert), "-key", str(key)) as server,
    ):
        async with echo_server() as echo, chromium(tmp_path, page + "/") as tab:
            server.add("/browser", echo.addr)
            got = await echo_in_browser(tab, f"wss://127.0.0.1:{server.port}/browser", payload)
            assert isinstance(got, bytes), got
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()


async def test_allow_origin_admits_the_listed_page_only(tmp_path: Path) -> None:
    payload = pattern(8, 200_000)
    with page_server() as page:
        async with echo_server() as echo, chromium(tmp_path, page + "/") as tab:
            with running_server("-allow-origin", page) as server:
                server.add("/panel", echo.addr)
                got = await echo_in_browser(tab, f"ws://127.0.0.1:{server.port}/panel", payload)
                assert isinstance(got, bytes), got
                assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
            with running_server("-allow-origin", "https://panel.example.com") as server:
                server.add("/panel", echo.addr)
                got = await echo_in_browser(tab, f"ws://127.0.0.1:{server.port}/panel", payload)
                assert got == "refused: 1006"  # the browser saw the 403 as a failed handshake
                deadline = time.monotonic() + 5
                while f'origin "{page}" not allowed' not in server.log_text():
                    assert time.monotonic() < deadline, server.log_text()
                    await asyncio.sleep(0.05)

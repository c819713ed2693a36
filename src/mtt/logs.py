"""One log format for every process of the server (workers tag their lines)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def __init__(self, tag: str) -> None:
        super().__init__()
        self._tag = tag

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._tag:
            entry["process"] = self._tag
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(verbose: bool, tag: str = "", json_format: bool = False) -> None:
    """INFO by default (start-up lines, failed connections); DEBUG with -verbose."""
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter(tag))
    else:
        prefix = f"{tag} " if tag else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("aiohttp", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    # picows' own lines lack the peer; the tunnels log one line of their own instead.
    logging.getLogger("mtt.ws").setLevel(logging.INFO if verbose else logging.CRITICAL)
    # aiohttp logs a traceback for each malformed controller request it rejects itself.
    logging.getLogger("aiohttp.server").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def log_loop_errors(loop: asyncio.AbstractEventLoop) -> None:
    """One line, no traceback, for what the event loop reports (a failed TLS
    handshake, accept() out of descriptors): a peer's bytes or a full fd
    table are events to log, not crashes to dump."""
    log = logging.getLogger("mtt.loop")

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if getattr(context.get("transport"), "logs_own_failures", False):
            return  # it logged the failure already, naming the peer
        exc = context.get("exception")
        message = str(context.get("message", "event loop error")).splitlines()[0]
        level = logging.INFO if isinstance(exc, (OSError, ssl.SSLError)) else logging.WARNING
        log.log(level, "%s: %s", message, repr(exc) if exc is not None else "")

    loop.set_exception_handler(handler)

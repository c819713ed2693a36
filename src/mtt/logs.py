"""One log format for every process of the server (workers tag their lines)."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: bool, tag: str = "") -> None:
    """INFO by default (start-up lines, failed connections); DEBUG with -verbose."""
    prefix = f"{tag} " if tag else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("mtt.ws", "aiohttp", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)

"""Every background task is created here: named, referenced until done, and
its unexpected failure logged instead of lost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("mtt.tasks")

_running: set[asyncio.Task[Any]] = set()


def spawn(
    coro: Coroutine[Any, Any, Any],
    name: str,
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Task[Any]:
    """Start a task that the event loop cannot garbage-collect mid-flight (on `loop`
    when the caller has it: finding the running loop costs a getpid())."""
    task = (loop or asyncio.get_running_loop()).create_task(coro, name=name)
    _running.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)


def running() -> int:
    """How many spawned tasks are alive (tests check that nothing leaks)."""
    return len(_running)

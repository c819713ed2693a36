"""Open the most descriptors the system allows, as Go programs do.

A shell's soft RLIMIT_NOFILE is often 1024 while the hard limit is far
higher; every tunnel holds two descriptors and every stalled connection one,
so 1024 fills with a few hundred clients and then new connections wait in
the backlog. Go (since 1.19) raises the soft limit to the hard one when a
program starts, and so did the Go server this one replaces.
"""

from __future__ import annotations

import resource
from collections.abc import Callable


def raise_nofile(
    unlimited_cap: int,
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> tuple[int, int, str | None]:
    """Raise the soft limit to the hard one, or to unlimited_cap where the hard one
    is unlimited: (soft before, soft now, why not or None)."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    wanted = unlimited_cap if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft, soft, None
    try:
        setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError) as exc:
        return soft, soft, str(exc) or type(exc).__name__
    return soft, wanted, None


def describe(before: int, now: int, error: str | None) -> str:
    """The start-up log line's words for the outcome."""
    if error is not None:
        return f"open files limit stays {before}: cannot raise it to the hard limit ({error})"
    if now != before:
        return f"open files limit raised from {before} to {now} (the hard limit)"
    return f"open files limit {now}"

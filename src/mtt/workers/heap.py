"""Give the C heap back to the system after a burst of connections ends.

Each TLS connection allocates tens of KiB in the C heap (OpenSSL's state,
aiofastnet's BIO buffers); when a burst of them closes, glibc keeps the
freed pages resident, scattered among live allocations where it cannot
shrink the heap: three waves of 3,000 stalled handshakes left a worker at 8
times its size, with 97% of its heap free. malloc_trim(0) returns the free
pages (madvise) without moving anything.

The trigger, checked every heap_check_interval (the settings are Limits'
heap_* fields): much of the heap is free (glibc's own count, mallinfo2,
glibc 2.33+) and the process has grown since the last trim, or more of the
heap was freed since (a burst still closing at the last trim left its rest
resident): there is something to give back. A trim walks the heap (about
20 ms for 1.6 GB of it), so trims are spaced by at least heap_trim_min_gap
and by heap_trim_cost_factor times the last one's duration. Elsewhere (musl,
macOS, an older glibc) this is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from mtt.config import Limits

log = logging.getLogger("mtt.server")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes in use
            "fordblks",  # bytes free
            "keepcost",
        )
    ]


class Heap:
    """glibc's malloc statistics and trim, through ctypes."""

    def __init__(self, libc: Any) -> None:
        self._mallinfo2 = libc.mallinfo2
        self._mallinfo2.restype = _MallInfo2
        self._mallinfo2.argtypes = []
        self._trim = libc.malloc_trim
        self._trim.restype = ctypes.c_int
        self._trim.argtypes = [ctypes.c_size_t]

    @classmethod
    def load(cls) -> Heap | None:
        """None where the C library is not glibc 2.33 or later."""
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            return None
        if not (hasattr(libc, "mallinfo2") and hasattr(libc, "malloc_trim")):
            return None
        return cls(libc)

    def usage(self) -> tuple[int, int]:
        """(bytes handed out, bytes free) in the heap; mmap'd blocks are not counted
        (free() unmaps those)."""
        info = self._mallinfo2()
        return int(info.uordblks), int(info.fordblks)

    def trim(self) -> None:
        self._trim(0)


def rss_bytes() -> int:
    """This process's resident memory."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE_SIZE


class BurstTrimmer:
    """Decides, from one sample every heap_check_interval, when to trim."""

    def __init__(
        self,
        heap: Heap,
        limits: Limits,
        rss: Callable[[], int] = rss_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._heap = heap
        self._free_fraction = limits.heap_trim_free_fraction
        self._growth = limits.heap_trim_growth
        self._freed = limits.heap_trim_freed
        self._min_gap = limits.heap_trim_min_gap
        self._cost_factor = limits.heap_trim_cost_factor
        self._rss = rss
        self._clock = clock
        self._rss_after = rss()  # RSS when last trimmed (or at start)
        self._in_use_after = heap.usage()[0]  # heap bytes in use then
        self._next = clock()  # no trim before this

    def check(self) -> bool:
        """Trim if a burst has left much of the heap free; True when it did."""
        in_use, free = self._heap.usage()
        if free < self._growth or free < self._free_fraction * (in_use + free):
            return False
        if self._clock() < self._next:
            return False
        # Freed since the last trim (a burst still closing then), or grown since;
        # steady traffic reusing free chunks does neither.
        freed = in_use + self._freed <= self._in_use_after
        if not freed and self._rss() < self._rss_after + self._growth:
            return False
        started = time.perf_counter()
        self._heap.trim()
        took = time.perf_counter() - started
        self._rss_after = self._rss()
        self._in_use_after = in_use
        self._next = self._clock() + max(self._min_gap, self._cost_factor * took)
        log.debug(
            "heap trimmed in %.1f ms: %d MiB free of %d MiB",
            took * 1000,
            free >> 20,
            (in_use + free) >> 20,
        )
        return True


async def trim_after_bursts(limits: Limits) -> None:
    """Run for the life of the process (a no-op where glibc's calls are missing)."""
    heap = Heap.load()
    if heap is None:
        return
    trimmer = BurstTrimmer(heap, limits)
    while True:
        await asyncio.sleep(limits.heap_check_interval)
        trimmer.check()

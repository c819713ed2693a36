"""No cyclic garbage collection while a change is parsed and applied.

A bulk add of 40,000 users allocates some 200,000 objects that the collector
tracks (the JSON objects and their key pairs, the entries, the counters a
store starts for each new user). Every 700 of them start a collection, and
the full ones among them walk the whole heap: about 80 ms of a 250 ms
request. None of those objects is garbage in a cycle, and reference counting
frees garbage as before; what the pause puts off runs at the next
allocation after it, once.

The controller pauses for each request it parses and carries out, a worker
for each message from the supervisor it decodes and handles (a change: 40,000
entries again). Requests overlap on the event loop (one awaits the store
while the next is parsed, a worker's message arrives meanwhile), hence one
pause per process, PAUSE, and a count: the last one out enables collection
again, and only if it was enabled when the first one came in.
"""

from __future__ import annotations

import gc


class CollectionPause:
    """gc.disable() for as long as any `paused()` block is open."""

    __slots__ = ("_depth", "_was_enabled")

    def __init__(self) -> None:
        self._depth = 0
        self._was_enabled = False

    def paused(self) -> CollectionPause:
        """`with PAUSE.paused():` (a plain context manager: it is entered
        for every message a worker or the supervisor gets)."""
        return self

    def __enter__(self) -> None:
        if self._depth == 0:
            self._was_enabled = gc.isenabled()
            gc.disable()
        self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._was_enabled:
            gc.enable()


PAUSE = CollectionPause()

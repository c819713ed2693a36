"""When the C heap is trimmed: after a burst leaves much of it free, not while
it is busy, and not more often than its cost allows."""

from __future__ import annotations

from mtt.config import Limits
from mtt.workers.heap import BurstTrimmer, Heap

MiB = 1 << 20
LIMITS = Limits()  # the trim settings the server runs with


class FakeHeap:
    def __init__(self) -> None:
        self.in_use = 10 * MiB
        self.free = 1 * MiB
        self.trims = 0

    def usage(self) -> tuple[int, int]:
        return self.in_use, self.free

    def trim(self) -> None:
        self.trims += 1


class World:
    """A fake heap, RSS and clock the trimmer reads."""

    def __init__(self, limits: Limits = LIMITS) -> None:
        self.heap = FakeHeap()
        self.rss = 60 * MiB
        self.now = 100.0
        self.trimmer = BurstTrimmer(self.heap, limits, lambda: self.rss, lambda: self.now)  # type: ignore[arg-type]

    def burst(self, size: int) -> None:
        """size bytes allocated (and made resident), then freed."""
        self.heap.free += size
        self.rss += size

    def tick(self, seconds: float = 1.0) -> bool:
        self.now += seconds
        trimmed = self.trimmer.check()
        if trimmed:
            self.rss -= self.heap.free // 2  # the free pages that were resident
        return trimmed


def test_quiet_heap_is_left_alone() -> None:
    world = World()
    assert not any(world.tick() for _ in range(10))


def test_a_burst_is_trimmed_once() -> None:
    world = World()
    world.burst(200 * MiB)
    assert world.tick()
    # Still mostly free, but nothing new is resident: no second trim.
    assert not any(world.tick() for _ in range(10))
    assert world.heap.trims == 1


def test_busy_heap_is_not_trimmed() -> None:
    """Growth that is in use (a user table loaded) leaves little free: no trim."""
    world = World()
    world.heap.in_use += 500 * MiB
    world.rss += 500 * MiB
    world.heap.free += 20 * MiB  # 4% free
    assert not any(world.tick() for _ in range(5))


def test_small_bursts_are_not_worth_a_trim() -> None:
    world = World()
    world.burst(4 * MiB)
    assert not any(world.tick() for _ in range(5))


def test_trims_are_spaced() -> None:
    world = World()
    world.burst(100 * MiB)
    assert world.tick()
    world.burst(100 * MiB)
    assert not world.tick(0.5)  # within heap_trim_min_gap of the last one
    assert world.tick(LIMITS.heap_trim_min_gap)


def test_the_spacing_is_the_limits_one() -> None:
    world = World(Limits(heap_trim_min_gap=5.0))
    world.burst(100 * MiB)
    assert world.tick()
    world.burst(100 * MiB)
    assert not world.tick(4.0)
    assert world.tick(1.0)


def test_real_heap() -> None:
    """glibc here: the statistics read and a trim runs."""
    real = Heap.load()
    assert real is not None
    in_use, free = real.usage()
    assert in_use > 0 and free >= 0
    real.trim()


def test_memory_freed_after_a_trim_is_trimmed_too() -> None:
    """A trim while a burst is still closing, then the rest of it freed: RSS has
    not grown since that trim, but what was freed since is given back too."""
    world = World()
    world.burst(100 * MiB)
    assert world.tick()
    world.heap.in_use -= 50 * MiB  # the burst's last connections close
    world.heap.free += 50 * MiB
    assert world.tick(LIMITS.heap_trim_min_gap)
    assert not any(world.tick() for _ in range(10))
    assert world.heap.trims == 2


def test_allocations_reused_from_free_memory_are_not_trimmed_again() -> None:
    """Steady traffic takes and returns the same free chunks: no trim for it."""
    world = World()
    world.burst(100 * MiB)
    assert world.tick()
    for _ in range(10):
        world.heap.free -= 4 * MiB  # taken by new connections, then freed again
        world.heap.in_use += 4 * MiB
        assert not world.tick()
        world.heap.free += 4 * MiB
        world.heap.in_use -= 4 * MiB
        assert not world.tick()
    assert world.heap.trims == 1

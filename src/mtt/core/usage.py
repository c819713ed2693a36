"""Per-user traffic counters: what a store keeps and the service bills by."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Usage:
    """Counters of one user; as a delta, what happened since the last report."""

    bytes_up: int = 0
    bytes_down: int = 0
    quota_used: int = 0  # up + down since the panel last set it; never reset by a read
    total_tunnels: int = 0
    last_seen: float = 0.0  # unix time, 0 = never

    def copy(self) -> Usage:
        return Usage(
            self.bytes_up, self.bytes_down, self.quota_used, self.total_tunnels, self.last_seen
        )

    def add(self, other: Usage) -> None:
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        self.quota_used += other.quota_used
        self.total_tunnels += other.total_tunnels
        self.last_seen = max(self.last_seen, other.last_seen)

    def to_wire(self) -> list[int | float]:
        return [self.bytes_up, self.bytes_down, self.quota_used, self.total_tunnels, self.last_seen]

    @classmethod
    def from_wire(cls, item: list[int | float]) -> Usage:
        up, down, used, total, seen = item
        return cls(int(up), int(down), int(used), int(total), float(seen))

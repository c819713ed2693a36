"""How a tunnel sees its user's accounting: a meter to count bytes into.

The transport layer moves bytes and knows nothing of users, tables or the
service; it counts what it relays into a Meter and opens and closes itself
through an Account. The service's per-process agent implements both.
"""

from __future__ import annotations

from typing import Protocol

from mtt.core.rate import Pausable
from mtt.core.users import User


class MeteredTunnel(Pausable, Protocol):
    """A tunnel, as its user's meter sees it: it can be paused and kicked."""

    def kick(self, why: str | None = None) -> bool:
        """Close now: the controller's kick (why None), or a limit (why says
        which); False if it was already closing."""
        ...


class Meter(Protocol):
    """One user's traffic in this process; counting charges the user's rate."""

    def count_up(self, size: int, tunnel: Pausable) -> None:
        """size bytes from the client were read for tunnel."""
        ...

    def count_down(self, size: int, tunnel: Pausable) -> None:
        """size bytes from dst were read for tunnel."""
        ...

    def forget(self, tunnel: Pausable) -> None:
        """tunnel (an smux stream) is gone: drop it from the rate's waiters."""
        ...


class Account(Protocol):
    """What one tunnel needs to count itself in and out of its user."""

    path: str
    user: User

    def open(self, tunnel: MeteredTunnel) -> Meter: ...

    def close(self, tunnel: MeteredTunnel) -> None: ...

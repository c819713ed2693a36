"""Admission against a user's server-wide limits: expire, quota, max_tunnels
and max_ips, decided over the tunnels open in every worker.

Pure: the caller passes the time and the quota used (which it reads from the
store), and tells the book which tunnels opened and closed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from mtt.core.users import UserLimits


@dataclass(frozen=True, slots=True)
class Verdict:
    """The service's answer to an admission: refused (why) or admitted, and
    then the quota the user has left (None: no quota, or not known now), the
    first budget of the tunnel's process (mtt.core.enforcement)."""

    refused: str | None = None
    quota_left: int | None = None


def expired(limits: UserLimits, now: float) -> bool:
    """From `expire` (unix time) on, new tunnels are refused; 0 is never."""
    return bool(limits.expire) and now >= limits.expire


def over_quota(limits: UserLimits, quota_used: int) -> bool:
    """Once the quota is used up, new tunnels are refused; 0 is no quota."""
    return bool(limits.quota) and quota_used >= limits.quota


class AdmissionBook:
    """The tunnels admitted against server-wide limits: path -> (agent, ip) -> count."""

    __slots__ = ("_admitted",)

    def __init__(self) -> None:
        self._admitted: dict[str, Counter[tuple[int, str]]] = {}

    def refusal(
        self, path: str, limits: UserLimits, ip: str, now: float, quota_used: int = 0
    ) -> str | None:
        """Why a new tunnel of path from ip is refused, or None to admit it."""
        if expired(limits, now):
            return "expired"
        if over_quota(limits, quota_used):
            return f"over quota ({quota_used} of {limits.quota} bytes)"
        admitted = self._admitted.get(path)
        if admitted is None:
            return None
        if limits.max_tunnels and sum(admitted.values()) >= limits.max_tunnels:
            return f"at its limit of {limits.max_tunnels} tunnels"
        if limits.max_ips:
            ips = {a_ip for (_, a_ip), n in admitted.items() if n > 0}
            if ip not in ips and len(ips) >= limits.max_ips:
                return f"at its limit of {limits.max_ips} client addresses"
        return None

    def admit(self, agent: int, path: str, ip: str) -> None:
        """Count a tunnel that was admitted."""
        self._admitted.setdefault(path, Counter())[(agent, ip)] += 1

    def release(self, agent: int, path: str, ip: str) -> None:
        """An admitted tunnel closed."""
        admitted = self._admitted.get(path)
        if admitted is None:
            return
        key = (agent, ip)
        admitted[key] -= 1
        if admitted[key] <= 0:
            del admitted[key]
        if not admitted:
            del self._admitted[path]

    def agent_gone(self, agent: int) -> None:
        """A worker died: its tunnels died with it."""
        for path in list(self._admitted):
            admitted = self._admitted[path]
            for key in [k for k in admitted if k[0] == agent]:
                del admitted[key]
            if not admitted:
                del self._admitted[path]

    def open_tunnels(self, path: str) -> int:
        """Admitted tunnels of path still open, in every agent."""
        admitted = self._admitted.get(path)
        return sum(admitted.values()) if admitted is not None else 0

    def __len__(self) -> int:
        """Users with an admitted tunnel open."""
        return len(self._admitted)

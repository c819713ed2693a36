"""GET /healthz and GET /readyz on the controller, for systemd, Docker and load
balancers (docs/deployment.md, "Health checks").

/healthz says the process is alive: its event loop answered. /readyz says it
can serve: started (the ready line is logged), not stopping, and each check
the server registered holds (the tunnel listener listening, the store
reachable, every worker running and answering). Every check reads state the
server already keeps, so a probe costs no store round trip. Neither needs
the controller token: a probe has none to give, and the answers say no more
than a generic reason (`store`, `workers`, ...), never an address or an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Readiness:
    """What /readyz reports; the server sets started and stopping and adds the checks."""

    started: bool = False
    stopping: bool = False
    checks: list[tuple[str, Callable[[], bool]]] = field(default_factory=list)

    def reasons(self) -> list[str]:
        """Why the server is not ready; empty when it is."""
        if self.stopping:
            return ["stopping"]
        if not self.started:
            return ["starting"]
        return [name for name, holds in self.checks if not holds()]

    def answer(self) -> tuple[int, dict[str, Any]]:
        """The /readyz status and body."""
        reasons = self.reasons()
        if not reasons:
            return 200, {"status": "ok"}
        return 503, {"status": "unready", "reasons": reasons}

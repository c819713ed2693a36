"""What the user service answers a command with: domain results, not replies.

Each result carries the table's size and revision as the service saw them
when it answered; how a result looks on the wire (JSON fields, HTTP status)
is the controller's business. A command that cannot be carried out raises an
MttError (StoreError: the store is away, nothing was applied).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtt.core.enforcement import Blocked
from mtt.core.harvest import Acked, Harvest, Refused
from mtt.core.usage import Usage
from mtt.core.users import User


@dataclass(frozen=True, slots=True)
class UserReport:
    """One user as a list shows it: settings, counters and open tunnels."""

    path: str
    user: User
    usage: Usage
    active_tunnels: int
    client_ips: tuple[str, ...]  # sorted
    state: str  # "ok", "expired" or "over_quota"
    blocked: Blocked | None = None  # its open tunnels were closed by a limit


@dataclass(frozen=True, slots=True)
class Changed:
    """An add, delete, reset or replace is stored and served.

    revision is this change's own: later changes may have bumped the table's
    by the time it is answered, and a panel syncing by revision must not take
    another writer's change for its own.
    """

    revision: int
    users: int


@dataclass(frozen=True, slots=True)
class Listed:
    """The users asked for, in path order."""

    reports: tuple[UserReport, ...]
    users: int
    revision: int


@dataclass(frozen=True, slots=True)
class Kicked:
    """How many tunnels a kick closed."""

    tunnels: int
    users: int
    revision: int


@dataclass(frozen=True, slots=True)
class Pong:
    """A ping: the table's size and revision."""

    users: int
    revision: int


@dataclass(frozen=True, slots=True)
class Harvested:
    """The harvest under the id asked for; repeat: an earlier request took it."""

    harvest: Harvest
    repeat: bool
    users: int
    revision: int


@dataclass(frozen=True, slots=True)
class HarvestRefused:
    """No harvest under that id: another one is pending, or the id was acknowledged."""

    refusal: Refused
    harvest_id: str
    users: int
    revision: int


@dataclass(frozen=True, slots=True)
class HarvestAcked:
    """What an ack did (acked, already_acked, unknown) and what is pending now."""

    acked: Acked
    harvest_id: str
    users: int
    revision: int


@dataclass(frozen=True, slots=True)
class HarvestPending:
    """The harvest taken and not yet acknowledged, if any."""

    harvest: Harvest | None
    users: int
    revision: int


Result = (
    Changed | Listed | Kicked | Pong | Harvested | HarvestRefused | HarvestAcked | HarvestPending
)

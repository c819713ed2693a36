"""The controller's JSON replies, built from the user service's results.

Every reply has the original's shape (mtt.core.commands.reply: res,
err_string, current_users, and our revision); a list adds "users", a kick
adds "kicked", a harvest its id, time and "harvested" users, an ack its
state (docs/protocol.md §6, harvests). The HTTP status beside it is chosen
by http.py.
"""

from __future__ import annotations

from typing import Any

from mtt.address import quote
from mtt.core.commands import RES_ERR, RES_OK, reply
from mtt.core.harvest import Harvest
from mtt.core.users import LIMIT_FIELDS
from mtt.service.results import (
    Changed,
    HarvestAcked,
    Harvested,
    HarvestPending,
    HarvestRefused,
    Kicked,
    Listed,
    Pong,
    Result,
    UserReport,
)
from mtt.service.user_service import UserService


def error_reply(service: UserService, err_string: str) -> dict[str, Any]:
    """res 2 with the table's size and revision as they are now."""
    return reply(RES_ERR, service.count(), err_string, service.revision)


def result_reply(result: Result) -> dict[str, Any]:
    """res 1 for a command the service carried out."""
    match result:
        case Changed(revision, users):
            return reply(RES_OK, users, "", revision)
        case Listed(reports, users, revision):
            return {**reply(RES_OK, users, "", revision), "users": describe_users(reports)}
        case Kicked(tunnels, users, revision):
            return {**reply(RES_OK, users, "", revision), "kicked": tunnels}
        case Pong(users, revision):
            return reply(RES_OK, users, "", revision)
        case Harvested(harvest, repeat, users, revision):
            return {**reply(RES_OK, users, "", revision), **describe_harvest(harvest, repeat)}
        case HarvestRefused(refusal, harvest_id, users, revision):
            if refusal.pending_id:
                why = (
                    f"harvest {quote(refusal.pending_id)} is pending: repeat it (opt 7 with"
                    " its harvest_id) and acknowledge it (opt 8) before taking another"
                )
            else:
                why = f"harvest_id {quote(harvest_id)} was acknowledged already: choose a new one"
            return {**reply(RES_ERR, users, why, revision), "pending_id": refusal.pending_id}
        case HarvestAcked(acked, harvest_id, users, revision):
            return {
                **reply(RES_OK, users, "", revision),
                "harvest_id": harvest_id,
                "ack": str(acked.state),
                "pending_id": acked.pending_id,
            }
        case HarvestPending(harvest, users, revision):
            base = reply(RES_OK, users, "", revision)
            if harvest is None:
                return {**base, "harvest_id": ""}
            return {**base, **describe_harvest(harvest, repeat=True)}


def describe_harvest(harvest: Harvest, repeat: bool) -> dict[str, Any]:
    """A harvest's fields of a reply (opt 7, opt 10), the same however often asked."""
    return {
        "harvest_id": harvest.harvest_id,
        "taken_at": int(harvest.taken_at),
        "repeat": repeat,
        "more": harvest.more,
        "harvested": [
            {
                "path": path,
                "bytes_up": share.bytes_up,
                "bytes_down": share.bytes_down,
                "total_tunnels": share.total_tunnels,
            }
            for path, share in harvest.users
        ],
    }


def describe_users(reports: tuple[UserReport, ...]) -> list[dict[str, Any]]:
    return [_describe(report) for report in reports]


def _describe(report: UserReport) -> dict[str, Any]:
    """One user of a list reply (docs/controller.md), fields in this order."""
    user = report.user
    usage = report.usage
    out: dict[str, Any] = {"path": report.path, "dst": str(user.dst)}
    for name in LIMIT_FIELDS:
        out[name] = getattr(user.limits, name)
    out["mux"] = user.mux.value if user.mux is not None else None
    out.update(
        bytes_up=usage.bytes_up,
        bytes_down=usage.bytes_down,
        quota_used=usage.quota_used,
        active_tunnels=report.active_tunnels,
        total_tunnels=usage.total_tunnels,
        last_seen=int(usage.last_seen),
        client_ips=list(report.client_ips),
        state=report.state,
        blocked=report.blocked.reason if report.blocked is not None else "",
        blocked_at=int(report.blocked.at) if report.blocked is not None else 0,
    )
    return out

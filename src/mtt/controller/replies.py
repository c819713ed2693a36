"""The controller's JSON replies, built from the user service's results.

Every reply has the original's shape (mtt.core.commands.reply: res,
err_string, current_users, and our revision); a list adds "users", a kick
adds "kicked". The HTTP status beside it is chosen by http.py.
"""

from __future__ import annotations

from typing import Any

from mtt.core.commands import RES_ERR, RES_OK, reply
from mtt.core.users import LIMIT_FIELDS
from mtt.service.results import Changed, Kicked, Listed, Pong, Result, UserReport
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


def describe_users(reports: tuple[UserReport, ...]) -> list[dict[str, Any]]:
    return [_describe(report) for report in reports]


def _describe(report: UserReport) -> dict[str, Any]:
    """One user of a list reply (docs/controller.md), fields in this order."""
    user = report.user
    usage = report.usage
    out: dict[str, Any] = {"path": report.path, "dst": str(user.dst)}
    for name in LIMIT_FIELDS:
        out[name] = getattr(user.limits, name)
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

"""Where the controller's changes go: one in-process table, or a supervisor
that keeps every worker's table in step (mtt.server.workers).

A change is applied everywhere before the controller replies res 1.
"""

from __future__ import annotations

from typing import Any, Protocol

from mtt.address import Destination
from mtt.controller.api import Command, Opt, apply_command
from mtt.server.users import UserTable


class UserStore(Protocol):
    """The controller's view of the users."""

    def count(self) -> int: ...
    async def apply(self, command: Command) -> None: ...


class LocalStore:
    """The table the tunnel listener of this very process reads."""

    def __init__(self, table: UserTable) -> None:
        self.table = table

    def count(self) -> int:
        return len(self.table)

    async def apply(self, command: Command) -> None:
        apply_command(self.table, command)


def command_to_wire(command: Command) -> dict[str, Any]:
    """A validated command as a control-channel message."""
    if command.opt is Opt.ADD:
        return {"op": "add", "entries": [[p, d.host, d.port] for p, d in command.entries]}
    if command.opt is Opt.DELETE:
        return {"op": "delete", "paths": list(command.paths)}
    if command.opt is Opt.RESET:
        return {"op": "reset"}
    raise ValueError(f"opt {command.opt} changes nothing and is never sent")


def command_from_wire(message: dict[str, Any]) -> Command:
    """The inverse of command_to_wire (the channel is trusted: already validated)."""
    op = message["op"]
    if op == "add":
        entries = tuple((p, Destination(h, port)) for p, h, port in message["entries"])
        return Command(Opt.ADD, entries=entries)
    if op == "delete":
        return Command(Opt.DELETE, paths=tuple(message["paths"]))
    if op == "reset":
        return Command(Opt.RESET)
    raise ValueError(f"unknown control op {op!r}")


def snapshot(table: UserTable) -> Command:
    """The whole table as one add (for a worker that starts or restarts)."""
    return Command(Opt.ADD, entries=tuple(table.items()))

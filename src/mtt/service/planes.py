"""The user service and a tunnel listener in one process (-workers 1): the
same requests as between a supervisor and its workers, as direct calls."""

from __future__ import annotations

from typing import Any

from mtt.core.admission import Verdict
from mtt.core.commands import Command
from mtt.core.rate import Direction
from mtt.core.usage import Usage
from mtt.service.agent import Agent
from mtt.service.user_service import UserService
from mtt.transport.tasks import spawn

LOCAL_AGENT = 0


class LocalLink:
    """The agent's way to the service in the same process."""

    def __init__(self, service: UserService) -> None:
        self._service = service

    async def admit(self, path: str, ip: str) -> Verdict:
        return await self._service.admit(LOCAL_AGENT, path, ip)

    def release(self, path: str, ip: str, delta: Usage) -> None:
        spawn(self._service.release(LOCAL_AGENT, path, ip, delta), name=f"release {path}")

    async def tokens(self, path: str, direction: Direction, want: int) -> int:
        return await self._service.tokens(path, direction, want)

    def exhausted(self, path: str, closed: int, unreported: int) -> None:
        spawn(self._service.exhausted(path, closed, unreported), name=f"quota of {path}")


class LocalPlane:
    """The service's way to the agent in the same process."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    async def apply(self, command: Command, kick: bool) -> None:
        self.agent.apply(command, kick)

    async def collect(self) -> list[dict[str, Any]]:
        return [self.agent.collect()]

    async def kick(self, paths: tuple[str, ...], why: str | None = None) -> int:
        return self.agent.kick(paths, why)

    def grant(self, budgets: dict[str, int]) -> None:
        self.agent.grant(budgets)

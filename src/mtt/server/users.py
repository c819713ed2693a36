"""The user table: URL path -> the user's TCP backend.

Lookups happen once per upgrade, changes come from the controller; a plain
dict gives O(1) lookups at a million users, and each controller request is
applied with one dict operation per entry after validation, so a reader on the
event loop never sees a half-applied request.
"""

from __future__ import annotations

from collections.abc import Iterable

from mtt.address import Destination


class UserTable:
    """Paths to destinations; every method is all-or-nothing."""

    __slots__ = ("_routes",)

    def __init__(self) -> None:
        self._routes: dict[str, Destination] = {}

    def __len__(self) -> int:
        return len(self._routes)

    def items(self) -> Iterable[tuple[str, Destination]]:
        return self._routes.items()

    def lookup(self, path: str) -> Destination | None:
        return self._routes.get(path)

    def add(self, entries: Iterable[tuple[str, Destination]]) -> None:
        """Add or overwrite; entries must already be validated."""
        self._routes.update(entries)

    def delete(self, paths: Iterable[str]) -> None:
        """Remove paths; unknown paths are ignored, as in the original."""
        routes = self._routes
        for path in paths:
            routes.pop(path, None)

    def reset(self) -> None:
        self._routes = {}

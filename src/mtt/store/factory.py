"""Which store the flags ask for."""

from __future__ import annotations

import os
from pathlib import Path

from mtt.config import ServerConfig
from mtt.store.base import Store
from mtt.store.memory import MemoryStore

MEMORY = "memory"


def default_db_path() -> str:
    """/var/lib/mtt-mu-server/users.db for root (systemd's StateDirectory),
    else under $XDG_STATE_HOME (~/.local/state)."""
    if os.geteuid() == 0:
        return "/var/lib/mtt-mu-server/users.db"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "mtt-mu-server" / "users.db")


async def open_store(config: ServerConfig) -> Store:
    """Open (and load nothing yet from) the store the configuration names."""
    # Imported here: a node pays for the client library it uses only.
    if config.store:
        from mtt.store.redis_store import RedisStore  # noqa: PLC0415

        return RedisStore(config.store, config.flush_interval)
    if config.db == MEMORY:
        return MemoryStore()
    from mtt.store.sqlite import SqliteStore  # noqa: PLC0415

    return await SqliteStore.open(
        config.db, config.flush_interval, config.limits.sqlite_busy_timeout
    )

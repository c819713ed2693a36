"""Every accepted change's reply names the revision that change produced.

A panel syncs by revision (docs/controller.md): it keeps the revision its last
change returned and compares opt 9's. Were a reply to carry a later change's
revision, a concurrent writer's change would go unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import concurrent_adds, running_server

THREADS, EACH = 8, 100


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("db", ["memory", "sqlite"])
def test_concurrent_adds_each_get_their_own_revision(db: str, workers: str, tmp_path: Path) -> None:
    where = "memory" if db == "memory" else str(tmp_path / "users.db")
    with running_server("-db", where, "-workers", workers) as server:
        start, revisions = concurrent_adds([server], THREADS, EACH)
        assert len(set(revisions)) == THREADS * EACH, "two replies named one revision"
        assert sorted(revisions) == list(range(start + 1, start + THREADS * EACH + 1))
        status, reply = server.control({"opt": 9})
        assert (status, reply["revision"], reply["current_users"]) == (200, start + 800, 800)

"""/readyz's answer from the server's state (mtt.controller.health), no server."""

from __future__ import annotations

from mtt.controller.health import Readiness


def test_starting_then_ready_then_stopping() -> None:
    store_up = [True]
    readiness = Readiness(checks=[("store", lambda: store_up[0]), ("listener", lambda: True)])
    assert readiness.answer() == (503, {"status": "unready", "reasons": ["starting"]})
    readiness.started = True
    assert readiness.answer() == (200, {"status": "ok"})
    store_up[0] = False
    assert readiness.answer() == (503, {"status": "unready", "reasons": ["store"]})
    readiness.stopping = True
    assert readiness.answer() == (503, {"status": "unready", "reasons": ["stopping"]})


def test_every_failing_check_is_named_in_order() -> None:
    readiness = Readiness(
        started=True, checks=[("store", lambda: False), ("workers", lambda: False)]
    )
    assert readiness.reasons() == ["store", "workers"]

"""When a smux session's timer fires for its idle-stream sweep: a fraction of
the tunnel idle timeout, within the bounds SmuxConfig gives (a fake loop)."""

from __future__ import annotations

from typing import Any

import pytest

from mtt.smux import SmuxConfig
from mtt.transport.session_timer import SessionTimer


class FakeLoop:
    """The two calls SessionTimer makes: time() and call_at()."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.scheduled: list[float] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> Any:
        self.scheduled.append(when)
        return self

    def cancel(self) -> None:
        pass


@pytest.mark.parametrize(
    ("idle_timeout", "config", "every"),
    [
        (8.0, SmuxConfig(), 2.0),  # a quarter of the idle timeout
        (300.0, SmuxConfig(), 15.0),  # but at least every idle_sweep_max
        (0.1, SmuxConfig(), 0.05),  # and not more often than idle_sweep_min
        (8.0, SmuxConfig(idle_sweeps=8), 1.0),
        (300.0, SmuxConfig(idle_sweep_max=60.0), 60.0),
        (0.1, SmuxConfig(idle_sweep_min=0.01), 0.025),
    ],
)
def test_the_sweep_follows_the_idle_timeout_within_the_bounds(
    idle_timeout: float, config: SmuxConfig, every: float
) -> None:
    loop = FakeLoop()
    timer = SessionTimer(loop, idle_timeout, config, lambda now, sweep: None)  # type: ignore[arg-type]
    timer.rearm(None)
    assert loop.scheduled == [pytest.approx(1000.0 + every)]
    timer.rearm(1000.0 + every / 2)  # the smux deadline comes first
    assert loop.scheduled[-1] == pytest.approx(1000.0 + every / 2)


@pytest.mark.parametrize(
    "bad",
    [{"idle_sweeps": 0}, {"idle_sweep_min": 0.0}, {"idle_sweep_min": 2.0, "idle_sweep_max": 1.0}],
)
def test_bad_sweep_bounds_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="idle_sweep"):
        SmuxConfig(**bad)  # type: ignore[arg-type]

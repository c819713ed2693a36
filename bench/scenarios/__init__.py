"""The scenarios, in run order; each module has steps(settings) and run(context)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.context import Context
from bench.scenarios import (
    client,
    control,
    limits,
    scale,
    setup_rate,
    stalled,
    throughput,
    workers,
)
from bench.settings import Settings


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    steps: Callable[[Settings], int]
    run: Callable[[Context], None]
    gated: bool = True  # False: informational only, so left out of --quick unless --only names it


SCENARIOS = (
    Scenario("throughput", throughput.SECTION, throughput.steps, throughput.run),
    Scenario("setup", setup_rate.SECTION, setup_rate.steps, setup_rate.run),
    Scenario("scale", scale.SECTION, scale.steps, scale.run),
    Scenario("stalled", stalled.SECTION, stalled.steps, stalled.run),
    Scenario("control", control.SECTION, control.steps, control.run),
    Scenario("client", client.SECTION, client.steps, client.run, gated=False),
    Scenario("workers", workers.SECTION, workers.steps, workers.run, gated=False),
    Scenario("limits", limits.SECTION, limits.steps, limits.run, gated=False),
)

"""What every scenario gets (settings, progress, results, certificates) and the A/B loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench.model import Results
from bench.peers import Certs
from bench.progress import Progress
from bench.settings import Settings

T = TypeVar("T")
CONFIRM_ROUNDS = 2
SUSPECT = 0.55  # goodness below this (gross is 0.5) is re-measured in the quick gate


@dataclass
class Context:
    settings: Settings
    progress: Progress
    results: Results
    certs: Certs
    workdir: Path


def interleave(
    ctx: Context,
    title: str,
    arms: Sequence[tuple[str, Callable[[], T]]],
    rounds: int | None = None,
    *,
    planned: bool = True,
) -> dict[str, list[T]]:
    """Run every arm once per round, reversing the order each round (A B, B A, A B ...),
    so drift in the machine (thermal, page cache, other load) hits all arms alike."""
    samples: dict[str, list[T]] = {label: [] for label, _ in arms}
    rounds = rounds or ctx.settings.rounds
    for r in range(rounds):
        order = list(arms) if r % 2 == 0 else list(reversed(arms))
        for label, measure in order:
            text = f"{title}: round {r + 1}/{rounds} {label}"
            if planned:
                ctx.progress.step(text)
            else:
                ctx.progress.note(text)
            samples[label].append(measure())
    return samples


def confirm(
    ctx: Context,
    title: str,
    arms: Sequence[tuple[str, Callable[[], T]]],
    samples: dict[str, list[T]],
    looks_gross: Callable[[dict[str, list[T]]], bool],
) -> None:
    """Quick gate: one 1-second round is noisy, so a result that looks like a gross
    regression gets CONFIRM_ROUNDS more rounds (merged in) before it may fail the run."""
    if not ctx.settings.quick or not looks_gross(samples):
        return
    ctx.progress.note(f"{title}: looks like a gross regression, measuring again")
    extra = interleave(ctx, f"{title} (confirming)", arms, CONFIRM_ROUNDS, planned=False)
    for label, values in extra.items():
        samples[label].extend(values)

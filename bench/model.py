"""What a run produces: metrics (ours beside a baseline), skips and failures, and the
rules that turn them into met/missed targets and the quick gate's exit code."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

Better = Literal["higher", "lower"]
GROSS = 0.5  # the quick gate: worse than half the baseline is a gross regression


@dataclass
class Metric:
    """One measured quantity, ours and (usually) a baseline measured A/B in the same run."""

    section: str
    name: str
    unit: str
    better: Better
    ours: list[float]
    ref: list[float] = field(default_factory=list)
    ours_label: str = "ours"
    ref_label: str = "Go relay"
    direct: list[float] = field(default_factory=list)  # no-tunnel baseline, where one exists
    target: float | None = None  # bound on ours/ref: >= (higher) or <= (lower)
    limit: float | None = None  # absolute bound on ours' median: < limit (lower is better)
    gross_limit: float | None = None  # quick gate: gross at or above this median (no ratio)
    overlap_ok: bool = False  # "no measurable change": also met if the min-max ranges overlap
    gate: bool = False  # part of the gross-regression exit code
    note: str = ""

    def ratio(self) -> float | None:
        """ours / ref of the medians (1.2 = ours is 20% more, whatever `better` says)."""
        if not self.ours or not self.ref:
            return None
        ref = statistics.median(self.ref)
        return statistics.median(self.ours) / ref if ref else None

    def goodness(self) -> float | None:
        """The ratio oriented so that > 1 means ours is better."""
        r = self.ratio()
        if r is None:
            return None
        if self.better == "higher":
            return r
        return 1 / r if r else float("inf")

    def overlaps(self) -> bool:
        if not self.ours or not self.ref:
            return False
        return min(self.ours) <= max(self.ref) and min(self.ref) <= max(self.ours)

    def target_text(self) -> str:
        if self.limit is not None:
            return f"< {self.limit:g} {self.unit}"
        if self.target is None:
            return ""
        sign = ">=" if self.better == "higher" else "<="
        text = f"{sign} {self.target:g}x"
        return text + " or overlap" if self.overlap_ok else text

    def met(self) -> bool | None:
        """None when there is no target."""
        if self.limit is not None:
            return bool(self.ours) and statistics.median(self.ours) < self.limit
        r = self.ratio()
        if self.target is None or r is None:
            return None
        ok = r >= self.target if self.better == "higher" else r <= self.target
        return ok or (self.overlap_ok and self.overlaps())

    def gross_regression(self) -> bool:
        if not self.gate:
            return False
        if self.gross_limit is not None and self.ours:
            return statistics.median(self.ours) >= self.gross_limit
        g = self.goodness()
        return g is not None and g < GROSS

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self.__dict__.items()},
            "ratio": self.ratio(),
            "met": self.met(),
        }


@dataclass
class Skip:
    section: str
    name: str
    reason: str


@dataclass
class Failure:
    section: str
    name: str
    error: str
    gate: bool = True  # False: reported, but not a reason for a non-zero exit


@dataclass
class Results:
    metrics: list[Metric] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)

    def gross_regressions(self) -> list[Metric]:
        return [m for m in self.metrics if m.gross_regression()]

    def gating_failures(self) -> list[Failure]:
        return [f for f in self.failures if f.gate]

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Results:
        """The inverse of to_json, to re-render a report without measuring again."""
        fields = set(Metric.__dataclass_fields__)
        return cls(
            metrics=[Metric(**{k: v for k, v in m.items() if k in fields}) for m in doc["metrics"]],
            skips=[Skip(**s) for s in doc["skips"]],
            failures=[Failure(**f) for f in doc["failures"]],
            info=doc["info"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "info": self.info,
            "metrics": [m.to_json() for m in self.metrics],
            "skips": [s.__dict__ for s in self.skips],
            "failures": [f.__dict__ for f in self.failures],
        }

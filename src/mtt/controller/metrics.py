"""GET /metrics: Prometheus text from the user service's totals.

Counts are fetched from every process at scrape time, so a scrape sees
traffic up to that moment. Per-user series are opt-in (-metrics-per-user):
one series per user per metric is what breaks a Prometheus with a million
users, and the label is the user's path, which is a credential.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mtt.core.stats import LATENCY_BUCKETS
from mtt.service.results import UserReport
from mtt.service.user_service import UserService

TUNNEL_MODES = ("plain", "smux", "muxcool")
HANDSHAKE_REASONS = (
    "tls",
    "timeout",
    "closed",
    "bad_request",
    "unknown_path",
    "not_websocket",
    "refused",
    "proxy_header",
)
DIAL_REASONS = ("refused", "timeout", "other")


async def render_metrics(service: UserService, per_user: bool) -> bytes:
    users = await service.list_users(None, False) if per_user else None
    if users is None:
        await service.collect()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(service, users))
    return generate_latest(registry)


class _Snapshot(Collector):
    def __init__(self, service: UserService, users: list[UserReport] | None) -> None:
        self._service = service
        self._users = users

    def collect(self) -> Iterator[Metric]:
        service = self._service
        totals = service.totals
        gauges = service.gauges
        yield GaugeMetricFamily("mtt_users", "Users in the table", value=service.count())
        yield GaugeMetricFamily(
            "mtt_revision", "Revision of the user table", value=service.revision
        )
        active = GaugeMetricFamily("mtt_tunnels_active", "Open tunnels", labels=["mode"])
        opened = CounterMetricFamily("mtt_tunnels_opened", "Tunnels opened", labels=["mode"])
        for mode in TUNNEL_MODES:
            active.add_metric([mode], gauges.get(mode, 0))
            opened.add_metric([mode], totals.opened.get(mode, 0))
        yield active
        yield opened
        yield GaugeMetricFamily(
            "mtt_streams_active",
            "Open smux streams and Mux.Cool sub-connections",
            value=gauges.get("stream", 0),
        )
        yield CounterMetricFamily(
            "mtt_streams_opened",
            "smux streams and Mux.Cool sub-connections opened",
            value=totals.opened.get("stream", 0),
        )
        traffic = CounterMetricFamily(
            "mtt_bytes", "Payload bytes relayed (up: client to dst)", labels=["direction"]
        )
        traffic.add_metric(["up"], totals.bytes_up)
        traffic.add_metric(["down"], totals.bytes_down)
        yield traffic
        yield _by_reason(
            "mtt_handshake_failures",
            "Connections that did not become a tunnel",
            HANDSHAKE_REASONS,
            totals.handshake_failures,
        )
        yield _by_reason(
            "mtt_dial_failures", "Failed connections to a dst", DIAL_REASONS, totals.dial_failures
        )
        cumulative = 0
        buckets = []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), totals.latency, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "mtt_handshake_seconds",
            "From accept (TLS included) to the upgrade",
            buckets=buckets,
            sum_value=totals.latency_sum,
        )
        if self._users is not None:
            yield from _per_user(self._users)


def _by_reason(
    name: str, documentation: str, reasons: tuple[str, ...], counts: dict[str, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason in sorted({*reasons, *counts}):
        family.add_metric([reason], counts.get(reason, 0))
    return family


def _per_user(users: list[UserReport]) -> Iterator[Metric]:
    traffic = CounterMetricFamily(
        "mtt_user_bytes",
        "A user's payload bytes since its counters were last reset",
        labels=["user", "direction"],
    )
    active = GaugeMetricFamily("mtt_user_tunnels_active", "A user's open tunnels", labels=["user"])
    used = GaugeMetricFamily(
        "mtt_user_quota_used_bytes", "Bytes counted against a user's quota", labels=["user"]
    )
    for user in users:
        path = user.path
        traffic.add_metric([path, "up"], user.usage.bytes_up)
        traffic.add_metric([path, "down"], user.usage.bytes_down)
        active.add_metric([path], user.active_tunnels)
        used.add_metric([path], user.usage.quota_used)
    yield traffic
    yield active
    yield used

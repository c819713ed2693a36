"""How long and how often to measure: the full run and the quick gate differ only here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one run; every loop in the suite is bounded by these."""

    quick: bool
    rounds: int  # A/B rounds per scenario (ours and the baseline alternate)
    iperf_seconds: int  # iperf3 -t per measurement
    warmup_seconds: int  # unmeasured iperf3 run per relay before the rounds (0: none)
    direct_baseline: bool  # also run iperf3 with no tunnel (the ceiling; not gated)
    rate_seconds: float  # duration cap of one connection-setup measurement
    rate_max_ops: int  # count cap of one connection-setup measurement
    rate_concurrency: int
    scale_counts: tuple[int, ...]  # concurrent open plain tunnels to hold
    scale_mux_streams: int  # concurrent smux streams to hold, 16 per session (0: skip)
    bulk_users: int  # users in one controller add
    many_users: int  # users loaded for the "many users" checks (0: skip)
    ping_count: int  # controller pings per round
    client_flows: tuple[str, ...]  # throughput flows for Python client vs Go client
    stalled_connections: int  # silent and half-handshaken connections per wave (0: skip)
    stalled_waves: int  # waves of them on the same server

    @classmethod
    def full(cls) -> Settings:
        return cls(
            quick=False,
            rounds=3,
            iperf_seconds=5,
            warmup_seconds=1,
            direct_baseline=True,
            rate_seconds=3.0,
            rate_max_ops=20_000,
            rate_concurrency=4,
            scale_counts=(1_000, 10_000),
            scale_mux_streams=10_000,
            bulk_users=40_000,
            many_users=1_000_000,
            ping_count=200,
            client_flows=("plain upload", "plain download", "mux upload"),
            stalled_connections=3_000,
            stalled_waves=3,
        )

    @classmethod
    def quick_gate(cls) -> Settings:
        return cls(
            quick=True,
            rounds=1,
            iperf_seconds=1,
            warmup_seconds=0,
            direct_baseline=False,
            rate_seconds=1.0,
            rate_max_ops=5_000,
            rate_concurrency=4,
            scale_counts=(200,),
            scale_mux_streams=0,
            bulk_users=40_000,
            many_users=0,
            ping_count=50,
            client_flows=("plain upload",),
            stalled_connections=1_000,
            stalled_waves=1,
        )

    def describe(self) -> str:
        rounds = f"{self.rounds} round{'s' if self.rounds > 1 else ''}"
        return (
            f"{rounds}; iperf3 -t {self.iperf_seconds} per measurement; connection setup "
            f"{self.rate_seconds:g} s per measurement, {self.rate_concurrency} at a time; scale "
            f"{', '.join(f'{n:,}' for n in self.scale_counts)} plain tunnels"
            + (f" and {self.scale_mux_streams:,} smux streams" if self.scale_mux_streams else "")
            + (
                f"; {self.stalled_waves} wave{'s' if self.stalled_waves > 1 else ''} of "
                f"{self.stalled_connections:,} silent + {self.stalled_connections:,} "
                "half-handshaken connections"
                if self.stalled_connections
                else ""
            )
        )

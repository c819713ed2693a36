"""Shared measurements: iperf3 through a client and a relay (with the relay's CPU cost),
and iperf3 straight to the dst as the no-tunnel baseline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.iperf import IperfHung, IperfRun, run_client
from bench.peers import BenchError, Client, GoClient, IperfServer, Relay
from bench.procstat import cpu_seconds

ClientFactory = Callable[[str, bool, int], Client]


@dataclass(frozen=True)
class Flow:
    """One iperf3 traffic shape through the tunnel."""

    name: str
    mux: bool
    reverse: bool = False
    parallel: int = 1
    max_stream: int = 4  # mttclient -mux-max-stream

    @property
    def direct_key(self) -> str:
        """Flows with the same iperf3 shape share a no-tunnel baseline."""
        return f"{'download' if self.reverse else 'upload'} x{self.parallel}"


FLOWS = {
    f.name: f
    for f in (
        Flow("plain upload", mux=False),
        Flow("plain download", mux=False, reverse=True),
        Flow("plain 8 streams", mux=False, parallel=8),
        Flow("mux upload", mux=True),
        Flow("mux download", mux=True, reverse=True),
        # 8 data streams + iperf3's control connection, all in one smux session
        Flow("mux 8 streams", mux=True, parallel=8, max_stream=16),
    )
}


ATTEMPTS = 2  # a measurement whose client or iperf3 failed is retried once, and reported


@dataclass(frozen=True)
class Sample:
    gbps: float
    cpu_s_per_gb: float  # relay process (tree) CPU seconds per 1e9 payload bytes
    retried: tuple[str, ...] = ()  # why earlier attempts of this measurement failed


def retry_note(*series: list[Sample]) -> str:
    """A line for the report when some measurements needed a second attempt."""
    reasons = [r for xs in series for x in xs for r in x.retried]
    total = sum(len(xs) for xs in series)
    if not reasons:
        return ""
    return f"{len(reasons)} of {total} measurements retried once; first failure: {reasons[0]}"


def _iperf(iperf: IperfServer, port: int, seconds: int, flow: Flow) -> IperfRun:
    """One iperf3 run; after a failure the iperf3 server is restarted for the next one."""
    try:
        return run_client(port, seconds, reverse=flow.reverse, parallel=flow.parallel)
    except BenchError:
        iperf.restart()
        raise


def _through_once(
    relay: Relay, flow: Flow, seconds: int, iperf: IperfServer, client_factory: ClientFactory
) -> Sample:
    client = client_factory(relay.addr, flow.mux, flow.max_stream)
    try:
        before = cpu_seconds(relay.pid)
        try:
            run = _iperf(iperf, client.port, seconds, flow)
        except BenchError as exc:
            died = "" if client.alive() else f"; {client.label} died: {client.failure()}"
            raise BenchError(f"{exc}{died}") from exc
        used = cpu_seconds(relay.pid) - before
        if not client.alive():
            raise BenchError(f"{client.label} died during the run: {client.failure()}")
    finally:
        client.stop()
    if run.bytes <= 0:
        raise BenchError("iperf3 moved no data")
    return Sample(run.gbps, used / (run.bytes / 1e9))


def through_relay(
    relay: Relay,
    flow: Flow,
    seconds: int,
    iperf: IperfServer,
    client_factory: ClientFactory = GoClient,
) -> Sample:
    """iperf3 -> client -> relay -> iperf3 -s, with a fresh client process per attempt."""
    failures: list[str] = []
    for _ in range(ATTEMPTS):
        if not relay.alive():
            raise BenchError(f"{relay.label} is not running; " + "; ".join(failures))
        try:
            sample = _through_once(relay, flow, seconds, iperf, client_factory)
        except IperfHung:
            raise  # a stuck tunnel: a second try would only hang as well
        except BenchError as exc:
            failures.append(f"{relay.label}: {exc}")
            continue
        return Sample(sample.gbps, sample.cpu_s_per_gb, tuple(failures))
    raise BenchError("; ".join(failures))


def direct(flow: Flow, seconds: int, iperf: IperfServer) -> Sample:
    """The same iperf3 run with no tunnel at all (retried once)."""
    try:
        run = _iperf(iperf, iperf.port, seconds, flow)
    except IperfHung:
        raise
    except BenchError:
        run = _iperf(iperf, iperf.port, seconds, flow)
    return Sample(run.gbps, 0.0)

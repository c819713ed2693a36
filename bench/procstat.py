"""Process accounting from /proc: CPU seconds and RSS of a server and its children."""

from __future__ import annotations

import contextlib
import os
import resource

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
WANTED_NOFILE = 65_536


def process_tree(pid: int) -> list[int]:
    """pid and all its live descendants (a multi-worker server counts as one)."""
    seen = [pid]
    i = 0
    while i < len(seen) and len(seen) < 1024:
        current = seen[i]
        i += 1
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{current}/task"):
                with (
                    contextlib.suppress(OSError),
                    open(f"/proc/{current}/task/{tid}/children") as fh,
                ):
                    seen.extend(int(child) for child in fh.read().split())
    return seen


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by pid and its descendants."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident memory of pid and its descendants."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/statm") as fh:
            total += int(fh.read().split()[1]) * PAGE_SIZE
    return total


def raise_nofile(wanted: int = WANTED_NOFILE) -> int:
    """Raise RLIMIT_NOFILE for this process (children inherit it); returns the soft limit.

    Ten thousand tunnels need 20,000+ descriptors in the server alone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in ((max(wanted, hard), max(wanted, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
            return limit[0]
        except (ValueError, OSError):
            continue
    return soft


def is_listening(port: int) -> bool:
    """Whether some socket on this host listens on TCP port (no probe connection made)."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            next(fh, None)
            for line in fh:
                parts = line.split()
                if len(parts) > 3 and parts[1].endswith(want) and parts[3] == "0A":
                    return True
    return False


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (no idle, no iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_seconds() -> float:
    """CPU seconds of this process and every child it has reaped (servers, clients, tools)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine_jiffies() -> tuple[int, int]:
    """(idle, total) CPU time of the whole machine so far, from /proc/stat, in ticks."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user..steal

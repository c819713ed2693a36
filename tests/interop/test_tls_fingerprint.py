"""What fingerprinting tools make of the TLS listener, next to a real nginx with
the same certificate and Debian's ssl_* settings (test_probe_resistance.py's):
nmap -sV names the same service, every probe nmap has gets the same answer,
and JARM, which fingerprints the ServerHello of ten odd ClientHellos, gives
the same hash."""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from jarm.scanner.scanner import Scanner

from tests.support import ServerProcess

from .test_probe_resistance import nginx, ours, raw_exchange

__all__ = ["nginx", "ours"]  # the fixtures, shared with test_probe_resistance.py

pytestmark = [pytest.mark.interop, pytest.mark.slow]

NMAP_PROBES_FILE = Path("/usr/share/nmap/nmap-service-probes")
_ESCAPES = {"0": 0, "a": 7, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13}


def nmap() -> str:
    path = shutil.which("nmap")
    if path is None or not NMAP_PROBES_FILE.exists():
        pytest.fail("nmap is not installed (scripts/test installs Debian's)")
    return path


def unescape(text: str) -> bytes:
    r"""nmap's probe string syntax: C escapes and \xHH."""
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] != "\\":
            out.append(ord(text[i]))
            i += 1
        elif text[i + 1] == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            out.append(_ESCAPES.get(text[i + 1], ord(text[i + 1])))
            i += 2
    return bytes(out)


def nmap_tcp_probes() -> dict[str, bytes]:
    nmap()
    text = NMAP_PROBES_FILE.read_text(encoding="latin-1")
    found = re.finditer(r"^Probe TCP (\S+) q\|(.*)\|", text, re.MULTILINE)
    return {match.group(1): unescape(match.group(2)) for match in found}


def test_nmap_names_the_same_service(nginx: int, ours: ServerProcess) -> None:
    """One nmap -sV run for both ports (about 15 s)."""
    result = subprocess.run(
        [nmap(), "-sV", "-sT", "-Pn", "-n", "-p", f"{nginx},{ours.port}", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    services = dict(re.findall(r"^(\d+)/tcp\s+open\s+(.*?)\s*$", result.stdout, re.MULTILINE))
    assert services.get(str(nginx)) == "ssl/http nginx", result.stdout
    assert services.get(str(ours.port)) == services[str(nginx)], result.stdout


def test_every_nmap_probe_gets_nginx_answer(nginx: int, ours: ServerProcess) -> None:
    """Each of nmap's TCP probes, raw, to both; what comes back (Date blanked)
    and whether the connection is closed within 8 s must match."""
    probes = nmap_tcp_probes()
    assert len(probes) > 50
    jobs = [(name, port) for name in probes for port in (nginx, ours.port)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: raw_exchange(job[1], probes[job[0]], 8), jobs))
    by_probe = {jobs[i][0]: (answers[i], answers[i + 1]) for i in range(0, len(jobs), 2)}
    differ = {name: pair for name, pair in by_probe.items() if pair[0] != pair[1]}
    assert not differ, differ
    assert sum(1 for theirs, _ in by_probe.values() if theirs[0]) > 20  # most got an answer


def test_jarm_fingerprint_is_nginx_one(nginx: int, ours: ServerProcess) -> None:
    def jarm(port: int) -> str:
        fingerprint, _, _ = Scanner.scan("127.0.0.1", port, timeout=10, proxy="ignore")
        return str(fingerprint)

    theirs, mine = jarm(nginx), jarm(ours.port)
    assert theirs.strip("0"), "nginx gave no JARM answer"
    assert mine == theirs

"""The suite in two parts: scripts/test runs the tests marked serial one at a time,
after the rest ran in parallel (pytest-xdist), so the parallel part never disturbs
what they measure."""

from __future__ import annotations

import pytest

PARTS = ("all", "parallel", "serial")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--part",
        choices=PARTS,
        default="all",
        help="all tests (default), all but the ones marked serial, or only those",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    part = config.getoption("part")
    if part == "all":
        return
    want_serial = part == "serial"
    kept, dropped = [], []
    for item in items:
        is_serial = item.get_closest_marker("serial") is not None
        (kept if is_serial == want_serial else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    if not want_serial:
        # The slow tests go first, so that none of them starts last on one worker
        # while the others have nothing left to run (the sort keeps each order).
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)

"""The controller's pause of cyclic garbage collection: overlapping requests
share it, and it leaves collection as it found it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from mtt.controller import http
from mtt.service import gc_pause
from mtt.service.gc_pause import CollectionPause
from mtt.workers import rpc


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    if enabled:
        gc.enable()
    else:
        gc.disable()


def test_overlapping_pauses_enable_again_when_the_last_ends() -> None:
    gc.enable()
    pause = CollectionPause()
    first = pause.paused()
    second = pause.paused()
    first.__enter__()
    assert not gc.isenabled()
    second.__enter__()
    first.__exit__(None, None, None)  # the first request finishes while the second awaits
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_a_failing_request_ends_its_pause() -> None:
    gc.enable()
    pause = CollectionPause()
    with pytest.raises(RuntimeError), pause.paused():
        raise RuntimeError("store gone")
    assert gc.isenabled()


def test_collection_disabled_before_stays_disabled() -> None:
    gc.disable()
    pause = CollectionPause()
    with pause.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_the_controller_and_the_worker_channel_share_one_pause() -> None:
    """Separate pauses would end each other's: a worker's reply handled during
    a controller request would enable collection in the middle of it."""
    assert http.PAUSE is rpc.PAUSE is gc_pause.PAUSE

"""Harvests (opts 7, 8, 10): the request checks, the pick of users, the book of
pending and acknowledged ids, and the memory store that uses them."""

from __future__ import annotations

import json

import pytest

from mtt.address import Destination
from mtt.config import Limits
from mtt.core.commands import Command, Entry, Opt, parse_command
from mtt.core.harvest import (
    ENTRY_OVERHEAD,
    Acked,
    AckState,
    Harvest,
    HarvestBook,
    HarvestBounds,
    Refused,
    Share,
    Taken,
    entry_cost,
    pick,
)
from mtt.core.usage import Usage
from mtt.core.users import User
from mtt.errors import ControlError
from mtt.store.memory import MemoryStore

BOUNDS = HarvestBounds()


def parse(doc: object, bounds: HarvestBounds = BOUNDS) -> Command:
    return parse_command(json.dumps(doc).encode(), max_path=Limits().max_user_path, harvest=bounds)


def rejected(doc: object, bounds: HarvestBounds = BOUNDS) -> str:
    with pytest.raises(ControlError) as info:
        parse(doc, bounds)
    return str(info.value)


# -- the requests --------------------------------------------------------------------


def test_harvest_ack_and_pending_parse() -> None:
    assert parse({"opt": 7, "harvest_id": "2025-06:node1.a_b"}) == Command(
        Opt.HARVEST, harvest_id="2025-06:node1.a_b"
    )
    assert parse({"opt": 8, "harvest_id": "h1"}) == Command(Opt.ACK, harvest_id="h1")
    assert parse({"opt": 10}) == Command(Opt.PENDING)
    paths = [{"path": "/b"}, {"path": "/a"}, {"path": "/b"}]
    assert parse({"opt": 7, "harvest_id": "h", "args_bunch": paths}) == Command(
        Opt.HARVEST, paths=("/b", "/a"), harvest_id="h"
    )
    # an ack names only its id
    assert parse({"opt": 8, "harvest_id": "h", "args_bunch": [{"path": "/a"}]}).paths == ()


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ({"opt": 7}, "missing harvest_id"),
        ({"opt": 8}, "missing harvest_id"),
        ({"opt": 7, "harvest_id": 5}, "harvest_id must be a string"),
        ({"opt": 7, "harvest_id": None}, "harvest_id must be a string"),
        ({"opt": 7, "harvest_id": ""}, "harvest_id is empty"),
        ({"opt": 8, "harvest_id": "a" * 129}, "harvest_id is longer than 128 characters"),
        ({"opt": 7, "harvest_id": "a b"}, "harvest_id may hold only letters, digits and . _ : -"),
        ({"opt": 7, "harvest_id": "h\n"}, "harvest_id may hold only letters, digits and . _ : -"),
        ({"opt": 7, "harvest_id": "é"}, "harvest_id may hold only letters, digits and . _ : -"),
        ({"opt": 7, "harvest_id": "h", "args_bunch": []}, "args_bunch is empty"),
        ({"opt": 7, "harvest_id": "h", "args_bunch": {}}, "args_bunch must be an array"),
        ({"opt": 7, "harvest_id": "h", "args_bunch": [{"path": "x"}]}, "must start with /"),
        ({"opt": 11}, "unknown opt 11"),
    ],
)
def test_bad_harvest_requests_are_named(doc: dict[str, object], why: str) -> None:
    assert why in rejected(doc)


def test_the_id_and_the_paths_are_bounded() -> None:
    small = HarvestBounds(id_max_length=4, max_paths=2)
    assert parse({"opt": 7, "harvest_id": "abcd"}, small).harvest_id == "abcd"
    assert "longer than 4" in rejected({"opt": 7, "harvest_id": "abcde"}, small)
    two = [{"path": "/a"}, {"path": "/b"}]
    assert parse({"opt": 7, "harvest_id": "h", "args_bunch": two}, small).paths == ("/a", "/b")
    three = [*two, {"path": "/c"}]
    assert "more than 2 paths" in rejected(
        {"opt": 7, "harvest_id": "h", "args_bunch": three}, small
    )


def test_opt_numbers_leave_the_originals_alone() -> None:
    """1, 2, 3 and 9 are mos-tls-tunnel's (docs/protocol.md §6)."""
    assert (Opt.ADD, Opt.DELETE, Opt.RESET, Opt.PING) == (1, 2, 3, 9)
    assert (Opt.HARVEST, Opt.ACK, Opt.PENDING) == (7, 8, 10)


def test_the_wire_form_keeps_the_id() -> None:
    command = Command(Opt.HARVEST, paths=("/a",), harvest_id="h1")
    assert Command.from_wire(json.loads(json.dumps(command.to_wire()))) == command


# -- what a harvest takes ----------------------------------------------------------------


def counters(**by_path: tuple[int, int, int]) -> dict[str, Usage]:
    return {
        f"/{p}": Usage(up, down, up + down + 7, tunnels, 99.0)
        for p, (up, down, tunnels) in by_path.items()
    }


def test_pick_takes_users_with_something_in_path_order() -> None:
    live = counters(b=(5, 0, 0), a=(0, 0, 1), idle=(0, 0, 0), c=(2**60, 3, 4))
    users, more = pick(live, None, BOUNDS)
    assert users == (
        ("/a", Share(0, 0, 1)),
        ("/b", Share(5, 0, 0)),
        ("/c", Share(2**60, 3, 4)),
    )
    assert not more
    chosen, more = pick(live, ["/c", "/idle", "/nobody", "/c"], BOUNDS)
    assert (chosen, more) == ((("/c", Share(2**60, 3, 4)),), False)


def test_pick_stops_at_max_users_and_says_more() -> None:
    live = counters(a=(1, 0, 0), b=(1, 0, 0), c=(1, 0, 0), z=(0, 0, 0))
    users, more = pick(live, None, HarvestBounds(max_users=2))
    assert ([p for p, _ in users], more) == (["/a", "/b"], True)
    users, more = pick(live, None, HarvestBounds(max_users=3))
    assert ([p for p, _ in users], more) == (["/a", "/b", "/c"], False)  # /z has nothing


def test_pick_stops_at_the_reply_size_but_takes_at_least_one() -> None:
    long = "/" + "x" * 500
    live = {long: Usage(1), "/a": Usage(1), "/b": Usage(1)}
    assert entry_cost("/a") == ENTRY_OVERHEAD + 2
    assert entry_cost("/é") == ENTRY_OVERHEAD + 3  # UTF-8 bytes, as in the reply
    users, more = pick(live, None, HarvestBounds(max_reply=2 * entry_cost("/a")))
    assert ([p for p, _ in users], more) == (["/a", "/b"], True)
    users, more = pick(live, [long], HarvestBounds(max_reply=10))
    assert ([p for p, _ in users], more) == ([long], False)


# -- the book ------------------------------------------------------------------------------


def harvest(harvest_id: str, *paths: str) -> Harvest:
    return Harvest(harvest_id, 1000.0, tuple((p, Share(1, 2, 3)) for p in paths), False)


def test_one_pending_harvest_repeats_and_refuses_others() -> None:
    book = HarvestBook(kept=4)
    assert book.verdict("h1") is None
    h1 = harvest("h1", "/a")
    book.begin(h1)
    assert book.verdict("h1") == Taken(h1, repeat=True)
    assert book.verdict("h2") == Refused("h1", acked_before=False)
    with pytest.raises(ValueError, match="h1"):
        book.begin(harvest("h2"))
    assert book.ack_state("h2") is AckState.UNKNOWN
    assert book.outcome(AckState.UNKNOWN) == Acked(AckState.UNKNOWN, "h1")
    assert book.ack_state("h1") is AckState.ACKED
    book.acked("h1")
    assert book.pending is None
    assert book.outcome(AckState.ACKED) == Acked(AckState.ACKED, "")
    assert book.ack_state("h1") is AckState.ALREADY_ACKED
    assert book.verdict("h1") == Refused("", acked_before=True)
    book.begin(harvest("h2"))
    assert book.verdict("h1") == Refused("h2", acked_before=True)


def test_acknowledged_ids_are_kept_up_to_the_bound() -> None:
    book = HarvestBook(kept=2)
    for harvest_id in ("h1", "h2", "h3"):
        book.begin(harvest(harvest_id))
        book.acked(harvest_id)
    assert book.acked_ids == ("h2", "h3")
    assert book.verdict("h1") is None  # forgotten: an id that old may be taken again
    book.restore(harvest("h9", "/x"), ["a", "b", "c"])
    assert (book.acked_ids, book.verdict("h9")) == (("b", "c"), Taken(harvest("h9", "/x"), True))


# -- the memory store ---------------------------------------------------------------------


async def test_memory_store_moves_counters_once() -> None:
    store = MemoryStore()
    user = User(Destination("127.0.0.1", 9))
    await store.commit(Command(Opt.ADD, entries=(Entry("/a", user), Entry("/b", user))))
    await store.add_usage({"/a": Usage(100, 50, 150, 2, 5.0), "/b": Usage(7, 0, 7, 1, 6.0)})
    first = await store.harvest("h1", None, 1234.5, BOUNDS)
    assert first == Taken(
        Harvest("h1", 1234.5, (("/a", Share(100, 50, 2)), ("/b", Share(7, 0, 1))), False),
        repeat=False,
    )
    live = await store.read_usage(None, False)
    assert live == {"/a": Usage(0, 0, 150, 0, 5.0), "/b": Usage(0, 0, 7, 0, 6.0)}
    await store.add_usage({"/a": Usage(1, 1, 2, 1, 7.0)})
    assert await store.harvest("h1", ["/b"], 9999.0, BOUNDS) == Taken(first.harvest, True)
    assert await store.harvest("h2", None, 9999.0, BOUNDS) == Refused("h1", False)
    assert await store.pending_harvest() == first.harvest
    assert await store.ack_harvest("h1", BOUNDS) == Acked(AckState.ACKED, "")
    assert await store.ack_harvest("h1", BOUNDS) == Acked(AckState.ALREADY_ACKED, "")
    assert await store.ack_harvest("zz", BOUNDS) == Acked(AckState.UNKNOWN, "")
    assert await store.harvest("h1", None, 0.0, BOUNDS) == Refused("", acked_before=True)
    second = await store.harvest("h2", None, 2000.0, BOUNDS)
    assert isinstance(second, Taken)
    assert second.harvest.users == (("/a", Share(1, 1, 1)),)  # only what came after
    # Deleting a user leaves its harvested share in the pending harvest.
    await store.commit(Command(Opt.DELETE, paths=("/a",)))
    assert await store.pending_harvest() == second.harvest

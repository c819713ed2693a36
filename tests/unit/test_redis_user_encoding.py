"""How a user sits in Redis's mtt:users hash: the form older nodes wrote reads
the same, and a user's "mux" comes back; how leases are grouped into calls."""

from __future__ import annotations

import json

import pytest

from mtt.address import Destination
from mtt.core.users import NO_LIMITS, MuxProtocol, User, UserLimits
from mtt.store.redis_limits import lease_chunks
from mtt.store.redis_store import decode_user, encode_user

DST = Destination("127.0.0.1", 8388)


@pytest.mark.parametrize(
    ("user", "stored"),
    [
        (User(DST), '["127.0.0.1",8388,0,0,0,0,0]'),
        (User(DST, UserLimits(1, 2, 3, 4, 5)), '["127.0.0.1",8388,1,2,3,4,5]'),
        (User(DST, mux=MuxProtocol.MUXCOOL), '["127.0.0.1",8388,0,0,0,0,0,"mux.cool"]'),
        (User(DST, UserLimits(rate=9), MuxProtocol.NONE), '["127.0.0.1",8388,9,0,0,0,0,"none"]'),
    ],
)
def test_a_user_round_trips(user: User, stored: str) -> None:
    assert encode_user(user) == stored
    assert decode_user(stored.encode()) == user


def test_a_mux_this_node_does_not_know_is_the_servers() -> None:
    user = decode_user(b'["127.0.0.1",8388,0,0,0,0,0,"yamux"]')
    assert user == User(DST) and user.limits is NO_LIMITS


def test_lease_calls_are_chunked_by_names_and_keep_each_users_keys_aligned() -> None:
    by_path = {"/a": ["a1", "a2", "a3"], "/b": ["b1"], "/c": ["c1", "c2"]}
    calls = list(lease_chunks(by_path, 3))
    assert calls == [
        (["mtt:adm:/a", "mtt:admip:/a"], '[["a1","a2","a3"]]'),
        (["mtt:adm:/b", "mtt:admip:/b", "mtt:adm:/c", "mtt:admip:/c"], '[["b1"],["c1","c2"]]'),
    ]
    big = {"/ü": [f"n {i} 10.0.0.1" for i in range(5)]}  # one user over two calls, raw UTF-8
    keys, groups = zip(*lease_chunks(big, 2), strict=True)
    assert keys == (["mtt:adm:/ü", "mtt:admip:/ü"],) * 3
    assert [json.loads(g) for g in groups] == [
        [["n 0 10.0.0.1", "n 1 10.0.0.1"]],
        [["n 2 10.0.0.1", "n 3 10.0.0.1"]],
        [["n 4 10.0.0.1"]],
    ]

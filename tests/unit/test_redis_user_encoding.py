"""How a user sits in Redis's mtt:users hash: the form older nodes wrote reads
the same, and a user's "mux" comes back."""

from __future__ import annotations

import pytest

from mtt.address import Destination
from mtt.core.users import NO_LIMITS, MuxProtocol, User, UserLimits
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

"""Routing keys and sub-protocol choice as the Go server makes them."""

import pytest

from mtt.accept.tunnel_server import choose_subprotocol, routing_key
from mtt.core.users import MuxProtocol


@pytest.mark.parametrize(
    ("target", "key"),
    [
        (b"/p1", "/p1"),
        (b"/p1?x=1", "/p1"),
        (b"/p1/", "/p1/"),
        (b"/a%20b", "/a b"),
        (b"/%E4%BD%A0", "/\u4f60"),
        (b"/p%3Fq", "/p?q"),
        (b"http://example.com/p1?x", "/p1"),
        (b"/p1#frag", "/p1"),
        (b"/bad%zz", None),
        (b"/bad%", None),
        (b"/%ff", None),
    ],
)
def test_routing_key(target: bytes, key: str | None) -> None:
    assert routing_key(target) == key


@pytest.mark.parametrize(
    ("header", "chosen"),
    [
        ("smux_on", (MuxProtocol.SMUX, "smux_on")),
        ("smux_off", (MuxProtocol.NONE, "smux_off")),
        (None, (None, None)),
        ("smux_off, smux_on", (MuxProtocol.SMUX, "smux_on")),
        ("chat", (None, None)),
    ],
)
def test_subprotocol_choice(
    header: str | None, chosen: tuple[MuxProtocol | None, str | None]
) -> None:
    assert choose_subprotocol(header) == chosen

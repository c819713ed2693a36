"""-allow-dst rules and the controller exposure check."""

import pytest

from mtt.address import Destination
from mtt.controller.http import check_exposure, is_loopback_only
from mtt.core.policy import DstPolicy, parse_rule
from mtt.errors import ConfigError


def policy(*rules: str) -> DstPolicy:
    return DstPolicy(tuple(parse_rule(r) for r in rules))


@pytest.mark.parametrize(
    ("rules", "dst", "allowed"),
    [
        (("127.0.0.0/8",), Destination("127.0.0.1", 10001), True),
        (("127.0.0.0/8",), Destination("10.0.0.1", 10001), False),
        (("127.0.0.1/32:10000-10999",), Destination("127.0.0.1", 10999), True),
        (("127.0.0.1/32:10000-10999",), Destination("127.0.0.1", 11000), False),
        (("127.0.0.1:443",), Destination("127.0.0.1", 443), True),
        (("[::1]/128:80",), Destination("::1", 80), True),
        (("::1/128",), Destination("::1", 22), True),
        (("10.0.0.0/8", "192.168.1.0/24:22"), Destination("192.168.1.7", 22), True),
        (("10.0.0.0/8",), Destination("backend.example", 80), False),
        ((), Destination("backend.example", 80), True),
    ],
)
def test_rules(rules: tuple[str, ...], dst: Destination, allowed: bool) -> None:
    assert (policy(*rules).problem(dst) is None) is allowed


def test_refusal_names_the_rules() -> None:
    problem = policy("127.0.0.0/8:1000-2000").problem(Destination("10.1.1.1", 80))
    assert problem == "is outside the allowed destinations (127.0.0.0/8:1000-2000)"
    assert policy("127.0.0.0/8").problem(Destination("db.internal", 5432)) == (
        "must be an IP address when -allow-dst is set"
    )


@pytest.mark.parametrize(
    "text", ["nope", "10.0.0.0/33", "10.0.0.0/8:0", "10.0.0.0/8:9-1", "10.0.0.0/8:x"]
)
def test_bad_rules(text: str) -> None:
    with pytest.raises(ConfigError, match="bad -allow-dst"):
        parse_rule(text)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:8080", True),
        ("[::1]:8080", True),
        ("localhost:1", True),
        ("/run/mtt/c.sock", True),
        ("0.0.0.0:8080", False),
        (":8080", False),
        ("10.1.2.3:8080", False),
        ("panel.example:8080", False),
    ],
)
def test_loopback_detection(address: str, loopback: bool) -> None:
    assert is_loopback_only(address) is loopback


def test_open_controller_on_the_network_is_refused() -> None:
    with pytest.raises(ConfigError, match="add -c-token TOKEN"):
        check_exposure("0.0.0.0:8080", "", insecure=False)
    check_exposure("0.0.0.0:8080", "secret", insecure=False)
    check_exposure("0.0.0.0:8080", "", insecure=True)
    check_exposure("127.0.0.1:8080", "", insecure=False)

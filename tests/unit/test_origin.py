"""-allow-origin, as tables: the origin an operator writes or a browser sends
-> its serialized form (RFC 6454 §6.1); a request's Origin lines -> refused
or not."""

from __future__ import annotations

import pytest

from mtt.errors import ConfigError
from mtt.wire.origin import OriginPolicy, normalize_origin

NORMALIZED: list[tuple[str, str | None]] = [
    ("https://panel.example.com", "https://panel.example.com"),
    ("HTTPS://Panel.Example.COM", "https://panel.example.com"),
    ("https://panel.example.com:443", "https://panel.example.com"),
    ("http://panel.example.com:80", "http://panel.example.com"),
    ("https://panel.example.com:8443", "https://panel.example.com:8443"),
    ("https://panel.example.com/", "https://panel.example.com"),
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("http://[::1]:8000", "http://[::1]:8000"),
    ("http://[::1]", "http://[::1]"),
    ("chrome-extension://abcdef", "chrome-extension://abcdef"),
    ("null", "null"),
    ("NULL", "null"),
    ("panel.example.com", None),
    ("https://", None),
    ("https://panel.example.com/admin", None),
    ("https://panel.example.com?x", None),
    ("https://panel.example.com#x", None),
    ("https://user@panel.example.com", None),
    ("https://panel.example.com:99999", None),
    ("https://panel.example.com:x", None),
    ("", None),
]


@pytest.mark.parametrize(
    ("text", "expected"), NORMALIZED, ids=[t or "empty" for t, _ in NORMALIZED]
)
def test_normalize_origin(text: str, expected: str | None) -> None:
    assert normalize_origin(text) == expected


POLICY = OriginPolicy(["https://panel.example.com", "http://localhost:3000"])

REFUSED: list[tuple[str, OriginPolicy, list[bytes], str | None]] = [
    ("no list, any origin", OriginPolicy(), [b"https://evil.example"], None),
    ("no list, garbage", OriginPolicy(), [b"\xff not an origin"], None),
    ("no Origin", POLICY, [], None),
    ("listed", POLICY, [b"https://panel.example.com"], None),
    ("listed, other case", POLICY, [b"https://PANEL.example.com"], None),
    ("listed, with a port", POLICY, [b"http://localhost:3000"], None),
    ("not listed", POLICY, [b"https://evil.example"], "https://evil.example"),
    ("listed host, other port", POLICY, [b"http://localhost:3001"], "http://localhost:3001"),
    (
        "listed host, other scheme",
        POLICY,
        [b"http://panel.example.com"],
        "http://panel.example.com",
    ),
    ("a suffix of a listed host", POLICY, [b"https://example.com"], "https://example.com"),
    ("empty", POLICY, [b""], ""),
    ("opaque", POLICY, [b"null"], "null"),
    ("opaque, listed", OriginPolicy(["null"]), [b"null"], None),
    ("not an origin", POLICY, [b"\xff"], "\xff"),
    (
        "two lines, one not listed",
        POLICY,
        [b"https://panel.example.com", b"https://evil.example"],
        "https://evil.example",
    ),
]


@pytest.mark.parametrize(
    ("policy", "values", "expected"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_refused(policy: OriginPolicy, values: list[bytes], expected: str | None) -> None:
    assert policy.refused(values) == expected


@pytest.mark.parametrize("text", ["panel.example.com", "https://panel.example.com/admin", "*"])
def test_a_bad_flag_value_names_itself(text: str) -> None:
    with pytest.raises(ConfigError, match=r"-allow-origin .* is not an origin"):
        OriginPolicy([text])


def test_empty_policy_is_false() -> None:
    assert not OriginPolicy()
    assert POLICY

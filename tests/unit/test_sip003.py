"""SIP003 plugin options and environment, as shadowsocks clients pass them."""

from __future__ import annotations

import pytest

from mtt.client.sip003 import join_host_port, plugin_env, split_options
from mtt.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("", []),
        ("wss", [("wss", None)]),
        (
            "wss;wss-path=/p1;mux;n=example.com",
            [("wss", None), ("wss-path", "/p1"), ("mux", None), ("n", "example.com")],
        ),
        ("mux;;sv;", [("mux", None), ("sv", None)]),
        ("n=", [("n", "")]),
        (r"wss-path=/a\;b", [("wss-path", "/a;b")]),
        (r"wss-path=/a\=b", [("wss-path", "/a=b")]),
        (r"wss-path=/a\\b", [("wss-path", "/a\\b")]),
        (r"wss-path=/a\\;mux", [("wss-path", "/a\\"), ("mux", None)]),
        (r"we\=ird=v", [("we=ird", "v")]),
        ("wss-path=/x==", [("wss-path", "/x==")]),  # base64-ish values: Go would refuse
        ("timeout=5m; mux", [("timeout", "5m"), ("mux", None)]),
        ("trailing\\", [("trailing\\", None)]),
    ],
)
def test_split_options(text: str, items: list[tuple[str, str | None]]) -> None:
    assert split_options(text) == items


@pytest.mark.parametrize("text", ["=x", "mux;=1"])
def test_option_without_a_name_is_an_error(text: str) -> None:
    with pytest.raises(ConfigError, match="without a name"):
        split_options(text)


@pytest.mark.parametrize(
    ("host", "port", "joined"),
    [
        ("127.0.0.1", "1080", "127.0.0.1:1080"),
        ("example.com", "443", "example.com:443"),
        ("::1", "1080", "[::1]:1080"),
        ("fe80::1%eth0", "80", "[fe80::1%eth0]:80"),
        ("[::1]", "1080", "[::1]:1080"),
    ],
)
def test_join_host_port(host: str, port: str, joined: str) -> None:
    assert join_host_port(host, port) == joined


def _env(**extra: str) -> dict[str, str]:
    return {
        "SS_REMOTE_HOST": "203.0.113.7",
        "SS_REMOTE_PORT": "443",
        "SS_LOCAL_HOST": "127.0.0.1",
        "SS_LOCAL_PORT": "40123",
        **extra,
    }


def test_no_variables_means_not_a_plugin() -> None:
    assert plugin_env({"PATH": "/bin"}) is None


def test_full_environment() -> None:
    env = plugin_env(_env(SS_PLUGIN_OPTIONS="wss;mux;n=example.com"))
    assert env is not None
    assert env.local == "127.0.0.1:40123"
    assert env.remote == "203.0.113.7:443"
    assert env.options == (("wss", None), ("mux", None), ("n", "example.com"))


def test_ipv6_addresses_get_brackets() -> None:
    env = plugin_env(_env(SS_REMOTE_HOST="2001:db8::1", SS_LOCAL_HOST="::1"))
    assert env is not None
    assert (env.local, env.remote) == ("[::1]:40123", "[2001:db8::1]:443")
    assert env.options == ()


@pytest.mark.parametrize("missing", ["SS_REMOTE_HOST", "SS_LOCAL_PORT"])
def test_partial_environment_is_an_error(missing: str) -> None:
    env = _env()
    del env[missing]
    with pytest.raises(ConfigError, match=missing):
        plugin_env(env)


def test_options_alone_still_need_the_addresses() -> None:
    with pytest.raises(ConfigError, match="incomplete SIP003"):
        plugin_env({"SS_PLUGIN_OPTIONS": "mux"})

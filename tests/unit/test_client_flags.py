"""mtt-client's flags as the Go client takes them, and SIP003 layered over them."""

from __future__ import annotations

import io
from typing import Any

import pytest

from mtt.address import Destination
from mtt.cli import run_cli
from mtt.client import ClientConfig
from mtt.client.main import build_flags, config_from_flags, main, resolve_config
from mtt.errors import ConfigError

BASE = ["-b", "127.0.0.1:1080", "-s", "203.0.113.7:443"]


def config(argv: list[str], environ: dict[str, str] | None = None) -> ClientConfig:
    return resolve(argv, environ)[0]


def resolve(
    argv: list[str], environ: dict[str, str] | None = None
) -> tuple[ClientConfig, list[str]]:
    return resolve_config(build_flags().parse(argv), environ or {})


def test_go_defaults() -> None:
    c, warnings = resolve([*BASE, "-wss"])
    assert c.bind == "127.0.0.1:1080"
    assert c.server == Destination("203.0.113.7", 443)
    assert c.server_name == "203.0.113.7"  # the host part of -s
    assert c.path == "/"
    assert not c.mux and not c.insecure and not c.fast_open and not c.verbose
    assert c.mux_max_stream == 4
    assert c.idle_timeout == 300.0  # 5m0s
    assert c.limits.handshake_timeout == 10.0
    assert c.limits.max_message == 16 * 1024
    assert warnings == []


def test_every_go_client_flag_is_accepted() -> None:
    c, warnings = resolve(
        [
            *BASE,
            "-wss",
            "-wss-path",
            "p1",
            "-n",
            "example.com",
            "-sv",
            "-mux",
            "-mux-max-stream",
            "16",
            "-timeout",
            "1m30s",
            "-fast-open",
            "-fallback-dns",
            "8.8.8.8:53",
            "-verbose",
            "-V",
        ]
    )
    assert c.path == "/p1"  # a leading slash is added, as in Go
    assert c.server_name == "example.com"
    assert c.insecure and c.mux and c.fast_open and c.verbose
    assert c.mux_max_stream == 16
    assert c.idle_timeout == 90.0
    assert any("-fallback-dns" in w for w in warnings)
    assert any("-V" in w for w in warnings)


def test_missing_wss_is_a_warning_not_an_error() -> None:
    _, warnings = resolve(BASE)
    assert len(warnings) == 1 and "-wss" in warnings[0]


def test_ipv6_server_name_defaults_to_the_bare_address() -> None:
    c = config(["-b", "[::1]:1080", "-s", "[2001:db8::7]:443", "-wss"])
    assert c.server == Destination("2001:db8::7", 443)
    assert c.server_name == "2001:db8::7"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-s", "203.0.113.7:443"], "need a bind address"),
        (["-b", "127.0.0.1:1080"], "need a server address"),
        ([*BASE, "-mux-max-stream", "0"], "-mux-max-stream must be 1..16"),
        ([*BASE, "-mux-max-stream", "17"], "-mux-max-stream must be 1..16"),
        ([*BASE, "-timeout", "0s"], "-timeout must be positive"),
        (["-b", "127.0.0.1:1080", "-s", "nohost"], "bad server address"),
        (["-b", "127.0.0.1", "-s", "203.0.113.7:443"], "bad bind address"),
    ],
)
def test_bad_combinations_are_config_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(argv)


def test_help_lists_the_go_flags() -> None:
    err = io.StringIO()
    assert run_cli(build_flags(), ["-h"], lambda v: 0, stderr=err) == 0
    text = err.getvalue()
    for flag in (
        "-b string",
        "-s string",
        "-n string",
        "-wss\n",
        "-wss-path string",
        "-mux\n",
        "-mux-max-stream int",
        "-sv\n",
        "-timeout duration",
        "-fast-open",
        "-fallback-dns string",
        "-verbose",
    ):
        assert flag in text
    assert "(default 5m0s)" in text
    assert "(default 4)" in text


def _sip003(options: str | None = None, **extra: str) -> dict[str, str]:
    env = {
        "SS_REMOTE_HOST": "198.51.100.9",
        "SS_REMOTE_PORT": "8443",
        "SS_LOCAL_HOST": "127.0.0.1",
        "SS_LOCAL_PORT": "40123",
        **extra,
    }
    if options is not None:
        env["SS_PLUGIN_OPTIONS"] = options
    return env


def test_sip003_addresses_and_options() -> None:
    c, warnings = resolve([], _sip003("wss;wss-path=/p1;mux;n=example.com;mux-max-stream=8"))
    assert c.bind == "127.0.0.1:40123"
    assert c.server == Destination("198.51.100.9", 8443)
    assert (c.path, c.server_name, c.mux, c.mux_max_stream) == ("/p1", "example.com", True, 8)
    assert warnings == []


def test_sip003_overrides_the_command_line() -> None:
    c = config(["-b", "127.0.0.1:1", "-s", "192.0.2.1:1", "-mux", "-sv"], _sip003("wss;mux=false"))
    assert c.bind == "127.0.0.1:40123"  # SS_LOCAL_*, not -b
    assert c.server.port == 8443
    assert not c.mux  # the option wins
    assert c.insecure  # untouched flags keep their command-line value


def test_sip003_ipv6_hosts() -> None:
    c = config([], _sip003("wss", SS_REMOTE_HOST="2001:db8::1", SS_LOCAL_HOST="::1"))
    assert c.bind == "[::1]:40123"
    assert c.server == Destination("2001:db8::1", 8443)
    assert c.server_name == "2001:db8::1"


def test_sip003_escaped_values() -> None:
    c = config([], _sip003(r"wss;wss-path=/a\;b\=c"))
    assert c.path == "/a;b=c"


def test_sip003_unknown_option_is_skipped_with_a_warning() -> None:
    c, warnings = resolve([], _sip003("wss;tls;host=example.com;mux"))
    assert c.mux
    assert sum("unknown plugin option" in w for w in warnings) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("wss;wss-path", "option wss-path needs a value"),
        ("wss;timeout=soon", "SS_PLUGIN_OPTIONS: invalid value"),
        ("wss;mux=maybe", "SS_PLUGIN_OPTIONS: invalid boolean value"),
        ("wss;mux-max-stream=99", "-mux-max-stream must be 1..16"),
    ],
)
def test_sip003_bad_options(options: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config([], _sip003(options))


def test_sip003_incomplete_environment_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([], {"SS_REMOTE_HOST": "198.51.100.9"}) == 1
    assert "incomplete SIP003 environment" in capsys.readouterr().err


def test_sip003_ignores_unknown_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    # ss-android passes its own arguments; a bad option then ends the run with 1, not 2.
    assert main(["-unknown-host-flag"], _sip003("wss;timeout=soon")) == 1
    err = capsys.readouterr().err
    assert "ignoring the command line" in err
    assert "SS_PLUGIN_OPTIONS" in err


def test_plain_flag_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-bogus"], {}) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "mtt-client: flag provided but not defined: -bogus"
    )


def test_config_errors_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-s", "203.0.113.7:443"], {}) == 1
    assert "need a bind address" in capsys.readouterr().err


def test_config_from_flags_keeps_warnings_separate() -> None:
    values: dict[str, Any] = build_flags().parse([*BASE, "-vpn"])
    warnings: list[str] = []
    config_from_flags(values, warnings)
    assert warnings and all(isinstance(w, str) for w in warnings)

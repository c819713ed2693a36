"""Go flag conventions and durations, as existing start scripts use them."""

import io
import re

import pytest

from mtt.cli import FlagSet, format_duration, parse_duration, run_cli
from mtt.core.leases import WhenDown
from mtt.core.users import MuxProtocol
from mtt.errors import ConfigError
from mtt.server.main import build_flags, config_from_flags


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1m0s", 60.0),
        ("30s", 30.0),
        ("1h2m3.5s", 3723.5),
        ("500ms", 0.5),
        ("0", 0.0),
        ("1.5h", 5400.0),
        ("10us", 1e-5),
        ("10µs", 1e-5),
        ("3ns", 3e-9),
        ("-2s", -2.0),
        ("+5m", 300.0),
        (".5s", 0.5),
        ("2h45m", 9900.0),
    ],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "5", "s", "1x", "1.2.3s", "ms", "1m s", "-", "abc"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="time: "):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(60.0, "1m0s"), (300.0, "5m0s"), (0.5, "500ms"), (3723.5, "1h2m3.5s"), (0, "0s"), (10, "10s")],
)
def test_durations_print_like_go(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def _flags() -> FlagSet:
    fs = FlagSet("prog")
    fs.add("b", "string", "", "bind")
    fs.add("mux", "bool", False, "mux")
    fs.add("n", "int", 4, "count")
    fs.add("timeout", "duration", 60.0, "idle")
    return fs


@pytest.mark.parametrize(
    "argv",
    [
        ["-b", "1.2.3.4:443", "-mux", "-n", "7", "-timeout", "5m"],
        ["-b=1.2.3.4:443", "-mux=true", "-n=7", "-timeout=5m"],
        ["--b", "1.2.3.4:443", "--mux", "--n=0x7", "--timeout", "300s"],
    ],
)
def test_go_flag_syntaxes(argv: list[str]) -> None:
    assert _flags().parse(argv) == {"b": "1.2.3.4:443", "mux": True, "n": 7, "timeout": 300.0}


def test_bool_flag_does_not_take_the_next_argument() -> None:
    # In Go `-mux false` sets mux and stops parsing at the positional "false".
    values = _flags().parse(["-mux", "false", "-n", "9"])
    assert values["mux"] is True
    assert values["n"] == 4


def test_double_dash_ends_flags() -> None:
    assert _flags().parse(["--", "-mux"])["mux"] is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-x"], "flag provided but not defined: -x"),
        (["-b"], "flag needs an argument: -b"),
        (["-n", "seven"], 'invalid value "seven" for flag -n'),
        (["-mux=maybe"], 'invalid boolean value "maybe" for flag -mux'),
        (["-timeout", "5"], 'invalid value "5" for flag -timeout: time: missing unit'),
        (["---b", "x"], "bad flag syntax: ---b"),
        (["-=x"], "bad flag syntax: -=x"),
    ],
)
def test_bad_flags_name_the_problem(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _flags().parse(argv)


def test_cli_exit_codes_and_one_line_errors() -> None:
    err = io.StringIO()
    assert run_cli(_flags(), ["-nope"], lambda v: 0, stderr=err) == 2
    assert err.getvalue().splitlines()[0] == "prog: flag provided but not defined: -nope"
    err = io.StringIO()
    assert run_cli(_flags(), ["-h"], lambda v: 0, stderr=err) == 0
    assert "Usage of prog:" in err.getvalue()
    assert "-timeout duration" in err.getvalue()
    assert "(default 1m0s)" in err.getvalue()

    def failing(values: dict[str, object]) -> int:
        raise ConfigError("cannot read /nope.pem: no such file")

    err = io.StringIO()
    assert run_cli(_flags(), [], failing, stderr=err) == 1
    assert err.getvalue() == "prog: cannot read /nope.pem: no such file\n"


def test_server_accepts_the_go_servers_flags() -> None:
    argv = [
        "-b",
        "0.0.0.0:443",
        "-c",
        "127.0.0.1:9000",
        "-mux",
        "-timeout",
        "2m30s",
        "-cert",
        "/c.pem",
        "-key",
        "/k.pem",
        "-n",
        "example.com",
        "-fast-open",
        "-verbose",
        "-bind-unix=false",
        "-force-tls",
        "-disable-tls=false",
    ]
    config = config_from_flags(build_flags().parse(argv))
    assert config.bind == "0.0.0.0:443"
    assert config.controller == "127.0.0.1:9000"
    assert config.mux_protocol is MuxProtocol.SMUX
    assert config.fast_open and config.verbose and config.force_tls
    assert config.limits.idle_timeout == 150.0
    assert (config.cert, config.key, config.server_name) == ("/c.pem", "/k.pem", "example.com")


def test_server_defaults() -> None:
    config = config_from_flags(build_flags().parse([]))
    assert config.limits.idle_timeout == 60.0
    assert config.mux_protocol is MuxProtocol.NONE and not config.force_tls
    assert config.bind == "127.0.0.1:8443"
    assert config.allowed_origins == ()  # any Origin (docs/security.md)
    assert config.limits_when_down is WhenDown.OPEN  # docs/redis.md, "Limits across nodes"


def test_redis_limits_when_down_closed() -> None:
    argv = ["-store", "redis://127.0.0.1:6379/0", "-redis-limits-when-down=closed"]
    assert config_from_flags(build_flags().parse(argv)).limits_when_down is WhenDown.CLOSED


def test_allow_origin_repeats_and_is_kept_as_browsers_serialize_origins() -> None:
    argv = ["-allow-origin", "https://Panel.Example.com:443", "-allow-origin=http://127.0.0.1:8000"]
    config = config_from_flags(build_flags().parse(argv))
    assert config.allowed_origins == ("http://127.0.0.1:8000", "https://panel.example.com")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-cert", "/c.pem"], "-cert and -key must be given together"),
        (["-timeout", "0s"], "-timeout must be positive"),
        (["-allow-origin", "panel.example.com"], "-allow-origin 'panel.example.com' is not an"),
        (
            ["-redis-limits-when-down", "half"],
            "-redis-limits-when-down must be open or closed, not 'half'",
        ),
    ],
)
def test_server_flag_combinations_are_checked(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_flags(build_flags().parse(argv))


@pytest.mark.parametrize(
    ("argv", "protocol"),
    [
        (["-mux-protocol", "mux.cool"], MuxProtocol.MUXCOOL),
        (["-mux-protocol=smux"], MuxProtocol.SMUX),
        (["-mux-protocol", "none"], MuxProtocol.NONE),
        (["-mux", "-mux-protocol", "smux"], MuxProtocol.SMUX),
    ],
)
def test_mux_protocol_flag(argv: list[str], protocol: MuxProtocol) -> None:
    assert config_from_flags(build_flags().parse(argv)).mux_protocol is protocol


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["-mux-protocol", "yamux"],
            "-mux-protocol must be one of none, smux, mux.cool, not 'yamux'",
        ),
        (["-mux", "-mux-protocol", "mux.cool"], "-mux means -mux-protocol smux, not mux.cool"),
    ],
)
def test_mux_protocol_flag_refusals(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_flags(build_flags().parse(argv))

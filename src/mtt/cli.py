"""Command-line parsing with the conventions of Go's `flag` package.

Existing deployments start mtt-mu-server and mtt-client from scripts and
systemd units written for the Go programs, so the exact Go rules apply:
`-flag value`, `-flag=value`, `--flag`, booleans only as `-flag` or
`-flag=false`, parsing stops at the first non-flag argument or at `--`,
durations in Go syntax (`1m0s`, `1h2m3.5s`, `500ms`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from mtt.errors import ConfigError, HelpRequested

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_MAX_DURATION_S = (2**63 - 1) * 1e-9  # Go durations are int64 nanoseconds


def parse_duration(text: str) -> float:
    """Parse a Go duration string into seconds, as time.ParseDuration does."""
    s = text
    sign = 1.0
    if s[:1] in ("+", "-"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"time: invalid duration {text!r}")
    total = 0.0
    pos = 0
    while pos < len(s):
        match = _DURATION_PART.match(s, pos)
        if match is None:
            if re.match(r"(\d+\.?\d*|\.\d+)", s[pos:]):
                raise ValueError(f"time: missing unit in duration {text!r}")
            raise ValueError(f"time: invalid duration {text!r}")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if total > _MAX_DURATION_S:
        raise ValueError(f"time: invalid duration {text!r}")
    return sign * total


def format_duration(seconds: float) -> str:
    """Format seconds the way Go prints a time.Duration (`1m0s`, `500ms`)."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    rest = abs(seconds)
    if rest < 1:
        for unit, scale in (("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
            if rest >= scale:
                return f"{sign}{_trim(rest / scale)}{unit}"
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    out = sign
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    return out + f"{_trim(secs)}s"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse_bool(text: str) -> bool:
    """strconv.ParseBool."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"parse error: invalid syntax {text!r}")


def parse_int(text: str) -> int:
    """strconv.ParseInt(s, 0, 64): decimal, 0x, 0o, 0b and underscores."""
    try:
        value = int(text, 0)
    except ValueError:
        raise ValueError(f"parse error: invalid syntax {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"parse error: value out of range {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class Flag:
    """One command-line flag: its Go type name drives parsing and usage."""

    name: str
    kind: str  # "string", "bool", "int", "duration"
    default: Any
    usage: str
    repeatable: bool = False


_PARSERS: dict[str, Callable[[str], Any]] = {
    "string": str,
    "bool": parse_bool,
    "int": parse_int,
    "duration": parse_duration,
}


@dataclass
class FlagSet:
    """A set of Go-style flags; `parse` returns {name: value}."""

    program: str
    flags: dict[str, Flag] = field(default_factory=dict)

    def add(
        self, name: str, kind: str, default: Any, usage: str, *, repeatable: bool = False
    ) -> None:
        if kind not in _PARSERS:
            raise ValueError(f"unknown flag kind {kind}")
        self.flags[name] = Flag(name, kind, default, usage, repeatable)

    def parse(self, argv: Sequence[str]) -> dict[str, Any]:
        """Parse argv as Go's FlagSet.Parse; raise ConfigError or HelpRequested."""
        values: dict[str, Any] = {
            f.name: (list(f.default) if f.repeatable else f.default) for f in self.flags.values()
        }
        args = list(argv)
        i = 0
        while i < len(args):
            arg = args[i]
            if len(arg) < 2 or arg[0] != "-":
                break  # first non-flag argument ends parsing, as in Go
            if arg == "--":
                break
            body = arg[2:] if arg.startswith("--") else arg[1:]
            if not body or body[0] == "-" or body[0] == "=":
                raise ConfigError(f"bad flag syntax: {arg}")
            name, has_value, value = body.partition("=")
            flag = self.flags.get(name)
            if flag is None:
                if name in ("h", "help"):
                    raise HelpRequested
                raise ConfigError(f"flag provided but not defined: -{name}")
            if flag.kind == "bool":
                text = value if has_value else "true"
            elif has_value:
                text = value
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"flag needs an argument: -{name}")
                i += 1
                text = args[i]
            try:
                parsed = _PARSERS[flag.kind](text)
            except ValueError as exc:
                raise ConfigError(
                    f'invalid {"boolean " if flag.kind == "bool" else ""}value "{text}" '
                    f"for flag -{name}: {exc}"
                ) from None
            if flag.repeatable:
                values[name].append(parsed)
            else:
                values[name] = parsed
            i += 1
        return values

    def usage(self) -> str:
        """The usage text in the layout Go's PrintDefaults uses."""
        lines = [f"Usage of {self.program}:"]
        for flag in sorted(self.flags.values(), key=lambda f: f.name):
            head = f"  -{flag.name}"
            if flag.kind != "bool":
                head += f" {flag.kind}"
            lines.append(head)
            text = f"    \t{flag.usage}"
            default = flag.default
            if flag.kind == "duration" and default:
                text += f" (default {format_duration(default)})"
            elif flag.kind == "string" and default and not flag.repeatable:
                text += f' (default "{default}")'
            elif flag.kind in ("int", "bool") and default:
                text += f" (default {str(default).lower()})"
            lines.append(text)
        return "\n".join(lines) + "\n"


def run_cli(
    flagset: FlagSet,
    argv: Sequence[str],
    start: Callable[[dict[str, Any]], int],
    stderr: TextIO | None = None,
) -> int:
    """Parse flags and call `start`; bad input ends in one line and a non-zero code."""
    err = stderr if stderr is not None else sys.stderr
    try:
        values = flagset.parse(argv)
    except HelpRequested:
        err.write(flagset.usage())
        return 0
    except ConfigError as exc:
        err.write(f"{flagset.program}: {exc}\n")
        err.write(f"run '{flagset.program} -h' for the list of flags\n")
        return 2
    try:
        return start(values)
    except ConfigError as exc:
        err.write(f"{flagset.program}: {exc}\n")
        return 1

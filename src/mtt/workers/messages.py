"""Every message between the supervisor and its workers, one frozen dataclass each.

On the wire a message is a compact JSON object tagged with "op" (a reply is
tagged by the request id it answers instead, see mtt.workers.rpc). Decoding
checks each message's own fields and turns anything malformed into a
ProtocolError, so a handler only ever sees a well-formed message. The bulk of
a big change (a Command with millions of entries) goes through
Command.to_wire/from_wire as before: nothing here walks the entries again.

Supervisor to worker: Init (before the channel runs), Change, Collect, Kick,
ReloadTls, Challenges (requests), Budgets, Stop (notifications). Worker to
supervisor: Ready (before the channel runs), Admit, Tokens (requests), Release,
Exhausted, Final (notifications).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from mtt.config import Limits, ServerConfig
from mtt.core.commands import Command
from mtt.core.harvest import HarvestBounds
from mtt.core.rate import Direction
from mtt.core.usage import Usage
from mtt.core.users import MuxProtocol
from mtt.errors import ProtocolError
from mtt.muxcool import MuxCoolConfig
from mtt.smux import SmuxConfig

Wire = dict[str, Any]
R = TypeVar("R", bound="Reply")
T = TypeVar("T")


class Reply:
    """The answer to a Request; encoded without "op" (its "re" says what it answers)."""

    __slots__ = ()

    def to_wire(self) -> Wire:
        raise NotImplementedError


class Message:
    """A message that starts an exchange: a Request or a Notification."""

    __slots__ = ()
    OP: ClassVar[str]

    def to_wire(self) -> Wire:
        raise NotImplementedError

    @classmethod
    def from_wire(cls, data: Wire) -> Message:
        raise NotImplementedError


class Request(Message, Generic[R]):
    """A message that gets exactly one reply (or a Failed)."""

    __slots__ = ()

    def reply_from_wire(self, data: Wire) -> R:
        raise NotImplementedError


class Notification(Message):
    """A message that gets no reply."""

    __slots__ = ()


# -- field checks: cheap, per message, never per user entry ---------------------


def _field(data: Wire, key: str, kind: type | tuple[type, ...]) -> Any:
    value = data[key]  # KeyError: reported as a ProtocolError by the decoder
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"{key!r} is {type(value).__name__}")
    return value


def _number(data: Wire, key: str) -> float:
    return float(_field(data, key, (int, float)))


def _optional_str(data: Wire, key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"{key!r} is {type(value).__name__}")
    return value


def _tls(data: Wire) -> dict[str, str] | None:
    value = data.get("tls")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ProtocolError("'tls' is not an object of strings")
    return value


def _challenges(data: Wire) -> dict[str, dict[str, str]]:
    value = data.get("challenges", {})
    if not isinstance(value, dict) or not all(
        isinstance(spec, dict) and all(isinstance(v, str) for v in spec.values())
        for spec in value.values()
    ):
        raise ProtocolError("'challenges' is not an object of objects of strings")
    return value


# -- replies ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Done(Reply):
    """Applied; nothing to say."""

    def to_wire(self) -> Wire:
        return {}

    @classmethod
    def from_wire(cls, data: Wire) -> Done:
        return cls()


@dataclass(frozen=True, slots=True)
class Failed(Reply):
    """The handler failed on the request (a bug there); the channel is fine."""

    error: str

    def to_wire(self) -> Wire:
        return {"error": self.error}


def _optional_int(data: Wire, key: str) -> int | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ProtocolError(f"{key!r} is {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class Admission(Reply):
    refused: str | None  # None: admitted
    quota_left: int | None = None  # admitted with a quota: what is left of it

    def to_wire(self) -> Wire:
        return {"refused": self.refused, "left": self.quota_left}

    @classmethod
    def from_wire(cls, data: Wire) -> Admission:
        return cls(_optional_str(data, "refused"), _optional_int(data, "left"))


@dataclass(frozen=True, slots=True)
class Grant(Reply):
    grant: int

    def to_wire(self) -> Wire:
        return {"grant": self.grant}

    @classmethod
    def from_wire(cls, data: Wire) -> Grant:
        return cls(_field(data, "grant", int))


@dataclass(frozen=True, slots=True)
class Report(Reply):
    """A worker's counters (Agent.collect's shape, absorbed by UserService.absorb)."""

    report: dict[str, Any]

    def to_wire(self) -> Wire:
        return {"report": self.report}

    @classmethod
    def from_wire(cls, data: Wire) -> Report:
        return cls(_field(data, "report", dict))


@dataclass(frozen=True, slots=True)
class Kicked(Reply):
    kicked: int

    def to_wire(self) -> Wire:
        return {"kicked": self.kicked}

    @classmethod
    def from_wire(cls, data: Wire) -> Kicked:
        return cls(_field(data, "kicked", int))


# -- supervisor to worker --------------------------------------------------------


def config_to_wire(config: ServerConfig) -> Wire:
    """What a worker needs; the controller's token and policy stay with the supervisor."""
    data = dataclasses.asdict(config)
    del data["controller_token"], data["allow_dst"]
    return data


def config_from_wire(data: Wire) -> ServerConfig:
    limits = dict(data["limits"])
    limits["smux"] = SmuxConfig(**limits["smux"])
    limits["harvest"] = HarvestBounds(**limits["harvest"])
    limits["muxcool"] = MuxCoolConfig(**limits["muxcool"])
    # JSON lists on the wire
    trusted = tuple(data.get("trusted_proxies", ()))
    origins = tuple(data.get("allowed_origins", ()))
    domains = tuple(data.get("acme_domains", ()))
    return ServerConfig(
        **{
            **data,
            "limits": Limits(**limits),
            "trusted_proxies": trusted,
            "allowed_origins": origins,
            "mux_protocol": MuxProtocol(data["mux_protocol"]),
            "acme_domains": domains,
        }
    )


@dataclass(frozen=True, slots=True)
class Init(Notification):
    """A new worker's configuration, certificate and full user table, sent first."""

    OP: ClassVar[str] = "init"
    config: ServerConfig
    tls: dict[str, str] | None
    users: Command
    # TLS-ALPN-01 challenges pending when the worker starts (domain -> PEM spec)
    challenges: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    def to_wire(self) -> Wire:
        return {
            "op": self.OP,
            "config": config_to_wire(self.config),
            "tls": self.tls,
            "users": self.users.to_wire(runs=True),
            "challenges": self.challenges,
        }

    @classmethod
    def from_wire(cls, data: Wire) -> Init:
        config = config_from_wire(_field(data, "config", dict))
        users = Command.from_wire(_field(data, "users", dict))
        return cls(config, _tls(data), users, _challenges(data))


@dataclass(frozen=True, slots=True)
class Change(Request[Done]):
    """A change to the user table; with kick, tunnels of removed users close."""

    OP: ClassVar[str] = "change"
    command: Command
    kick: bool

    def to_wire(self) -> Wire:
        return {"op": self.OP, "command": self.command.to_wire(runs=True), "kick": self.kick}

    @classmethod
    def from_wire(cls, data: Wire) -> Change:
        return cls(Command.from_wire(_field(data, "command", dict)), _field(data, "kick", bool))

    def reply_from_wire(self, data: Wire) -> Done:
        return Done.from_wire(data)


@dataclass(frozen=True, slots=True)
class Collect(Request[Report]):
    OP: ClassVar[str] = "collect"

    def to_wire(self) -> Wire:
        return {"op": self.OP}

    @classmethod
    def from_wire(cls, data: Wire) -> Collect:
        return cls()

    def reply_from_wire(self, data: Wire) -> Report:
        return Report.from_wire(data)


@dataclass(frozen=True, slots=True)
class Kick(Request[Kicked]):
    """Close these users' tunnels: the controller's kick (why None) or a limit's cut."""

    OP: ClassVar[str] = "kick"
    paths: tuple[str, ...]
    why: str | None = None

    def to_wire(self) -> Wire:
        return {"op": self.OP, "paths": list(self.paths), "why": self.why}

    @classmethod
    def from_wire(cls, data: Wire) -> Kick:
        paths = _field(data, "paths", list)
        if not all(isinstance(p, str) for p in paths):
            raise ProtocolError("'paths' is not a list of strings")
        return cls(tuple(paths), _optional_str(data, "why"))

    def reply_from_wire(self, data: Wire) -> Kicked:
        return Kicked.from_wire(data)


@dataclass(frozen=True, slots=True)
class ReloadTls(Request[Done]):
    OP: ClassVar[str] = "tls"
    tls: dict[str, str]

    def to_wire(self) -> Wire:
        return {"op": self.OP, "tls": self.tls}

    @classmethod
    def from_wire(cls, data: Wire) -> ReloadTls:
        tls = _tls(data)
        if tls is None:
            raise ProtocolError("'tls' is missing")
        return cls(tls)

    def reply_from_wire(self, data: Wire) -> Done:
        return Done.from_wire(data)


@dataclass(frozen=True, slots=True)
class Budgets(Notification):
    """The quota each user with open tunnels has left, after a collection
    (mtt.core.enforcement); the worker closes a user's tunnels once it has
    counted that much more."""

    OP: ClassVar[str] = "budgets"
    left: dict[str, int]

    def to_wire(self) -> Wire:
        return {"op": self.OP, "left": self.left}

    @classmethod
    def from_wire(cls, data: Wire) -> Budgets:
        left = _field(data, "left", dict)
        if not all(type(v) is int for v in left.values()):
            raise ProtocolError("'left' is not an object of integers")
        return cls(left)


@dataclass(frozen=True, slots=True)
class Challenges(Request[Done]):
    """Serve exactly these TLS-ALPN-01 challenge certificates (domain -> PEM
    spec, as ReloadTls's); an empty dict ends every challenge."""

    OP: ClassVar[str] = "challenges"
    challenges: dict[str, dict[str, str]]

    def to_wire(self) -> Wire:
        return {"op": self.OP, "challenges": self.challenges}

    @classmethod
    def from_wire(cls, data: Wire) -> Challenges:
        return cls(_challenges(data))

    def reply_from_wire(self, data: Wire) -> Done:
        return Done.from_wire(data)


@dataclass(frozen=True, slots=True)
class Stop(Notification):
    """Stop accepting, let tunnels finish for grace seconds, send Final, exit."""

    OP: ClassVar[str] = "stop"
    grace: float

    def to_wire(self) -> Wire:
        return {"op": self.OP, "grace": self.grace}

    @classmethod
    def from_wire(cls, data: Wire) -> Stop:
        return cls(_number(data, "grace"))


# -- worker to supervisor --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready(Notification):
    """The worker listens and applied Init's table."""

    OP: ClassVar[str] = "ready"

    def to_wire(self) -> Wire:
        return {"op": self.OP}

    @classmethod
    def from_wire(cls, data: Wire) -> Ready:
        return cls()


@dataclass(frozen=True, slots=True)
class Admit(Request[Admission]):
    """May a tunnel of path from ip open (server-wide limits)?"""

    OP: ClassVar[str] = "admit"
    path: str
    ip: str

    def to_wire(self) -> Wire:
        return {"op": self.OP, "path": self.path, "ip": self.ip}

    @classmethod
    def from_wire(cls, data: Wire) -> Admit:
        return cls(_field(data, "path", str), _field(data, "ip", str))

    def reply_from_wire(self, data: Wire) -> Admission:
        return Admission.from_wire(data)


@dataclass(frozen=True, slots=True)
class Tokens(Request[Grant]):
    """Rate tokens for path in direction (UP/DOWN)."""

    OP: ClassVar[str] = "tokens"
    path: str
    direction: Direction
    want: int

    def to_wire(self) -> Wire:
        return {"op": self.OP, "path": self.path, "dir": int(self.direction), "want": self.want}

    @classmethod
    def from_wire(cls, data: Wire) -> Tokens:
        number = _field(data, "dir", int)
        try:
            direction = Direction(number)
        except ValueError:
            raise ProtocolError(f"tokens: no direction {number}") from None
        return cls(_field(data, "path", str), direction, _field(data, "want", int))

    def reply_from_wire(self, data: Wire) -> Grant:
        return Grant.from_wire(data)


@dataclass(frozen=True, slots=True)
class Release(Notification):
    """An admitted tunnel closed; usage is its user's uncounted traffic."""

    OP: ClassVar[str] = "release"
    path: str
    ip: str
    usage: Usage

    def to_wire(self) -> Wire:
        return {"op": self.OP, "path": self.path, "ip": self.ip, "usage": self.usage.to_wire()}

    @classmethod
    def from_wire(cls, data: Wire) -> Release:
        usage = Usage.from_wire(_field(data, "usage", list))
        return cls(_field(data, "path", str), _field(data, "ip", str), usage)


@dataclass(frozen=True, slots=True)
class Exhausted(Notification):
    """The worker spent a user's quota budget and closed `closed` of its tunnels;
    unreported: bytes of the user it counted since its last report."""

    OP: ClassVar[str] = "exhausted"
    path: str
    closed: int
    unreported: int

    def to_wire(self) -> Wire:
        return {
            "op": self.OP,
            "path": self.path,
            "closed": self.closed,
            "unreported": self.unreported,
        }

    @classmethod
    def from_wire(cls, data: Wire) -> Exhausted:
        return cls(
            _field(data, "path", str),
            _field(data, "closed", int),
            _field(data, "unreported", int),
        )


@dataclass(frozen=True, slots=True)
class Final(Notification):
    """A stopping worker's last counters."""

    OP: ClassVar[str] = "final"
    report: dict[str, Any]

    def to_wire(self) -> Wire:
        return {"op": self.OP, "report": self.report}

    @classmethod
    def from_wire(cls, data: Wire) -> Final:
        return cls(_field(data, "report", dict))


KINDS: dict[str, type[Message]] = {
    kind.OP: kind
    for kind in (
        Init,
        Change,
        Collect,
        Kick,
        ReloadTls,
        Budgets,
        Challenges,
        Stop,
        Ready,
        Admit,
        Tokens,
        Release,
        Exhausted,
        Final,
    )
}


def decode(data: Wire) -> Message:
    """The message a decoded JSON object holds; ProtocolError if it holds none."""
    op = data.get("op")
    kind = KINDS.get(op) if isinstance(op, str) else None
    if kind is None:
        raise ProtocolError(f"unknown message {op!r}")
    return checked(kind.from_wire, data, kind.OP)


def checked(parse: Callable[[Wire], T], data: Wire, what: str) -> T:
    """parse(data), with any sign of a malformed object as a ProtocolError."""
    try:
        return parse(data)
    except ProtocolError as exc:
        raise ProtocolError(f"malformed {what!r}: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ProtocolError(f"malformed {what!r}: {type(exc).__name__}: {exc}") from None

"""The controller's JSON commands, validated in full before anything is applied.

Wire shape (docs/protocol.md §6): `{"opt": 1|2|3|9, "args_bunch": [{"path", "dst"}]}`
in, `{"res": 1|2, "err_string": str, "current_users": int}` out. Unlike the
original, which answers an empty 200 to what it cannot parse, every reply is
JSON, every error names its cause, and one bad entry rejects the whole request.

Beyond the original, in the same style: per-user limits on add entries,
opt 4 replace (the panel's desired state, atomically), opt 5 list (settings and
counters, optionally read-and-reset), opt 6 kick, opts 7, 8 and 10 harvest,
ack and pending (counters taken exactly once, mtt.core.harvest); every reply
carries the table's revision (docs/controller.md). Opt numbers stay clear of
the original's 1, 2, 3 and 9 (docs/protocol.md §6).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from itertools import repeat
from operator import attrgetter, is_, itemgetter
from typing import Any

from mtt.address import Destination, DestinationParser, destinations, parse_destination, quote
from mtt.core.harvest import HarvestBounds, id_problem
from mtt.core.policy import DstPolicy
from mtt.core.users import LIMIT_FIELDS, NO_LIMITS, MuxProtocol, User, UserLimits, UserTable
from mtt.errors import ControlError

MAX_NUMBER = 2**53  # what every JSON implementation a panel may use holds exactly
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_ALLOW_ALL = DstPolicy()
_HARVEST = HarvestBounds()
RES_OK = 1
RES_ERR = 2
# Fields of entries, users and destinations, for loops of C over 40,000 of them.
_PATH = attrgetter("path")
_USER = attrgetter("user")
_QUOTA_USED = attrgetter("quota_used")
_LIMITS = attrgetter("limits")
_MUX = attrgetter("mux")
_DST = attrgetter("dst")
_HOST = attrgetter("host")
_PORT = attrgetter("port")


class Opt(IntEnum):
    ADD = 1
    DELETE = 2
    RESET = 3
    REPLACE = 4
    LIST = 5
    KICK = 6
    HARVEST = 7
    ACK = 8
    PING = 9
    PENDING = 10


CHANGES = frozenset({Opt.ADD, Opt.DELETE, Opt.RESET, Opt.REPLACE})  # these bump the revision
_OPT_NAMES = (
    "1 add, 2 delete, 3 reset, 4 replace, 5 list, 6 kick, 7 harvest, 8 ack, 9 ping, 10 pending"
)


@dataclass(slots=True)
class Entry:
    """One user of an add or replace; quota_used None keeps the current count."""

    path: str
    user: User
    quota_used: int | None = None


# Paths, each entry's host and ports of entries that are each a plain User of its own.
Columns = tuple[list[str], list[str], list[int]]


@dataclass(frozen=True, slots=True)
class Command:
    """A validated request: nothing in it can fail to apply."""

    opt: Opt
    entries: tuple[Entry, ...] = ()
    paths: tuple[str, ...] = ()
    reset: bool = False  # list: read-and-reset the counters
    harvest_id: str = ""  # harvest and ack: the panel's id of the harvest
    # plain_columns(entries), when parse_command has them already (a port per user).
    columns: Columns | None = field(default=None, compare=False, repr=False)

    def plain(self) -> Columns | None:
        """plain_columns(self.entries), taken from the parse if it kept them."""
        return self.columns if self.columns is not None else plain_columns(self.entries)

    def to_wire(self, *, runs: bool = False) -> dict[str, Any]:
        """As JSON for a worker, a store or another node (trusted: already validated).

        runs: entries in a row that share one User (as parse_command makes
        them) become one item listing their paths: a third of the bytes and
        one User to build on the other side instead of 40,000. Only from_wire
        of this version reads them: for the workers, never for other nodes."""
        out: dict[str, Any] = {"opt": int(self.opt)}
        if self.entries:
            out["entries"] = _runs_to_wire(self) if runs else _entries_to_wire(self.entries)
        if self.paths:
            out["paths"] = list(self.paths)
        if self.reset:
            out["reset"] = True
        if self.harvest_id:
            out["harvest_id"] = self.harvest_id
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Command:
        return cls(
            Opt(data["opt"]),
            entries=_entries_from_wire(data.get("entries", ())),
            paths=tuple(data.get("paths", ())),
            reset=bool(data.get("reset", False)),
            harvest_id=str(data.get("harvest_id", "")),
        )


def _entries_to_wire(entries: tuple[Entry, ...]) -> list[list[Any]]:
    return [_entry_to_wire(e.path, e.user, e.quota_used) for e in entries]


def runs(entries: Sequence[Entry]) -> Iterator[tuple[int, int]]:
    """(start, end) of each stretch of entries in a row that share one User
    object (as parse_command gives the entries of one dst), in order; an entry
    with a quota_used of its own stands alone."""
    start = 0
    user: User | None = None
    for index, entry in enumerate(entries):
        if entry.user is not user or entry.quota_used is not None:
            if index:
                yield start, index
            start, user = index, entry.user
    if entries:
        yield start, len(entries)


def plain_columns(entries: Sequence[Entry]) -> Columns | None:
    """Paths, hosts and ports of entries that are each a User of its own with
    no limits, no mux and no quota_used (a port per user, as parse_command
    makes them), or None if any entry is not: checked and taken by loops of C,
    where runs() would walk the entries one by one."""
    users: list[User] = list(map(_USER, entries))
    if (
        any(map(is_, users, users[1:]))  # two in a row share a User: a run
        or not all(map(is_, map(_LIMITS, users), repeat(NO_LIMITS)))
        or not all(map(is_, map(_MUX, users), repeat(None)))
        or not all(map(is_, map(_QUOTA_USED, entries), repeat(None)))
    ):
        return None
    dsts = list(map(_DST, users))
    return list(map(_PATH, entries)), list(map(_HOST, dsts)), list(map(_PORT, dsts))


def _runs_to_wire(command: Command) -> list[Any]:
    """Each run of two or more entries as one item, its first element the list
    of their paths; a stretch of entries each of its own User of no limits (a
    port per user) as one _Columns object; other entries as they are."""
    entries = command.entries
    plain = command.plain()
    if plain is not None:  # every entry: one _Columns object, made column by column
        paths, hosts, ports = plain
        index: dict[str, int] = {}
        for host in dict.fromkeys(hosts):
            index[host] = len(index)
        which = list(map(index.__getitem__, hosts))
        return [{"paths": paths, "hosts": list(index), "host": which, "ports": ports}]
    out: list[Any] = []
    columns: _Columns | None = None
    for start, end in runs(entries):
        first = entries[start]
        user = first.user
        if (
            end - start == 1
            and user.limits is NO_LIMITS
            and user.mux is None
            and first.quota_used is None
        ):
            if columns is None:
                columns = _Columns()
                out.append(columns.wire)
            columns.add(first.path, user.dst)
            continue
        columns = None
        if end - start == 1:
            out.append(_entry_to_wire(first.path, user, first.quota_used))
        else:
            out.append(_entry_to_wire([e.path for e in entries[start:end]], user, None))
    return out


class _Columns:
    """Entries of plain Users, one each, as columns: {"paths", "hosts", "host",
    "ports"}, each entry's host an index into "hosts" (most share one). JSON
    lists of strings and numbers encode and decode several times faster than
    40,000 small lists, and the worker's Users share each host string again."""

    __slots__ = ("_hosts", "_paths", "_ports", "_seen", "_which", "wire")

    def __init__(self) -> None:
        self._paths: list[str] = []
        self._hosts: list[str] = []
        self._which: list[int] = []
        self._ports: list[int] = []
        self._seen: dict[str, int] = {}  # host -> its index in _hosts
        self.wire: dict[str, list[Any]] = {
            "paths": self._paths,
            "hosts": self._hosts,
            "host": self._which,
            "ports": self._ports,
        }

    def add(self, path: str, dst: Destination) -> None:
        self._paths.append(path)
        index = self._seen.get(dst.host)
        if index is None:
            index = self._seen[dst.host] = len(self._hosts)
            self._hosts.append(dst.host)
        self._which.append(index)
        self._ports.append(dst.port)


def _entry_to_wire(path: str | list[str], user: User, quota_used: int | None) -> list[Any]:
    dst = user.dst
    if user.limits is NO_LIMITS and quota_used is None and user.mux is None:
        return [path, dst.host, dst.port]  # most users: a third of the bytes
    limits = [getattr(user.limits, name) for name in LIMIT_FIELDS]
    out = [path, dst.host, dst.port, limits, quota_used]
    if user.mux is not None:
        out.append(user.mux.value)
    return out


def _entries_from_wire(items: list[Any]) -> tuple[Entry, ...]:
    entries: list[Entry] = []
    for item in items:
        if type(item) is dict:  # entries of plain Users, one each, as columns (_Columns)
            entries.extend(_columns_from_wire(item))
            continue
        paths = item[0]
        if type(paths) is list:  # a run: its entries share one User (_runs_to_wire)
            user = _user_from_wire(item)
            entries.extend([Entry(path, user) for path in paths])
        else:
            entries.append(Entry(paths, _user_from_wire(item), item[4] if len(item) > 3 else None))
    return tuple(entries)


def _columns_from_wire(item: dict[str, Any]) -> Iterator[Entry]:
    paths, which, ports = item["paths"], item["host"], item["ports"]
    if not len(paths) == len(which) == len(ports):
        raise ValueError("columns of different lengths")
    hosts = item["hosts"]
    dsts = map(Destination._make, zip(map(hosts.__getitem__, which), ports, strict=True))
    return map(Entry, paths, map(User, dsts))


def _user_from_wire(item: list[Any]) -> User:
    if len(item) == 3:
        return User(Destination(item[1], item[2]))
    _, host, port, limits, _, *mux = item
    user_limits = UserLimits(*limits) if any(limits) else NO_LIMITS
    return User(Destination(host, port), user_limits, MuxProtocol(mux[0]) if mux else None)


def reply(res: int, current_users: int, err_string: str = "", revision: int = 0) -> dict[str, Any]:
    """The reply object; every field always present."""
    return {
        "res": res,
        "err_string": err_string,
        "current_users": current_users,
        "revision": revision,
    }


def parse_command(
    body: bytes,
    policy: DstPolicy = _ALLOW_ALL,
    *,
    max_path: int,
    harvest: HarvestBounds = _HARVEST,
) -> Command:
    """Decode and validate a request body (a user's path at most max_path
    characters); raise ControlError naming the problem."""
    try:
        doc = json.loads(body, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise ControlError("body is not valid UTF-8") from None
    except RecursionError:
        raise ControlError("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise ControlError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ControlError(f"body must be a JSON object, got {_json_type(doc)}")
    if "opt" not in doc:
        raise ControlError("missing opt")
    raw_opt = doc["opt"]
    if not isinstance(raw_opt, int) or isinstance(raw_opt, bool):
        raise ControlError(f"opt must be an integer, got {_json_type(raw_opt)}")
    try:
        opt = Opt(raw_opt)
    except ValueError:
        raise ControlError(f"unknown opt {raw_opt} (valid: {_OPT_NAMES})") from None
    if opt in (Opt.RESET, Opt.PING, Opt.PENDING):
        return Command(opt)
    if opt is Opt.LIST:
        return _parse_list(doc, max_path)
    if opt in (Opt.HARVEST, Opt.ACK):
        return _parse_harvest(opt, doc, harvest, max_path)
    bunch = doc.get("args_bunch")
    if bunch is None:
        if opt is Opt.REPLACE:
            raise ControlError("missing args_bunch (send [] to remove every user)")
        raise ControlError("missing args_bunch")
    if not isinstance(bunch, list):
        raise ControlError(f"args_bunch must be an array, got {_json_type(bunch)}")
    if not bunch and opt is not Opt.REPLACE:
        raise ControlError("args_bunch is empty")
    if opt in (Opt.ADD, Opt.REPLACE):
        entries, columns = _parse_adds(bunch, policy, max_path)
        if opt is Opt.REPLACE:
            _check_unique(entries)
        return Command(opt, entries=entries, columns=columns)
    return Command(opt, paths=tuple(_parse_delete(i, arg, max_path) for i, arg in enumerate(bunch)))


def _parse_list(doc: dict[str, Any], max_path: int) -> Command:
    reset = doc.get("reset", False)
    if not isinstance(reset, bool):
        raise ControlError(f"reset must be a boolean, got {_json_type(reset)}")
    bunch = doc.get("args_bunch")
    if bunch is None:
        return Command(Opt.LIST, reset=reset)
    if not isinstance(bunch, list):
        raise ControlError(f"args_bunch must be an array, got {_json_type(bunch)}")
    paths = tuple(_parse_delete(i, arg, max_path) for i, arg in enumerate(bunch))
    return Command(Opt.LIST, paths=paths, reset=reset)


def _parse_harvest(opt: Opt, doc: dict[str, Any], bounds: HarvestBounds, max_path: int) -> Command:
    """Harvest: an id and optionally the paths to take; ack: an id."""
    if "harvest_id" not in doc:
        raise ControlError("missing harvest_id")
    harvest_id = doc["harvest_id"]
    problem = id_problem(harvest_id, bounds)
    if problem is not None:
        raise ControlError(f"harvest_id {problem}")
    bunch = doc.get("args_bunch") if opt is Opt.HARVEST else None
    if bunch is None:
        return Command(opt, harvest_id=harvest_id)
    if not isinstance(bunch, list):
        raise ControlError(f"args_bunch must be an array, got {_json_type(bunch)}")
    if not bunch:
        raise ControlError("args_bunch is empty (leave it out to harvest every user)")
    if len(bunch) > bounds.max_paths:
        raise ControlError(f"args_bunch has more than {bounds.max_paths} paths")
    paths = tuple(dict.fromkeys(_parse_delete(i, arg, max_path) for i, arg in enumerate(bunch)))
    return Command(opt, paths=paths, harvest_id=harvest_id)


def _check_unique(entries: tuple[Entry, ...]) -> None:
    """A desired state names each user once; two entries for one path is a panel bug."""
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if entry.path in seen:
            raise ControlError(f"args_bunch[{index}].path {quote(entry.path)} appears twice")
        seen.add(entry.path)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Reject duplicate keys: `{"opt": 9, "opt": 3}` must not quietly reset.

    Called for each of a bulk add's 40,000 objects: a dict shorter than its
    pairs is the one sign needed; the key is looked for only then."""
    doc = dict(pairs)
    if len(doc) == len(pairs):
        return doc
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ControlError(f"duplicate key {quote(key)} in a JSON object")
        seen.add(key)
    raise AssertionError("unreachable: a dict shorter than its pairs has a duplicate key")


def apply_command(table: UserTable, command: Command) -> None:
    """Apply a validated change to a table (list, kick and ping change nothing)."""
    if command.opt is Opt.ADD:
        table.add(_pairs(command.entries))
    elif command.opt is Opt.DELETE:
        table.delete(command.paths)
    elif command.opt is Opt.RESET:
        table.reset()
    elif command.opt is Opt.REPLACE:
        table.replace(_pairs(command.entries))


def _pairs(entries: tuple[Entry, ...]) -> Iterator[tuple[str, User]]:
    """(path, user) of each entry, by loops of C (40,000 entries, in every process)."""
    return zip(map(_PATH, entries), map(_USER, entries), strict=True)


def _parse_adds(
    bunch: list[Any], policy: DstPolicy, max_path: int
) -> tuple[tuple[Entry, ...], Columns | None]:
    """The entries of an add or replace, checked as _parse_add checks each one,
    and their plain_columns if the column by column check has them already.

    Go-era panels send 40,000 `{"path", "dst"}` objects at a time, with one dst
    for all or one each: such entries share the User of their dst text, parsed
    (by a DestinationParser: few hosts among the dsts) and checked against the
    policy once (a User is never changed in place, so sharing one is safe), and
    their paths are searched for control characters and lone surrogates all at
    once. A request of nothing but such entries, all valid, is checked column
    by column (_plain_adds). Anything else, or a dst that fails, goes through
    _parse_add: an error still names the first bad entry, with the same words.
    """
    whole = _plain_adds(bunch, policy, max_path)
    if whole is not None:
        return whole
    plain: dict[str, User] = {}  # dst text -> the User of entries with only path and dst
    parse = DestinationParser().parse
    entries: list[Entry] = []
    append = entries.append
    try:
        for index, arg in enumerate(bunch):
            if type(arg) is dict and len(arg) == 2:
                path = arg.get("path")
                dst = arg.get("dst")
                if type(path) is str and type(dst) is str:
                    user = plain.get(dst)
                    if user is None:
                        user = _plain_user(dst, policy, parse)
                        if user is not None:
                            plain[dst] = user
                    if user is not None and path.startswith("/") and len(path) <= max_path:
                        append(Entry(path, user))  # its text is checked below, with the others
                        continue
            append(_parse_add(index, arg, policy, max_path, parse=parse))
    except ControlError:
        _check_texts(entries)  # an earlier entry's path is the first problem
        raise
    _check_texts(entries)
    return tuple(entries), None


def _plain_adds(
    bunch: list[Any], policy: DstPolicy, max_path: int
) -> tuple[tuple[Entry, ...], Columns | None] | None:
    """The entries of an add or replace whose every entry has only a path and
    a dst, all of them valid, as passes of C over the columns of paths and of
    dsts; None if any entry is anything else (_parse_adds then goes entry by
    entry, so an error names the first bad one in the same words).

    Few distinct dsts (one backend for all): a User each, shared by its
    entries, as _parse_adds shares them. Mostly distinct (a port per user):
    mtt.address.destinations parses the column, a User per entry."""
    if set(map(type, bunch)) != {dict} or set(map(len, bunch)) != {2}:
        return None
    try:
        paths: list[Any] = list(map(itemgetter("path"), bunch))
        dsts: list[Any] = list(map(itemgetter("dst"), bunch))
    except KeyError:
        return None
    if set(map(type, paths)) != {str} or set(map(type, dsts)) != {str}:
        return None
    if (
        max(map(len, paths)) > max_path
        or not all(map(str.startswith, paths, repeat("/")))
        or _text_problem("".join(paths))
    ):
        return None
    distinct = dict.fromkeys(dsts)
    users: list[User]
    columns: Columns | None = None
    if 2 * len(distinct) > len(dsts):
        parsed = destinations(dsts)
        if parsed is None or (policy.rules and any(map(policy.problem, parsed))):
            return None
        users = list(map(User, parsed))
        # A User each: the columns the store and the workers take them in.
        columns = (paths, list(map(_HOST, parsed)), list(map(_PORT, parsed)))
    else:
        shared: dict[str, User] = {}
        for text in distinct:
            user = _plain_user(text, policy, parse_destination)
            if user is None:
                return None
            shared[text] = user
        users = list(map(shared.__getitem__, dsts))
    return tuple(map(Entry, paths, users)), columns


def _plain_user(dst: str, policy: DstPolicy, parse: Callable[[str], Destination]) -> User | None:
    """The User of an entry with only path and dst, or None if dst is not
    allowed (_parse_add then says why, after checking the path first)."""
    try:
        destination = parse(dst)
    except ValueError:
        return None
    if policy.problem(destination) is not None:
        return None
    return User(destination)


def _check_texts(entries: list[Entry]) -> None:
    """_check_path_text over every entry's path (entry i is args_bunch[i]): one
    search of the paths joined, then entry by entry only if that finds something."""
    if not _text_problem("".join([e.path for e in entries])):
        return
    for index, entry in enumerate(entries):
        _check_path_text(index, entry.path)


def _text_problem(text: str) -> bool:
    """True if text has a control character or a lone surrogate (not UTF-8)."""
    return _CONTROL_CHARS.search(text) is not None or not (text.isascii() or _encodes(text))


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_add(
    index: int,
    arg: Any,
    policy: DstPolicy,
    max_path: int,
    *,
    parse: Callable[[str], Destination] = parse_destination,
) -> Entry:
    """One entry, checked in full (_parse_adds shares the Users of the entries
    with only path and dst that pass; the ones here fail or carry limits)."""
    if not isinstance(arg, dict):
        raise ControlError(f"args_bunch[{index}] must be an object, got {_json_type(arg)}")
    path = _parse_path(index, arg, max_path)
    if "dst" not in arg:
        raise ControlError(f"args_bunch[{index}]: missing dst")
    dst = arg["dst"]
    if not isinstance(dst, str):
        raise ControlError(f"args_bunch[{index}].dst must be a string, got {_json_type(dst)}")
    try:
        destination = parse(dst)
    except ValueError as exc:
        raise ControlError(f"args_bunch[{index}].dst {quote(dst)}: {exc}") from None
    problem = policy.problem(destination)
    if problem is not None:
        raise ControlError(f"args_bunch[{index}].dst {quote(dst)} {problem}")
    if len(arg) == 2:  # path and dst only: what Go-era panels send, 40,000 at a time
        return Entry(path, User(destination))
    values = [_parse_count(index, arg, name) for name in LIMIT_FIELDS]
    limits = UserLimits(*values) if any(values) else NO_LIMITS
    quota_used = _parse_count(index, arg, "quota_used") if "quota_used" in arg else None
    return Entry(path, User(destination, limits, _parse_mux(index, arg)), quota_used)


_MUX_NAMES = ", ".join(p.value for p in MuxProtocol)


def _parse_mux(index: int, arg: dict[str, Any]) -> MuxProtocol | None:
    """The user's "mux": what its tunnels carry when the client names no
    sub-protocol; absent or null: the server's -mux-protocol."""
    value = arg.get("mux")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ControlError(f"args_bunch[{index}].mux must be a string, got {_json_type(value)}")
    try:
        return MuxProtocol(value)
    except ValueError:
        raise ControlError(
            f"args_bunch[{index}].mux {quote(value)} must be one of {_MUX_NAMES}"
        ) from None


def _parse_count(index: int, arg: dict[str, Any], name: str) -> int:
    value = arg.get(name, 0)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ControlError(
            f"args_bunch[{index}].{name} must be an integer, got {_json_type(value)}"
        )
    if not 0 <= value <= MAX_NUMBER:
        raise ControlError(f"args_bunch[{index}].{name} must be from 0 to 2^53")
    return value


def _parse_delete(index: int, arg: Any, max_path: int) -> str:
    if not isinstance(arg, dict):
        raise ControlError(f"args_bunch[{index}] must be an object, got {_json_type(arg)}")
    return _parse_path(index, arg, max_path)


def _parse_path(index: int, arg: dict[str, Any], max_path: int) -> str:
    if "path" not in arg:
        raise ControlError(f"args_bunch[{index}]: missing path")
    path = arg["path"]
    if not isinstance(path, str):
        raise ControlError(f"args_bunch[{index}].path must be a string, got {_json_type(path)}")
    if not path.startswith("/"):
        raise ControlError(f"args_bunch[{index}].path {quote(path)} must start with /")
    if len(path) > max_path:
        raise ControlError(f"args_bunch[{index}].path is longer than {max_path} characters")
    _check_path_text(index, path)
    return path


def _check_path_text(index: int, path: str) -> None:
    if _CONTROL_CHARS.search(path):
        raise ControlError(f"args_bunch[{index}].path contains control characters")
    if not _encodes(path):
        raise ControlError(f"args_bunch[{index}].path is not valid Unicode")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"

"""The controller's JSON commands, validated in full before anything is applied.

Wire shape (PROTOCOL.md §6): `{"opt": 1|2|3|9, "args_bunch": [{"path", "dst"}]}`
in, `{"res": 1|2, "err_string": str, "current_users": int}` out. Unlike the
original, which answers an empty 200 to what it cannot parse, every reply is
JSON, every error names its cause, and one bad entry rejects the whole request.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from mtt.address import Destination, parse_destination, quote
from mtt.controller.policy import DstPolicy
from mtt.errors import ControlError
from mtt.server.users import UserTable

MAX_PATH_LENGTH = 4096
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_ALLOW_ALL = DstPolicy()
RES_OK = 1
RES_ERR = 2


class Opt(IntEnum):
    ADD = 1
    DELETE = 2
    RESET = 3
    PING = 9


@dataclass(frozen=True, slots=True)
class Command:
    """A validated request: nothing in it can fail to apply."""

    opt: Opt
    entries: tuple[tuple[str, Destination], ...] = ()
    paths: tuple[str, ...] = ()


def reply(res: int, current_users: int, err_string: str = "") -> dict[str, Any]:
    """The reply object; all three fields always present."""
    return {"res": res, "err_string": err_string, "current_users": current_users}


def parse_command(body: bytes, policy: DstPolicy = _ALLOW_ALL) -> Command:
    """Decode and validate a request body; raise ControlError naming the problem."""
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
        raise ControlError(
            f"unknown opt {raw_opt} (valid: 1 add, 2 delete, 3 reset, 9 ping)"
        ) from None
    if opt in (Opt.RESET, Opt.PING):
        return Command(opt)
    bunch = doc.get("args_bunch")
    if bunch is None:
        raise ControlError("missing args_bunch")
    if not isinstance(bunch, list):
        raise ControlError(f"args_bunch must be an array, got {_json_type(bunch)}")
    if not bunch:
        raise ControlError("args_bunch is empty")
    if opt is Opt.ADD:
        return Command(
            opt, entries=tuple(_parse_add(i, arg, policy) for i, arg in enumerate(bunch))
        )
    return Command(opt, paths=tuple(_parse_delete(i, arg) for i, arg in enumerate(bunch)))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Reject duplicate keys: `{"opt": 9, "opt": 3}` must not quietly reset."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ControlError(f"duplicate key {quote(key)} in a JSON object")
        seen.add(key)
    return dict(pairs)


def apply_command(table: UserTable, command: Command) -> dict[str, Any]:
    """Apply a validated command and build the reply."""
    if command.opt is Opt.ADD:
        table.add(command.entries)
    elif command.opt is Opt.DELETE:
        table.delete(command.paths)
    elif command.opt is Opt.RESET:
        table.reset()
    return reply(RES_OK, len(table))


def _parse_add(index: int, arg: Any, policy: DstPolicy) -> tuple[str, Destination]:
    if not isinstance(arg, dict):
        raise ControlError(f"args_bunch[{index}] must be an object, got {_json_type(arg)}")
    path = _parse_path(index, arg)
    if "dst" not in arg:
        raise ControlError(f"args_bunch[{index}]: missing dst")
    dst = arg["dst"]
    if not isinstance(dst, str):
        raise ControlError(f"args_bunch[{index}].dst must be a string, got {_json_type(dst)}")
    try:
        destination = parse_destination(dst)
    except ValueError as exc:
        raise ControlError(f"args_bunch[{index}].dst {quote(dst)}: {exc}") from None
    problem = policy.problem(destination)
    if problem is not None:
        raise ControlError(f"args_bunch[{index}].dst {quote(dst)} {problem}")
    return path, destination


def _parse_delete(index: int, arg: Any) -> str:
    if not isinstance(arg, dict):
        raise ControlError(f"args_bunch[{index}] must be an object, got {_json_type(arg)}")
    return _parse_path(index, arg)


def _parse_path(index: int, arg: dict[str, Any]) -> str:
    if "path" not in arg:
        raise ControlError(f"args_bunch[{index}]: missing path")
    path = arg["path"]
    if not isinstance(path, str):
        raise ControlError(f"args_bunch[{index}].path must be a string, got {_json_type(path)}")
    if not path.startswith("/"):
        raise ControlError(f"args_bunch[{index}].path {quote(path)} must start with /")
    if len(path) > MAX_PATH_LENGTH:
        raise ControlError(f"args_bunch[{index}].path is longer than {MAX_PATH_LENGTH} characters")
    if _CONTROL_CHARS.search(path):
        raise ControlError(f"args_bunch[{index}].path contains control characters")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ControlError(f"args_bunch[{index}].path is not valid Unicode") from None
    return path


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

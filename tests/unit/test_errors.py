"""The exception tree drawn in mtt.errors is the whole tree: every exception
class the package defines sits under MttError and is drawn under its parent."""

import importlib
import inspect
import pkgutil
import re

import mtt
import mtt.errors
from mtt.errors import MttError

_NODE = re.compile(r"^    (?P<branch>[│├└─ ]*)(?P<name>[A-Z]\w*)\b")


def _defined_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the package, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(mtt.__path__, "mtt."):
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{obj.__qualname__}"] = obj
    return found


def _drawn_parents() -> dict[str, str | None]:
    """Each class drawn in the errors docstring, mapped to the class drawn above it."""
    parents: dict[str, str | None] = {}
    path: list[str] = []
    for line in (mtt.errors.__doc__ or "").splitlines():
        node = _NODE.match(line)
        if node is None or (not path and node["name"] != "MttError"):
            continue
        depth = len(node["branch"]) // 4
        del path[depth:]
        parents[node["name"]] = path[-1] if path else None
        path.append(node["name"])
    return parents


def test_the_walk_finds_the_tree() -> None:
    found = _defined_exceptions()
    assert "mtt.errors.SmuxProtocolError" in found
    assert _drawn_parents()["SmuxProtocolError"] == "ProtocolError"


def test_every_exception_class_is_in_the_tree() -> None:
    problems = [
        f"{name} is not a subclass of MttError"
        for name, cls in _defined_exceptions().items()
        if not issubclass(cls, MttError)
    ]
    assert problems == []


def test_every_exception_class_is_drawn_under_its_parent() -> None:
    drawn = _drawn_parents()
    problems = []
    for name, cls in _defined_exceptions().items():
        if cls.__name__ not in drawn:
            problems.append(f"{name} is not drawn in mtt/errors.py's docstring")
        elif cls is not MttError and drawn[cls.__name__] not in {
            base.__name__ for base in cls.__bases__
        }:
            bases = ", ".join(base.__name__ for base in cls.__bases__)
            problems.append(f"{name} is drawn under {drawn[cls.__name__]}, but subclasses {bases}")
    assert problems == []


def test_nothing_is_drawn_that_does_not_exist() -> None:
    defined = {cls.__name__ for cls in _defined_exceptions().values()}
    assert sorted(set(_drawn_parents()) - defined) == []

"""Every task of the package starts in mtt.transport.tasks.spawn: named, held
until done, its failure logged. ruff bans asyncio.create_task and
asyncio.ensure_future; a loop's or a TaskGroup's .create_task is a method call
it cannot see, so this looks for both in the code (not comments or strings)."""

import io
import tokenize
from pathlib import Path

import mtt

PACKAGE = Path(mtt.__file__).parent
ALLOWED = PACKAGE / "transport" / "tasks.py"


def _task_starts(source: str) -> list[tuple[int, str]]:
    """(line, call) of each `.create_task(` and `ensure_future(` in source code."""
    tokens = [
        t
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)
    ]
    found = []
    for before, name, after in zip(tokens, tokens[1:], tokens[2:], strict=False):
        if name.type != tokenize.NAME or after.string != "(":
            continue
        if name.string == "ensure_future" or (
            name.string == "create_task" and before.string == "."
        ):
            found.append((name.start[0], name.string))
    return found


def test_the_search_sees_method_calls_only_in_code() -> None:
    source = (
        "loop.create_task(x)\n"
        "asyncio.ensure_future(y)\n"
        "# loop.create_task(z)\n"
        "'ensure_future(w)'\n"
        "def create_task(): pass\n"
    )
    assert _task_starts(source) == [(1, "create_task"), (2, "ensure_future")]


def test_no_task_starts_outside_spawn() -> None:
    stray = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {call}( (use mtt.transport.tasks.spawn)"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != ALLOWED
        for line, call in _task_starts(path.read_text(encoding="utf-8"))
    ]
    assert stray == []

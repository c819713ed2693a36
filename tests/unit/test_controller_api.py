"""Controller validation: every bad input named, nothing partially applied."""

import json

import pytest

from mtt.address import Destination, parse_destination
from mtt.config import Limits
from mtt.core.commands import Command, Opt, apply_command, plain_columns, reply
from mtt.core.commands import parse_command as parse_with
from mtt.core.policy import DstPolicy, parse_rule
from mtt.core.users import NO_LIMITS, MuxProtocol, UserTable
from mtt.errors import ControlError

MAX_PATH = Limits().max_user_path  # what the controller gives the parser


def parse_command(body: bytes) -> Command:
    return parse_with(body, max_path=MAX_PATH)


def run(table: UserTable, doc: object) -> dict[str, object]:
    apply_command(table, parse_command(json.dumps(doc).encode()))
    return {k: v for k, v in reply(1, len(table)).items() if k != "revision"}


def test_add_ping_delete_reset() -> None:
    table = UserTable()
    reply = run(
        table,
        {
            "opt": 1,
            "args_bunch": [
                {"path": "/p1", "dst": "127.0.0.1:10001"},
                {"path": "/p2", "dst": "[::1]:10002"},
                {"path": "/p3", "dst": "backend.example:80"},
            ],
        },
    )
    assert reply == {"res": 1, "err_string": "", "current_users": 3}
    assert table.lookup("/p2").dst == Destination("::1", 10002)
    assert run(table, {"opt": 9}) == {"res": 1, "err_string": "", "current_users": 3}
    assert run(table, {"opt": 2, "args_bunch": [{"path": "/p1"}, {"path": "/unknown"}]}) == {
        "res": 1,
        "err_string": "",
        "current_users": 2,
    }
    assert table.lookup("/p1") is None
    assert run(table, {"opt": 3}) == {"res": 1, "err_string": "", "current_users": 0}


def test_add_overwrites_existing_path() -> None:
    table = UserTable()
    run(table, {"opt": 1, "args_bunch": [{"path": "/p", "dst": "127.0.0.1:1"}]})
    run(table, {"opt": 1, "args_bunch": [{"path": "/p", "dst": "127.0.0.1:2"}]})
    assert table.lookup("/p").dst == Destination("127.0.0.1", 2)
    assert len(table) == 1


def test_paths_match_exactly() -> None:
    table = UserTable()
    run(table, {"opt": 1, "args_bunch": [{"path": "/path_1", "dst": "127.0.0.1:1"}]})
    assert table.lookup("/path_1/") is None
    assert table.lookup("/PATH_1") is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "body is not valid JSON"),
        (b"{", "body is not valid JSON"),
        (b"\xff\xfe{}", "body is not valid"),
        (b"[1]", "body must be a JSON object, got array"),
        (b'{"args_bunch": []}', "missing opt"),
        (b'{"opt": "1"}', "opt must be an integer, got string"),
        (b'{"opt": 1.0}', "opt must be an integer, got number"),
        (b'{"opt": true}', "opt must be an integer, got boolean"),
        (b'{"opt": 11}', "unknown opt 11"),
        (b'{"opt": 99999999999999999999999}', "unknown opt"),
        (b'{"opt": 1}', "missing args_bunch"),
        (b'{"opt": 1, "args_bunch": []}', "args_bunch is empty"),
        (b'{"opt": 2, "args_bunch": {}}', "args_bunch must be an array, got object"),
        (b'{"opt": 1, "args_bunch": [3]}', r"args_bunch\[0\] must be an object, got number"),
        (b'{"opt": 1, "args_bunch": [{"dst": "127.0.0.1:1"}]}', r"args_bunch\[0\]: missing path"),
        (b'{"opt": 1, "args_bunch": [{"path": "/a"}]}', r"args_bunch\[0\]: missing dst"),
        (b'{"opt": 1, "args_bunch": [{"path": "a", "dst": "h:1"}]}', "must start with /"),
        (b'{"opt": 1, "args_bunch": [{"path": 5, "dst": "h:1"}]}', "path must be a string"),
        (b'{"opt": 1, "args_bunch": [{"path": "/a", "dst": 5}]}', "dst must be a string"),
        (b'{"opt": 1, "args_bunch": [{"path": "/a", "dst": "h"}]}', "must be host:port"),
        (b'{"opt": 1, "args_bunch": [{"path": "/a", "dst": "h:0"}]}', "port must be a number"),
        (b'{"opt": 1, "args_bunch": [{"path": "/a", "dst": "h:65536"}]}', "port must be"),
        (b'{"opt": 1, "args_bunch": [{"path": "/a", "dst": "h:-1"}]}', "port must be"),
        (b'{"opt": 1, "args_bunch": [{"path": "/a", "dst": ":80"}]}', "must be host:port"),
        (b'{"opt": 1, "args_bunch": [{"path": "/a", "dst": "::1:80"}]}', "in brackets"),
        (b'{"opt": 1, "args_bunch": [{"path": "/a", "dst": "[zz]:80"}]}', "not an IPv6"),
        (b'{"opt": 1, "args_bunch": [{"path": "/a", "dst": "a b:80"}]}', "not a valid host"),
        (b'{"opt": 1, "args_bunch": [{"path": "/a\\u0000", "dst": "h:1"}]}', "control characters"),
        (b'{"opt": 2, "args_bunch": [{"dst": "h:1"}]}', "missing path"),
        (
            b'{"opt": 1, "args_bunch": [{"path": "/a", "dst": "h:1", "mux": 1}]}',
            r"args_bunch\[0\].mux must be a string, got number",
        ),
        (
            b'{"opt": 1, "args_bunch": [{"path": "/a", "dst": "h:1", "mux": "yamux"}]}',
            r'args_bunch\[0\].mux "yamux" must be one of none, smux, mux.cool',
        ),
    ],
)
def test_bad_requests_name_the_problem(body: bytes, message: str) -> None:
    with pytest.raises(ControlError, match=message):
        parse_command(body)


@pytest.mark.parametrize("opt", [1, 2, 4, 5])
def test_a_path_is_at_most_max_path_characters(opt: int) -> None:
    def body(path: str) -> bytes:
        return json.dumps({"opt": opt, "args_bunch": [{"path": path, "dst": "h:1"}]}).encode()

    longest = "/" + "é" * (MAX_PATH - 1)  # characters, not bytes
    assert parse_command(body(longest)).opt == opt
    with pytest.raises(ControlError, match=f"path is longer than {MAX_PATH} characters"):
        parse_command(body(longest + "x"))
    with pytest.raises(ControlError, match="path is longer than 10 characters"):
        parse_with(body("/" + "a" * 10), max_path=10)


def test_deep_nesting_and_huge_numbers_are_errors_not_crashes() -> None:
    with pytest.raises(ControlError, match="not valid JSON"):
        parse_command(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ControlError, match="not valid JSON"):
        parse_command(b'{"opt": ' + b"9" * 10_000 + b"}")


def test_one_bad_entry_rejects_the_whole_request() -> None:
    table = UserTable()
    run(table, {"opt": 1, "args_bunch": [{"path": "/keep", "dst": "127.0.0.1:1"}]})
    bunch = [{"path": f"/u{i}", "dst": f"127.0.0.1:{1000 + i}"} for i in range(100)]
    bunch.append({"path": "/bad", "dst": "nope"})
    with pytest.raises(ControlError, match=r"args_bunch\[100\]"):
        parse_command(json.dumps({"opt": 1, "args_bunch": bunch}).encode())
    assert len(table) == 1 and table.lookup("/u0") is None


SAME_DST = "127.0.0.1:1"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("a", "must start with /"),
        (5, "path must be a string"),
        (None, "path must be a string"),
        ("/a\u0001", "control characters"),
        ("/a\x7f", "control characters"),
        ("/a\ud800", "not valid Unicode"),
        ("/" + "a" * MAX_PATH, "longer than"),
    ],
)
def test_entries_sharing_a_dst_are_each_checked_as_the_first(path: object, message: str) -> None:
    """Entries after the first of a dst take a shorter way (mtt.core.commands._parse_adds)."""
    bunch: list[object] = [{"path": f"/u{i}", "dst": SAME_DST} for i in range(10)]
    bunch[6] = {"path": path, "dst": SAME_DST}
    body = json.dumps({"opt": 1, "args_bunch": bunch}).encode()
    with pytest.raises(ControlError, match=message) as err:
        parse_command(body)
    assert str(err.value).startswith("args_bunch[6]"), err.value


@pytest.mark.parametrize(
    "entry",
    [
        {"path": "/u6", "dst": "127.0.0.1:0"},
        {"path": "/u6", "dst": "127.0.0.1:65536"},
        {"path": "/u6", "dst": "127.0.0.1:"},
        {"path": "/u6", "dst": "127.0.0.1:\u0661"},
        {"path": "/u6", "dst": "127.0.0.1"},
        {"path": "/u6", "dst": "::1:80"},
        {"path": "/u6", "dst": "[::1]:0"},
        {"path": "/u6", "dst": "bad host:80"},
        {"path": "/u6", "dst": 80},
        {"path": "u6", "dst": "127.0.0.1:0"},
        {"path": "/u6\u0001", "dst": "127.0.0.1:0"},
        {"path": "/u6\u0001", "dst": "127.0.0.1:6"},
        {"path": "/u6", "dst": "127.0.0.1:6", "rate": -1},
    ],
)
def test_entries_each_of_its_own_dst_are_each_checked_as_the_first(entry: object) -> None:
    """A dst of a host seen before takes a shorter way (mtt.address.DestinationParser);
    the error is the one the entry would get alone."""
    with pytest.raises(ControlError) as alone:
        parse_command(json.dumps({"opt": 1, "args_bunch": [entry]}).encode())
    bunch: list[object] = [{"path": f"/u{i}", "dst": f"127.0.0.1:{i + 1}"} for i in range(10)]
    bunch[6] = entry
    with pytest.raises(ControlError) as err:
        parse_command(json.dumps({"opt": 1, "args_bunch": bunch}).encode())
    assert str(err.value) == str(alone.value).replace("args_bunch[0]", "args_bunch[6]", 1)


def test_entries_each_of_its_own_dst_parse_as_each_alone() -> None:
    bunch = [
        {"path": f"/u{i}", "dst": f"{('10.0.0.1', 'h.example')[i % 2]}:{i + 1}"} for i in range(50)
    ]
    entries = parse_command(json.dumps({"opt": 1, "args_bunch": bunch}).encode()).entries
    alone = [
        parse_command(json.dumps({"opt": 1, "args_bunch": [b]}).encode()).entries[0] for b in bunch
    ]
    assert entries == tuple(alone)


def test_a_port_per_user_parses_as_each_alone_and_shares_each_host() -> None:
    """Most dsts distinct: the column's way (mtt.core.commands._plain_adds);
    a dst given twice among them is equal, not shared."""
    bunch = [
        {"path": f"/u{i}", "dst": f"{('10.0.0.1', 'h.example')[i % 2]}:{i + 1}"} for i in range(8)
    ]
    bunch.append({"path": "/again", "dst": "10.0.0.1:1"})
    entries = parse_command(json.dumps({"opt": 4, "args_bunch": bunch}).encode()).entries
    assert [(e.path, e.user.dst, e.quota_used) for e in entries] == [
        *((f"/u{i}", Destination(("10.0.0.1", "h.example")[i % 2], i + 1), None) for i in range(8)),
        ("/again", Destination("10.0.0.1", 1), None),
    ]
    assert entries[0].user.dst.host is entries[2].user.dst.host is entries[8].user.dst.host
    assert entries[8].user == entries[0].user and entries[8].user is not entries[0].user
    assert all(e.user.limits is NO_LIMITS and e.user.mux is None for e in entries)


def test_a_port_per_user_keeps_its_columns_for_the_store_and_the_workers() -> None:
    bunch = [{"path": f"/u{i}", "dst": f"10.0.0.{i % 2}:{i + 1}"} for i in range(4)]
    command = parse_command(json.dumps({"opt": 1, "args_bunch": bunch}).encode())
    assert command.columns == (
        ["/u0", "/u1", "/u2", "/u3"],
        ["10.0.0.0", "10.0.0.1", "10.0.0.0", "10.0.0.1"],
        [1, 2, 3, 4],
    )
    assert command.plain() == plain_columns(command.entries) == command.columns
    assert command == Command(Opt.ADD, entries=command.entries)  # columns: not compared
    shared = [{"path": f"/u{i}", "dst": SAME_DST} for i in range(4)]
    assert parse_command(json.dumps({"opt": 1, "args_bunch": shared}).encode()).columns is None


def test_a_port_per_user_outside_the_policy_is_named() -> None:
    policy = DstPolicy((parse_rule("127.0.0.1/32:1-100"),))
    bunch = [{"path": f"/u{i}", "dst": f"127.0.0.1:{i + 1}"} for i in range(10)]
    body = json.dumps({"opt": 1, "args_bunch": bunch}).encode()
    assert len(parse_with(body, policy, max_path=MAX_PATH).entries) == 10
    bunch[7] = {"path": "/u7", "dst": "127.0.0.1:500"}
    with pytest.raises(ControlError) as err:
        parse_with(json.dumps({"opt": 1, "args_bunch": bunch}).encode(), policy, max_path=MAX_PATH)
    assert str(err.value) == (
        'args_bunch[7].dst "127.0.0.1:500" is outside the allowed destinations (127.0.0.1/32:1-100)'
    )


def test_the_first_bad_entry_is_named_whatever_is_wrong_with_a_later_one() -> None:
    bunch: list[object] = [{"path": f"/u{i}", "dst": SAME_DST} for i in range(10)]
    bunch[3] = {"path": "/u3\u0000", "dst": SAME_DST}  # found only by the check of all paths
    bunch[7] = {"path": "/u7", "dst": "nope"}
    with pytest.raises(ControlError, match=r"^args_bunch\[3\]\.path contains control"):
        parse_command(json.dumps({"opt": 1, "args_bunch": bunch}).encode())
    bunch[7] = {"path": "/u7", "dst": SAME_DST, "rate": -1}
    with pytest.raises(ControlError, match=r"^args_bunch\[3\]\.path contains control"):
        parse_command(json.dumps({"opt": 4, "args_bunch": bunch}).encode())


def test_a_duplicate_key_in_any_entry_is_an_error() -> None:
    entries = [b'{"path":"/u%d","dst":"h:1"}' % i for i in range(100)]
    entries[60] = b'{"path":"/u60","dst":"h:1","path":"/other"}'
    with pytest.raises(ControlError, match='duplicate key "path"'):
        parse_command(b'{"opt":1,"args_bunch":[' + b",".join(entries) + b"]}")


def test_entries_of_one_dst_share_one_user_and_others_keep_theirs() -> None:
    bunch = [{"path": f"/u{i}", "dst": f"127.0.0.1:{1 + i % 2}"} for i in range(6)]
    bunch.append({"path": "/limited", "dst": "127.0.0.1:1", "rate": 5})
    entries = parse_command(json.dumps({"opt": 1, "args_bunch": bunch}).encode()).entries
    assert [e.path for e in entries] == [*(f"/u{i}" for i in range(6)), "/limited"]
    assert [e.user.dst.port for e in entries] == [1, 2, 1, 2, 1, 2, 1]
    assert entries[0].user is entries[2].user is entries[4].user
    assert entries[1].user is entries[3].user is not entries[0].user
    assert entries[6].user.limits.rate == 5 and entries[0].user.limits.rate == 0


def test_unknown_fields_are_ignored_like_the_original() -> None:
    table = UserTable()
    reply = run(
        table,
        {"opt": 1, "extra": 1, "args_bunch": [{"path": "/a", "dst": "127.0.0.1:1", "note": "x"}]},
    )
    assert reply["res"] == 1


def test_bulk_add_of_40000_users() -> None:
    table = UserTable()
    bunch = [
        {"path": f"/user/{i}", "dst": f"10.0.{i // 250}.{i % 250}:{1 + i % 65535}"}
        for i in range(40_000)
    ]
    reply = run(table, {"opt": 1, "args_bunch": bunch})
    assert reply == {"res": 1, "err_string": "", "current_users": 40_000}
    assert table.lookup("/user/39999").dst == Destination("10.0.159.249", 40000)


@pytest.mark.parametrize(
    ("text", "dst"),
    [
        ("127.0.0.1:1", Destination("127.0.0.1", 1)),
        ("[::1]:65535", Destination("::1", 65535)),
        ("my-host.example:8080", Destination("my-host.example", 8080)),
        ("localhost:443", Destination("localhost", 443)),
    ],
)
def test_destinations(text: str, dst: Destination) -> None:
    assert parse_destination(text) == dst
    assert str(parse_destination(text)) == text


def test_a_users_mux_is_kept_null_or_absent_is_the_servers() -> None:
    table = UserTable()
    bunch = [
        {"path": "/v2", "dst": "127.0.0.1:1", "mux": "mux.cool"},
        {"path": "/s", "dst": "127.0.0.1:1", "mux": "smux"},
        {"path": "/p", "dst": "127.0.0.1:1", "mux": "none", "rate": 5},
        {"path": "/d", "dst": "127.0.0.1:1", "mux": None},
        {"path": "/g", "dst": "127.0.0.1:1"},
    ]
    run(table, {"opt": 1, "args_bunch": bunch})
    muxes = {path: user.mux for path, user in table.items()}
    assert muxes == {
        "/v2": MuxProtocol.MUXCOOL,
        "/s": MuxProtocol.SMUX,
        "/p": MuxProtocol.NONE,
        "/d": None,
        "/g": None,
    }

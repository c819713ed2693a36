"""Supervisor-worker messages: every type survives its wire form, a malformed
one is the peer's ProtocolError, and a handler that raises is its own bug (logged,
answered as an error) rather than the channel's."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from mtt.address import Destination
from mtt.config import ServerConfig
from mtt.core.commands import Command, Entry, Opt, plain_columns
from mtt.core.policy import DstPolicy, parse_rule
from mtt.core.usage import Usage
from mtt.core.users import MuxProtocol, User, UserLimits
from mtt.errors import ProtocolError, RemoteError
from mtt.workers import channel
from mtt.workers.messages import (
    KINDS,
    Admission,
    Admit,
    Budgets,
    Challenges,
    Change,
    Collect,
    Done,
    Exhausted,
    Final,
    Grant,
    Init,
    Kick,
    Kicked,
    Message,
    Ready,
    Release,
    ReloadTls,
    Reply,
    Report,
    Request,
    Stop,
    Tokens,
    checked,
    decode,
)
from mtt.workers.rpc import Handlers, RpcChannel
from mtt.workers.supervisor import Worker
from mtt.workers.worker import WorkerControl

SHARED = User(Destination("127.0.0.1", 10))  # as parse_command gives entries of one dst
SOLD = User(Destination("::1", 80), UserLimits(1000, 2, 3, 4, 5))
COMMAND = Command(
    Opt.ADD,
    entries=(
        Entry("/plain", User(Destination("127.0.0.1", 9))),
        Entry("/sold", SOLD, 77),
        Entry("/v2", User(Destination("127.0.0.1", 8388), mux=MuxProtocol.MUXCOOL)),
        *(Entry(f"/s{i}", SHARED) for i in range(3)),
        Entry("/sold2", SOLD),
        Entry("/sold3", SOLD),
        Entry("/sold4", SOLD, 5),  # its own quota_used: not in the run before it
        Entry("/s0", SHARED),
    ),
)
REPORT = {"users": {"/a": [[1, 2, 3, 1, 5.5], 1, ["10.0.0.1"]]}, "stats": {}, "gauges": {}}

# One example of every message, and of every request with its reply.
EXAMPLES: list[Message] = [
    Init(ServerConfig(bind="127.0.0.1:0", workers=2), {"cert": "c", "key": "k"}, COMMAND),
    Init(
        ServerConfig(trusted_proxies=("10.0.0.0/8",), allowed_origins=("https://a.example",)),
        None,
        Command(Opt.RESET),
    ),
    Init(ServerConfig(mux_protocol=MuxProtocol.MUXCOOL), None, Command(Opt.RESET)),
    Init(
        ServerConfig(acme_domains=("a.example", "b.example"), acme_dir="/var/lib/x/acme"),
        {"cert_pem": "c", "key_pem": "k", "origin": "o"},
        Command(Opt.RESET),
        {"a.example": {"cert_pem": "c", "key_pem": "k", "origin": "challenge"}},
    ),
    Change(COMMAND, kick=True),
    Change(Command(Opt.DELETE, paths=("/a", "/b")), kick=False),
    Collect(),
    Kick(("/a", "/b")),
    Kick(("/a",), "quota used up"),
    Budgets({"/sold": 4096, "/other": 0}),
    ReloadTls({"cert": "c", "key": "k"}),
    Challenges({"a.example": {"cert_pem": "c", "key_pem": "k", "origin": "challenge"}}),
    Challenges({}),
    Stop(2.5),
    Ready(),
    Admit("/sold", "2001:db8::1"),
    Tokens("/sold", 1, 65536),
    Release("/sold", "10.0.0.1", Usage(1, 2, 3, 4, 5.25)),
    Exhausted("/sold", 2, 65536),
    Final(REPORT),
]
REPLIES: list[tuple[Request[Any], Reply]] = [
    (Change(COMMAND, kick=False), Done()),
    (Collect(), Report(REPORT)),
    (Kick(("/a",)), Kicked(3)),
    (ReloadTls({}), Done()),
    (Challenges({}), Done()),
    (Admit("/a", "::1"), Admission(None)),
    (Admit("/a", "::1"), Admission("quota used up")),
    (Admit("/a", "::1"), Admission(None, 1 << 40)),
    (Tokens("/a", 0, 1), Grant(4096)),
]


def through_json(data: dict[str, Any]) -> dict[str, Any]:
    """What the peer decodes from the frame."""
    decoded: dict[str, Any] = json.loads(channel.encode(data)[4:])
    return decoded


def test_every_message_type_has_an_example() -> None:
    assert {type(m) for m in EXAMPLES} == set(KINDS.values())


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_a_message_round_trips_through_its_wire_form(message: Message) -> None:
    assert decode(through_json(message.to_wire())) == message


@pytest.mark.parametrize(("request_", "reply"), REPLIES, ids=lambda r: type(r).__name__)
def test_a_reply_round_trips_through_its_wire_form(request_: Request[Any], reply: Reply) -> None:
    assert request_.reply_from_wire(through_json(reply.to_wire())) == reply


def test_entries_sharing_a_user_cross_as_one_item_and_share_it_again() -> None:
    wire = Change(COMMAND, kick=False).to_wire()["command"]["entries"]
    assert wire[3:6] == [
        [["/s0", "/s1", "/s2"], "127.0.0.1", 10],
        [["/sold2", "/sold3"], "::1", 80, [1000, 2, 3, 4, 5], None],
        ["/sold4", "::1", 80, [1000, 2, 3, 4, 5], 5],
    ]
    decoded = decode(through_json(Change(COMMAND, kick=False).to_wire()))
    assert isinstance(decoded, Change) and decoded.command == COMMAND
    entries = decoded.command.entries
    assert entries[3].user is entries[4].user is entries[5].user == entries[9].user
    assert entries[6].user is entries[7].user is not entries[8].user


def test_entries_each_of_its_own_user_cross_as_columns() -> None:
    """A port per user: no runs, but a stretch of plain Users crosses as lists
    of paths, host indexes and ports (mtt.core.commands._Columns)."""
    own = tuple(
        Entry(f"/p{i}", User(Destination(("10.0.0.1", "h.example")[i % 2], 1000 + i)))
        for i in range(6)
    )
    last = Entry("/last", User(Destination("10.0.0.1", 1)))
    command = Command(Opt.ADD, entries=(*own, Entry("/sold", SOLD, 5), last))
    wire = Change(command, kick=False).to_wire()["command"]["entries"]
    assert wire[0] == {
        "paths": [f"/p{i}" for i in range(6)],
        "hosts": ["10.0.0.1", "h.example"],
        "host": [0, 1, 0, 1, 0, 1],
        "ports": [1000, 1001, 1002, 1003, 1004, 1005],
    }
    assert wire[1] == ["/sold", "::1", 80, [1000, 2, 3, 4, 5], 5]
    assert wire[2] == {"paths": ["/last"], "hosts": ["10.0.0.1"], "host": [0], "ports": [1]}
    decoded = decode(through_json(Change(command, kick=False).to_wire()))
    assert isinstance(decoded, Change) and decoded.command == command
    entries = decoded.command.entries
    assert entries[0].user.dst.host is entries[2].user.dst.host
    assert all(type(item) is list for item in command.to_wire()["entries"])  # for other nodes


def test_other_nodes_get_entry_by_entry() -> None:
    """Redis publishes Command.to_wire() to nodes that may run an earlier
    version: their from_wire reads one entry per item."""
    wire = COMMAND.to_wire()["entries"]
    assert [item[0] for item in wire] == [e.path for e in COMMAND.entries]
    assert wire[3] == ["/s0", "127.0.0.1", 10]
    assert Command.from_wire(through_json(COMMAND.to_wire())) == COMMAND


def test_the_controller_token_and_policy_stay_with_the_supervisor() -> None:
    config = ServerConfig(
        controller_token="secret", allow_dst=DstPolicy((parse_rule("10.0.0.0/8"),))
    )
    wire = Init(config, None, Command(Opt.RESET)).to_wire()
    assert "secret" not in json.dumps(wire)
    init = decode(through_json(wire))
    assert isinstance(init, Init)
    assert init.config.controller_token == ""
    assert init.config.allow_dst == DstPolicy()


MALFORMED: list[dict[str, Any]] = [
    {},
    {"op": "nope"},
    {"op": 3},
    {"op": "admit", "path": "/a"},
    {"op": "admit", "path": 1, "ip": "::1"},
    {"op": "tokens", "path": "/a", "dir": "0", "want": 1},
    {"op": "tokens", "path": "/a", "dir": 0, "want": True},
    {"op": "release", "path": "/a", "ip": "::1", "usage": [1, 2]},
    {"op": "release", "path": "/a", "ip": "::1", "usage": "lots"},
    {"op": "final", "report": []},
    {"op": "change", "command": {"opt": 99}, "kick": False},
    {"op": "change", "command": {"opt": 1, "entries": [["/a", "h"]]}, "kick": False},
    {
        "op": "change",
        "command": {
            "opt": 1,
            "entries": [{"paths": ["/a", "/b"], "hosts": ["h"], "host": [0, 0], "ports": [1]}],
        },
        "kick": False,
    },
    {
        "op": "change",
        "command": {
            "opt": 1,
            "entries": [{"paths": ["/a"], "hosts": ["h"], "host": [1], "ports": [1]}],
        },
        "kick": False,
    },
    {"op": "change", "command": {"opt": 1}, "kick": "yes"},
    {"op": "change", "command": [], "kick": False},
    {"op": "kick", "paths": "/a"},
    {"op": "kick", "paths": [1]},
    {"op": "kick", "paths": ["/a"], "why": 5},
    {"op": "budgets", "left": {"/a": "1"}},
    {"op": "budgets", "left": {"/a": True}},
    {"op": "budgets", "left": []},
    {"op": "exhausted", "path": "/a", "closed": 1},
    {"op": "exhausted", "path": "/a", "closed": 1, "unreported": 1.5},
    {"op": "tls", "tls": None},
    {"op": "tls", "tls": {"cert": 1}},
    {"op": "challenges", "challenges": []},
    {"op": "challenges", "challenges": {"a.example": "pem"}},
    {"op": "challenges", "challenges": {"a.example": {"cert_pem": 1}}},
    {"op": "init", "config": {}, "tls": None, "users": {"opt": 3}, "challenges": 1},
    {"op": "stop"},
    {"op": "stop", "grace": "soon"},
    {"op": "init", "config": {"nope": 1}, "tls": None, "users": {"opt": 3}},
]


@pytest.mark.parametrize("data", MALFORMED, ids=lambda d: json.dumps(d)[:60])
def test_a_malformed_message_is_a_protocol_error(data: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


@pytest.mark.parametrize(
    ("request_", "data"),
    [(Admit("/a", "::1"), {"refused": 1}), (Tokens("/a", 0, 1), {}), (Collect(), {"report": 1})],
    ids=lambda r: type(r).__name__,
)
def test_a_malformed_reply_is_a_protocol_error(
    request_: Request[Any], data: dict[str, Any]
) -> None:
    with pytest.raises(ProtocolError):
        checked(request_.reply_from_wire, data, request_.OP)


def test_a_port_per_user_alone_crosses_as_one_columns_object() -> None:
    """Every entry a plain User of its own: the columns are taken whole
    (mtt.core.commands.plain_columns), the same object as entry by entry."""
    own = tuple(
        Entry(f"/p{i}", User(Destination(("h.example", "10.0.0.1")[i % 3 == 2], 1000 + i)))
        for i in range(6)
    )
    command = Command(Opt.ADD, entries=own)
    assert plain_columns(own) == (
        [f"/p{i}" for i in range(6)],
        ["h.example", "h.example", "10.0.0.1", "h.example", "h.example", "10.0.0.1"],
        [1000, 1001, 1002, 1003, 1004, 1005],
    )
    assert Change(command, kick=False).to_wire()["command"]["entries"] == [
        {
            "paths": [f"/p{i}" for i in range(6)],
            "hosts": ["h.example", "10.0.0.1"],
            "host": [0, 0, 1, 0, 0, 1],
            "ports": [1000, 1001, 1002, 1003, 1004, 1005],
        }
    ]
    decoded = decode(through_json(Change(command, kick=False).to_wire()))
    assert isinstance(decoded, Change) and decoded.command == command


@pytest.mark.parametrize(
    "odd",
    [
        Entry("/p1", SHARED),  # follows an entry of the same User: a run
        Entry("/sold", SOLD),
        Entry("/v2", User(Destination("127.0.0.1", 8388), mux=MuxProtocol.MUXCOOL)),
        Entry("/q", User(Destination("127.0.0.1", 9)), quota_used=0),
    ],
)
def test_columns_are_only_for_plain_users_each_of_its_own(odd: Entry) -> None:
    entries = (Entry("/p0", SHARED), odd, Entry("/p2", User(Destination("127.0.0.1", 2))))
    assert plain_columns(entries) is None


def test_each_side_serves_what_the_other_sends() -> None:
    supervisor = set(Worker(1, None).handlers)  # type: ignore[arg-type]
    worker = set(WorkerControl(None, None).handlers)  # type: ignore[arg-type]
    assert supervisor == {Admit, Tokens, Release, Exhausted, Final}
    assert worker == {Change, Collect, Kick, Budgets, ReloadTls, Challenges, Stop}
    # Init and Ready are exchanged before the channel runs.
    assert supervisor | worker | {Init, Ready} == set(KINDS.values())


# -- the RPC loop over a socketpair: no process needed -----------------------------


@dataclass
class Ends:
    caller: RpcChannel
    served: RpcChannel
    caller_end: channel.ControlConnection  # the served side's peer, to send frames by hand
    caller_task: asyncio.Task[None]
    served_task: asyncio.Task[None]


async def connected_pair() -> tuple[channel.ControlConnection, channel.ControlConnection]:
    a, b = socket.socketpair()
    return await channel.connect(a), await channel.connect(b)


@asynccontextmanager
async def rpc_pair(handlers: Handlers) -> AsyncIterator[Ends]:
    """A caller with no handlers and a peer serving handlers, on one socketpair."""
    end_a, end_b = await connected_pair()
    # Each side's first message is its handshake (Init, Ready), taken before the RPC layer.
    end_a.send(channel.encode(Ready().to_wire()))
    end_b.send(channel.encode(Ready().to_wire()))
    assert await end_a.first() == await end_b.first() == Ready().to_wire()
    caller = RpcChannel(end_a, {}, "caller")
    served = RpcChannel(end_b, handlers, "served")
    ends = Ends(
        caller,
        served,
        end_a,
        asyncio.ensure_future(caller.run()),
        asyncio.ensure_future(served.run()),
    )
    try:
        yield ends
    finally:
        caller.close()
        served.close()
        await asyncio.wait_for(asyncio.gather(ends.caller_task, ends.served_task), 10)


def broken(message: Any) -> Any:
    raise RuntimeError("handler bug")


async def broken_later(message: Any) -> Any:
    await asyncio.sleep(0)
    raise RuntimeError("async handler bug")


async def grant(message: Tokens) -> Grant:
    return Grant(message.want * 2)


def bug_records(caplog: pytest.LogCaptureFixture, op: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if f"bug in the handler for {op!r}" in r.getMessage()
        and r.levelno == logging.ERROR
        and r.exc_info is not None
    ]


def protocol_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "protocol error" in r.getMessage()]


@pytest.mark.parametrize("handler", [broken, broken_later], ids=["sync", "async"])
async def test_a_handler_bug_is_answered_as_an_error_and_the_channel_carries_on(
    caplog: pytest.LogCaptureFixture, handler: Callable[[Any], Awaitable[Any] | Any]
) -> None:
    caplog.set_level(logging.ERROR)
    async with rpc_pair({Admit: handler, Tokens: grant}) as ends:
        with pytest.raises(RemoteError, match=r"admit: RuntimeError: .*handler bug"):
            await asyncio.wait_for(ends.caller.call(Admit("/a", "::1")), 10)
        # Same channel, next request: answered.
        assert await asyncio.wait_for(ends.caller.call(Tokens("/a", 0, 21)), 10) == Grant(42)
        assert ends.caller.open and ends.served.open
    records = bug_records(caplog, "admit")
    assert len(records) == 1
    assert records[0].exc_info is not None and "handler bug" in str(records[0].exc_info[1])
    assert protocol_errors(caplog) == []


async def test_a_notification_handler_bug_is_logged_and_the_channel_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    async with rpc_pair({Final: broken, Tokens: grant}) as ends:
        ends.caller.notify(Final(REPORT))
        assert await asyncio.wait_for(ends.caller.call(Tokens("/a", 0, 1)), 10) == Grant(2)
    assert len(bug_records(caplog, "final")) == 1
    assert protocol_errors(caplog) == []


async def test_a_request_handler_without_a_reply_is_a_handler_bug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    async with rpc_pair({Admit: lambda message: None}) as ends:
        with pytest.raises(RemoteError, match="not a reply"):
            await asyncio.wait_for(ends.caller.call(Admit("/a", "::1")), 10)
    assert len(bug_records(caplog, "admit")) == 1


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":1,"op":"admit","path":5,"ip":"::1"}',  # a field of the wrong type
        b'{"id":1,"op":"launch"}',  # no such message
        b'{"id":1,"op":"collect"}',  # a message this side does not serve
        b'{"op":"tokens","path":"/a","dir":0,"want":1}',  # a request without an id
        b'{"id":"1","op":"tokens","path":"/a","dir":0,"want":1}',
        b'{"re":"x"}',
        b"{not json",
        b"[1]",
        b"\xff\xfe",
    ],
)
async def test_a_malformed_frame_ends_the_channel_as_a_protocol_error(
    caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    caplog.set_level(logging.ERROR)
    calls: list[Any] = []
    async with rpc_pair({Admit: calls.append, Tokens: grant}) as ends:
        ends.caller_end.send(frame(body))
        await asyncio.wait_for(ends.served_task, 10)
        assert not ends.served.open
    assert calls == []
    assert len(protocol_errors(caplog)) == 1, caplog.text
    assert not any("bug in the handler" in r.getMessage() for r in caplog.records)


async def test_a_malformed_reply_ends_the_channel_and_fails_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    async with rpc_pair({Tokens: lambda message: Kicked(1)}) as ends:  # the wrong reply
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(ends.caller.call(Tokens("/a", 0, 1)), 10)
        assert not ends.caller.open
    assert any("malformed 'tokens reply'" in m for m in protocol_errors(caplog))


# -- framing: the channel's bytes, however they are read --------------------------

MESSAGES = [EXAMPLES[i].to_wire() for i in (4, 6, 15, 16, 17)]  # Change, Collect, Admit, ...


def test_frames_split_at_every_byte_give_the_same_messages() -> None:
    stream = b"".join(channel.encode(m) for m in MESSAGES)
    for cut in range(len(stream) + 1):
        reader = channel.FrameReader(1 << 20)
        bodies = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [channel.parse_body(b) for b in bodies] == MESSAGES, cut
        assert not reader.mid_message()


def test_frames_fed_byte_by_byte_give_the_same_messages() -> None:
    frames = [channel.encode(m) for m in MESSAGES]
    stream = b"".join(frames)
    ends = {sum(len(f) for f in frames[: k + 1]) for k in range(len(frames))}
    reader = channel.FrameReader(1 << 20)
    bodies: list[bytes] = []
    for i in range(len(stream)):
        bodies += reader.feed(stream[i : i + 1])
        assert reader.mid_message() == (i + 1 not in ends)
    assert [channel.parse_body(b) for b in bodies] == MESSAGES


def test_a_length_over_the_bound_is_refused_before_its_body() -> None:
    reader = channel.FrameReader(100)
    assert reader.feed(struct.pack("!I", 100)[:2]) == []
    assert reader.feed(struct.pack("!I", 100)[2:]) == []  # exactly the bound: waited for
    reader = channel.FrameReader(100)
    with pytest.raises(ProtocolError, match="control message of 101 bytes"):
        reader.feed(struct.pack("!I", 101))
    reader = channel.FrameReader(100)
    assert reader.feed(b"\xff") == []  # the length so far: 1 byte of 4
    with pytest.raises(ProtocolError, match="control message of 4294967295 bytes"):
        reader.feed(b"\xff\xff\xff")


def test_a_big_message_in_many_reads_arrives_whole() -> None:
    body = json.dumps({"op": "collect", "pad": "x" * 300_000}).encode()
    stream = channel.encode_body(body) + channel.encode({"op": "stop", "grace": 1})
    reader = channel.FrameReader(1 << 20)
    bodies: list[bytes] = []
    for at in range(0, len(stream), 65536):
        bodies += reader.feed(stream[at : at + 65536])
    assert bodies == [body, b'{"op":"stop","grace":1}']


@pytest.mark.parametrize("body", [b"{not json", b"[1]", b"\xff\xfe", b'"text"'])
def test_a_body_that_is_no_json_object_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="control message is not"):
        channel.parse_body(body)


async def test_messages_sent_in_one_iteration_leave_in_one_write() -> None:
    end_a, end_b = await connected_pair()
    got: list[dict[str, Any]] = []
    end_b.send(channel.encode(Ready().to_wire()))
    end_a.send(channel.encode(Ready().to_wire()))
    await end_a.first()
    await end_b.first()
    end_b.attach(got.append)
    writes: list[bytes] = []
    transport = end_a._transport
    assert transport is not None
    real_write = transport.write
    transport.write = lambda data: (writes.append(bytes(data)), real_write(data))  # type: ignore[method-assign]
    for message in MESSAGES:
        end_a.send(channel.encode(message))
    await asyncio.sleep(0)
    assert len(writes) == 1
    for _ in range(100):
        if len(got) == len(MESSAGES):
            break
        await asyncio.sleep(0.01)
    assert got == MESSAGES
    end_a.close()
    await asyncio.wait_for(end_b.closed, 5)
    assert end_b.error is None


async def test_a_channel_cut_mid_message_is_a_protocol_error() -> None:
    end_a, end_b = await connected_pair()
    end_a.send(channel.encode(Ready().to_wire()) + channel.encode(Stop(1).to_wire())[:7])
    assert await end_b.first() == Ready().to_wire()
    end_a.close()
    await asyncio.wait_for(end_b.closed, 5)
    assert end_b.error == "protocol error: control channel closed mid-message"


async def test_messages_before_the_rpc_layer_attaches_wait_for_it() -> None:
    end_a, end_b = await connected_pair()
    end_a.send(b"".join(channel.encode(m) for m in [Ready().to_wire(), *MESSAGES]))
    assert await end_b.first() == Ready().to_wire()
    for _ in range(100):  # until every message is in, before anything attached
        if len(end_b._early) == len(MESSAGES):
            break
        await asyncio.sleep(0.01)
    got: list[dict[str, Any]] = []
    end_b.attach(got.append)
    assert got == MESSAGES
    end_a.close()
    end_b.close()

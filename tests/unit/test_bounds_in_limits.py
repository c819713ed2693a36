"""Every size, wait and bound of the package is a field of mtt.config.Limits
(or of the SmuxConfig and ClientLimits it is built like), handed to the code
that applies it: a number written down as a module-level UPPER_CASE constant
is one that a Limits change would not reach, and a second place to look.

What may stay a module constant is a number another party fixed: a wire
format's field sizes and codes, a C library's ABI, a version. Those are the
allow-list below, module by module, each with where its numbers come from;
anything else found fails the test, with the line to move into Limits."""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import mtt

PACKAGE = Path(mtt.__file__).parent
UPPER_CASE = re.compile(r"^_?[A-Z][A-Z0-9_]*$")

WIRE_FORMAT = {
    # TLS record bounds (RFC 8446 §5.2, TLS 1.2's 2^14 + 2048), OpenSSL's MIN_SSL2_RECORD_LEN,
    # and the content and handshake types of a ClientHello.
    "accept/first_bytes.py": "_MAX_RECORD _MIN_SSL2_RECORD _HANDSHAKE _CLIENT_HELLO",
    # Go durations are int64 nanoseconds.
    "cli.py": "_MAX_DURATION_S",
    # The JSON around one harvested user in a reply (a path and three 63-bit counters),
    # by which HarvestBounds.max_reply is counted: a size of the reply's format.
    "core/harvest.py": "ENTRY_OVERHEAD",
    # Integers every JSON implementation holds exactly; the reply's res codes (protocol.md §6).
    "core/commands.py": "MAX_NUMBER RES_OK RES_ERR",
    # Mux.Cool's format (protocol.md §11): v2ray's largest metadata, the u16 data length,
    # and the option bits.
    "muxcool/frames.py": "MAX_METADATA MAX_PAYLOAD OPTION_DATA OPTION_ERROR",
    # The in-process agent's id among the workers' (an id, not a quantity).
    "service/planes.py": "LOCAL_AGENT",
    # smux's frame header and UPD payload, its u16 length, u32 arithmetic, Go's
    # initialPeerWindow and the window of v1, which has none (protocol.md §5).
    "smux/frames.py": "HEADER_SIZE UPD_SIZE MAX_PAYLOAD _U32",
    "smux/session.py": "_U32 _I32_SIGN INITIAL_PEER_WINDOW V1_SEND_WINDOW",
    # The SQLite file's schema version.
    "store/sqlite.py": "SCHEMA_VERSION",
    # openssl/ssl.h and openssl/tls1.h numbers and flag bits.
    "transport/libssl.py": (
        "_SSL_CTRL_MODE _SSL_CTRL_SET_SESS_CACHE_SIZE _SSL_CTRL_SET_SESS_CACHE_MODE"
        " _SSL_CTRL_GET_SESS_CACHE_MODE _SSL_CTRL_SET_TLSEXT_SERVERNAME_CB _SSL_MODE_NO_AUTO_CHAIN"
        " _SSL_SESS_CACHE_SERVER _SSL_SESS_CACHE_NO_AUTO_CLEAR _SSL_SESS_CACHE_NO_INTERNAL_STORE"
        " _SSL_TLSEXT_ERR_OK _SSL_TLSEXT_ERR_ALERT_FATAL _OPENSSL_NPN_NEGOTIATED"
        " _SSL_CTRL_GET_TLSEXT_TICKET_KEYS _SSL_CTRL_SET_TLSEXT_TICKET_KEYS TICKET_KEYS_SIZE"
    ),
    "transport/tls.py": "_SSL_OP_DONT_INSERT_EMPTY_FRAGMENTS _SSL_OP_NO_ANTI_REPLAY",
    # RFC 6455 §5.2: FIN and the binary opcode in a frame's first byte.
    "transport/wsframe.py": "_OP_BINARY_FIN",
    # haproxy's proxy-protocol.txt: v1's longest line (§2.1), v2's fixed part and its
    # command, family and transport codes (§2.2).
    "wire/proxy_header.py": (
        "V1_MAX_LINE V2_FIXED _V2_LOCAL _V2_PROXY _AF_UNSPEC _AF_INET _AF_INET6 _AF_UNIX"
        " _TP_UNSPEC _TP_STREAM _TP_DGRAM"
    ),
    # ClientHello fields (RFC 8446 §4, RFC 6066 §3 server_name, RFC 7301 ALPN's type 16).
    "wire/client_hello.py": "_HANDSHAKE _CLIENT_HELLO _EXT_SERVER_NAME _EXT_ALPN _HOST_NAME",
    # A DNS name's longest text form (RFC 1035 §2.3.4).
    "wire/acme.py": "MAX_DOMAIN",
    # Bytes of an HTTP request line.
    "wire/request_line.py": "_SP _CR _LF _SLASH",
}


def numeric_constants(source: str, values: Mapping[str, object]) -> Iterator[tuple[int, str]]:
    """(line, name) of each module-level UPPER_CASE name assigned a number
    written in source (values: the module's namespace once run)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        written = any(
            isinstance(n, ast.Constant) and type(n.value) in (int, float) for n in ast.walk(value)
        )
        if not written:
            continue  # derived from elsewhere: an enum's value, the system's page size
        for target in targets:
            for name in ast.walk(target):
                if (
                    isinstance(name, ast.Name)
                    and UPPER_CASE.match(name.id)
                    and type(values.get(name.id)) in (int, float)  # not bool, enum or table
                ):
                    yield node.lineno, name.id


def _modules() -> Iterator[tuple[str, str, Mapping[str, object]]]:
    """(path under mtt/, source, namespace) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        dotted = ".".join(("mtt", *relative.with_suffix("").parts)).removesuffix(".__init__")
        yield (
            relative.as_posix(),
            path.read_text(encoding="utf-8"),
            vars(importlib.import_module(dotted)),
        )


def test_the_search_finds_numbers_written_at_module_level() -> None:
    source = (
        "import enum\n"
        "KiB = 1024\n"
        "A = 5\n"
        "B: float = 0.5\n"
        "_C, D = 1, 2\n"
        "E = 4 * KiB\n"
        "lower = 3\n"
        "F = (1, 2)\n"
        "G = True\n"
        "H = 'x'\n"
        "class Cmd(enum.IntEnum):\n"
        "    SYN = 0\n"
        "I = int(Cmd.SYN)\n"
        "J = Cmd.SYN\n"
        "def f() -> None:\n"
        "    K = 7\n"
    )
    namespace: dict[str, object] = {}
    exec(compile(source, "<test>", "exec"), namespace)  # our own source, above
    assert list(numeric_constants(source, namespace)) == [
        (3, "A"),
        (4, "B"),
        (5, "_C"),
        (5, "D"),
        (6, "E"),
    ]


def test_no_bound_is_a_module_constant() -> None:
    stray = [
        f"mtt/{path}:{line}: {name} (a bound? make it a Limits field; a wire-format"
        " number? add it to WIRE_FORMAT with its source)"
        for path, source, namespace in _modules()
        for line, name in numeric_constants(source, namespace)
        if name not in WIRE_FORMAT.get(path, "").split()
    ]
    assert stray == []


def test_the_allow_list_names_only_what_is_there() -> None:
    """An entry whose constant went away goes too, so the list stays short."""
    found = {
        (path, name)
        for path, source, namespace in _modules()
        for _, name in numeric_constants(source, namespace)
    }
    listed = {(path, name) for path, names in WIRE_FORMAT.items() for name in names.split()}
    assert listed - found == set()

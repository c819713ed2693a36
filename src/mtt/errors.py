"""The one exception tree of the project.

    MttError
    ├── ConfigError          bad flag, unreadable cert/key: exit with one line
    ├── HelpRequested        -h or -help given: print the usage, exit 0
    ├── ProtocolError        a peer broke a protocol: close that connection
    │   ├── SmuxProtocolError    bad smux frame or state (ends the whole session)
    │   └── MuxCoolProtocolError bad Mux.Cool frame or state (ends the whole session)
    ├── ControlError         a controller request that cannot be applied (400, res 2)
    ├── StoreError           the user store cannot take a change now (503, res 2)
    ├── AcmeError            an ACME order gave no certificate: logged, retried later
    └── RemoteError          the other process's handler failed on our request

Peer bytes only ever raise ProtocolError subclasses; the I/O layer turns them
into a logged close, never a traceback. Every class the package defines is
drawn here (tests/unit/test_errors.py checks it).
"""


class MttError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(MttError):
    """A command-line flag or a file named by one is unusable."""


class HelpRequested(MttError):
    """`-h` or `-help` was given: print usage and exit 0."""


class ProtocolError(MttError):
    """A peer sent bytes that break the protocol."""


class SmuxProtocolError(ProtocolError):
    """An smux frame or frame sequence the session cannot accept."""


class MuxCoolProtocolError(ProtocolError):
    """A Mux.Cool frame or frame sequence the session cannot accept."""


class AcmeError(MttError):
    """An ACME order did not give a certificate; the message says why, in one line."""


class ControlError(MttError):
    """A controller request is invalid; the message is the err_string."""


class StoreError(MttError):
    """The user store (SQLite, Redis) cannot take a change now; nothing was applied."""


class RemoteError(MttError, ConnectionError):
    """The supervisor's or a worker's handler failed on our request; its error
    is the message. Also a ConnectionError: callers treat it as a peer that
    cannot answer, and the channel itself goes on."""

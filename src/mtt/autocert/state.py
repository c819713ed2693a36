"""Where ACME's account key and certificates live, and who may order.

Layout, under the server's state directory (the directory of -db's file, or
of the default one when users live in memory or Redis):

    acme/                      mode 0700
      lock                     flock-ed by the process that is ordering
      <CA host>/               one account per CA (Let's Encrypt's, staging's, ...)
        account.key            the account's EC P-256 key (PEM, 0600)
        <first domain>.pem     private key and certificate chain (PEM, 0600)

Key and chain share one file so that a new certificate replaces the old one
in a single rename: a crash never leaves a key beside someone else's chain.
The lock is held only while ordering; a process that finds it taken waits
and then first reads the file again, since the other one may have just
renewed the certificate they share.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mtt.accept.tls_setup import TlsSpec
from mtt.config import Limits
from mtt.errors import AcmeError, ConfigError
from mtt.store.factory import MEMORY, default_db_path
from mtt.transport.tls import context_from_pem

_LIMITS = Limits()  # max_pem_file: kept files are read no larger than -cert files
log = logging.getLogger("mtt.acme")

SUBDIR = "acme"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


def acme_root(db: str) -> str:
    """<state directory>/acme, the state directory being -db's."""
    path = default_db_path() if db == MEMORY or not db else db
    return os.path.join(os.path.dirname(os.path.abspath(path)), SUBDIR)


def ca_folder(directory_url: str) -> str:
    """A directory name for the CA behind a directory URL: its host[_port]."""
    netloc = urlsplit(directory_url).netloc.lower().rsplit("@", 1)[-1]
    name = re.sub(r"[^a-z0-9.-]", "_", netloc).strip(".")
    return name or "ca"


@dataclass(frozen=True, slots=True)
class Kept:
    """A certificate with its key, as kept on disk and served."""

    chain_pem: bytes
    key_pem: bytes
    not_before: float  # POSIX seconds
    not_after: float
    names: tuple[str, ...]
    serial: int

    def covers(self, domains: tuple[str, ...]) -> bool:
        return set(domains) <= set(self.names)

    def spec(self, origin: str) -> TlsSpec:
        return {
            "cert_pem": self.chain_pem.decode("latin-1"),
            "key_pem": self.key_pem.decode("latin-1"),
            "origin": origin,
        }

    def until(self) -> str:
        return iso(self.not_after)


def iso(when: float) -> str:
    """A POSIX time as the log lines show it: UTC, seconds."""
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def parse_kept(data: bytes, origin: str) -> Kept:
    """The key and certificate chain in one PEM file; ConfigError if they are
    not a usable pair (the same check the TLS listener makes)."""
    blocks = [m.group(0).rstrip(b"\r\n") + b"\n" for m in _PEM_BLOCK.finditer(data)]
    keys = [b for b in blocks if b"PRIVATE KEY-----" in b.split(b"\n", 1)[0]]
    certs = [b for b in blocks if b.startswith(b"-----BEGIN CERTIFICATE-----")]
    if len(keys) != 1 or not certs:
        raise ConfigError(f"{origin}: want one private key and a certificate chain")
    chain, key = b"".join(certs), keys[0]
    context_from_pem(chain, key, origin)
    leaf = x509.load_pem_x509_certificate(certs[0])
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(name.lower() for name in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    return Kept(
        chain_pem=chain,
        key_pem=key,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        names=names,
        serial=leaf.serial_number,
    )


def _problem(path: str, exc: OSError) -> ConfigError:
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        reason += f" (running as uid {os.geteuid()})"
    return ConfigError(f"ACME state {path}: {reason}")


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(_LIMITS.max_pem_file)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _problem(path, exc) from None


def write_private(path: str, data: bytes) -> None:
    """Replace path with data, mode 0600, in one rename (fsync-ed first)."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class OrderLock:
    """The flock that lets one process order for a state directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> int | None:
        """Take the lock: None if taken, else the pid of the process holding it
        (0 when it is unknown)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _problem(self.path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).strip()
            os.close(fd)
            return int(holder) if holder.isdigit() else 0
        except OSError as exc:
            os.close(fd)
            raise _problem(self.path, exc) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class AcmeState:
    """The files of one CA's account and of the certificate for -acme's names."""

    def __init__(self, root: str, directory_url: str, domains: tuple[str, ...]) -> None:
        self.root = root
        self.domains = domains
        self.ca_dir = os.path.join(root, ca_folder(directory_url))
        self.account_key_path = os.path.join(self.ca_dir, "account.key")
        self.cert_path = os.path.join(self.ca_dir, f"{domains[0]}.pem")
        self.lock = OrderLock(os.path.join(root, "lock"))

    def prepare(self) -> None:
        """Create the directories (0700); a ConfigError says why they cannot be used."""
        # The state directory too, if this is the first to need it (as -db makes it).
        state_dir = os.path.dirname(self.root)
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise _problem(state_dir, exc) from None
        for folder in (self.root, self.ca_dir):
            try:
                os.makedirs(folder, mode=0o700, exist_ok=True)
                if os.stat(folder).st_mode & 0o077:
                    os.chmod(folder, 0o700)
                if not os.access(folder, os.W_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, "not writable")
            except OSError as exc:
                raise _problem(folder, exc) from None

    def account_key(self) -> bytes:
        """The account key (PEM), made on first use."""
        data = _read(self.account_key_path)
        if data is not None:
            try:
                serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError):
                raise ConfigError(f"{self.account_key_path}: not a private key in PEM") from None
            return data
        key = ec.generate_private_key(ec.SECP256R1())
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            write_private(self.account_key_path, data)
        except OSError as exc:
            raise _problem(self.account_key_path, exc) from None
        log.info("ACME: new account key in %s", self.account_key_path)
        return data

    def kept(self) -> Kept | None:
        """The certificate on disk, if there is a usable one (expired or not);
        one that cannot be used is logged and treated as none."""
        try:
            data = _read(self.cert_path)
            return None if data is None else parse_kept(data, self.cert_path)
        except ConfigError as exc:
            log.warning("ACME: ignoring the kept certificate: %s", exc)
            return None

    def save(self, chain_pem: bytes, key_pem: bytes) -> Kept:
        """Check and keep a newly issued certificate with its key; AcmeError if it
        does not cover every name (kept, it would be ordered again at once)."""
        data = key_pem.rstrip(b"\n") + b"\n" + chain_pem.lstrip(b"\n")
        kept = parse_kept(data, f"the certificate issued for {self.cert_path}")
        if not kept.covers(self.domains):
            raise AcmeError(
                f"the CA issued a certificate for {', '.join(kept.names) or 'no name'},"
                f" not for all of {', '.join(self.domains)}"
            )
        try:
            write_private(self.cert_path, data)
        except OSError as exc:
            raise _problem(self.cert_path, exc) from None
        return kept

"""Who may submit, and as whom: the password file and the sender policy.

The password file is text, one user a line, ``#`` comments kept::

    alice:$argon2id$v=19$m=65536,t=3,p=4$...$...
    bob:$argon2id$v=19$...:bob@example.org,@example.net

Field 1 is the login name (printable, no ``:`` and no white space), field 2
an argon2id hash (argon2-cffi's PHC string), field 3 (optional) the
addresses the user may send as, comma separated, ``@domain`` for a whole
domain; they add to ``[auth].senders`` of the config.

Invariants:

- The file is replaced whole (temp file in the same directory, fsync,
  rename, fsync of the directory), mode 0600, owner kept; writers take a
  ``filelock`` on ``<file>.lock`` so two ``msa user`` runs do not lose an
  edit.
- :class:`PasswdFileAuth` rereads the file when its inode, size or mtime
  change, so ``msa user add`` works without a reload. A file that cannot
  be read keeps the users last read (and logs why).
- Verification costs the same for unknown users (a dummy hash is
  verified) so the reply time does not tell which names exist.
- :meth:`Auth.verify_secret` is synchronous and CPU-heavy; the edge runs
  it in a small thread pool, never on the event loop.
- :class:`TrustedNetworks` (``[edge] trusted_networks``) lets clients from
  listed networks submit without AUTH (Postfix's ``permit_mynetworks``);
  an IPv4-mapped IPv6 peer (``::ffff:127.0.0.1``) is its IPv4 address.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

import argon2
import filelock

from msa.protocol.errors import PermanentError
from spool import fsync_dir

log = logging.getLogger("msa.auth")

_NAME = re.compile(r"[^\s:#][^\s:]{0,254}")


class CredentialsInvalidError(PermanentError):
    """The user name or the password is wrong (RFC 4954 §6: 535 5.7.8)."""

    code = 535
    status = "5.7.8"


def valid_username(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and name.isprintable()


class Auth:
    """The tutorial's interface: return the authenticated user, or raise
    :class:`CredentialsInvalidError`. ``identity`` is the authorization
    identity the client asked for, None when it asked for none."""

    def __init__(self, session=None):
        self.session = session

    def verify_secret(self, username: str, password: str,
                      identity: str | None = None) -> str:
        raise CredentialsInvalidError()

    def get_secret(self, username: str, identity: str | None = None):
        raise CredentialsInvalidError()

    def senders_for(self, user: str) -> list[str]:
        """Extra addresses this backend lets ``user`` send as."""
        return []


def auth_backend(auth: Any, session: Any = None) -> Any:
    """The object to verify with: an :class:`Auth` class (the tutorial
    passes the class) is made for the session, with it as slimta does or
    without arguments; an instance is used as it is."""
    if not isinstance(auth, type):
        return auth
    try:
        return auth(session)
    except TypeError:
        return auth()


@dataclass
class PasswdEntry:
    name: str
    hash: str
    senders: list[str] = field(default_factory=list)

    def line(self) -> str:
        tail = ":" + ",".join(self.senders) if self.senders else ""
        return f"{self.name}:{self.hash}{tail}"


def parse_passwd(text: str) -> tuple[list[str | PasswdEntry], list[str]]:
    """Lines (comments as str, users as entries) and the problems found."""
    lines: list[str | PasswdEntry] = []
    problems = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            lines.append(raw)
            continue
        parts = raw.split(":")
        if len(parts) not in (2, 3) or not valid_username(parts[0]) or not parts[1]:
            problems.append(f"line {n}: not name:hash[:senders]")
            lines.append("# bad line: " + raw.replace(":", " ", 1)[:40])
            continue
        senders = [s for s in parts[2].split(",") if s] if len(parts) == 3 else []
        lines.append(PasswdEntry(parts[0], parts[1], senders))
    return lines, problems


class PasswdFile:
    """The password file as lines, for the ``msa user`` commands."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        self.lines, self.problems = parse_passwd(text)

    def entries(self) -> list[PasswdEntry]:
        return [x for x in self.lines if isinstance(x, PasswdEntry)]

    def get(self, name: str) -> PasswdEntry | None:
        return next((e for e in self.entries() if e.name == name), None)

    def set(self, entry: PasswdEntry) -> None:
        for i, x in enumerate(self.lines):
            if isinstance(x, PasswdEntry) and x.name == entry.name:
                self.lines[i] = entry
                return
        self.lines.append(entry)

    def remove(self, name: str) -> bool:
        before = len(self.lines)
        self.lines = [x for x in self.lines
                      if not (isinstance(x, PasswdEntry) and x.name == name)]
        return len(self.lines) != before

    def save(self) -> None:
        text = "".join((x if isinstance(x, str) else x.line()) + "\n" for x in self.lines)
        write_atomic(self.path, text.encode("utf-8"), 0o600)


def locked(path: str | os.PathLike) -> filelock.BaseFileLock:
    """The lock ``msa user`` holds while it reads, edits and saves."""
    return filelock.FileLock(os.fspath(path) + ".lock", timeout=30)


def write_atomic(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` whole: temp file, fsync, rename, fsync the
    directory. The owner of an existing file is kept."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(prefix=".passwd.", dir=directory)
    try:
        os.fchmod(fd, mode)
        if st is not None and (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def hash_password(password: str, hasher: argon2.PasswordHasher | None = None) -> str:
    return (hasher or argon2.PasswordHasher()).hash(password)


class PasswdFileAuth(Auth):
    """:class:`Auth` over the password file (argon2id hashes)."""

    def __init__(self, path: str | os.PathLike, session=None):
        super().__init__(session)
        self.path = os.fspath(path)
        self._hasher = argon2.PasswordHasher()
        self._dummy = self._hasher.hash("not a password")
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._users: dict[str, PasswdEntry] = {}
        self.refresh()

    def refresh(self) -> None:
        """Reread the file if it changed since the last read."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            log.warning("%s: cannot stat password file: %s", self.path, exc)
            return
        with self._lock:
            if stamp == self._stamp and self._stamp is not None:
                return
            if stamp is None:
                if self._stamp is not None or not self._users:
                    log.warning("%s: no password file; nobody can log in", self.path)
                self._users, self._stamp = {}, None
                return
            try:
                pf = PasswdFile(self.path)
            except (OSError, UnicodeDecodeError) as exc:
                log.warning("%s: cannot read password file, keeping %d users: %s",
                            self.path, len(self._users), exc)
                return
            for problem in pf.problems:
                log.warning("%s: %s (ignored)", self.path, problem)
            self._users = {e.name: e for e in pf.entries()}
            self._stamp = stamp

    def verify_secret(self, username: str, password: str,
                      identity: str | None = None) -> str:
        self.refresh()
        entry = self._users.get(username)
        try:
            self._hasher.verify(entry.hash if entry else self._dummy, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            raise CredentialsInvalidError() from None
        if entry is None:
            raise CredentialsInvalidError()
        if identity and identity != username:
            raise CredentialsInvalidError("no proxy authorization")
        return username

    def senders_for(self, user: str) -> list[str]:
        entry = self._users.get(user)
        return list(entry.senders) if entry else []

    def users(self) -> list[str]:
        self.refresh()
        return sorted(self._users)


class SenderPolicy:
    """Which envelope senders and From addresses a user may use.

    ``senders`` maps a user to addresses or ``@domain`` patterns
    (``[auth].senders``). With ``allow_login_address`` a user may also
    use their login when it is an address, and ``login@domain`` when a
    domain is given. Addresses compare case-insensitively (as Postfix's
    smtpd_sender_login_maps lookups do).
    """

    def __init__(self, senders: dict[str, Iterable[str]] | None = None,
                 domain: str = "", allow_login_address: bool = True):
        self.senders = {u: [a.lower() for a in lst] for u, lst in (senders or {}).items()}
        self.domain = domain.lower()
        self.allow_login_address = allow_login_address

    def allowed(self, user: str, address: str, extra: Iterable[str] = ()) -> bool:
        address = address.lower()
        if "@" not in address:
            return False
        domain = "@" + address.rpartition("@")[2]
        patterns = list(self.senders.get(user, [])) + [a.lower() for a in extra]
        if self.allow_login_address:
            patterns.append(user.lower())
            if self.domain and "@" not in user:
                patterns.append(f"{user.lower()}@{self.domain}")
        return address in patterns or domain in patterns


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedNetworks:
    """Client networks that may submit without AUTH (pure).

    Built from CIDR strings (``"127.0.0.0/8"``, ``"::1/128"``; a bare
    address is a /32 or /128). Host bits set are an error, as a typo like
    ``10.0.0.1/8`` would otherwise open more than was meant.
    """

    def __init__(self, cidrs: Iterable[str | Network] = ()):
        nets: list[Network] = []
        for cidr in cidrs:
            if isinstance(cidr, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                nets.append(cidr)
                continue
            try:
                nets.append(ipaddress.ip_network(str(cidr).strip(), strict=True))
            except ValueError as exc:
                raise ValueError(f"bad network {cidr!r}: {exc}") from None
        self.networks: tuple[Network, ...] = tuple(nets)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __repr__(self) -> str:
        return f"TrustedNetworks({[str(n) for n in self.networks]!r})"

    def contains(self, ip: str) -> bool:
        """Whether the client address ``ip`` (as the socket gives it; an
        IPv6 scope ``%eth0`` is ignored) is in a trusted network."""
        if not self.networks or not ip:
            return False
        try:
            addr = ipaddress.ip_address(ip.partition("%")[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

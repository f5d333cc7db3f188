"""Validating files from ``maildrop/``: untrusted input from any local user.

Any local user may put a file in ``maildrop/`` (mode 3733), by ``sendmail``
or by hand. Before such a file becomes a trusted queue file in
``incoming/`` (docs/ARCHITECTURE.md, "maildrop/ is untrusted"):

- it is opened with ``O_NOFOLLOW`` (a symlink is refused, never followed)
  and ``O_NONBLOCK`` (a FIFO cannot hang the watcher); it must be a
  regular file with exactly one link (a hard link to someone else's file
  is refused without reading it);
- the submitting user (``Local-User``, ``Local-UID``) is the file's owner,
  whatever the file says; the origin is ``local``; fields only the daemon
  may set (SMTP client data, ``Auth-User``, delivery state, ``Policies``,
  ``Bounce-Of``, unknown keys) are dropped;
- every address is checked (no CR, LF, NUL or other controls, at most 254
  octets, a local part of at most 64, one ``@``); bare names get
  ``cfg.domain``; no Sender line means the owner's ``login@domain``;
- the message must be exactly ``Size`` bytes of CRLF text: a bare CR or
  LF (which could smuggle a second message past a lax next hop) or a
  truncated file is refused.

Refused files are quarantined to ``corrupt/`` by the watcher with the
reason from :class:`Refused`. The functions here never raise anything else
for bad input.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import time
from typing import BinaryIO

from msa.message import queuefile
from msa.message.headers import normalize_address
from msa.message.queuefile import Envelope, QueueFileError, Recipient
from msa.protocol import xtext
from msa.protocol.errors import AddressError

MAX_LOCAL_PART = 64     # RFC 5321 §4.5.3.1.1
NOTIFY_WORDS = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}


class Refused(Exception):
    """A maildrop file that will not be accepted; the text says why."""


# -- opening ---------------------------------------------------------------

def open_untrusted(path: str | os.PathLike) -> tuple[BinaryIO, os.stat_result]:
    """Open a maildrop file for reading without following it anywhere."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused("a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"not a regular file (mode {st.st_mode:o})")
        if st.st_nlink != 1:
            raise Refused(f"has {st.st_nlink} hard links")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb"), st


# uid -> (passwd entry, when looked up). An entry is reused for OWNER_TTL
# seconds: a burst from one user costs one NSS lookup, and a renamed or
# removed account is seen within that time. A uid with no entry is not
# remembered (a new account is seen at once).
OWNER_TTL = 10.0
_OWNERS_MAX = 1024
_owners: dict[int, tuple[pwd.struct_passwd, float]] = {}


def owner(st: os.stat_result) -> pwd.struct_passwd:
    now = time.monotonic()
    hit = _owners.get(st.st_uid)
    if hit is not None and now - hit[1] <= OWNER_TTL:
        return hit[0]
    try:
        entry = pwd.getpwuid(st.st_uid)
    except KeyError:
        _owners.pop(st.st_uid, None)
        raise Refused(f"owner uid {st.st_uid} has no passwd entry") from None
    if len(_owners) >= _OWNERS_MAX:
        _owners.clear()
    _owners[st.st_uid] = (entry, now)
    return entry


# -- addresses -------------------------------------------------------------

def check_address(address: str, domain: str, allow_null: bool = False) -> str:
    """A safe, qualified address, or :class:`Refused` (pure; the rules are
    sendmail's :func:`msa.message.headers.normalize_address`, without its
    leniency for brackets, plus the local-part limit)."""
    if any(c in address for c in "<>"):
        raise Refused(f"address with a bracket: {address[:80]!r}")
    try:
        address = normalize_address(address, domain, allow_null)
    except AddressError as exc:
        raise Refused(str(exc)) from None
    if len(address.rpartition("@")[0].encode()) > MAX_LOCAL_PART:
        raise Refused(f"local part too long: {address[:80]!r}")
    return address


def _notify(value: str) -> str:
    words = {w.upper() for w in value.split(",") if w}
    if not words or not words <= NOTIFY_WORDS or ("NEVER" in words and len(words) > 1):
        return ""
    return ",".join(sorted(words))


# -- the envelope ----------------------------------------------------------

def read_untrusted(f: BinaryIO, user: pwd.struct_passwd, domain: str) -> tuple[Envelope, int]:
    """Parse and sanitise the envelope of an open maildrop file; returns the
    trusted envelope and the offset of the message."""
    f.seek(0)
    try:
        block, offset = queuefile.read_envelope_block(f)
        sender_given = b"\nSender: " in block
        if not sender_given:
            block += b"Sender: <>\n"
        raw = queuefile.parse_envelope(block)
        queuefile.check_size(f, raw, offset)
    except QueueFileError as exc:
        raise Refused(str(exc)) from None
    return sanitise(raw, user, domain, sender_given), offset


def sanitise(raw: Envelope, user: pwd.struct_passwd, domain: str,
             sender_given: bool = True) -> Envelope:
    """Keep only what a local user may say; fill in who they are (pure)."""
    env = Envelope(origin="local", local_user=user.pw_name, local_uid=str(user.pw_uid),
                   size=raw.size)
    if sender_given:
        env.sender = check_address(raw.sender, domain, allow_null=True)
    else:
        env.sender = f"{user.pw_name}@{domain}"
    for rcpt in raw.recipients:
        env.recipients.append(Recipient(check_address(rcpt.address, domain),
                                        notify=_notify(rcpt.notify),
                                        orcpt=rcpt.orcpt[:500]))
    if not env.recipients:
        raise Refused("no recipients")
    env.full_name = raw.full_name[:200]
    env.body = raw.body if raw.body in ("7BIT", "8BITMIME") else ""
    env.smtputf8 = "yes" if raw.smtputf8 else ""
    env.ret = raw.ret if raw.ret in ("FULL", "HDRS") else ""
    env.envid = raw.envid if len(raw.envid) <= 100 and xtext.is_xtext(raw.envid) else ""
    return env


# -- the message -----------------------------------------------------------

class LineEndings:
    """Streaming check that every CR is followed by LF and every LF follows
    a CR (pure; feed chunks, then :meth:`finish`)."""

    def __init__(self) -> None:
        self.prev_cr = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        joined = self.prev_cr and chunk.startswith(b"\n")
        if self.prev_cr and not joined:
            raise Refused("bare CR in message")
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\n") - crlf - joined > 0:
            raise Refused("bare LF in message")
        if chunk.count(b"\r") - crlf - chunk.endswith(b"\r") > 0:
            raise Refused("bare CR in message")
        self.prev_cr = chunk.endswith(b"\r")

    def finish(self) -> None:
        if self.prev_cr:
            raise Refused("bare CR at end of message")

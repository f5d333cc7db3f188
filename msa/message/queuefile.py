"""The on-disk message format: an envelope in plain text above the message.

A queue file is what ``cat spool/active/<id>`` shows::

    MSA-Queue-File: 1
    Queue-ID: 018F2C3A4B5C600123A001
    Arrival: 2026-11-29T10:59:15.123456Z
    Sender: <alice@example.org>
    Origin: smtp
    Client-Address: 127.0.0.1
    Auth-User: alice
    Size: 1834
    Body: 8BITMIME
    Attempts: 1
    Recipient: pending <bob@example.test>
    Recipient: sent <carol@example.test> 250 2.0.0 Ok: queued as 4XyZ
    Recipient: deferred <dave@example.net> 450 4.2.0 Mailbox busy
    Recipient: failed <erin@example.com> 550 5.1.1 No such user
    History: 2026-11-29T11:04:15Z mx1.example.test[127.0.0.2] deferred 450 4.2.0 ...
    <blank line>
    Received: ...
    From: alice@example.org
    ...

Rules (every writer and reader here keeps them):

- The envelope is ``Key: value`` lines in ASCII or UTF-8, ended by ``\\n``,
  closed by one empty line. Keys are case-sensitive. Unknown keys are kept
  (``extra``) and written back, so a newer writer's fields survive an older
  reader.
- No value contains CR, LF or NUL: :func:`one_line` folds remote replies
  into one line before they are stored.
- ``Recipient`` lines keep their order; each has a state (``pending``,
  ``sent``, ``deferred``, ``failed``), the address in angle brackets, then
  optional ``KEY=value`` DSN parameters (``NOTIFY=``, ``ORCPT=``) and the last
  reply for that recipient.
- Everything after the empty line is the message exactly as it will be
  relayed: CRLF line endings, not dot-stuffed.
- ``Size`` is the length of the message in bytes; a reader checks it
  against the file, so a truncated file is found, not relayed.
- The envelope is at most :data:`MAX_ENVELOPE` bytes; a file whose envelope
  is longer, or that does not start with the magic line, is corrupt.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import re
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

MAGIC = b"MSA-Queue-File: 1\n"
_MAGIC_TEXT = MAGIC.decode()
MAX_ENVELOPE = 4 * 1024 * 1024
STATES = ("pending", "sent", "deferred", "failed")
HISTORY_KEEP = 20
_DSN_PARAM = re.compile(r"^(NOTIFY|ORCPT)=(\S+)$")

# Keys with a dedicated attribute, in the order they are written.
_SCALARS = (
    ("Queue-ID", "queue_id"), ("Arrival", "arrival"), ("Sender", None),
    ("Origin", "origin"), ("Client-Name", "client_name"),
    ("Client-Address", "client_address"), ("Helo", "helo"), ("TLS", "tls"),
    ("Auth-User", "auth_user"), ("Local-User", "local_user"),
    ("Local-UID", "local_uid"), ("Full-Name", "full_name"),
    ("Size", "size"), ("Body", "body"), ("SMTPUTF8", "smtputf8"), ("Ret", "ret"),
    ("Envid", "envid"), ("Attempts", "attempts"),
    ("First-Attempt", "first_attempt"), ("Last-Attempt", "last_attempt"),
    ("Next-Attempt", "next_attempt"), ("Last-Error", "last_error"),
    ("Delay-Warned", "delay_warned"), ("Bounce-Of", "bounce_of"),
    ("Policies", "policies"),
)


class QueueFileError(ValueError):
    """The file is not a queue file this version can read."""


_UNSAFE = re.compile(r"[\r\n\x00]+")
_UTC = _dt.timezone.utc
# Exactly what utc_iso writes (4-digit year, 6-digit fraction).
_ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def one_line(text: str, limit: int = 1000) -> str:
    """Fold text (a multi-line SMTP reply, an error) into one safe line."""
    if "\n" in text or "\r" in text or "\x00" in text:
        text = _UNSAFE.sub(" ", text)
    return text.strip()[:limit]


def utc_iso(ts: float) -> str:
    """``2026-11-29T10:59:15.123456Z`` (UTC, always six fraction digits)."""
    return _dt.datetime.fromtimestamp(ts, _UTC).isoformat(timespec="microseconds")[:26] + "Z"


def is_utc_iso(text: str) -> bool:
    """True when ``text`` is exactly what :func:`utc_iso` writes."""
    return _ISO_UTC.fullmatch(text) is not None


def parse_iso(text: str) -> float:
    """The inverse of :func:`utc_iso`. What it writes is parsed with
    ``fromisoformat`` (strptime costs ten times more); anything else goes
    through strptime's stricter format and raises ValueError like it."""
    if _ISO_UTC.fullmatch(text):
        return _dt.datetime.fromisoformat(text[:-1]).replace(tzinfo=_UTC).timestamp()
    return _dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=_UTC).timestamp()


@dataclass
class Recipient:
    address: str
    state: str = "pending"
    reply: str = ""
    notify: str = ""
    orcpt: str = ""

    def line(self) -> str:
        parts = [self.state, f"<{self.address}>"]
        if self.notify:
            parts.append(f"NOTIFY={self.notify}")
        if self.orcpt:
            parts.append(f"ORCPT={self.orcpt}")
        if self.reply:
            parts.append(one_line(self.reply))
        return " ".join(parts)

    @classmethod
    def parse(cls, value: str) -> "Recipient":
        state, _, rest = value.partition(" ")
        if state not in STATES or not rest.startswith("<"):
            raise QueueFileError(f"bad Recipient line: {value!r}")
        end = rest.find(">")
        if end < 0:
            raise QueueFileError(f"bad Recipient line: {value!r}")
        rcpt = cls(rest[1:end], state)
        words = rest[end + 1:].strip().split(" ") if rest[end + 1:].strip() else []
        while words and _DSN_PARAM.match(words[0]):
            key, val = words.pop(0).split("=", 1)
            setattr(rcpt, key.lower(), val)
        rcpt.reply = " ".join(words)
        return rcpt


@dataclass
class Envelope:
    """Sender, recipients and what the spool needs to know of a message."""

    sender: str = ""
    recipients: list[Recipient] = field(default_factory=list)
    queue_id: str = ""
    arrival: str = ""
    origin: str = ""
    client_name: str = ""
    client_address: str = ""
    helo: str = ""
    tls: str = ""
    auth_user: str = ""
    local_user: str = ""
    local_uid: str = ""
    full_name: str = ""
    size: str = ""
    body: str = ""
    smtputf8: str = ""
    ret: str = ""
    envid: str = ""
    attempts: str = ""
    first_attempt: str = ""
    last_attempt: str = ""
    next_attempt: str = ""
    last_error: str = ""
    delay_warned: str = ""
    bounce_of: str = ""
    policies: str = ""
    history: list[str] = field(default_factory=list)
    extra: list[tuple[str, str]] = field(default_factory=list)

    # -- convenience ------------------------------------------------------

    def add_recipient(self, address: str, **kw) -> Recipient:
        rcpt = Recipient(address, **kw)
        self.recipients.append(rcpt)
        return rcpt

    def pending(self) -> list[Recipient]:
        """Recipients still to be tried (pending or deferred)."""
        return [r for r in self.recipients if r.state in ("pending", "deferred")]

    @property
    def attempt_count(self) -> int:
        return int(self.attempts or 0)

    def add_history(self, line: str) -> None:
        self.history.append(one_line(line))
        del self.history[:-HISTORY_KEEP]

    def copy(self) -> "Envelope":
        import copy
        return copy.deepcopy(self)

    # -- serialisation ----------------------------------------------------

    def to_bytes(self) -> bytes:
        lines = [_MAGIC_TEXT]
        fields = self.__dict__
        for key, attr in _SCALARS:
            if attr is None:
                lines.append(f"Sender: <{self.sender}>\n")
                continue
            value = fields[attr]
            if value:
                lines.append(f"{key}: {one_line(str(value))}\n")
        for rcpt in self.recipients:
            lines.append(f"Recipient: {rcpt.line()}\n")
        for h in self.history:
            lines.append(f"History: {one_line(h)}\n")
        for key, value in self.extra:
            lines.append(f"{key}: {one_line(value)}\n")
        lines.append("\n")
        data = "".join(lines).encode("utf-8")
        if len(data) > MAX_ENVELOPE:
            raise QueueFileError("envelope too large")
        return data


def parse_envelope(data: bytes) -> Envelope:
    """Parse the envelope part (without the closing empty line)."""
    if not data.startswith(MAGIC):
        raise QueueFileError("not a queue file (no MSA-Queue-File line)")
    try:
        text = data[len(MAGIC):].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QueueFileError(f"envelope is not UTF-8: {exc}") from None
    env = Envelope()
    have_sender = False
    attrs = {k: a for k, a in _SCALARS if a}
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition(": ")
        if not sep or "\r" in line or "\x00" in line:
            raise QueueFileError(f"bad envelope line: {line[:80]!r}")
        if key == "Sender":
            if not (value.startswith("<") and value.endswith(">")):
                raise QueueFileError(f"bad Sender: {value!r}")
            env.sender, have_sender = value[1:-1], True
        elif key == "Recipient":
            env.recipients.append(Recipient.parse(value))
        elif key == "History":
            env.history.append(value)
        elif key in attrs:
            setattr(env, attrs[key], value)
        else:
            env.extra.append((key, value))
    if not have_sender:
        raise QueueFileError("no Sender line")
    return env


def read_envelope(f: BinaryIO) -> tuple[Envelope, int]:
    """Read the envelope from an open queue file; returns it and the offset
    where the message starts. Reads at most :data:`MAX_ENVELOPE` bytes."""
    block, offset = read_envelope_block(f)
    return parse_envelope(block), offset


def envelope_of(data: bytes | bytearray, f: BinaryIO | None = None) -> tuple[Envelope, int]:
    """The envelope of a queue file whose first bytes (or all of them) are
    ``data``, and the offset of the message: parsed from ``data`` when it
    ends there, else read from ``f`` (rewound) or from ``data`` by
    :func:`read_envelope`, whose rules and errors it has. (Readers that
    read a file's start in one go use this, rather than reading twice.)"""
    end = data.find(b"\n\n", len(MAGIC) - 1)
    if 0 <= end < MAX_ENVELOPE and data.startswith(MAGIC):
        return parse_envelope(bytes(data[:end + 1])), end + 2
    if f is None:
        f = io.BytesIO(data)
    f.seek(0)
    return read_envelope(f)


def read_envelope_block(f: BinaryIO) -> tuple[bytes, int]:
    """The envelope's raw lines (the closing empty line left out) and the
    offset of the message, from the start of ``f``: the magic line first,
    every line ended by ``\\n``, at most :data:`MAX_ENVELOPE` bytes read.
    QueueFileError otherwise."""
    head = f.read(len(MAGIC))
    if head != MAGIC:
        raise QueueFileError("not a queue file (no MSA-Queue-File line)")
    buf = bytearray(head)
    while True:
        line = f.readline(MAX_ENVELOPE + 1 - len(buf))
        if not line:
            raise QueueFileError("truncated: no end of envelope")
        buf += line
        if line == b"\n":
            break
        if not line.endswith(b"\n") or len(buf) > MAX_ENVELOPE:
            raise QueueFileError("envelope too large or truncated")
    return bytes(buf[:-1]), len(buf)


def check_size(f: BinaryIO, env: Envelope, offset: int) -> None:
    """A file whose message is shorter or longer than its ``Size`` line
    says was truncated or tampered with."""
    if not env.size.isdigit():
        raise QueueFileError("no valid Size line")
    actual = os.fstat(f.fileno()).st_size - offset
    if actual != int(env.size):
        raise QueueFileError(f"message is {actual} bytes, Size says {env.size}")


def load(path) -> tuple[Envelope, int]:
    with open(path, "rb") as f:
        env, offset = read_envelope(f)
        check_size(f, env, offset)
        return env, offset


def iter_message(f: BinaryIO, offset: int, chunk: int = 65536) -> Iterator[bytes]:
    """The message bytes of an open queue file, in chunks."""
    f.seek(offset)
    while True:
        data = f.read(chunk)
        if not data:
            return
        yield data

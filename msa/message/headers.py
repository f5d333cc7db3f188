"""Header fields of a locally submitted message and the addresses in them
(pure: no I/O).

Used by ``sendmail`` for ``-t`` and for the fields it always removes; the
watcher may use :func:`extract_recipients` and :func:`drop_fields` on
maildrop files too. Invariants:

- A field is kept byte for byte (name, folding, 8-bit text) as raw bytes
  that include its continuation lines (RFC 5322 §2.2.3); lines end in CRLF
  because the caller normalised them.
- The header section ends at the first empty line, or at the first line
  that is neither a field (RFC 5322 §2.2: a name of printable ASCII 33-126
  except ``:``, then ``:``) nor a continuation; in that second case the
  body started without a separator and the writer inserts one (as
  Postfix's cleanup does).
- The header section is bounded (:data:`MAX_HEADER_BYTES`); a longer one is
  a :class:`HeaderTooLarge`, never an unbounded buffer.
- ``Bcc``, ``Resent-Bcc``, ``Return-Path`` and ``Content-Length`` are always
  dropped (:data:`DROP_ALWAYS`): Bcc must not reach recipients (RFC 5322
  §3.6.3), Return-Path is added at final delivery only (RFC 5321 §4.4),
  Content-Length is wrong once line endings change.
- With ``-t`` the recipients are those of To, Cc and Bcc; if any
  ``Resent-`` field exists only Resent-To, Resent-Cc and Resent-Bcc count
  (RFC 5322 §3.6.6, Postfix ``cleanup``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Iterator

from msa.protocol.errors import AddressError

MAX_HEADER_BYTES = 1024 * 1024
MAX_ADDRESS = 254  # RFC 5321 §4.5.3.1.3 path limit less the brackets
DROP_ALWAYS = frozenset({"bcc", "resent-bcc", "return-path", "content-length"})
RECIPIENT_FIELDS = ("to", "cc", "bcc")
RESENT_RECIPIENT_FIELDS = ("resent-to", "resent-cc", "resent-bcc")
_SPECIALS = set('<>()[]\\,;:"') | {" ", "\t"}


class HeaderTooLarge(ValueError):
    """The header section is longer than :data:`MAX_HEADER_BYTES`."""


def is_field_start(line: bytes) -> bool:
    name, colon, _ = line.partition(b":")
    return bool(colon and name) and all(33 <= c <= 126 for c in name)


# What a line of the message is to the header scanner.
FIELD, CONTINUATION, END_EMPTY, END_BODY = "field", "continuation", "end-empty", "end-body"


def line_kind(line: bytes, have_fields: bool) -> str:
    """Classify one line (with its line ending) at the top of a message."""
    if line in (b"\r\n", b"\n", b"\r"):
        return END_EMPTY
    if line[:1] in (b" ", b"\t"):
        return CONTINUATION if have_fields else END_BODY
    return FIELD if is_field_start(line) else END_BODY


def field_name(raw: bytes) -> str:
    return raw.partition(b":")[0].decode("ascii", "replace").strip().lower()


def field_value(raw: bytes) -> str:
    """The unfolded value, decoded as UTF-8 (Latin-1 when that fails)."""
    value = raw.partition(b":")[2].replace(b"\r\n", b"").replace(b"\n", b"")
    try:
        return value.decode("utf-8").strip()
    except UnicodeDecodeError:
        return value.decode("latin-1").strip()


@dataclass
class HeaderSection:
    """Raw fields; ``separator``: an empty line (or a body line, inserted
    separator) follows them; ``first_body``: the body line that ended the
    section when there was no empty line."""

    fields: list[bytes] = field(default_factory=list)
    separator: bool = False
    first_body: bytes = b""

    def to_bytes(self, drop: frozenset[str] = DROP_ALWAYS) -> bytes:
        out = b"".join(drop_fields(self.fields, drop))
        if self.separator:
            out += b"\r\n" + self.first_body
        return out


class HeaderScanner:
    """The one reader of a message's header section (pure): fed the
    message's bytes in chunks of any size, it says where the section ends,
    by :func:`line_kind`'s rule, and never holds more than ``limit``
    bytes of it.

    :meth:`feed` returns None while the section goes on, then the offset
    (in all bytes fed) where the body starts, its separator line included;
    :attr:`kind` is then ``END_EMPTY`` (an empty line) or ``END_BODY`` (a
    line that is no field: the separator was missing). :meth:`finish` says
    the message ended: a message of header fields only ends at its end
    (``kind`` None). A section longer than ``limit`` raises
    :class:`HeaderTooLarge`. The bytes are the caller's: the scanner keeps
    only the line it is in.
    """

    __slots__ = ("limit", "pos", "partial", "end", "kind")

    def __init__(self, limit: int = MAX_HEADER_BYTES):
        self.limit = limit
        self.pos = 0                 # bytes of whole header lines so far
        self.partial = b""           # the line being read
        self.end: int | None = None
        self.kind: str | None = None

    def feed(self, data: bytes) -> int | None:
        if self.end is not None:
            return self.end
        buf = self.partial + data if self.partial else bytes(data)
        start = 0
        while (nl := buf.find(b"\n", start)) >= 0:
            kind = line_kind(buf[start:nl + 1], self.pos > 0)
            if kind in (END_EMPTY, END_BODY):
                self.end, self.kind, self.partial = self.pos, kind, b""
                return self.end
            self.pos += nl + 1 - start
            start = nl + 1
            if self.pos > self.limit:
                break
        self.partial = buf[start:]
        if self.pos + len(self.partial) > self.limit:
            raise HeaderTooLarge(f"header section larger than {self.limit} bytes")
        return None

    def finish(self) -> int:
        """The message ended; returns where its header section ends."""
        if self.end is None:
            tail = self.partial
            if tail and line_kind(tail, self.pos > 0) in (END_EMPTY, END_BODY):
                self.end, self.kind = self.pos, (END_EMPTY if tail == b"\r" else END_BODY)
            else:
                self.end = self.pos + len(tail)
            self.partial = b""
        return self.end


def split_fields(block: bytes) -> list[bytes]:
    """A header section's bytes (no empty line) as raw fields, each with
    its continuation lines (RFC 5322 §2.2.3)."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def read_header_section(pieces: Iterator[bytes],
                        limit: int = MAX_HEADER_BYTES) -> HeaderSection:
    """Consume the header section from CRLF-normalised pieces (a piece
    ending in CRLF ends a line; see :mod:`msa.submission.sendmail_input`),
    found by :class:`HeaderScanner`. The iterator is left at the first
    body piece; the line that ended the section, if not the empty line,
    is ``first_body``."""
    scanner = HeaderScanner(limit)
    buf = bytearray()
    for piece in pieces:
        buf += piece
        end = scanner.feed(piece)
        if end is not None:
            rest = bytes(buf[end:])
            return HeaderSection(split_fields(bytes(buf[:end])), separator=True,
                                 first_body=b"" if scanner.kind == END_EMPTY else rest)
    end = scanner.finish()
    return HeaderSection(split_fields(bytes(buf[:end])), separator=scanner.kind is not None,
                         first_body=bytes(buf[end:]) if scanner.kind == END_BODY else b"")


MAX_DISPLAY_NAME = 256  # characters of a -F or GECOS full name
_PHRASE_SPECIALS = re.compile(r'[][\\()<>@,:;".]')


def display_name_problem(text: str) -> str:
    """Why ``text`` cannot be a display name in a header msa writes, or "".

    Refused: a control character (C0, DEL or C1: CR and LF would end the
    field and start another, RFC 5322 §2.2), a lone surrogate (bytes of the
    command line that are not UTF-8), any other character that is not
    printable (formatting characters such as U+202E, which reverses the
    text a reader sees; separators; unassigned code points), more than
    :data:`MAX_DISPLAY_NAME` characters. 8-bit text is fine:
    :func:`from_field` encodes it."""
    if len(text) > MAX_DISPLAY_NAME:
        return f"longer than {MAX_DISPLAY_NAME} characters"
    if text.isprintable():
        return ""
    for c in text:
        o = ord(c)
        if o < 32 or 127 <= o < 160:
            return f"control character {c!r}"
        if 0xD800 <= o < 0xE000:
            return "not valid UTF-8"
        if not c.isprintable():
            return f"unprintable character U+{o:04X}"
    return ""


def safe_display_name(text: str) -> str:
    """``text`` with what :func:`display_name_problem` refuses taken out:
    for names msa finds rather than is given (the passwd GECOS field)."""
    text = "".join(c for c in text[:MAX_DISPLAY_NAME]
                   if not display_name_problem(c))
    return " ".join(text.split())


def phrase(name: str) -> str:
    """A display name as it goes into a header: ASCII as atoms, or as a
    quoted string when it has specials (RFC 5322 §3.2.3-4, backslash before
    ``"`` and ``\\``: what ``email.utils.formataddr`` writes), anything else as
    RFC 2047 encoded words, folded with CRLF SP. The caller has checked it
    with :func:`display_name_problem`."""
    if name.isascii():
        if not _PHRASE_SPECIALS.search(name):
            return name
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    from email.header import Header
    return Header(name, "utf-8", header_name="From").encode(linesep="\r\n")


def mailbox(address: str, display: str = "") -> str:
    """``Name <address>``, or the bare address without a name (RFC 5322
    §3.4); the address kept as UTF-8 when it is not ASCII (RFC 6532 §3.2)."""
    return f"{phrase(display)} <{address}>" if display else address


def from_field(sender: str, full_name: str = "") -> bytes:
    """The ``From:`` field for local mail that has none (RFC 5322 §3.6.2
    requires one; Postfix's cleanup adds it the same way for sendmail).
    ``sender`` is a checked address (:func:`normalize_address`);
    ``full_name`` has passed :func:`display_name_problem`."""
    return f"From: {mailbox(sender, full_name)}\r\n".encode("utf-8")


ADDRESS_FIELDS = frozenset({"from", "sender", "reply-to", "to", "cc", "resent-from",
                            "resent-sender", "resent-to", "resent-cc"})


def qualify_fields(fields: list[bytes], domain: str) -> list[bytes]:
    """Header fields of local mail with bare local parts qualified (``To:
    root`` -> ``To: root@domain``, ``From: root (Cron Daemon)`` -> ``From:
    Cron Daemon <root@domain>``), as Postfix's cleanup does with
    ``myorigin``: a strict receiver refuses an address without a domain
    (RFC 5322 §3.4.1). Only the address fields (:data:`ADDRESS_FIELDS`)
    that hold such a part are rewritten; a field that does not parse, or
    that holds a group, is kept byte for byte, as is every other field."""
    out = []
    for raw in fields:
        name = field_name(raw)
        if name not in ADDRESS_FIELDS:
            out.append(raw)
            continue
        value = field_value_raw(raw)
        pairs = getaddresses([value])
        if (not pairs or any(not addr for _, addr in pairs) or ":" in value
                or all("@" in addr for _, addr in pairs)):
            out.append(raw)
            continue
        parts = [mailbox(addr if "@" in addr else f"{addr}@{domain}", display)
                 for display, addr in pairs]
        head = raw.partition(b":")[0].decode("ascii")
        out.append(f"{head}: {', '.join(parts)}\r\n".encode("utf-8"))
    return out


def drop_fields(fields: list[bytes], names: frozenset[str] = DROP_ALWAYS) -> list[bytes]:
    return [f for f in fields if field_name(f) not in names]


def extract_recipients(fields: list[bytes]) -> list[str]:
    """Addresses for ``sendmail -t`` (RFC 5322 §3.6.6 for Resent-)."""
    names = {field_name(f) for f in fields}
    wanted = (RESENT_RECIPIENT_FIELDS if any(n.startswith("resent-") for n in names)
              else RECIPIENT_FIELDS)
    out: list[str] = []
    for f in fields:
        if field_name(f) in wanted:
            out.extend(parse_address_list(field_value(f)))
    return out


def parse_address_list(value: str) -> list[str]:
    """The addr-specs of an address-list (RFC 5322 §3.4); groups are
    flattened, empty groups (``undisclosed-recipients:;``) give nothing."""
    return [addr for _name, addr in getaddresses([value]) if addr]


def strip_brackets(text: str) -> str:
    text = text.strip()
    if "<" in text and text.endswith(">"):
        text = text[text.rindex("<") + 1:-1]
    return text.strip()


def normalize_address(text: str, domain: str, allow_null: bool = False) -> str:
    """A command-line or header address as it goes into the envelope:
    brackets removed, a bare local part qualified with ``domain``.

    Raises :class:`AddressError` for what cannot be a mailbox (RFC 5321
    §4.1.2): control characters, unquoted specials, an empty part, too long.
    ``""`` (or ``<>``) is the null sender when ``allow_null``.
    """
    addr = strip_brackets(text)
    if not addr:
        if allow_null:
            return ""
        raise AddressError(f"empty address {text!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in addr):
        raise AddressError(f"bad address {text!r}: control character")
    local, at, dom = addr.rpartition("@")
    if not at:
        local, dom = addr, domain
    if not local or not dom:
        raise AddressError(f"bad address {text!r}")
    if not (local.startswith('"') and local.endswith('"') and len(local) > 1) \
            and any(c in _SPECIALS or c == "@" for c in local):
        raise AddressError(f"bad address {text!r}")
    if dom.startswith("[") and dom.endswith("]"):
        pass  # address literal, RFC 5321 §4.1.3
    elif any(c in _SPECIALS or c == "@" for c in dom) or ".." in dom \
            or dom.startswith("."):
        raise AddressError(f"bad address {text!r}: bad domain")
    result = f"{local}@{dom}"
    if len(result) > MAX_ADDRESS:
        raise AddressError(f"address too long: {text[:60]!r}...")
    return result


def header_addresses(headers: bytes, name: str = "From") -> list[str] | None:
    """The addr-specs in every ``name`` field of a header section, or None
    when a field is there but yields no usable address (unparseable, a
    group without members, no domain) or when mail programs could read it
    otherwise: the field must give the same addresses to the standard
    library's two readers (``email.headerregistry``, which reads
    ``alice@x (c) <bob@y>`` as alice, and ``email.utils.getaddresses`` on
    the raw text, which a client may follow to bob). 8-bit text is read as
    UTF-8 (RFC 6532); invalid UTF-8 survives as surrogates and so matches
    no configured address."""
    # Imported here: the edge calls this, a sendmail call never does (the
    # email package's parser and policies cost it 8 ms).
    import email.errors
    import email.parser
    import email.policy
    text = headers.decode("utf-8", "surrogateescape")
    raw = [field_value_raw(f) for f in split_fields(headers) if field_name(f) == name.lower()]
    out: list[str] = []
    try:
        msg = email.parser.HeaderParser(policy=email.policy.SMTPUTF8).parsestr(text)
        values = msg.get_all(name, [])
        if len(values) != len(raw):
            return None
        for value, plain in zip(values, raw):
            addrs = list(value.addresses)
            if not addrs or any(not a.domain or not a.username for a in addrs):
                return None
            specs = [a.addr_spec for a in addrs]
            if sorted(specs) != sorted(a for _, a in getaddresses([plain])):
                return None
            out.extend(specs)
    except (AttributeError, ValueError, IndexError, TypeError, email.errors.HeaderParseError):
        return None  # a field the parser chokes on: "From: <", "From: x:;c@d"
    return out


def field_value_raw(raw: bytes) -> str:
    """The unfolded value of a raw field, as text (encoded words left
    encoded), for a second reader."""
    value = raw.partition(b":")[2].replace(b"\r\n", b"").replace(b"\n", b"")
    return value.decode("utf-8", "surrogateescape").strip()

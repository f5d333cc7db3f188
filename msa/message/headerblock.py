"""The header section of a message, as raw bytes fields (pure: no I/O).

A message is ``header fields`` + ``body`` (RFC 5322 §2.1). Policies edit
only the header fields; the body is streamed by the caller and never
parsed here. Invariants:

- A field is kept byte for byte as it arrived (its name, folding, 8-bit
  text), including continuation lines (RFC 5322 §2.2.3); only fields that a
  policy adds or removes change.
- The header section ends at the first empty line or at the first line
  that is neither a field (``name:``, RFC 5322 §2.2: printable ASCII 33-126
  except ``:``) nor a continuation (leading WSP). In the second case the
  message lacked the empty separator line and :meth:`HeaderBlock.to_bytes`
  inserts one, as Postfix's cleanup does, so the body cannot be read as
  headers by the next hop.
- Every field written ends with CRLF; added fields are folded to stay under
  the 998-octet line limit of RFC 5322 §2.1.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from msa.message.headers import HeaderScanner, HeaderTooLarge, field_name, split_fields

CRLF = b"\r\n"

def field_value(raw: bytes) -> str:
    """The unfolded value of a raw field (RFC 5322 §2.2.3), decoded
    leniently, runs of white space made one space."""
    value = raw.partition(b":")[2]
    return " ".join(value.decode("utf-8", "replace").split())


def fold(name: str, value: str | list[str], width: int = 78) -> bytes:
    """``Name: value`` folded at spaces so lines stay near ``width``
    (never beyond 998 unless a single word is that long). A list value
    gives the units that are never broken (a Received clause)."""
    words = value.split(" ") if isinstance(value, str) else value
    lines, current = [], f"{name}:"
    for word in words:
        if not word:
            continue
        if len(current) + 1 + len(word) > width and current.strip() not in (f"{name}:", ""):
            lines.append(current)
            current = "\t" + word
        else:
            current = f"{current} {word}"
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


@dataclass
class HeaderBlock:
    """The header fields of a message; ``missing_separator`` when the body
    started without an empty line."""

    fields: list[bytes] = field(default_factory=list)
    missing_separator: bool = False

    @classmethod
    def parse(cls, block: bytes, missing_separator: bool = False) -> "HeaderBlock":
        """Split header bytes (no empty line) into raw fields."""
        return cls(split_fields(block), missing_separator)

    def copy(self) -> "HeaderBlock":
        return HeaderBlock(list(self.fields), self.missing_separator)

    # -- queries ----------------------------------------------------------

    def has(self, name: str) -> bool:
        return any(field_name(f) == name.lower() for f in self.fields)

    def get(self, name: str) -> str | None:
        for f in self.fields:
            if field_name(f) == name.lower():
                return field_value(f)
        return None

    def get_all(self, name: str) -> list[str]:
        return [field_value(f) for f in self.fields if field_name(f) == name.lower()]

    def names(self) -> list[str]:
        return [field_name(f) for f in self.fields]

    # -- edits ------------------------------------------------------------

    def prepend(self, name: str, value: str | list[str]) -> None:
        """Add at the top (trace fields, RFC 5321 §4.4)."""
        self.fields.insert(0, fold(name, value))

    def append(self, name: str, value: str | list[str]) -> None:
        self.fields.append(fold(name, value))

    def remove(self, name: str) -> int:
        before = len(self.fields)
        self.fields = [f for f in self.fields if field_name(f) != name.lower()]
        return before - len(self.fields)

    def to_bytes(self) -> bytes:
        out = bytearray()
        for f in self.fields:
            out += f if f.endswith(b"\n") else f + CRLF
        if self.missing_separator and self.fields:
            out += CRLF
        return bytes(out)


class HeaderCollector:
    """Keeps the header section of a message that streams past (the SMTP
    edge's DATA), at most ``limit`` bytes of it, so that its From can be
    checked once the message is in; found by :class:`HeaderScanner`."""

    def __init__(self, limit: int = 256 * 1024):
        self._scanner = HeaderScanner(limit)
        self._buf = bytearray()
        self.complete = False
        self.overflow = False

    def feed(self, data: bytes) -> None:
        if self.complete or self.overflow:
            return
        try:
            end = self._scanner.feed(data)
        except HeaderTooLarge:
            self.overflow, self._buf = True, bytearray()
            return
        self._buf += data
        if end is not None:
            del self._buf[end:]
            self.complete = True

    def finish(self) -> None:
        """The message ended: a message of only headers is complete too."""
        if not self.overflow and not self.complete:
            del self._buf[self._scanner.finish():]
            self.complete = True

    @property
    def headers(self) -> bytes:
        return bytes(self._buf)

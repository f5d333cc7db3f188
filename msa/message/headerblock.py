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

from msa.message.headers import field_name, is_field_start

CRLF = b"\r\n"
MAX_HEADER_BYTES = 1024 * 1024

# What a line of the message is to the header scanner.
FIELD, CONTINUATION, END_EMPTY, END_BODY = "field", "continuation", "end-empty", "end-body"


def line_kind(line: bytes, have_fields: bool) -> str:
    """Classify one line (with its line ending) at the top of a message."""
    if line in (b"\r\n", b"\n", b"\r"):
        return END_EMPTY
    if line[:1] in (b" ", b"\t"):
        return CONTINUATION if have_fields else END_BODY
    return FIELD if is_field_start(line) else END_BODY


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
        fields: list[bytes] = []
        for line in block.splitlines(keepends=True):
            if fields and line[:1] in (b" ", b"\t"):
                fields[-1] += line
            else:
                fields.append(line)
        return cls(fields, missing_separator)

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

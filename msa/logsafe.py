"""Log lines stay one line (pure): every message a log handler of msa's
writes goes through :func:`escape` in its formatter (``msa.process.logs``),
whatever code made it, so nothing a client or a local user sends (a HELO,
an address, an AUTH user name, a maildrop file name) can end a line and
forge the next one, or reach a terminal as an escape sequence.

- ``\\n``, ``\\r`` and ``\\t`` are written as those two characters (Postfix
  writes a newline as ``\\n`` too);
- any other character that is not printable (C0 and C1 controls, DEL,
  ESC, U+2028 and other separators, formatting characters) as ``\\xNN``
  or ``\\uNNNN``;
- bytes that were not UTF-8 (lone surrogates from ``surrogateescape``) as
  ``\\xNN`` of the byte;
- printable text, 8-bit letters included, is kept.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    named = _NAMED.get(c)
    if named is not None:
        return named
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"

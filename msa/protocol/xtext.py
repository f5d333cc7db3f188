"""xtext (RFC 3461 §4), the encoding of the ENVID and ORCPT parameters
(pure).

``xtext = *( xchar / hexchar )``: ``xchar`` is any printable ASCII character
from ``!`` to ``~`` except ``+`` and ``=``; ``hexchar`` is ``+`` and two
upper-case hexadecimal digits, the byte it stands for. One module for every
reader and writer of these values:

- :func:`is_xtext` is the syntax check (lower-case hex digits are not xtext);
- :func:`decode` undoes it, for a human reader (a DSN's
  ``Original-Envelope-Id``); it is only applied to checked xtext;
- :func:`encode` makes xtext of a raw value (``sendmail -V``).

The queue file stores ENVID and ORCPT as xtext, exactly as they go into the
relay's MAIL and RCPT commands (msa-spool(5)).
"""

from __future__ import annotations

import re

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")


def is_xtext(text: str) -> bool:
    return _XTEXT.fullmatch(text) is not None


def decode(text: str) -> str:
    """``a+2Bb`` -> ``a+b`` (each ``+XX`` is the byte XX, read as Latin-1)."""
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)


def encode(text: str) -> str:
    """``a+b`` -> ``a+2Bb``: ``+``, ``=`` and everything outside ``!``..``~``
    as ``+XX`` of its UTF-8 bytes."""
    out = []
    for ch in text:
        if "!" <= ch <= "~" and ch not in "+=":
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)

"""Encode a message for the SMTP DATA phase, chunk by chunk. Pure: bytes in,
bytes out, no I/O.

RFC 5321 §4.5.2 (transparency): before sending a line, if its first
character is a period, one more period is inserted at the start of the
line. RFC 5321 §2.3.8: lines end in CRLF on the wire, so a bare LF or a
bare CR in the spool file is sent as CRLF (a bare CR or LF on the wire is
what SMTP smuggling abuses). The data ends with ``CRLF . CRLF``
(§4.1.1.4); a message that does not end with CRLF gets one first.

Invariant: for any way of cutting a message into chunks, the
concatenation of ``feed(chunk)`` for every chunk followed by ``finish()``
equals the encoding of the whole message at once. The only state carried
across chunks is "the last byte was a CR whose LF may be in the next
chunk" and "the next byte starts a line".
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")
_DOT_AFTER_CRLF = re.compile(rb"\r\n\.")


class DotStuffer:
    """Incremental DATA encoder: ``feed()`` chunks, then ``finish()``."""

    def __init__(self) -> None:
        self._held_cr = False
        self._at_line_start = True
        self.finished = False

    def feed(self, chunk: bytes) -> bytes:
        if self.finished:
            raise ValueError("feed() after finish()")
        buf = (b"\r" + chunk) if self._held_cr else chunk
        # A CR at the end may be the first half of a CRLF split across
        # chunks: decide when the next byte is known.
        self._held_cr = buf.endswith(b"\r")
        if self._held_cr:
            buf = buf[:-1]
        if not buf:
            return b""
        out = buf
        crlf = buf.count(b"\r\n")
        if buf.count(b"\n") != crlf or buf.count(b"\r") != crlf:  # a bare CR or LF
            out = _LINE_END.sub(b"\r\n", buf)
        if b"\r\n." in out:
            out = _DOT_AFTER_CRLF.sub(b"\r\n..", out)
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\r\n")
        return out

    def finish(self) -> bytes:
        """The rest: a held CR as CRLF, a final CRLF if missing, ``.CRLF``."""
        if self.finished:
            raise ValueError("finish() called twice")
        self.finished = True
        tail = b""
        if self._held_cr:
            self._held_cr = False
            tail = b"\r\n"
            self._at_line_start = True
        if not self._at_line_start:
            tail += b"\r\n"
        return tail + b".\r\n"


def encode(message: bytes) -> bytes:
    """The whole DATA payload of ``message`` in one call."""
    d = DotStuffer()
    return d.feed(message) + d.finish()

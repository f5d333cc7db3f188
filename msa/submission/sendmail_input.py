"""Message text as ``sendmail`` reads it, turned into queue-file form
(pure: pieces of bytes in, pieces of bytes out, no I/O).

The input is a stream of *pieces*: each is a whole line with its ``\\n``
or, for a line longer than the reader's chunk, part of one (no ``\\n``).
Memory is bounded by the largest piece; nothing keeps the whole message.

Output invariants (the queue file's message part, see
:mod:`msa.message.queuefile`):

- Every line ends in CRLF: ``\\r\\n`` and bare ``\\n`` endings both become
  ``\\r\\n`` (RFC 5322 §2.1); a last line without an ending gets one; a
  bare ``\\r`` inside a line is a line break too (``\\r\\n``), so the
  queue file never holds a bare CR or LF (the watcher refuses those: they
  could smuggle a second message past a lax next hop).
  A piece that does not complete a line never ends in ``\\r\\n`` (a
  trailing ``\\r`` is held back until the next piece shows whether a
  ``\\n`` follows), so a consumer can tell line ends from pieces.
- Dots, by ``dots`` mode:
  ``"ignore"`` (``-i``/``-oi``): dots mean nothing;
  ``"end"`` (sendmail's default): a line of a lone ``.`` ends the input and
  is not part of the message, other lines are untouched (Postfix,
  Sendmail: no unstuffing outside SMTP);
  ``"smtp"`` (``-bs`` DATA): a lone ``.`` ends, a leading ``.`` is removed
  from other lines (RFC 5321 §4.5.2).
- ``strip_from``: a first line starting with ``From `` (an mbox separator
  that mailers sometimes pass on) is dropped, as Postfix does.
- :attr:`MessageInput.terminated` tells whether a lone dot ended the input
  (``-bs`` needs one; end of file before it is a lost connection).
"""

from __future__ import annotations

from typing import Iterable, Iterator

CRLF = b"\r\n"
DOT_MODES = ("ignore", "end", "smtp")


class MessageInput:
    """Iterate to get the normalised pieces of one message."""

    def __init__(self, pieces: Iterable[bytes], dots: str = "end",
                 strip_from: bool = True):
        if dots not in DOT_MODES:
            raise ValueError(f"dots must be one of {DOT_MODES}")
        self._pieces = iter(pieces)
        self.dots = dots
        self.strip_from = strip_from
        self.terminated = False

    def __iter__(self) -> Iterator[bytes]:
        at_start = True      # the next piece begins a line
        first_line = True
        skipping = False     # inside a dropped From_ line
        carry = b""          # held back: a trailing "\r", or a lone "." at a line start
        for piece in self._pieces:
            if not piece:
                continue
            data = carry + piece
            carry = b""
            complete = data.endswith(b"\n")
            if at_start:
                if first_line and self.strip_from and data.startswith(b"From "):
                    skipping = True
                first_line = False
                if self.dots != "ignore" and data.rstrip(b"\r\n") == b".":
                    if complete:
                        self.terminated = True
                        return
                    carry = data    # "." or ".\r" so far: wait for the rest
                    continue
                if self.dots == "smtp" and data.startswith(b"."):
                    data = data[1:]
            if complete:
                data = data[:-2] if data.endswith(CRLF) else data[:-1]
                data = data.replace(b"\r", CRLF) + CRLF
            else:
                if data.endswith(b"\r"):
                    data, carry = data[:-1], b"\r"
                data = data.replace(b"\r", CRLF)
            at_start = complete
            if skipping:
                skipping = not complete
                continue
            if data:
                yield data
        if at_start and carry:
            # A lone dot without a line ending at the very end.
            self.terminated = True
        elif not at_start and not skipping:
            yield CRLF  # the last line had no ending (a held "\r" was it)

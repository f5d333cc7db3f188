"""The SMTP DATA reader: bytes in, events out (pure: no I/O, no awaits).

h11-style: the caller feeds whatever arrived from the socket, in chunks of
any size, to :meth:`DataReader.feed` and gets :class:`Data` events (the
message, un-dot-stuffed, CRLF line endings) and finally one
:class:`EndOfData`. Bytes that followed the end-of-data indicator in the
same chunk are left in :attr:`DataReader.trailing` for the command reader.

Invariants (each is tested byte by byte and across every chunk split):

- Only ``<CRLF>.<CRLF>`` ends DATA (RFC 5321 §4.1.1.4); the CRLF of the DATA
  command counts as the first CRLF, so ``.<CRLF>`` at the very start ends
  an empty message. ``\\n.\\n``, ``\\r.\\r``, ``\\n.\\r\\n`` and every other
  look-alike is data, never an end: this is what stops SMTP smuggling.
- A bare CR or bare LF anywhere (RFC 5321 §2.3.8) or a NUL (RFC 6152 §2:
  8-bit data has no NUL; we offer no BINARYMIME) marks the message bad.
  A bad message is still read to the real end-of-data indicator, so none
  of it is ever taken as commands; then it is refused with the error.
- A leading dot of a line is removed (RFC 5321 §4.5.2).
- A line longer than :data:`MAX_LINE` octets without its CRLF (RFC 5322
  §2.1.1, after un-stuffing) marks the message bad (``500 5.5.2``).
- When the message grows past ``max_size`` it is bad (``552 5.3.4``,
  RFC 1870 §6.3); the rest is read and discarded.
- After the first error no more :class:`Data` is emitted: the caller
  needs to hold nothing for a message that will be refused. Every check
  keeps running to the end, and when a message has several faults the
  one reported is chosen by a fixed rank (bare CR/LF, NUL, long line,
  size), so the result never depends on how the bytes were split.
- Memory does not grow with the message: the reader keeps a few integers
  of state; each emitted :class:`Data` holds at most the chunk it came from.

The header section is found by :class:`msa.message.headerblock.HeaderCollector`,
fed the same Data events.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from msa.protocol.errors import PermanentError

MAX_LINE = 998
CR, LF, DOT = 13, 10, 46
_SPECIAL = re.compile(rb"[\r\n\x00]")

# Reader states: at the start of a line, inside a line, after a CR inside a
# line, after a dot at the start of a line, after ".<CR>" at a line start.
_START, _MID, _CR, _DOT, _DOT_CR = range(5)


class DataError(PermanentError):
    """The message data is refused; the reply is sent after end-of-data."""

    code = 550
    status = "5.6.0"
    text = "Message data refused"

    def __init__(self, message: str = ""):
        super().__init__(message or self.text)


class BareLineEnding(DataError):
    # RFC 5321 §2.3.8: CR and LF only as CRLF. 5.6.0 (RFC 3463 §3.7): the
    # content is bad. Postfix 3.9 says 5.5.2; we keep the content class.
    code, status, text = 550, "5.6.0", "Bare CR or LF in message data not allowed"


class NulInData(DataError):
    code, status, text = 550, "5.6.0", "NUL in message data not allowed"


class LineTooLong(DataError):
    # RFC 5321 §4.5.3.1.6 / §4.5.3.1.7: "500 Line too long".
    code, status, text = 500, "5.5.2", "Line too long"


class MessageTooBig(DataError):
    # RFC 1870 §6.3 and RFC 3463 §3.4 (X.3.4 message too big for system).
    code, status, text = 552, "5.3.4", "Message size exceeds fixed maximum message size"


_RANK = {BareLineEnding: 0, NulInData: 1, LineTooLong: 2, MessageTooBig: 3}


@dataclass(frozen=True)
class Data:
    """A piece of the message, already un-dot-stuffed."""

    data: bytes


@dataclass(frozen=True)
class EndOfData:
    """The real end-of-data indicator was read. ``size`` is the message
    length in bytes (un-stuffed); ``error`` is None for a good message."""

    size: int
    error: DataError | None


Event = Data | EndOfData


class DataReader:
    """Reads one message after the 354 reply. Feed it until it is
    :attr:`done`; then :attr:`trailing` holds the bytes that belong to
    the command stream."""

    def __init__(self, max_size: int | None = None, max_line: int = MAX_LINE):
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0
        self.error: DataError | None = None
        self.done = False
        self.trailing = b""
        self._state = _START
        self._line = 0        # octets of the current line in earlier chunks

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data``; return the events it completes."""
        if self.done:
            raise RuntimeError("feed() after end of data")
        out: list[bytes] = []
        i, n = 0, len(data)
        run = 0               # start of bytes not yet emitted or dropped
        line_start = 0        # where the current line starts in this chunk
        clean_from = 0        # no whole-line skipping before this (checked already)
        state = self._state
        while i < n:
            if state == _MID:
                m = _SPECIAL.search(data, i)
                if m is None:
                    i = n
                    break
                j = m.start()
                i = j + 1
                c = data[j]
                if c == CR:
                    state = _CR
                else:
                    self._fail(BareLineEnding() if c == LF else NulInData())
            elif state == _START:
                if data[i] == DOT:
                    self._emit(out, data, run, i)
                    i += 1
                    run = line_start = i
                    state = _DOT
                elif i >= clean_from:
                    # Whole lines up to the next one that starts with a
                    # dot, at C speed when they are clean (CRLF only, no
                    # NUL, none too long); else byte by byte, and this
                    # stretch is not looked at in bulk again.
                    stop = _clean_lines(data, i, self.max_line)
                    if stop > i:
                        i = line_start = stop
                    else:
                        clean_from = data.find(b"\r\n.", i) % (n + 1) + 2
                        state = _MID
                else:
                    state = _MID
            elif state == _DOT:
                # A dot then anything but CR: the dot was stuffing
                # (already dropped); the byte is ordinary line content.
                if data[i] == CR:
                    i += 1
                    state = _DOT_CR
                else:
                    state = _MID
            elif state == _DOT_CR:
                if data[i] == LF:
                    # <CRLF>.<CRLF>: the ".<CR>" is not message data.
                    self._emit(out, data, run, max(run, i - 1))
                    self._finish(data[i + 1:])
                    return self._events(out)
                # ".<CR>x": a bare CR on a line that began with a dot. A CR
                # held back at the end of the last chunk is data after all.
                if i == 0:
                    self._emit(out, b"\r", 0, 1)
                state = _CR
            else:  # _CR
                if data[i] == LF:
                    i += 1
                    self._end_line(i - 2 - line_start)
                    line_start = i
                    state = _START
                else:
                    self._fail(BareLineEnding())
                    state = _MID
        # Chunk exhausted mid-message. Keep ".<CR>" unemitted: it may be
        # the start of the end-of-data indicator.
        end = n - 1 if state == _DOT_CR else n
        self._emit(out, data, run, max(run, end))
        if state in (_MID, _CR, _DOT, _DOT_CR):
            self._line += n - line_start
            if self._line - (1 if state in (_CR, _DOT_CR) else 0) > self.max_line:
                self._fail(LineTooLong())
        self._state = state
        return self._events(out)

    # -- helpers ------------------------------------------------------------

    def _end_line(self, length_here: int) -> None:
        if self._line + length_here > self.max_line:
            self._fail(LineTooLong())
        self._line = 0

    def _emit(self, out: list[bytes], data: bytes, start: int, end: int) -> None:
        if end <= start:
            return
        self.size += end - start
        if self.max_size is not None and self.size > self.max_size:
            self._fail(MessageTooBig())
        if self.error is None:
            out.append(data[start:end])

    def _fail(self, error: DataError) -> None:
        if self.error is None or _RANK[type(error)] < _RANK[type(self.error)]:
            self.error = error

    def _finish(self, trailing: bytes) -> None:
        self.done = True
        self.trailing = trailing
        self._state = _START

    def _events(self, out: list[bytes]) -> list[Event]:
        events: list[Event] = []
        if out and self.error is None:
            events.append(Data(b"".join(out)))
        if self.done:
            events.append(EndOfData(self.size, self.error))
        return events


def _clean_lines(data: bytes, i: int, max_line: int) -> int:
    """End of the whole lines from ``i`` up to the next line that starts
    with a dot (or the chunk's last CRLF), when none has a bare CR or LF or
    a NUL or exceeds ``max_line`` octets; else ``i``."""
    dot = data.find(b"\r\n.", i)
    last = data.rfind(b"\r\n", i, len(data) if dot < 0 else dot + 2)
    if last < 0:
        return i
    region = data[i:last + 2]
    crlf = region.count(b"\r\n")
    if (region.count(b"\r") != crlf or region.count(b"\n") != crlf or b"\x00" in region
            or max(map(len, region.split(b"\r\n"))) > max_line):
        return i
    return last + 2

"""The policy pipeline on a message in memory (pure: no files, no clock
but the policies' own).

Both the SMTP edge (before it writes ``incoming/``, as Postfix's cleanup
does) and the watcher (on a file's first bytes) use it, so a message gets
the same bytes whichever of them applies the policies
(tests/e2e/test_edge_stamp.py compares the two). Invariants:

- The header section is found by :class:`msa.message.headers.HeaderScanner`,
  the one reader of header sections; at most ``cap`` bytes of it, else
  :class:`msa.message.headers.HeaderTooLarge` (the watcher sends such a
  file to ``corrupt/``).
- :func:`apply_in_memory` never changes its input envelope.
"""

from __future__ import annotations

import copy

from msa.cleanup import policies
from msa.cleanup.policies import Policy
from msa.message.headerblock import HeaderBlock
from msa.message.headers import END_BODY, HeaderScanner, HeaderTooLarge
from msa.message.queuefile import Envelope


def header_section(data: bytes | bytearray, offset: int, cap: int,
                   whole: bool) -> tuple[HeaderBlock, int] | None:
    """The header section of the message that starts at ``offset`` in
    ``data`` and where its body (separator line included) starts, or None
    when its end is not in ``data`` and ``data`` is not the whole file."""
    scanner = HeaderScanner(cap)
    end = scanner.feed(memoryview(data)[offset:])
    if end is None:
        if not whole:
            return None
        end = scanner.finish()
    return (HeaderBlock.parse(bytes(data[offset:offset + end]),
                              missing_separator=scanner.kind == END_BODY), offset + end)


def read_header_section(f, offset: int, cap: int, chunk: int = 65536) -> tuple[HeaderBlock, int]:
    """:func:`header_section` of an open file, read from ``offset`` in
    chunks until the section ends."""
    f.seek(offset)
    scanner = HeaderScanner(cap)
    buf = bytearray()
    while True:
        data = f.read(chunk)
        end = scanner.feed(data) if data else scanner.finish()
        buf += data
        if end is not None:
            return (HeaderBlock.parse(bytes(buf[:end]),
                                      missing_separator=scanner.kind == END_BODY), offset + end)


def apply_in_memory(env: Envelope, message: bytes | bytearray, stages: list[list[Policy]],
                    cap: int) -> tuple[Envelope, bytes, int, str | None] | None:
    """The policies of ``stages`` applied to a message held in memory, as
    the watcher would apply them to its file; ``env`` is not changed.
    Returns the new envelope, which records every policy of ``stages`` in
    ``Policies:`` (those that changed nothing too: the file is written
    anyway, and the watcher then only renames it), the new header section,
    the offset in ``message`` where the body (its separator line
    included) starts, and the Message-ID field's value (or None). None
    when the message splits (the watcher makes the parts from the file)
    or its header section is larger than ``cap`` (the watcher sends it to
    ``corrupt/``).
    """
    try:
        headers, body_offset = header_section(message, 0, cap, whole=True)
    except HeaderTooLarge:
        return None
    # Policies assign envelope fields, they do not edit them in place: a
    # shallow copy keeps ``env`` as it was.
    results, _ = policies.run_stages(copy.copy(env), headers, stages)
    if len(results) != 1:
        return None
    new_env, new_headers = results[0]
    for pols in stages:
        for p in pols:
            policies.mark_applied(new_env, p.name)
    header_bytes = new_headers.to_bytes()
    new_env.size = str(len(header_bytes) + len(message) - body_offset)
    return new_env, header_bytes, body_offset, new_headers.get("Message-ID")

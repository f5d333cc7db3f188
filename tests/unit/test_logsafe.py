"""msa.logsafe.escape: a log line's text stays one line of printable text."""

from __future__ import annotations

import os

import pytest

from msa.logsafe import escape


@pytest.mark.parametrize("text,want", [
    ("plain text, 8-bit too: José ö 鳥", "plain text, 8-bit too: José ö 鳥"),
    ("foo\nDec 02 18:00:00 vm msa/edge[1]: FORGED", "foo\\nDec 02 18:00:00 vm msa/edge[1]: FORGED"),
    ("a\r\nb", "a\\r\\nb"),
    ("tab\there", "tab\\there"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("nul\x00del\x7fnel\x85", "nul\\x00del\\x7fnel\\x85"),
    ("line\u2028sep", "line\\u2028sep"),
    (os.fsdecode(b"bad \xff\xfe utf-8"), "bad \\xff\\xfe utf-8"),
])
def test_escape(text, want):
    assert escape(text) == want


def test_every_character_comes_out_printable():
    for o in list(range(0x00, 0x250)) + list(range(0xDC80, 0xDD00)) + [0x2028, 0x2029, 0xFEFF]:
        out = escape(f"x{chr(o)}y")
        assert out.isprintable() and "\n" not in out and "\r" not in out, hex(o)

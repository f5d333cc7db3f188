"""The DATA encoder (msa.protocol.dotstuff) against aiosmtplib's own whole-message
encoder as an independent oracle, at every chunk boundary (h11 style)."""

from __future__ import annotations

import random

import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from msa.protocol.dotstuff import DotStuffer, encode

SAMPLES = [
    b"Subject: x\r\n\r\nhello\r\n",
    b".leading dot\r\n..two dots\r\n.\r\nend",
    b"bare\nLF\nlines\n.dot after LF\n",
    b"bare\rCR\r.dot after CR\r",
    b"mixed\r\n\n\r\r\n.\r.\n.",
    b"no final newline",
    b".",
    b"\r",
    b"\n.\n",
    b"\r\n.\r\n",
    b"8bit \xc3\xa9\xff\x00 nul\r\n.\x00\r\n",
]


def oracle(message: bytes) -> bytes:
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


def chunked(message: bytes, cuts: list[int]) -> bytes:
    d = DotStuffer()
    out, prev = [], 0
    for cut in cuts + [len(message)]:
        out.append(d.feed(message[prev:cut]))
        prev = cut
    out.append(d.finish())
    return b"".join(out)


@pytest.mark.parametrize("message", SAMPLES)
def test_whole_matches_oracle(message):
    assert encode(message) == oracle(message)


@pytest.mark.parametrize("message", SAMPLES)
def test_every_single_cut(message):
    want = oracle(message)
    for i in range(len(message) + 1):
        assert chunked(message, [i]) == want, i


@pytest.mark.parametrize("message", SAMPLES)
def test_byte_by_byte(message):
    assert chunked(message, list(range(1, len(message)))) == oracle(message)


def test_random_messages_random_cuts():
    rng = random.Random(5321)
    for _ in range(500):
        message = bytes(rng.choice(b"\r\n.a") for _ in range(rng.randint(1, 40)))
        cuts = sorted(rng.sample(range(len(message) + 1), rng.randint(0, min(5, len(message)))))
        assert chunked(message, cuts) == oracle(message), (message, cuts)


def test_wire_invariants():
    out = encode(b"a\n.\nb\r.\r\n")
    body = out[:-3]
    assert out.endswith(b"\r\n.\r\n")
    assert b"\r\n.\r\n" not in body
    assert b"\n" not in body.replace(b"\r\n", b"")
    assert b"\r" not in body.replace(b"\r\n", b"")


def test_empty_message_is_just_the_terminator():
    assert encode(b"") == b".\r\n"


def test_feed_after_finish_is_an_error():
    d = DotStuffer()
    d.finish()
    with pytest.raises(ValueError):
        d.feed(b"x")

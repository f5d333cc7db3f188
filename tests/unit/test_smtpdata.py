"""The pure DATA reader (msa.protocol.smtpdata), h11 style: whole, byte by byte,
split at every offset, with trailing data, and against a slow oracle."""

from __future__ import annotations

import random

import pytest

from msa.protocol.smtpdata import (
    BareLineEnding,
    Data,
    DataReader,
    EndOfData,
    LineTooLong,
    MessageTooBig,
    NulInData,
)

SMUGGLE_VARIANTS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
                    b"\r.\r", b"\r.\n", b"\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]


def run(chunks, **kw):
    """Feed chunks; return (message, EndOfData or None, trailing, events)."""
    reader = DataReader(**kw)
    events, rest = [], []
    for chunk in chunks:
        if reader.done:
            rest.append(chunk)     # what the command reader gets next
        else:
            events += reader.feed(chunk)
    body = b"".join(e.data for e in events if isinstance(e, Data))
    ends = [e for e in events if isinstance(e, EndOfData)]
    assert len(ends) <= 1
    return body, (ends[0] if ends else None), reader.trailing + b"".join(rest), events


def summary(chunks, **kw):
    body, end, trailing, _ = run(chunks, **kw)
    if end is None:
        return ("open",)
    err = type(end.error) if end.error else None
    return (err, end.size, trailing, body if err is None else None)


def oracle(data: bytes, max_size=None, max_line=998):
    """A slow, obviously-right reading of the same rules."""
    s = b"\r\n" + data
    k = s.find(b"\r\n.\r\n")
    if k < 0:
        return ("open",)
    region, trailing = s[2:k + 2], s[k + 5:]
    lines = region.split(b"\r\n")[:-1] if region else []
    errors, out = set(), []
    for line in lines:
        if line.startswith(b"."):
            line = line[1:]
        if b"\r" in line or b"\n" in line:
            errors.add(BareLineEnding)
        if b"\x00" in line:
            errors.add(NulInData)
        if len(line) > max_line:
            errors.add(LineTooLong)
        out.append(line + b"\r\n")
    body = b"".join(out)
    if max_size is not None and len(body) > max_size:
        errors.add(MessageTooBig)
    rank = [BareLineEnding, NulInData, LineTooLong, MessageTooBig]
    err = min(errors, key=rank.index) if errors else None
    return (err, len(body), trailing, body if err is None else None)


def splits(data: bytes):
    yield [data]
    yield [bytes([b]) for b in data]
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


MESSAGES = [
    b".\r\n",
    b".\r\nMAIL FROM:<x@y>\r\n",
    b"Subject: hi\r\n\r\nbody\r\n.\r\n",
    b"a\r\n..\r\n.b\r\n...\r\n.\r\nRSET\r\nQUIT\r\n",
    b"line\r\n.\r\n.\r\n",
    b"x\r\n.\r",                          # not finished yet
    b"bare\nlf\r\n.\r\nNOOP\r\n",
    b"bare\rcr\r\n.\r\n",
    b"nul\x00\r\n.\r\n",
    b"\r\r\n.\r\n",
]


@pytest.mark.parametrize("data", MESSAGES)
def test_every_split_matches_whole_and_oracle(data):
    want = oracle(data)
    for chunks in splits(data):
        assert summary(chunks) == want, chunks


def test_three_way_splits_of_tricky_terminator():
    data = b"a\r\n.\r\n..\r\n.\r\nQUIT\r\n"
    want = oracle(data)
    assert want[0] is None and want[3] == b"a\r\n" and want[2] == b"..\r\n.\r\nQUIT\r\n"
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert summary([data[:i], data[i:j], data[j:]]) == want


def test_dot_unstuffing_and_empty_message():
    body, end, trailing, events = run([b"..\r\n.x\r\n...y\r\n.\r\nQUIT\r\n"])
    assert body == b".\r\nx\r\n..y\r\n"
    assert end == EndOfData(len(body), None)
    assert trailing == b"QUIT\r\n"
    body, end, trailing, events = run([b".\r\n"])
    assert (body, end.size, end.error, trailing) == (b"", 0, None, b"")
    assert not any(isinstance(e, Data) for e in events)


@pytest.mark.parametrize("variant", SMUGGLE_VARIANTS)
def test_smuggling_variants_do_not_end_data(variant):
    smuggled = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nevil\r\n"
    data = b"Subject: a\r\n\r\nhello" + variant + smuggled + b".\r\nQUIT\r\n"
    want = oracle(data)
    assert want[0] in (BareLineEnding, NulInData)
    assert want[2] == b"QUIT\r\n"
    for chunks in splits(data):
        assert summary(chunks) == want


def test_not_finished_without_real_terminator():
    for variant in SMUGGLE_VARIANTS:
        _, end, _, _ = run([b"hello" + variant + b"MAIL FROM:<x@y>\r\n"])
        assert end is None


@pytest.mark.parametrize("n,ok", [(998, True), (999, False)])
def test_line_length(n, ok):
    data = b"x" * n + b"\r\n.\r\n"
    stuffed = b"." + b"x" * n + b"\r\n.\r\n"
    for d in (data, stuffed):
        for chunks in ([d], [d[:500], d[500:]], [d[:n], d[n:]], [d[:n + 1], d[n + 1:]]):
            err = summary(chunks)[0]
            assert (err is None) == ok
            if not ok:
                assert err is LineTooLong
    assert LineTooLong().reply() == "500 5.5.2 Line too long"


def test_size_limit_reads_to_the_end():
    msg = b"a" * 98 + b"\r\n"       # 100 bytes
    assert summary([msg + b".\r\nNOOP\r\n"], max_size=100)[:3] == (None, 100, b"NOOP\r\n")
    err, size, trailing, _ = summary([msg + b"b\r\n.\r\nNOOP\r\n"], max_size=100)
    assert (err, size, trailing) == (MessageTooBig, 103, b"NOOP\r\n")
    assert MessageTooBig().code == 552 and MessageTooBig().status == "5.3.4"


def test_no_data_after_error_and_feed_after_end():
    reader = DataReader()
    ev = reader.feed(b"ok\r\n")
    assert ev == [Data(b"ok\r\n")]
    assert reader.feed(b"bad\nmore\r\n") == []
    ev = reader.feed(b".\r\nX")
    assert isinstance(ev[-1].error, BareLineEnding) and reader.trailing == b"X"
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


def test_large_message_in_chunks_is_bounded():
    line = b"0123456789" * 7 + b"\r\n"
    reader = DataReader(max_size=10 * 1024 * 1024)
    total = 0
    chunk = line * 900
    for _ in range(100):
        for ev in reader.feed(chunk):
            assert len(ev.data) <= len(chunk)
            total += len(ev.data)
    (end,) = reader.feed(b".\r\n")
    assert end.error is None and end.size == total == len(chunk) * 100


def test_random_against_oracle():
    rnd = random.Random(5321)
    alphabet = [b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n.", b"\x00", b"\r\n.\r\n"]
    for _ in range(3000):
        data = b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 14)))
        data += rnd.choice([b"", b"\r\n.\r\nQUIT\r\n"])
        want = oracle(data, max_size=12, max_line=5)
        cuts = sorted(rnd.sample(range(len(data) + 1), min(3, len(data) + 1)))
        chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        assert summary(chunks, max_size=12, max_line=5) == want, (data, chunks)

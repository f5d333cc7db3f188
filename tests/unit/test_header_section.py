"""The one reader of a header section (msa.message.headers.HeaderScanner)
and its three users: sendmail's read_header_section, the policy
pipeline's header_section / read_header_section, and the edge's
HeaderCollector. Each is fed every split of a set of messages, and all
agree on where the section ends and how."""

from __future__ import annotations

import io

import pytest

from msa.cleanup.pipeline import header_section
from msa.cleanup.pipeline import read_header_section as read_file_section
from msa.message.headerblock import HeaderCollector
from msa.message.headers import (
    END_BODY,
    END_EMPTY,
    HeaderScanner,
    HeaderTooLarge,
    header_addresses,
    read_header_section,
)

# message -> (header bytes, how the section ended)
CASES = {
    b"From: a@x\r\nTo: b@y\r\n\r\nbody\r\n": (b"From: a@x\r\nTo: b@y\r\n", END_EMPTY),
    b"Subject: folded\r\n more\r\n\r\n": (b"Subject: folded\r\n more\r\n", END_EMPTY),
    # no separator: the first line that is no field ends it (was: the edge
    # kept reading to the first empty line, so a "From:" further down the
    # body counted in its From check)
    b"From: a@x\r\nthis is body\r\nFrom: evil@z\r\n\r\nx\r\n": (b"From: a@x\r\n", END_BODY),
    b" leading space\r\nFrom: a@x\r\n\r\n": (b"", END_BODY),
    b"\r\nbody only\r\n": (b"", END_EMPTY),
    b"From: a@x\r\n": (b"From: a@x\r\n", None),              # headers only
    b"From: a@x\r\nTo: b@y": (b"From: a@x\r\nTo: b@y", None),  # no final CRLF
}


def splits(data: bytes):
    yield [data]
    yield [bytes([b]) for b in data]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]


def scan(chunks) -> tuple[int, str | None]:
    s = HeaderScanner(1000)
    for c in chunks:
        end = s.feed(c)
        if end is not None:
            return end, s.kind
    return s.finish(), s.kind


@pytest.mark.parametrize("message", CASES)
def test_scanner_at_every_split(message):
    header, kind = CASES[message]
    for chunks in splits(message):
        assert scan(chunks) == (len(header), kind), chunks


@pytest.mark.parametrize("message", CASES)
def test_edge_collector_agrees(message):
    header, _ = CASES[message]
    for chunks in splits(message):
        hc = HeaderCollector(1000)
        for c in chunks:
            hc.feed(c)
        hc.finish()
        assert hc.complete and hc.headers == header, chunks


@pytest.mark.parametrize("message", CASES)
def test_pipeline_agrees(message):
    header, kind = CASES[message]
    block, body = header_section(message, 0, 1000, whole=True)
    assert block.to_bytes().startswith(header.rstrip(b"\r\n")) and body == len(header)
    assert block.missing_separator is (kind == END_BODY)
    for chunk in (1, 3, 7, 65536):
        block2, body2 = read_file_section(io.BytesIO(b"xx" + message), 2, 1000, chunk=chunk)
        assert (block2, body2) == (block, body + 2)


@pytest.mark.parametrize("message", [m for m, (_, k) in CASES.items() if m.endswith(b"\r\n")])
def test_sendmail_agrees(message):
    header, kind = CASES[message]
    lines = [line + b"\n" for line in message.split(b"\n")[:-1]]
    section = read_header_section(iter(lines))
    assert b"".join(section.fields) == header
    rest = message[len(header):]
    if kind == END_EMPTY:
        assert section.separator and section.first_body == b""
    elif kind == END_BODY:
        assert section.separator and section.first_body == rest.split(b"\n")[0] + b"\n"
    else:
        assert not section.separator


def test_limit_is_a_bound_not_a_buffer():
    s = HeaderScanner(limit=50)
    with pytest.raises(HeaderTooLarge):
        for _ in range(10):
            s.feed(b"X-Long: " + b"a" * 10)   # one line, never ended
    with pytest.raises(HeaderTooLarge):   # whole lines count too, in one chunk
        HeaderScanner(limit=50).feed(b"X-Long: " + b"a" * 60 + b"\r\n\r\nbody\r\n")
    assert HeaderScanner(limit=50).feed(b"X: " + b"a" * 40 + b"\r\n\r\n" + b"b" * 99) == 45
    hc = HeaderCollector(limit=10)
    hc.feed(b"Subject: " + b"x" * 20 + b"\r\n")
    assert hc.overflow and not hc.complete and hc.headers == b""


def test_from_addresses():
    assert header_addresses(b"From: A <a@example.org>\r\nTo: b@x\r\n") == ["a@example.org"]
    assert header_addresses(b"From: x, \"b@evil\" <c@y.z>\r\n") is None
    assert header_addresses(b"From: \"a@b.c\" <m@evil.test>\r\n") == ["m@evil.test"]
    assert header_addresses(b"Subject: none\r\n") == []
    assert header_addresses("From: Jos\u00e9 <j\u00f6@ex.org>\r\n".encode()) == ["j\u00f6@ex.org"]


@pytest.mark.parametrize("value", [
    "alice@example.org (x) <bob@example.org>",   # mail clients may see bob
    "<alice@example.org> <bob@example.org>",
    "alice@example.org;bob@example.org",
    "<",                                          # raised inside the parser
    "x:;c@d",
    "undisclosed-recipients:;",
])
def test_ambiguous_or_broken_from_gives_no_addresses(value):
    assert header_addresses(f"From: {value}\r\n".encode()) is None


def test_encoded_words_and_comments_are_read_alike():
    assert header_addresses(b"From: =?utf-8?q?a=2C_b?= <alice@example.org>\r\n") == [
        "alice@example.org"]
    assert header_addresses(b"From: alice@example.org (comment)\r\n") == ["alice@example.org"]
    assert header_addresses(b"From: a@x.org\r\nFrom: b@y.org\r\n") == ["a@x.org", "b@y.org"]



@pytest.mark.parametrize("field,want", [
    (b"From: root (Cron Daemon)\r\n", b"From: Cron Daemon <root@example.org>\r\n"),
    (b"To: root\r\n", b"To: root@example.org\r\n"),
    (b"To: a@x.org, bob\r\n", b"To: a@x.org, bob@example.org\r\n"),
    (b'Reply-To: "Al B" <al>\r\n', b"Reply-To: Al B <al@example.org>\r\n"),
    (b"To: =?utf-8?q?J=C3=B6?= <jo>\r\n", b"To: =?utf-8?q?J=C3=B6?= <jo@example.org>\r\n"),
    # kept byte for byte: qualified already, not an address field, a group,
    # or what does not parse
    (b"To: A <a@x.org>\r\n", b"To: A <a@x.org>\r\n"),
    (b"Subject: root\r\n", b"Subject: root\r\n"),
    (b"Cc: undisclosed-recipients:;\r\n", b"Cc: undisclosed-recipients:;\r\n"),
    (b"From: <\r\n", b"From: <\r\n"),
])
def test_local_mail_gets_qualified_header_addresses(field, want):
    from msa.message.headers import qualify_fields
    assert qualify_fields([field], "example.org") == [want]

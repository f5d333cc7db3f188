"""Property tests (hypothesis) of the pure parsers: whatever the input,
each either returns its result or raises its own documented error, never
anything else, and a reader fed in chunks gives what it gives fed whole.

Bounded for CI (HYPOTHESIS_PROFILE=ci, the default: 150 examples a
property); ``HYPOTHESIS_PROFILE=long`` runs 20,000 each, for a release.
"""

from __future__ import annotations

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from msa.logsafe import escape  # noqa: E402
from msa.message import queuefile  # noqa: E402
from msa.message.headers import (HeaderScanner, HeaderTooLarge,  # noqa: E402
                                 header_addresses, read_header_section)
from msa.protocol import smtpcmd, xtext  # noqa: E402
from msa.protocol.errors import MsaError  # noqa: E402
from msa.submission.sendmail_args import UsageError, parse_args  # noqa: E402
from msa.submission.sendmail_input import MessageInput  # noqa: E402
from tests.unit.test_smtpdata import run  # noqa: E402

settings.register_profile("ci", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Bytes that matter to these parsers, mixed with anything.
SMTP_BYTES = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"\x00", b" ", b":", b"<",
                                       b">", b"@", b"a", b"From: ", b"\xff", b"\t", b"+"])
                      | st.binary(max_size=4), max_size=40).map(b"".join)
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["*@\udc80", "<a@b>", "<>", "<@x,@y:a@b.c>", "a@[1.2.3.4]", "a@[IPv6:::1]"])


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@given(st.binary(max_size=600))
def test_split_command_returns_or_raises_a_reply(line):
    try:
        verb, arg = smtpcmd.split_command(line)
    except MsaError as exc:
        assert exc.reply()[:1] in "45"
    else:
        assert isinstance(verb, str) and isinstance(arg, str)


@given(TEXT, st.booleans(), st.booleans())
def test_parse_path_returns_or_raises_a_reply(text, null_ok, utf8):
    try:
        addr, rest = smtpcmd.parse_path(text, null_ok=null_ok, utf8=utf8)
    except MsaError as exc:
        assert exc.code in (501, 553)
    else:
        assert addr == "" or "@" in addr
        addr.encode("utf-8")


@given(TEXT)
def test_esmtp_parameters_return_or_raise_a_reply(text):
    for parse in (smtpcmd.parse_mail_params, smtpcmd.parse_rcpt_params):
        try:
            parse(text)
        except MsaError as exc:
            assert exc.code in (501, 555)


@given(st.text(max_size=40))
def test_xtext_round_trip(raw):
    encoded = xtext.encode(raw)
    assert xtext.is_xtext(encoded) and encoded.isascii()
    if raw.isascii():   # xtext carries ASCII values (RFC 3461 §4)
        assert xtext.decode(encoded) == raw


def _read_data(chunks):
    body, end, trailing, _ = run(chunks, max_size=5000)
    ok = end is not None and end.error is None
    # A refused message's data is thrown away: only a good one's must agree.
    return (body if ok else None,
            None if end is None else (type(end.error), end.size), trailing)


@given(SMTP_BYTES, st.lists(st.integers(0, 100), max_size=6))
def test_data_reader_does_not_depend_on_how_bytes_are_split(data, cuts):
    data += b"\r\n.\r\nQUIT\r\n"
    whole = _read_data([data])
    assert _read_data(splits(data, cuts)) == whole
    assert _read_data([data[i:i + 1] for i in range(len(data))]) == whole
    assert whole[1] is not None, "the real end of data is always found"


@given(SMTP_BYTES, st.lists(st.integers(0, 100), max_size=6))
def test_header_scanner_does_not_depend_on_how_bytes_are_split(data, cuts):
    def scan(chunks):
        s = HeaderScanner(limit=200)
        try:
            for c in chunks:
                if s.feed(c) is not None:
                    break
            return s.finish(), s.kind
        except HeaderTooLarge:
            return "too large"
    whole = scan([data])
    assert scan(splits(data, cuts)) == whole
    if whole != "too large":
        assert 0 <= whole[0] <= len(data)


@given(SMTP_BYTES)
def test_header_addresses_never_raises(data):
    result = header_addresses(data)
    assert result is None or all("@" in a for a in result)


def readline_pieces(data: bytes, size: int) -> list[bytes]:
    """What ``readline(size)`` gives, piece by piece: up to and with a
    "\n", at most ``size`` bytes (sendmail's input contract)."""
    out, i = [], 0
    while i < len(data):
        nl = data.find(b"\n", i)
        end = min(len(data) if nl < 0 else nl + 1, i + size)
        out.append(data[i:end])
        i = end
    return out


@given(SMTP_BYTES, st.sampled_from(["end", "ignore"]), st.booleans())
def test_sendmail_input_and_header_section(data, dots, strip_from):
    pieces = readline_pieces(data, 7)
    out = list(MessageInput(pieces, dots=dots, strip_from=strip_from))
    joined = b"".join(out)
    assert b"\r" not in joined.replace(b"\r\n", b"") and b"\n" not in joined.replace(b"\r\n", b"")
    try:
        section = read_header_section(iter(out), limit=300)
    except HeaderTooLarge:
        return
    assert all(f.endswith(b"\r\n") for f in section.fields)


@given(st.lists(TEXT | st.sampled_from(["-t", "-i", "-f", "-F", "-N", "-R", "-V", "-B",
                                          "-bs", "-bp", "-q", "-o", "-oi", "--", "-C"]),
                max_size=8))
def test_sendmail_args_parse_or_usage_error(argv):
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        assert exc.code in (64,)
    else:
        for value in (opts.sender or "", opts.full_name or "", *opts.recipients):
            value.encode("utf-8")   # what the envelope and headers can carry
        if opts.full_name:
            assert opts.full_name.isprintable()


@given(st.binary(max_size=300))
def test_queue_file_reader_returns_or_raises_its_error(data):
    try:
        env, offset = queuefile.envelope_of(data)
    except queuefile.QueueFileError:
        return
    assert 0 < offset <= len(data)
    # What it read it writes back the same (apart from what one_line folds).
    again, _ = queuefile.envelope_of(env.to_bytes() + data[offset:])
    assert again == env


@given(st.text(max_size=80))
def test_escaped_log_text_is_one_printable_line(text):
    out = escape(text)
    assert out.isprintable()
    if text.isprintable():
        assert out == text


def test_unprintable_full_names_found_by_the_fuzzer():
    """Regressions: an unassigned code point (found by hypothesis) and
    U+202E (right-to-left override, which would reverse what a reader
    sees of the name) are refused by -F like control characters."""
    from msa.submission.sendmail_args import UsageError, parse_args
    for name in ("\ud7fc", "evil\u202etxt.exe", "a\u2028b"):
        with pytest.raises(UsageError, match="unprintable"):
            parse_args(["-F", name, "r@x.test"])

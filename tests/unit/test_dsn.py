"""The DSN builder (msa.message.dsn): pure, so its output is parsed back with the
standard library's email parser and checked field by field."""

from __future__ import annotations

import email
import email.policy

import pytest

from msa.message import dsn
from msa.message.dsn import DsnRequest, RecipientReport
from msa.protocol.replies import status_of

ORIGINAL = (b"From: alice@example.org\r\nTo: bob@example.test\r\n"
            b"Message-ID: <abc@example.org>\r\nSubject: hi\r\n\r\nbody line\r\n.dot\r\n")
NOW = 1_800_000_000.0


def request(**kw) -> DsnRequest:
    base = dict(
        queue_id="Q1", reporting_mta="msa.test", sender="alice@example.org",
        arrival=NOW - 3600, now=NOW,
        recipients=[RecipientReport("bob@example.test", "failed", "5.1.1",
                                    "550 5.1.1 <bob@example.test>: No such user",
                                    "mx1.example.test", "rfc822;bob+2Bx@example.test",
                                    last_attempt=NOW)],
        original_size=len(ORIGINAL), original_head=ORIGINAL, boundary="BOUNDARY-1")
    base.update(kw)
    return DsnRequest(**base)


def render(req: DsnRequest, original: bytes = ORIGINAL) -> tuple[dsn.Dsn, bytes]:
    d = dsn.build_dsn(req)
    data = d.head + original[:d.include] + d.tail
    assert len(data) == d.size
    return d, data


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def test_structure_and_headers():
    d, data = render(request())
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["From"].addresses[0].username == "MAILER-DAEMON"
    assert msg["In-Reply-To"] == "<abc@example.org>"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    assert "550 5.1.1" in parts[0].get_content()
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")


def test_delivery_status_fields():
    _, data = render(request())
    text = data.decode()
    for line in ["Reporting-MTA: dns; msa.test", "Final-Recipient: rfc822; bob@example.test",
                 "Original-Recipient: rfc822; bob+x@example.test", "Action: failed",
                 "Status: 5.1.1", "Remote-MTA: dns; mx1.example.test",
                 "Diagnostic-Code: smtp; 550 5.1.1 <bob@example.test>: No such user",
                 "Arrival-Date: ", "Last-Attempt-Date: "]:
        assert ("\r\n" + line) in text, line


def test_original_included_whole():
    d, data = render(request())
    assert not d.headers_only and d.include == len(ORIGINAL)
    inner = list(parse(data).iter_parts())[2].get_content()
    assert inner["Message-ID"] == "<abc@example.org>"
    assert "body line" in inner.get_content()


def test_ret_hdrs_gives_headers_only():
    d, data = render(request(ret="HDRS"))
    assert d.headers_only
    assert data.count(b"body line") == 0
    assert b"text/rfc822-headers" in data
    assert ORIGINAL[:d.include].endswith(b"Subject: hi\r\n")


def test_large_original_gives_headers_only_without_reading_it_all():
    head = ORIGINAL[:90]  # the caller read only the first bytes
    d = dsn.build_dsn(request(original_size=50 * 1024 * 1024, original_head=head, limit=90))
    assert d.headers_only
    assert d.include <= 90 and head[:d.include].endswith(b"\r\n")


def test_headers_only_message_without_body():
    msg = b"Subject: x\r\nFrom: a@b\r\n"
    d = dsn.build_dsn(request(ret="HDRS", original_size=len(msg), original_head=msg))
    assert d.include == len(msg)


def test_delay_warning():
    r = RecipientReport("bob@example.test", "delayed", "4.2.0", "450 4.2.0 busy",
                        "mx1.example.test", will_retry_until=NOW + 86400)
    d, data = render(request(recipients=[r]))
    assert d.subject.startswith("Delayed Mail")
    assert b"Action: delayed" in data and b"Will-Retry-Until: " in data


def test_utf8_addresses_use_rfc6533_types():
    r = RecipientReport("j\u00f6rg@example.test", "failed", "5.1.1", "550 5.1.1 no")
    d, data = render(request(recipients=[r]))
    assert d.utf8 and d.eight_bit
    assert b"message/global-delivery-status" in data
    assert "Final-Recipient: utf-8; j\u00f6rg@example.test".encode() in data


def test_eight_bit_original_marks_part_and_envelope():
    original = b"Subject: caf\xc3\xa9\r\n\r\nd\xc3\xa9j\xc3\xa0\r\n"
    d, data = render(request(original_size=len(original), original_head=original), original)
    assert d.eight_bit and b"Content-Transfer-Encoding: 8bit" in data
    env = dsn.dsn_envelope(request(), d, "Q2")
    assert env.body == "8BITMIME"


def test_envelope_is_from_null_sender_to_original_sender():
    req = request()
    d = dsn.build_dsn(req)
    env = dsn.dsn_envelope(req, d, "Q2")
    assert env.sender == "" and [r.address for r in env.recipients] == ["alice@example.org"]
    assert env.bounce_of == "Q1" and env.size == str(d.size)
    assert env.recipients[0].notify == "NEVER"


@pytest.mark.parametrize("reply,want", [
    ("550 5.1.1 No such user", "5.1.1"), ("550 No such user", "5.0.0"),
    ("452-4.2.2 Full", "4.2.2"), ("", "5.0.0")])
def test_status_of(reply, want):
    assert status_of(reply, "5.0.0") == want


def test_header_length():
    assert dsn.header_length(b"A: b\r\n\r\nbody", 13) == 6
    assert dsn.header_length(b"\r\nbody", 6) == 0
    assert dsn.header_length(b"A: b\r\nC: d", 100) == 6


def test_no_recipients_is_an_error():
    with pytest.raises(ValueError):
        dsn.build_dsn(request(recipients=[]))

"""Policies and the header block: pure, byte for byte."""

from __future__ import annotations

import pytest

from msa import config
from msa.cleanup import policies
from msa.cleanup.policies import (
    AddDateHeader,
    AddMessageIdHeader,
    AddReceivedHeader,
    Forward,
    RecipientDomainSplit,
    RemoveBccHeader,
)
from msa.message.headerblock import HeaderBlock, fold
from msa.message.headers import CONTINUATION, END_BODY, END_EMPTY, FIELD, line_kind
from msa.message.queuefile import Envelope, utc_iso


def _env(rcpts=("bob@example.test",), **kw):
    env = Envelope(sender="alice@example.org", queue_id="0123456789ABC000001000",
                   arrival=utc_iso(1_800_000_000), **kw)
    for r in rcpts:
        env.add_recipient(r)
    return env


def _headers(text=b"From: a@x\r\nSubject: hi\r\n"):
    return HeaderBlock.parse(text)


def test_line_kinds():
    assert line_kind(b"Subject: x\r\n", False) == FIELD
    assert line_kind(b" folded\r\n", True) == CONTINUATION
    assert line_kind(b" folded\r\n", False) == END_BODY
    assert line_kind(b"\r\n", True) == END_EMPTY
    assert line_kind(b"no colon here\r\n", True) == END_BODY
    assert line_kind(b"Bad Name: x\r\n", True) == END_BODY  # space in a field name


def test_header_block_keeps_bytes_and_folding():
    raw = b"Subject: a\r\n long \xc3\xa9\r\nX-A: 1\r\nx-a: 2\r\n"
    h = HeaderBlock.parse(raw)
    assert h.to_bytes() == raw
    assert h.get("subject") == "a long \u00e9"
    assert h.get_all("X-A") == ["1", "2"]
    assert h.remove("x-a") == 2
    assert h.to_bytes() == b"Subject: a\r\n long \xc3\xa9\r\n"


def test_missing_separator_is_inserted_only_with_fields():
    h = HeaderBlock.parse(b"Subject: x\r\n", missing_separator=True)
    assert h.to_bytes() == b"Subject: x\r\n\r\n"
    h = HeaderBlock.parse(b"", missing_separator=True)
    assert h.to_bytes() == b""
    h.prepend("Received", "by x")
    assert h.to_bytes() == b"Received: by x\r\n\r\n"


def test_fold_keeps_lines_short():
    data = fold("Received", " ".join(["word%d" % i for i in range(100)]))
    assert all(len(line) <= 78 for line in data.split(b"\r\n"))
    assert data.endswith(b"\r\n") and data.count(b"\r\n\t") > 3


def test_date_added_only_when_missing():
    h = _headers()
    AddDateHeader().apply(_env(), h)
    date = h.get("date")
    assert date and "2027" in date  # 1_800_000_000 is in January 2027
    h2 = _headers(b"Date: Mon, 1 Jan 2001 00:00:00 +0000\r\n")
    AddDateHeader().apply(_env(), h2)
    assert h2.get_all("date") == ["Mon, 1 Jan 2001 00:00:00 +0000"]


def test_message_id_added_only_when_missing():
    h = _headers()
    AddMessageIdHeader("msa.test").apply(_env(), h)
    assert h.get("message-id") == "<0123456789ABC000001000@msa.test>"
    h2 = _headers(b"Message-Id: <x@y>\r\n")
    AddMessageIdHeader("msa.test").apply(_env(), h2)
    assert h2.get_all("message-id") == ["<x@y>"]


def test_received_for_smtp_with_tls_and_auth():
    env = _env(origin="smtp", helo="laptop.example", client_name="host.example",
               client_address="192.0.2.7", tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
               auth_user="alice")
    h = _headers()
    AddReceivedHeader("msa.test").apply(env, h)
    assert h.fields[0].startswith(b"Received: from laptop.example (host.example [192.0.2.7])")
    value = h.get("received")
    assert "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)" in value
    assert "(authenticated as alice)" in value
    assert "by msa.test (msa) with ESMTPSA id 0123456789ABC000001000" in value
    assert "for <bob@example.test>;" in value
    assert value.endswith(policies.rfc5322_date(env))


def test_received_hides_recipients_when_several_and_names_protocol():
    env = _env(rcpts=("a@x.test", "b@y.test"), origin="smtp", client_address="::1")
    h = _headers()
    AddReceivedHeader("h").apply(env, h)
    value = h.get("received")
    assert "for <" not in value and "with ESMTP id" in value
    assert "(unknown [::1])" in value


def test_received_for_a_message_made_here_names_no_client():
    """A DSN (origin dsn, no client): "by host (msa) id Q;", not "from
    unknown (unknown [])", whose empty address literal RFC 5321 forbids."""
    env = _env(origin="dsn")
    h = _headers()
    AddReceivedHeader("msa.test").apply(env, h)
    value = h.get("received")
    assert value.startswith("by msa.test (msa) id 0123456789ABC000001000; "), value
    assert "[]" not in value and "from " not in value


def test_received_for_local_mail():
    env = _env(origin="local", local_user="bob", local_uid="1000")
    h = _headers()
    AddReceivedHeader("msa.test").apply(env, h)
    assert h.get("received").startswith(
        "by msa.test (msa, from userid 1000) id 0123456789ABC000001000; ")


def test_remove_bcc():
    h = _headers(b"To: a@x\r\nBcc: hidden@x,\r\n other@y\r\nResent-Bcc: z@z\r\nbcc: q@q\r\n")
    RemoveBccHeader().apply(_env(), h)
    assert h.to_bytes() == b"To: a@x\r\n"


def test_forward_rewrites_aliases_and_dedupes():
    fwd = Forward([(r"^postmaster@example\.org$", "admin@example.org"),
                   (r"^team@example\.org$", "a@x.test, b@y.test, admin@EXAMPLE.ORG"),
                   (r"@old\.example$", "@new.example")])
    env = _env(rcpts=("postmaster@example.org", "team@example.org", "joe@old.example",
                      "carol@z.test"))
    env.recipients[3].notify = "FAILURE"
    fwd.apply(env, _headers())
    assert [r.address for r in env.recipients] == [
        "admin@example.org", "a@x.test", "b@y.test", "joe@new.example", "carol@z.test"]
    assert env.recipients[0].orcpt == "rfc822;postmaster@example.org"
    assert env.recipients[4].notify == "FAILURE" and env.recipients[4].orcpt == ""


def test_forward_ignores_a_rule_that_yields_garbage():
    env = _env(rcpts=("x@a.test",))
    Forward([("x@a.test", "bad\r\naddress")]).apply(env, _headers())
    assert [r.address for r in env.recipients] == ["x@a.test"]


def test_forward_bad_pattern_is_a_config_error():
    with pytest.raises(config.ConfigError):
        Forward([("(", "x")])


def test_split_by_domain_keeps_order_and_ids():
    env = _env(rcpts=("a@one.test", "b@two.test", "c@ONE.test", "d@three.test"))
    parts = RecipientDomainSplit().apply(env, _headers())
    assert [p.queue_id for p in parts] == [f"{env.queue_id}-{i}" for i in (1, 2, 3)]
    assert [[r.address for r in p.recipients] for p in parts] == [
        ["a@one.test", "c@ONE.test"], ["b@two.test"], ["d@three.test"]]
    assert RecipientDomainSplit().apply(_env(rcpts=("a@x", "b@X")), _headers()) is None


def test_pipeline_from_config():
    cfg = config.from_dict({"server": {"hostname": "h"},
                            "policies": {"add_date": False,
                                         "forward": [["a", "b"]]}})
    pipe = policies.pipeline(cfg)
    assert [s for s, _ in pipe] == ["policy-headers", "policy-forward", "policy-split"]
    assert [type(p).__name__ for p in pipe[0][1]] == [
        "AddReceivedHeader", "AddMessageIdHeader", "RemoveBccHeader"]
    assert isinstance(pipe[1][1][0], Forward)
    cfg.policies.forward = [["only-one"]]
    with pytest.raises(config.ConfigError):
        policies.pipeline(cfg)
    cfg.policies.forward = []
    cfg.policies.stages = ["nonsense"]
    with pytest.raises(config.ConfigError):
        policies.pipeline(cfg)


def test_split_must_be_last():
    with pytest.raises(config.ConfigError):
        policies.check_stage("x", [RecipientDomainSplit(), RemoveBccHeader()])

"""ENVID from each of its three inputs (SMTP submission, ``sendmail -bs``,
``sendmail -V``) is kept in the queue file as xtext (msa-spool(5)) and
reaches the relay's MAIL command as the same valid xtext: ``a+b`` is
``ENVID=a+2Bb`` on the wire whichever way it came in (it used to be relayed
as ``ENVID=a+b`` after -bs, which is not xtext)."""

from __future__ import annotations

import asyncio

import pytest

from msa.cleanup import maildrop
from msa.delivery.relay import MxSmtpRelay
from msa.message import queuefile
from msa.protocol import xtext
from msa.submission.sendmail_args import UsageError, parse_envid
from tests import support
from tests.e2e.test_relay import attempt_and_close
from tests.edge_support import Edges, read_queued
from tests.relay_support import start_smtp_sink, stop_smtp_sink
from tests.sendmail_support import make_config, only_message, sendmail

WIRE = "ENVID=a+2Bb"
MSG = b"From: alice@example.org\r\nSubject: envid\r\n\r\nhi\r\n"


@pytest.fixture
def sink():
    """Postfix's smtp-sink: it offers DSN (aiosmtpd refuses ENVID) and
    dumps each transaction with its MAIL arguments (X-Mail-Args)."""
    proc, port, dump = start_smtp_sink()
    yield port, dump
    stop_smtp_sink(proc, dump)


def _relayed_options(sink, env: queuefile.Envelope, message: bytes) -> list[str]:
    port, dump = sink
    env.recipients = [queuefile.Recipient("bob@x.test")]
    relay = MxSmtpRelay(force_mx={"x.test": f"127.0.0.1:{port}"}, ehlo_as="msa.test",
                        connect_timeout=10, command_timeout=10, data_timeout=10)
    results = asyncio.run(attempt_and_close(relay, env, message))
    assert [r.state for r in results] == ["sent"], results
    [path] = support.wait_for(lambda: list(dump.iterdir()), what="the dumped message")
    args = [line for line in path.read_text().splitlines() if line.startswith("X-Mail-Args: ")]
    return args[0].split()[2:]


def test_from_smtp_submission(tmp_path, ca, sink):
    e = Edges(tmp_path, ca)
    try:
        c = e.session("alice")
        assert c.cmd("MAIL FROM:<alice@example.org> ENVID=a+2Bb").startswith("250")
        assert c.cmd("RCPT TO:<bob@x.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.send(MSG + b".\r\n")
        assert c.reply().startswith("250")
        [path] = e.queued()
    finally:
        e.stop()
    env, message = read_queued(path)
    assert env.envid == "a+2Bb"
    assert WIRE in _relayed_options(sink, env, message)


def test_from_sendmail_bs(tmp_path, sink):
    cfg = make_config(tmp_path)
    dialogue = (b"EHLO x\r\nMAIL FROM:<alice@example.org> ENVID=a+2Bb\r\nRCPT TO:<bob@x.test>\r\n"
                b"DATA\r\n" + MSG + b".\r\nQUIT\r\n")
    p = sendmail(["-bs"], dialogue, cfg)
    assert p.returncode == 0, p.stderr
    q = only_message(cfg)
    assert q.env.envid == "a+2Bb"
    assert WIRE in _relayed_options(sink, q.env, q.message)


def test_from_sendmail_V(tmp_path, sink):
    cfg = make_config(tmp_path)
    p = sendmail(["-V", "a+b", "-f", "alice@example.org", "bob@x.test"], MSG, cfg)
    assert p.returncode == 0, p.stderr
    q = only_message(cfg)
    assert q.env.envid == "a+2Bb"
    assert WIRE in _relayed_options(sink, q.env, q.message)


@pytest.mark.parametrize("raw", ["a+b", "x=y", "plain", "+++", "~!"])
def test_xtext_round_trip(raw):
    encoded = xtext.encode(raw)
    assert xtext.is_xtext(encoded) and xtext.decode(encoded) == raw
    assert parse_envid(raw) == encoded


def test_lower_case_hex_is_not_xtext_anywhere():
    assert not xtext.is_xtext("a+2bb")
    raw = queuefile.Envelope(sender="a@example.org", envid="a+2bb", size="0")
    raw.add_recipient("b@x.test")
    import pwd
    env = maildrop.sanitise(raw, pwd.getpwuid(0), "example.org")
    assert env.envid == ""  # a maildrop file's bad ENVID is dropped, not relayed


def test_V_longer_than_100_as_xtext_is_refused():
    with pytest.raises(UsageError):
        parse_envid("+" * 34)  # 102 characters encoded
    assert len(parse_envid("+" * 33)) == 99

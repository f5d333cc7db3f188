"""``sendmail -bs``: SMTP on standard input/output, driven by a subprocess
writing SMTP lines (pipelined) and by swaks ``--pipe``."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from msa.submission.bsmtp import LocalSmtp
from tests import sendmail_support as ss
from tests import support


@pytest.fixture
def cfg(tmp_path):
    return ss.make_config(tmp_path)


def _dialogue(cfg, data: bytes) -> list[str]:
    r = ss.sendmail(["-bs"], data, cfg)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().split("\r\n")


def test_state_machine_order_and_codes():
    s = LocalSmtp("msa.test", "example.org", 1000)
    assert s.command("RCPT TO:<a@x>").code == 503
    assert s.command("DATA").code == 503
    assert s.command("MAIL FROM:<a@x.test> SIZE=5000").code == 552
    assert s.command("MAIL FROM:<a@x.test> FROB=1").code == 555
    assert s.command("MAIL FROM:<a b@x.test>").code == 501
    assert s.command("MAIL FROM: <a@x.test> BODY=8BITMIME ENVID=a+2Bb").code == 250
    # ENVID stays xtext, as the edge keeps it (msa-spool(5)): relayed as given.
    assert s.txn.params == {"BODY": "8BITMIME", "ENVID": "a+2Bb"}
    assert s.command("MAIL FROM:<b@x.test>").code == 503
    assert s.command("DATA").code == 503
    assert s.command("RCPT TO:<root> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;root").code == 250
    assert s.txn.recipients == [("root@example.org",
                                 {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;root"})]
    assert s.command("DATA").action == "data"
    assert s.command("RSET").code == 250 and s.txn is None
    assert s.command("XYZZY").code == 500
    assert s.command("STARTTLS").code == 502
    assert s.command("QUIT").action == "quit"


def test_pipelined_dialogue_two_messages_crlf_and_lf(cfg):
    data = (b"EHLO client.test\r\n"
            b"MAIL FROM:<alice@x.test>\r\nRCPT TO:<bob@y.test>\r\nRCPT TO:<carol>\r\nDATA\r\n"
            b"From: alice@x.test\r\nBcc: hidden@y.test\r\nSubject: one\r\n\r\n"
            b"..leading dot\r\n.\r\n"
            # The second message uses bare LF lines, as a shell here-doc would.
            b"MAIL FROM:<>\nRCPT TO:<dave@y.test> NOTIFY=NEVER\nDATA\nSubject: two\n\nline\n.\n"
            b"NOOP\r\nQUIT\r\n")
    replies = _dialogue(cfg, data)
    codes = [line[:3] for line in replies if line[3:4] == " "]
    assert codes == ["220", "250", "250", "250", "250", "354", "250",
                     "250", "250", "354", "250", "250", "221"], replies
    assert "250-PIPELINING" in replies and "250-8BITMIME" in replies
    queued = ss.maildrop(cfg)
    assert len(queued) == 2
    one, two = queued
    assert one.env.sender == "alice@x.test"
    assert one.recipients() == ["bob@y.test", "carol@example.org"]
    assert one.message == b"From: alice@x.test\r\nSubject: one\r\n\r\n.leading dot\r\n"
    assert two.env.sender == "" and two.env.recipients[0].notify == "NEVER"
    assert two.message == b"Subject: two\r\n\r\nline\r\n"
    assert f"250 2.0.0 Ok: queued as {one.path.name}" in replies
    assert one.env.local_user == "root" and one.env.origin == "local"


def test_input_ending_inside_data_queues_nothing(cfg):
    r = ss.sendmail(["-bs"], b"HELO a\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
                             b"DATA\r\nSubject: cut\r\n\r\nno end", cfg)
    assert r.returncode == 65
    assert ss.maildrop(cfg) == []
    assert list((ss.spool_root(cfg) / "tmp").iterdir()) == []


def test_interactive_replies_come_before_the_next_command(cfg):
    """A client that waits for each reply (no pipelining) is not stuck."""
    p = subprocess.Popen([sys.executable, ss.SENDMAIL, "-bs"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=support.msa_env(cfg))
    try:
        def say(line: bytes) -> str:
            p.stdin.write(line)
            p.stdin.flush()
            return p.stdout.readline().decode()
        assert p.stdout.readline().startswith(b"220 ")
        assert say(b"HELO me\r\n").startswith("250 ")
        assert say(b"MAIL FROM:<a@x.test>\r\n").startswith("250 ")
        assert say(b"RCPT TO:<b@x.test>\r\n").startswith("250 ")
        assert say(b"DATA\r\n").startswith("354 ")
        assert say(b"Subject: i\r\n\r\nhi\r\n.\r\n").startswith("250 2.0.0 Ok: queued as ")
        assert say(b"QUIT\r\n").startswith("221 ")
        assert p.wait(30) == 0
    finally:
        p.kill()
        p.wait()
    assert ss.only_message(cfg).message == b"Subject: i\r\n\r\nhi\r\n"


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed")
def test_swaks_pipe(cfg):
    r = subprocess.run(["swaks", "--pipe", f"{sys.executable} {ss.SENDMAIL} -bs",
                        "--from", "swaks@x.test", "--to", "one@y.test,two@y.test",
                        "--header", "Subject: via swaks", "--body", "swaks body\n.dot line"],
                       capture_output=True, env=support.msa_env(cfg), timeout=60)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "<-  250 2.0.0 Ok: queued as" in out
    q = ss.only_message(cfg)
    assert q.env.sender == "swaks@x.test"
    assert q.recipients() == ["one@y.test", "two@y.test"]
    assert b"Subject: via swaks\r\n" in q.header_block()
    # swaks dot-stuffs ".dot line"; it arrives unstuffed (swaks adds empty lines after)
    assert q.body().rstrip(b"\r\n") == b"swaks body\r\n.dot line"

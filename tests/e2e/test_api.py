"""The tutorial from Python: examples/tutorial.py runs and takes mail;
Queue, SpoolStorage and system helpers on their own."""

from __future__ import annotations

import pwd
import smtplib
import ssl
import subprocess
import sys

import pytest

from msa.cleanup import policies
from msa.queue import Queue, SpoolStorage
from tests import support
from tests.daemon_support import numbered_message


def test_queue_policies_become_ordered_stages(tmp_path):
    q = Queue(SpoolStorage(str(tmp_path / "spool")))
    q.add_policy(policies.AddDateHeader())
    q.add_policy(policies.Forward([("a", "b")]))
    q.add_policy(policies.Forward([("c", "d")]))
    q.add_policy(policies.RecipientDomainSplit())
    assert [s for s, _ in q.pipeline()] == [
        "policy-date", "policy-forward", "policy-forward2", "policy-split"]
    assert q.spool.stages == ["maildrop", "incoming", "policy-date", "policy-forward",
                              "policy-forward2", "policy-split", "active"]
    assert (tmp_path / "spool" / "policy-forward2").is_dir()
    with pytest.raises(RuntimeError):
        q.add_policy(policies.RemoveBccHeader())


def test_api_names_resolve():
    from msa import api
    for name in api._NAMES:
        assert getattr(api, name) is not None, name
    assert api.system.drop_privileges is api.drop_privileges


def test_drop_privileges_and_redirect_stdio(tmp_path):
    out = tmp_path / "out"
    code = f"""
import os
from msa import system
system.redirect_stdio(stdout={str(out)!r})  # before: nobody cannot enter tmp_path
assert system.drop_privileges("nobody")
print(os.getuid(), os.getgid(), os.getgroups())
try:
    os.setuid(0)
except PermissionError:
    print("cannot regain root")
"""
    proc = subprocess.run([sys.executable, "-c", code], env=support.msa_env(), cwd=support.ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    nobody = pwd.getpwnam("nobody")
    assert out.read_text().split("\n")[:2] == [
        f"{nobody.pw_uid} {nobody.pw_gid} [{nobody.pw_gid}]", "cannot regain root"]


class _Sink:
    """An aiosmtpd server on loopback that keeps what it receives."""

    def __init__(self):
        from aiosmtpd.controller import Controller
        self.received = []
        self.port = support.free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    async def handle_DATA(self, server, session, envelope):
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok"

    def stop(self):
        self.controller.stop()


def test_tutorial_example_takes_and_relays_mail(tmp_path, ca):
    port, ssl_port = support.free_port(), support.free_port()
    sink = _Sink()
    env = support.msa_env(MSA_TUTORIAL_SPOOL=str(tmp_path / "spool"),
                          MSA_TUTORIAL_CERT=str(ca.cert_pem), MSA_TUTORIAL_KEY=str(ca.key_pem),
                          MSA_TUTORIAL_PORT=str(port), MSA_TUTORIAL_SSL_PORT=str(ssl_port),
                          MSA_TUTORIAL_HOST="127.0.0.1", MSA_TUTORIAL_USER="",
                          MSA_TUTORIAL_KEEP_STDIO="1",
                          MSA_TUTORIAL_FORCE_MX=f"one.test=127.0.0.1:{sink.port},"
                                                f"two.test=127.0.0.1:{sink.port}")
    proc = support.Proc([sys.executable, str(support.ROOT / "examples" / "tutorial.py")],
                        env=env)
    try:
        support.wait_port(port)
        support.wait_port(ssl_port)
        ctx = ssl.create_default_context(cafile=str(ca.ca_pem))
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.starttls(context=ctx)
            code, _ = s.mail("testuser@example.org")
            assert code >= 500  # not authenticated
            s.rset()
            s.login("testuser", "testpassword")
            s.sendmail("testuser@example.org", ["bob@one.test", "carol@two.test"],
                       numbered_message("testuser@example.org", "bob@one.test", 1))
        with smtplib.SMTP_SSL("127.0.0.1", ssl_port, context=ctx, timeout=20) as s:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("testuser", "wrong")
        support.wait_for(lambda: len(sink.received) == 2, timeout=30, what="two deliveries")
    finally:
        code = proc.stop()
        sink.stop()
    assert code == 0, proc.output()
    # RecipientDomainSplit: one delivery per domain; the policies ran once.
    assert sorted(r for _, rcpts, _ in sink.received for r in rcpts) == [
        "bob@one.test", "carol@two.test"]
    for sender, _, content in sink.received:
        assert sender == "testuser@example.org"
        assert content.count(b"Received: from ") == 1 and b"(authenticated as testuser)" in content
        assert b"by mail.example.org (msa) with ESMTPSA" in content
        assert content.count(b"\r\nDate: ") == 1 and b"Message-ID: <" in content
        assert content.endswith(b"message number 1\r\n")

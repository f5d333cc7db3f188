"""A Postfix administrator's tools read msa's log unchanged: a day's mix
through ``msa daemon`` (sent, deferred, bounced with its notice delivered,
a rejected sender, failed logins from three addresses, one address past
its AUTH budget, one over its connection rate), then the real
``pflogsumm --syslog-name=msa`` counts what was done, and the real
``fail2ban-regex`` with the shipped filters (contrib/fail2ban: Debian's
stock postfix filter with msa's daemon names; msa-limits for the limit
lines Postfix's anvil would write) matches every failed login, every
refused AUTH and every limit block with the right address."""

from __future__ import annotations

import base64
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess

import pytest

from msa import config
from msa.store import open_spool
from tests import support
from tests.daemon_support import add_user, start_daemon, write_daemon_config
from tests.relay_support import Sink

STOCK = "/etc/fail2ban/filter.d"
MSG = b"From: alice@example.org\r\nSubject: day\r\nMessage-ID: <%d@example.org>\r\n\r\nhi\r\n"


def _tool(name: str) -> str:
    for path in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if path and os.path.exists(path):
            return path
    pytest.skip(f"{name} not installed")


def _login(port, ca, source="127.0.0.1"):
    ctx = ssl.create_default_context(cafile=str(ca.ca_pem))
    s = smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0))
    s.starttls(context=ctx)
    s.ehlo("client.test")
    return s


def _wrong(port, ca, source: str, tries: int) -> list[int]:
    s = _login(port, ca, source)
    codes = []
    token = base64.b64encode(b"\0alice\0wrong").decode()
    for _ in range(tries):
        codes.append(s.docmd("AUTH", f"PLAIN {token}")[0])
    s.close()
    return codes


@pytest.fixture
def day_log(tmp_path, ca):
    """The log of a day's mix, and what was done."""
    sink = Sink().start()
    sink.rules = {"busy@x.test": "450 4.2.1 Mailbox busy", "gone@x.test": "550 5.1.1 No such user"}
    ports = support.free_port(), support.free_port()
    log = tmp_path / "msa.log"
    path = write_daemon_config(
        tmp_path, ca, *ports,
        edge="max_auth_failures_per_client = 3\nauth_failure_delay = 0\nmax_errors = 100\n"
             "max_auth_failures = 10\nmax_connection_rate_per_client = 4\n"
             "rate_window = 3600\n",
        extra=f'log = "{log}"\nprocesses = false\n\n[retry]\nmin_delay = 3600\n'
              f'max_delay = 3600\njitter = 0\n')
    text = path.read_text().replace(
        'force_mx = { "example.test"',
        f'force_mx = {{ "x.test" = "127.0.0.1:{sink.port}", '
        f'"example.org" = "127.0.0.1:{sink.port}", "example.test"')
    path.write_text(text)
    add_user(tmp_path / "passwd", "alice", "alice-pw", ["alice@example.org"])
    sp = open_spool(config.load(str(path)))
    proc = start_daemon(path)
    # Rejected: the sender alice does not own, and .23's two refused AUTHs.
    done = {"received": 3, "rejected": 3}
    try:
        support.wait_port(ports[0])
        s = _login(ports[0], ca)
        s.login("alice", "alice-pw")
        for n, rcpt in enumerate(["ok@x.test", "busy@x.test", "gone@x.test"]):
            s.sendmail("alice@example.org", [rcpt], MSG % n)
        with pytest.raises(smtplib.SMTPSenderRefused):
            s.sendmail("mallory@evil.test", ["ok@x.test"], MSG % 9)
        s.quit()
        # Failed logins: 2 from .21, 1 from .22; .23 spends its budget of 3
        # and gets 454 twice more.
        assert _wrong(ports[0], ca, "127.0.0.21", 2) == [535, 535]
        assert _wrong(ports[0], ca, "127.0.0.22", 1) == [535]
        assert _wrong(ports[0], ca, "127.0.0.23", 5) == [535, 535, 535, 454, 454]
        # .24 connects six times: the fifth and sixth are over its rate.
        greetings = []
        for _ in range(6):
            with socket.create_connection(("127.0.0.1", ports[0]), timeout=30,
                                          source_address=("127.0.0.24", 0)) as c:
                greetings.append(c.makefile("rb").readline()[:9])
        assert greetings == [b"220 msa.t"] * 4 + [b"421 4.7.0"] * 2

        def settled():
            t = log.read_text() if log.exists() else ""
            return (t.count("status=sent") == 2 and "status=deferred" in t
                    and "status=bounced" in t and "queue active" in t)
        support.wait_for(settled, timeout=60, what="deliveries logged")
        assert len(sink.messages) == 2        # ok@x.test and the notice
    finally:
        proc.stop()
        sink.stop()
    assert sp.deferred_stages()
    done.update(delivered=2, deferred=1, bounced=1)
    failed = {"127.0.0.21": 2, "127.0.0.22": 1, "127.0.0.23": 3}
    refused = {"127.0.0.23": 2}
    limited = {"127.0.0.23": 1, "127.0.0.24": 2}   # one AUTH block, two over the rate
    return log, done, failed, refused, limited


def test_pflogsumm_counts_what_was_done(day_log):
    log, done, *_ = day_log
    r = subprocess.run([_tool("pflogsumm"), "--syslog-name=msa", str(log)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    counts = {}
    for what in ("received", "delivered", "deferred", "bounced", "rejected"):
        m = re.search(rf"^\s+(\d+)\s+{what}\b", r.stdout, re.M)
        assert m, (what, r.stdout)
        counts[what] = int(m.group(1))
    assert counts == done, r.stdout


def _filter_dir(tmp_path) -> str:
    if not os.path.exists(f"{STOCK}/postfix.conf"):
        pytest.skip("fail2ban's stock filters are not installed")
    conf = tmp_path / "fail2ban"
    (conf / "filter.d").mkdir(parents=True, exist_ok=True)
    for name in ("common.conf", "postfix.conf"):
        shutil.copy(f"{STOCK}/{name}", conf / "filter.d" / name)
    for name in ("msa.conf", "msa-limits.conf"):
        shutil.copy(support.ROOT / "contrib" / "fail2ban" / "filter.d" / name,
                    conf / "filter.d" / name)
    return str(conf)


def _matched(tmp_path, log, name: str) -> dict[str, int]:
    r = subprocess.run([_tool("fail2ban-regex"), "--config", _filter_dir(tmp_path),
                        "--print-all-matched", "--raw", str(log), name],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    hosts: dict[str, int] = {}
    for line in r.stdout.splitlines():
        m = re.search(r"\|\s+(\S+ \d+ [\d:]+ .*)$", line)
        if m:
            ip = re.search(r"\[(\d+\.\d+\.\d+\.\d+)\]", m.group(1)).group(1)
            hosts[ip] = hosts.get(ip, 0) + 1
    return hosts


def test_fail2ban_matches_every_failed_login_with_its_address(day_log, tmp_path):
    log, _, failed, refused, _ = day_log
    assert _matched(tmp_path, log, "msa[mode=auth]") == failed
    both = {ip: failed.get(ip, 0) + refused.get(ip, 0) for ip in failed}
    assert _matched(tmp_path, log, "msa[mode=extra]") == both


def test_fail2ban_matches_every_limit_block_with_its_address(day_log, tmp_path):
    log, *_, limited = day_log
    assert _matched(tmp_path, log, "msa-limits") == limited

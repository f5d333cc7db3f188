"""The pure pieces of msa's Postfix-shaped log lines: the disconnect
summary, which replies are logged as rejects, the daemon names."""

from __future__ import annotations

import logging

from msa.process.logs import Format, daemon_name
from msa.submission.session import _refusal_kind, command_tally


def test_command_tally_is_postfix_s():
    assert command_tally({"quit": [1, 1]}) == "quit=1 commands=1"
    assert command_tally({"auth": [0, 3], "ehlo": [2, 2], "starttls": [1, 1], "quit": [1, 1]}) \
        == "ehlo=2 starttls=1 auth=0/3 quit=1 commands=4/7"
    assert command_tally({"unknown": [0, 2], "xyzzy": [1, 1]}) == \
        "unknown=0/2 xyzzy=1 commands=1/3"
    assert command_tally({}) == "commands=0"


def test_which_replies_are_rejects():
    assert _refusal_kind("MAIL", "553 5.7.1 <x>: Sender address rejected") == "reject"
    assert _refusal_kind("RCPT", "452 4.5.3 Error: too many recipients") == "reject"
    assert _refusal_kind("AUTH", "454 4.7.0 Client host rejected: x") == "reject"
    assert _refusal_kind("XCMD", "500 5.5.1 Error: command not recognized") == "protocol error"
    assert _refusal_kind("MAIL", "503 5.5.1 Error: need HELO") == "protocol error"
    assert _refusal_kind("AUTH", "535 5.7.8 Authentication credentials invalid") is None


def test_daemon_names_and_level_prefixes():
    assert [daemon_name(n) for n in ("msa.edge", "msa.watcher", "msa.pickup", "msa.runner",
                                     "msa.smtp", "msa.bounce", "msa.daemon", "msa.other",
                                     "spool")] == [
        "msa/smtpd", "msa/cleanup", "msa/pickup", "msa/qmgr", "msa/smtp", "msa/bounce",
        "msa/master", "msa/other", "msa/cleanup"]
    fmt = Format("%(component)s: %(message)s")
    record = logging.makeLogRecord({"name": "msa.edge", "levelno": logging.WARNING,
                                    "msg": "unknown[1.2.3.4]: SASL PLAIN authentication "
                                           "failed: user=a\nb"})
    assert fmt.format(record) == ("msa/smtpd: warning: unknown[1.2.3.4]: SASL PLAIN "
                                  "authentication failed: user=a\\nb")
    record = logging.makeLogRecord({"name": "msa.runner", "levelno": logging.INFO, "msg": "x"})
    assert Format("%(message)s", priority=True).format(record) == "<6>x"


def test_delays_figures():
    from msa.delivery.runner import _fig
    assert [_fig(x) for x in (0, 0.004, 0.011, 0.06, 1.2, 1.234, 9.999, 37.4, -1)] == [
        "0", "0", "0.01", "0.06", "1.2", "1.23", "10", "37", "0"]

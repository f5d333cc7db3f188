"""``msa daemon`` as a real process with real clients: kill -9 while a
client submits, SIGTERM with a transaction in flight, SIGHUP with a new
user and an open connection, the control socket."""

from __future__ import annotations

import os
import random
import signal
import smtplib
import socket
import threading
import time

import pytest

from msa import config
from msa.admin.control import send_control
from msa.store import open_spool
from tests import support
from tests.daemon_support import (
    add_user,
    numbered_message,
    smtp_login,
    spooled_seqs,
    start_daemon,
    write_daemon_config,
)

COMMAND = os.environ.get("MSA_TEST_DAEMON_COMMAND", "daemon")


@pytest.fixture
def setup(tmp_path, ca):
    ports = support.free_port(), support.free_port()
    path = write_daemon_config(tmp_path, ca, *ports)
    add_user(tmp_path / "passwd", "alice", "alice-pw", ["alice@example.org"])
    cfg = config.load(str(path))
    return path, cfg, ports


class _Submitter(threading.Thread):
    """Submits numbered messages in a loop over STARTTLS + AUTH, noting
    which got 250; reconnects after errors until told to stop."""

    def __init__(self, port, ca, first):
        super().__init__(daemon=True)
        self.port, self.ca, self.n = port, ca, first
        self.acked: list[int] = []
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                s = smtp_login(self.port, self.ca, "alice", "alice-pw")
                while not self.halt.is_set():
                    self.n += 1
                    s.sendmail("alice@example.org", ["bob@example.test"],
                               numbered_message("alice@example.org", "bob@example.test", self.n))
                    self.acked.append(self.n)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)


def test_kill_9_while_submitting_loses_no_acknowledged_message(setup, ca):
    path, cfg, (port, _) = setup
    sp = open_spool(cfg)
    rng = random.Random(99)
    acked: list[int] = []
    for round_ in range(4):
        proc = start_daemon(path, COMMAND)
        sub = _Submitter(port, ca, first=round_ * 100_000)
        try:
            support.wait_port(port)
            sub.start()
            support.wait_for(lambda: len(sub.acked) >= 3, timeout=30, what="some 250s")
            time.sleep(rng.uniform(0.0, 0.5))
            os.killpg(proc.p.pid, signal.SIGKILL)
            proc.p.wait(10)
        finally:
            sub.halt.set()
            if sub.is_alive():
                sub.join(30)
            proc.stop()
        acked += sub.acked
        found = spooled_seqs(sp)  # every file in the spool is whole
        missing = [n for n in acked if n not in found]
        assert not missing, f"acknowledged but not in the spool: {missing[:10]}"
    assert list(sp.names("corrupt")) == []
    assert len(acked) >= 12


def test_sigterm_lets_a_transaction_finish_and_exits_0(setup, ca):
    path, cfg, (port, _) = setup
    proc = start_daemon(path, COMMAND)
    try:
        support.wait_port(port)
        s = smtp_login(port, ca, "alice", "alice-pw")
        assert s.mail("alice@example.org")[0] == 250
        assert s.rcpt("bob@example.test")[0] == 250
        assert s.docmd("DATA")[0] == 354
        os.kill(proc.p.pid, signal.SIGTERM)
        # The daemon is stopping (its listeners are closed) while the
        # client is still sending DATA.
        support.wait_for(lambda: _refused(port), timeout=30, what="listeners closed")
        s.send(numbered_message("alice@example.org", "bob@example.test", 7) + b".\r\n")
        code, _ = s.getreply()
        assert code == 250
        assert proc.p.wait(30) == 0
    finally:
        out = proc.output()
    assert "stopped" in out, out
    assert 7 in spooled_seqs(open_spool(cfg))
    with pytest.raises(OSError):
        support.wait_port(port, timeout=0.5)


def test_sighup_reload_new_user_and_open_connection_survives(setup, ca, tmp_path):
    path, cfg, (port, ssl_port) = setup
    proc = start_daemon(path, COMMAND)
    try:
        support.wait_port(port)
        old = smtp_login(port, ca, "alice", "alice-pw")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp_login(ssl_port, ca, "carol", "carol-pw", implicit=True)
        add_user(tmp_path / "passwd", "carol", "carol-pw", ["carol@example.org"])
        os.kill(proc.p.pid, signal.SIGHUP)
        support.wait_for(lambda: b"reloaded" in _peek(proc), what="reload logged")
        new = smtp_login(ssl_port, ca, "carol", "carol-pw", implicit=True)
        new.sendmail("carol@example.org", ["x@example.test"],
                     numbered_message("carol@example.org", "x@example.test", 2))
        old.sendmail("alice@example.org", ["x@example.test"],
                     numbered_message("alice@example.org", "x@example.test", 1))
        old.quit()
        new.quit()
        assert {1, 2} <= set(spooled_seqs(open_spool(cfg)))
    finally:
        code = proc.stop()
        rest = proc.p.stdout.read().decode()
        assert code == 0, _peek(proc).decode() + rest


def test_control_socket_status_and_flush(setup):
    path, cfg, (port, _) = setup
    proc = start_daemon(path, COMMAND)
    try:
        support.wait_port(port)
        status = support.wait_for(lambda: send_control(cfg, "status"), what="control socket")
        assert status.startswith(f"ok pid={proc.p.pid} components=edge,watch,deliver")
        assert send_control(cfg, "flush") == "ok flushing"
        assert send_control(cfg, "reload") == "ok reloaded"
    finally:
        assert proc.stop() == 0
    assert send_control(cfg, "status") is None
    assert not os.path.exists(cfg.control_socket())


_peeked: dict[int, bytes] = {}


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return True
    return False


def _peek(proc) -> bytes:
    """Output of a running daemon so far (non-blocking read)."""
    fd = proc.p.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        data = b""
    _peeked[proc.p.pid] = _peeked.get(proc.p.pid, b"") + (data or b"")
    return _peeked[proc.p.pid]

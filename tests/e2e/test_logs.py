"""Where ``msa daemon`` logs and in what shape (msa.process.logs): Postfix's
line with a host field and Postfix's daemon names in a file; the file
reopened after it was moved (by hand and by the real logrotate with
contrib/logrotate/msa); syslog over a real datagram socket, and a syslog
that is not there or goes away (one notice on stderr, lines on stderr);
--detach refusing to lose lines; journald's priority prefixes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from tests import support
from tests.daemon_support import start_daemon, write_daemon_config
from tests.edge_support import RawClient

LINE = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d (\S+) msa/(\w+)\[(\d+)\]: (.*)$")


def _daemon(tmp_path, ca, log: str, env: dict | None = None, **kw):
    """``msa daemon`` in one process (the lines' pid is its pid)."""
    ports = support.free_port(), support.free_port()
    path = write_daemon_config(tmp_path, ca, *ports,
                               extra=f'log = "{log}"\nprocesses = false\n')
    (tmp_path / "passwd").write_text("")
    if env is None and not kw:
        return start_daemon(path), ports[0]
    argv = [sys.executable, str(support.BIN / "msa"), "daemon", "--config", str(path)]
    return support.Proc(argv, env=support.msa_env(**(env or {})), **kw), ports[0]


def _reject(port: int, word: str) -> None:
    """One INFO line: a command the edge refuses (NOQUEUE: protocol error: ...)."""
    c = RawClient(port)
    c.cmd("EHLO logs.test")
    assert c.cmd(f"X{word}").startswith("500")
    c.close()


def _text(path) -> str:
    return path.read_text() if path.exists() else ""


def test_file_lines_are_postfix_shaped_and_the_file_is_reopened_when_moved(tmp_path, ca):
    log = tmp_path / "msa.log"
    proc, port = _daemon(tmp_path, ca, str(log))
    try:
        support.wait_port(port)
        _reject(port, "ONE")
        support.wait_for(lambda: "XONE" in _text(log), what="the first line")
        os.rename(log, tmp_path / "msa.log.1")
        _reject(port, "TWO")
        support.wait_for(lambda: "XTWO" in _text(log), what="a line in a new msa.log")
    finally:
        proc.stop()
    old = (tmp_path / "msa.log.1").read_text()
    assert "XTWO" not in old and "XONE" in old
    lines = log.read_text().splitlines()
    for line in lines:
        assert LINE.match(line), line
    [reject] = [line for line in lines if "XTWO" in line]
    host, daemon, pid, text = LINE.match(reject).groups()
    assert host == socket.gethostname().split(".")[0] and daemon == "smtpd"
    assert int(pid) == proc.p.pid
    assert text.startswith("NOQUEUE: protocol error: XTWO from unknown[127.0.0.1]: 500 5.5.1 ")
    assert text.endswith("; proto=ESMTP helo=<logs.test>")


def test_logrotate_with_the_shipped_config(tmp_path, ca):
    if not support.have("logrotate") and not os.path.exists("/usr/sbin/logrotate"):
        pytest.skip("logrotate not installed")
    log = tmp_path / "msa.log"
    conf = tmp_path / "logrotate.conf"
    shipped = (support.ROOT / "contrib" / "logrotate" / "msa").read_text()
    conf.write_text(shipped.replace("/var/log/msa.log", str(log))
                    .replace("create 0640 root adm", "create 0640 root root"))
    proc, port = _daemon(tmp_path, ca, str(log))
    try:
        support.wait_port(port)
        _reject(port, "BEFORE")
        support.wait_for(lambda: "XBEFORE" in _text(log), what="a line")
        r = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PATH": os.environ["PATH"] + ":/usr/sbin"})
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "msa.log.1").exists()
        _reject(port, "AFTER")
        support.wait_for(lambda: "XAFTER" in _text(log), what="a line after the rotation")
    finally:
        proc.stop()
    assert "XAFTER" not in (tmp_path / "msa.log.1").read_text()


def test_syslog_over_a_real_socket_then_gone(tmp_path, ca):
    path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(30)
    proc, port = _daemon(tmp_path, ca, f"syslog:{path}")
    try:
        support.wait_port(port)
        _reject(port, "SYSLOG")
        got = b""
        while b"XSYSLOG" not in got:
            got = server.recv(65536)
        # <22>: facility mail (2) * 8 + info (6); syslog adds time and host.
        assert re.match(rb"^<22>msa/smtpd\[\d+\]: NOQUEUE: protocol error: XSYSLOG from unknown",
                        got), got
        server.close()
        os.unlink(path)
        _reject(port, "GONE")
        support.wait_for(lambda: "XGONE" in _so_far(proc), what="the line on stderr")
        _reject(port, "AGAIN")
        support.wait_for(lambda: "XAGAIN" in _so_far(proc), what="the next on stderr")
    finally:
        proc.stop()
    out = _so_far(proc)
    assert out.count("syslog stopped taking lines") == 1, out
    assert "Traceback" not in out and "Logging error" not in out


def test_no_syslog_falls_back_to_stderr_once(tmp_path, ca):
    proc, port = _daemon(tmp_path, ca, f"syslog:{tmp_path}/nothing-here")
    try:
        support.wait_port(port)
        _reject(port, "STDERR")
        support.wait_for(lambda: "XSTDERR" in _so_far(proc), what="the line on stderr")
    finally:
        proc.stop()
    out = _so_far(proc)
    assert out.count("cannot log to syslog") == 1 and "logging to stderr" in out
    assert "Traceback" not in out and "Logging error" not in out


def test_detach_without_syslog_refuses_rather_than_lose_lines(tmp_path, ca):
    ports = support.free_port(), support.free_port()
    path = write_daemon_config(tmp_path, ca, *ports,
                               extra=f'log = "syslog:{tmp_path}/nothing-here"\n')
    r = subprocess.run([sys.executable, str(support.BIN / "msa"), "daemon", "--detach",
                        "--config", str(path)], capture_output=True, text=True, timeout=60,
                       env=support.msa_env())
    assert r.returncode == 78, r.stderr
    assert "syslog is not there" in r.stderr and "set [daemon] log = a file" in r.stderr


def test_journal_lines_carry_their_priority(tmp_path, ca):
    out = tmp_path / "stderr"
    with open(out, "wb") as f:
        st = os.fstat(f.fileno())
        proc, port = _daemon(tmp_path, ca, "stderr", stdout=f, stderr=subprocess.STDOUT,
                             env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        try:
            support.wait_port(port)
            _reject(port, "JOURNAL")
            c = RawClient(port)
            c.close()
            support.wait_for(lambda: "XJOURNAL" in _text(out), what="the line")
        finally:
            proc.stop()
    lines = out.read_text().splitlines()
    assert lines and all(re.match(r"^<[2-7]>msa/\w+\[\d+\]: ", line) for line in lines), lines
    assert any(line.startswith("<6>msa/smtpd[") and "XJOURNAL" in line for line in lines)


def _so_far(proc) -> str:
    return support.read_so_far(proc).decode(errors="replace")

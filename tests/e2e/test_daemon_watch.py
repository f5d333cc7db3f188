"""``msa watch`` as a real process: start, work, SIGHUP, SIGTERM, pid file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from msa import config
from msa.message import queuefile
from msa.store import open_spool
from tests import support
from tests.daemon_support import MESSAGE, deposit, smtp_file, start_detached


def _start(cfg_path, *args):
    return support.Proc([sys.executable, str(support.BIN / "msa"), "watch",
                         "--config", str(cfg_path), *args],
                        env=support.msa_env(), stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)


def test_watch_process_runs_reloads_and_stops_cleanly(tmp_path):
    path = support.write_config(tmp_path)
    cfg = config.load(str(path))
    sp = open_spool(cfg)
    pidfile = tmp_path / "msa.pid"
    # A temp file of a dead writer is tidied at start.
    (sp.root / "tmp" / "0000000000000FFFFFF000.999999999").write_bytes(b"junk")
    proc = _start(path, "--pidfile", str(pidfile))
    try:
        qid = deposit(sp, "incoming", smtp_file(["b@x.test"], MESSAGE))
        support.wait_for(lambda: qid in list(sp.names("active")), what="message in active/")
        assert int(pidfile.read_text()) == proc.p.pid
        assert list(sp.names("tmp")) == []
        # SIGHUP: a new forward rule applies to the next message.
        with open(path, "a") as f:
            f.write('\n[policies]\nforward = [["^b@x\\\\.test$", "c@x.test"]]\n')
        os.kill(proc.p.pid, signal.SIGHUP)
        support.wait_for(lambda: b"reloaded" in _read_so_far(proc), what="reload")
        second = deposit(sp, "incoming", smtp_file(["b@x.test"], MESSAGE))
        support.wait_for(lambda: second in list(sp.names("active")), what="second message")
        env, _ = queuefile.load(sp.path("active", second))
        assert [r.address for r in env.recipients] == ["c@x.test"]
        os.kill(proc.p.pid, signal.SIGTERM)
        assert proc.p.wait(30) == 0
    finally:
        out = _read_so_far(proc).decode() + proc.output()
    assert "started watch" in out and "reloaded" in out and "stopped" in out, out
    assert f" msa/qmgr[{proc.p.pid}]: {qid}: from=<" in out and "(queue active; policies done" in out
    assert not pidfile.exists()


def test_second_daemon_with_the_same_pidfile_refuses(tmp_path):
    path = support.write_config(tmp_path)
    pidfile = tmp_path / "msa.pid"
    first = _start(path, "--pidfile", str(pidfile))
    try:
        support.wait_for(pidfile.exists, what="pid file")
        second = subprocess.run([sys.executable, str(support.BIN / "msa"), "watch", "--config",
                                 str(path), "--pidfile", str(pidfile)], capture_output=True,
                                text=True, env=support.msa_env(), timeout=60)
        assert second.returncode == 75 and "already running" in second.stderr
    finally:
        assert first.stop() == 0


def test_bad_config_exits_78(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[policies]\nstages = ['nonsense']\n")
    proc = subprocess.run([sys.executable, str(support.BIN / "msa"), "watch", "--config",
                           str(bad)], capture_output=True, text=True, env=support.msa_env(),
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 78 and "unknown stage 'nonsense'" in proc.stderr
    bad.write_text("[daemon]\nnope = 1\n")
    proc = subprocess.run([sys.executable, str(support.BIN / "msa"), "watch", "--config",
                           str(bad)], capture_output=True, text=True, env=support.msa_env(),
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 78 and "unknown key daemon.nope" in proc.stderr


def test_detach_writes_pidfile_logs_to_file_and_stops_on_sigterm(tmp_path):
    path = support.write_config(tmp_path)
    cfg = config.load(str(path))
    sp = open_spool(cfg)
    pid = start_detached(path, tmp_path, "watch")
    pidfile = tmp_path / "msa.pid"
    try:
        assert os.getsid(pid) != os.getsid(0)  # its own session: no controlling terminal
        qid = deposit(sp, "incoming", smtp_file(["b@x.test"], MESSAGE))
        support.wait_for(lambda: qid in list(sp.names("active")), what="message in active/")
        os.kill(pid, signal.SIGTERM)
        support.wait_for(lambda: not pidfile.exists(), what="pid file removed")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    log = (tmp_path / "msa.log").read_text()
    assert "started watch" in log and "stopped" in log and qid in log


_seen: dict[int, bytes] = {}


def _read_so_far(proc) -> bytes:
    fd = proc.p.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        _seen[fd] = _seen.get(fd, b"") + (os.read(fd, 65536) or b"")
    except BlockingIOError:
        pass
    return _seen.get(fd, b"")

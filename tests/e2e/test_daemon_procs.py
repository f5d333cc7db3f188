"""``msa daemon`` as a supervisor of child processes (msa.process.supervisor):
children on the ``msa edge|watch|deliver`` code paths, restart of a dead
child, no orphans after kill -9 of the supervisor, start-up failure, flush
reaching the runner, and the single-process mode."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from msa import config
from msa.admin.control import send_control
from msa.process.supervisor import edge_workers, parse_supervised, restart_delay
from msa.store import open_spool
from tests import support
from tests.daemon_support import (
    MESSAGE,
    add_user,
    deposit,
    numbered_message,
    smtp_file,
    smtp_login,
    spooled_seqs,
    start_daemon,
    start_detached,
    write_daemon_config,
)


@pytest.fixture
def setup(tmp_path, ca):
    ports = support.free_port(), support.free_port()
    path = write_daemon_config(tmp_path, ca, *ports)
    add_user(tmp_path / "passwd", "alice", "alice-pw", ["alice@example.org"])
    return path, config.load(str(path)), ports


def _processes(cfg) -> dict[str, int]:
    """name -> pid of each child, from the supervisor's status line."""
    status = send_control(cfg, "status") or ""
    field = [w for w in status.split() if w.startswith("processes=")]
    if not field:
        return {}
    out = {}
    for item in field[0].split("=", 1)[1].split(","):
        name, _, pid = item.partition(":")
        out[name] = int(pid) if pid.isdigit() else 0
    return out


def _ready(cfg) -> dict[str, int] | None:
    procs = _processes(cfg)
    return procs if procs and all(procs.values()) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _read_so_far(proc) -> str:
    return support.read_so_far(proc).decode(errors="replace")


def _nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def test_pure_decisions():
    assert [restart_delay(n) for n in (1, 2, 3, 4, 7, 50)] == [1, 2, 4, 8, 60, 60]
    assert edge_workers(0, 8) == 8
    assert edge_workers(0, 32) == 8
    assert edge_workers(0, 2) == 2
    assert edge_workers(3, 8) == 3
    assert edge_workers(12, 4) == 12
    assert edge_workers(0, 1) == 1
    assert edge_workers(0, 0) == 1
    assert parse_supervised("12:5") == (12, 5)
    with pytest.raises(ValueError):
        parse_supervised("12")


def test_children_are_separate_processes_and_a_dead_one_is_restarted(setup, ca):
    path, cfg, (port, _) = setup
    sp = open_spool(cfg)
    proc = start_daemon(path)
    try:
        procs = support.wait_for(lambda: _ready(cfg), what="children in status")
        assert {name.split("-")[0] for name in procs} == {"edge", "watch", "deliver"}
        assert len(set(procs.values()) | {proc.p.pid}) == len(procs) + 1
        for pid in procs.values():
            assert os.getppid() != pid and _alive(pid)
            with open(f"/proc/{pid}/stat") as f:
                assert int(f.read().rsplit(")", 1)[1].split()[1]) == proc.p.pid  # ppid
        # [daemon] background_nice (default 10): the watcher and the runner
        # yield the CPU to the edge.
        base = _nice(proc.p.pid)
        assert {name: _nice(pid) - base for name, pid in procs.items()} == {
            name: 0 if name.startswith("edge") else 10 for name in procs}
        # kill -9 of the watcher: logged, started again, and it works.
        os.kill(procs["watch"], signal.SIGKILL)
        new = support.wait_for(lambda: (p := _ready(cfg)) and p["watch"] != procs["watch"]
                               and p, timeout=20, what="a new watcher")
        assert {n: p for n, p in new.items() if n != "watch"} == \
            {n: p for n, p in procs.items() if n != "watch"}
        qid = deposit(sp, "incoming", smtp_file(["b@example.test"], MESSAGE))
        support.wait_for(lambda: qid in list(sp.names("deferred/1")), timeout=30,
                         what="message through the new watcher to the runner")
        # The edge still takes mail.
        s = smtp_login(port, ca, "alice", "alice-pw")
        s.sendmail("alice@example.org", ["x@example.test"],
                   numbered_message("alice@example.org", "x@example.test", 5))
        s.quit()
        assert 5 in spooled_seqs(sp)
        # flush reaches the runner process.
        assert send_control(cfg, "flush") == "ok flushing"
        support.wait_for(lambda: "deferred messages made due" in _read_so_far(proc),
                         what="flush logged by the runner")
    finally:
        code = proc.stop()
        out = _read_so_far(proc)
    assert code == 0, out
    assert "watch (pid %d) was killed by SIGKILL" % procs["watch"] in out, out
    assert "starting it again in 1s" in out
    assert "stopped" in out
    for pid in new.values():
        assert not _alive(pid)


def test_kill_9_of_the_supervisor_leaves_no_orphans(setup):
    path, cfg, (port, _) = setup
    proc = start_daemon(path)
    try:
        procs = support.wait_for(lambda: _ready(cfg), what="children in status")
        os.kill(proc.p.pid, signal.SIGKILL)   # the supervisor only
        proc.p.wait(10)
        support.wait_for(lambda: not any(_alive(p) for p in procs.values()), timeout=30,
                         what="children gone after their supervisor")
    finally:
        proc.stop(signal.SIGKILL)
    # The next daemon starts on the same spool and socket.
    again = start_daemon(path)
    try:
        support.wait_for(lambda: _ready(cfg), what="second daemon")
    finally:
        assert again.stop() == 0


def test_a_child_failing_at_start_stops_the_daemon_with_its_status(setup, tmp_path):
    path, cfg, _ = setup
    text = path.read_text().replace(str(cfg.edge.certfile), str(tmp_path / "missing.pem"))
    path.write_text(text)
    r = subprocess.run([sys.executable, str(support.BIN / "msa"), "daemon", "--config",
                        str(path)], capture_output=True, text=True, env=support.msa_env(),
                       timeout=60)
    assert r.returncode == 78, r.stderr
    assert "missing.pem" in r.stderr and "while starting" in r.stderr
    assert not os.path.exists(cfg.control_socket())


def test_detached_supervisor_pidfile_and_sigterm(setup, tmp_path):
    path, cfg, _ = setup
    pid = start_detached(path, tmp_path)
    pidfile = tmp_path / "msa.pid"
    try:
        procs = support.wait_for(lambda: _ready(cfg), what="children")
        assert send_control(cfg, "status").startswith(f"ok pid={pid} ")
        os.kill(pid, signal.SIGTERM)
        support.wait_for(lambda: not pidfile.exists(), timeout=30, what="pid file removed")
        support.wait_for(lambda: not any(_alive(p) for p in procs.values()), what="children")
    finally:
        for p in [pid, *_processes(cfg).values()]:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, OverflowError):
                pass
    log = (tmp_path / "msa.log").read_text()
    assert "started edge+watch+deliver as %d processes" % len(procs) in log
    assert "started edge (pid" in log and "started deliver (pid" in log


def _submit(port: int, ca, cfg, seq: int) -> None:
    """One message from alice over STARTTLS; it must be in the spool."""
    s = smtp_login(port, ca, "alice", "alice-pw")
    s.sendmail("alice@example.org", ["x@example.test"],
               numbered_message("alice@example.org", "x@example.test", seq))
    s.quit()
    assert seq in spooled_seqs(open_spool(cfg))


def test_single_process_mode(setup, ca):
    path, cfg, (port, _) = setup
    proc = start_daemon(path, "daemon", "--single-process")
    try:
        support.wait_port(port)
        status = support.wait_for(lambda: send_control(cfg, "status"), what="control socket")
        assert status.startswith(f"ok pid={proc.p.pid} components=edge,watch,deliver")
        assert "processes=" not in status
        _submit(port, ca, cfg, 9)
    finally:
        code = proc.stop()
        assert code == 0, proc.output()
    # The same in asyncio's own event loop (uvloop is the default).
    path.write_text(path.read_text().replace(
        "[daemon]\n", "[daemon]\nprocesses = false\nevent_loop = \"asyncio\"\n"))
    proc = start_daemon(path)
    try:
        status = support.wait_for(lambda: send_control(cfg, "status"), what="control socket")
        assert "processes=" not in status
        _submit(port, ca, cfg, 10)
    finally:
        assert proc.stop() == 0, proc.output()


@pytest.mark.parametrize("setting,error", [
    ('event_loop = "tokio"', "daemon.event_loop: 'tokio' is not one of uvloop, asyncio"),
    ("background_nice = 20", "daemon.background_nice: 20 is not within 0..19"),
])
def test_bad_daemon_settings_are_config_errors(setup, setting, error):
    path, cfg, _ = setup
    path.write_text(path.read_text().replace("[daemon]\n", f"[daemon]\n{setting}\n"))
    r = subprocess.run([sys.executable, str(support.BIN / "msa"), "daemon", "--config",
                        str(path)], capture_output=True, text=True, env=support.msa_env(),
                       timeout=60)
    assert r.returncode == 78, r.stderr
    assert error in r.stderr
    assert not os.path.exists(cfg.control_socket())

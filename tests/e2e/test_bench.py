"""Smoke tests of the benchmark harness (bench/): its pure pieces, the
reference Postfix relaying a real message to smtp-sink, and a tiny real run
of ``bench/run.py`` whose JSON and table must agree. Postfix parts are
skipped when the Postfix binaries (or root) are absent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench import msa_side, postfix_ref, procs, profile, report, source
from bench.scenarios import Side, free_port, open_idle, send_and_wait
from bench.sink import Sink, parse_counter
from tests import support

needs_postfix = pytest.mark.skipif(
    not (postfix_ref.available() and os.access(source.SMTP_SOURCE, os.X_OK)
         and os.geteuid() == 0),
    reason="needs root and the postfix package (postfix, smtp-source, smtp-sink)")


def test_parse_counter_takes_last_value():
    assert parse_counter(b"sess=1 quit=1 mesg=1\rsess=2 quit=2 mesg=12\r") == 12
    assert parse_counter(b"sess=1 quit=1\r") is None


def test_master_cf_has_one_loopback_listener_and_no_local_transport():
    text = postfix_ref.master_cf(12345)
    inet = [line for line in text.splitlines() if " inet " in line]
    assert len(inet) == 1 and inet[0].startswith("127.0.0.1:12345 ")
    assert not any(line.split()[0] in ("local", "virtual") for line in text.splitlines())


def test_main_cf_relays_to_sink_and_keeps_defaults_for_durability(tmp_path):
    text = postfix_ref.main_cf(tmp_path, 2525)
    assert "relayhost = [127.0.0.1]:2525" in text
    assert "smtpd_recipient_restrictions = permit_mynetworks, reject" in text
    assert "fsync" not in text  # Postfix's fsync before 250 stays on


def test_msa_config_is_one_trusted_loopback_listener_with_optional_edge_workers(tmp_path):
    from msa import config
    for workers in (None, 2):
        path = tmp_path / f"msa-{workers}.toml"
        path.write_text(msa_side.config_text(tmp_path, 2526, 2525, tmp_path / "c.pem",
                                             tmp_path / "k.pem", edge_workers=workers))
        cfg = config.load(str(path))
        assert [str(a) for a in cfg.edge.submission] == ["127.0.0.1:2526"]
        assert list(cfg.edge.submissions) == [] and cfg.edge.trusted_networks
        assert cfg.daemon.edge_workers == (workers or config.Config().daemon.edge_workers)
    assert msa_side.MsaInstance(tmp_path, 2526, 2525).argv()[-3:] == [
        "--config", str(tmp_path / "msa.toml"), "--foreground"]


def test_rows_use_median_and_fail_a_cell_with_a_failed_round():
    load = [{"side": "msa", "conc": 10, "n": 100, "accept_s": s, "e2e_s": s * 2, "error": ""}
            for s in (1.0, 2.0, 4.0)]
    load += [{"side": "postfix", "conc": 10, "n": 100, "accept_s": 1.0, "e2e_s": None,
              "error": "sink got 3/100"}]
    rows = {(r.metric, r.conc): r for r in report.load_rows(load)}
    assert rows["accept", 10].msa == 50.0           # median of 100, 50, 25
    assert rows["accept", 10].postfix is None       # its only round failed
    assert rows["accept", 10].verdict == "n/a"
    assert rows["e2e", 10].msa == 25.0


def test_targets_by_disk_regime():
    load = [{"side": side, "conc": 10, "n": 100, "accept_s": s, "e2e_s": s, "error": ""}
            for side, s in (("msa", 1.0), ("postfix", 1.5))]       # 1.5x
    disk = {(r.metric, r.conc): r for r in report.load_rows(load)}
    assert disk["accept", 10].target == 2.0 and disk["accept", 10].verdict == "MISS"
    tmpfs = {(r.metric, r.conc): r for r in report.load_rows(load, tmpfs=True)}
    assert tmpfs["e2e", 10].target == 1.1 and tmpfs["e2e", 10].verdict == "ok"
    assert report.on_tmpfs({"disk": {"protocol": "commit protocol journal (tmpfs: ...)"}})
    assert not report.on_tmpfs({"disk": {"protocol": "commit protocol journal (xfs: ...)"}})


def test_verdicts_against_targets():
    assert report.Row("accept", 1, 80.0, 100.0, 0.8).verdict == "ok"
    assert report.Row("accept", 10, 99.0, 100.0, 1.0).verdict == "MISS"
    assert report.backlog_ok({"first_s": 6.0, "rss_peak_kb": 1}) is False
    assert report.backlog_ok({"first_s": 1.0, "rss_peak_kb": 400 * 1024}) is False
    assert report.idle_ok({"rss_kb": 100 * 1024, "greeted": 1000, "count": 1000}) is True
    assert report.idle_ok({"rss_kb": 100 * 1024, "greeted": 999, "count": 1000}) is False


def test_profile_summary_counts_self_and_inclusive_time():
    text = ("main (/work/main/msa/x.py:1);handle (/work/main/msa/submission/edge.py:9) 30\n"
            "main (/work/main/msa/x.py:1);fsync (/work/main/spool/core.py:5) 70\n"
            "_bootstrap (/x/threading.py:1);_worker (/x/concurrent/futures/thread.py:81) 50\n")
    out = profile.summarise(text)
    assert "100 samples of working threads (50 idle" in out
    assert "by component: other 70.0%, edge 30.0%" in out
    assert " 70.0  fsync (spool/core.py:5)" in out
    assert "100.0  main (msa/x.py:1)" in out


def test_profile_summary_attributes_child_processes_by_command_line():
    sup = 'process 10:"python3 /x/bin/msa daemon --config c"'
    text = (f'{sup};process 11:"python3 -m msa.cli edge --config c";run (asyncio/x.py:1);'
            'recv (socket.py:2) 3\n'
            f'{sup};process 12:"python3 -m msa.cli deliver --config c";fsync (spool/core.py:5) 1\n')
    out = profile.summarise(text)
    assert "by component: edge 75.0%, runner 25.0%" in out
    assert "process" not in out.split("by component")[1]
    assert "edge: self% of its 3 samples\n100.0  recv (socket.py:2)" in out


def test_backlog_files_are_valid_queue_files(tmp_path):
    from msa.message import queuefile
    msa_side.write_backlog(tmp_path, 3, size=500)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 3 and names == sorted(set(names))
    env, _ = queuefile.load(tmp_path / names[0])
    assert env.queue_id == names[0] and [r.address for r in env.pending()] == ["r@y"]


def test_tree_rss_includes_children():
    p = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30"])
    try:
        support.wait_for(lambda: len(procs.tree(p.pid)) == 3, 10, what="children")
        assert procs.tree_rss_kb(p.pid) > procs.vm_rss_kb(p.pid) > 0
    finally:
        for pid in procs.tree(p.pid)[1:]:
            os.kill(pid, 9)
        p.kill()
        p.wait()


@needs_postfix
def test_reference_postfix_relays_a_message_to_the_sink():
    # pytest's tmp_path is under a 0700 directory Postfix's daemons cannot enter.
    work = Path(tempfile.mkdtemp(prefix="msa-bench-test-"))
    os.chmod(work, 0o755)
    side = Side("postfix", work)
    try:
        side.start()
        run = send_and_wait(side, 1, 3, 2048, 30)
        assert run["error"] == "" and run["e2e_s"] is not None
        assert side.sink.count == 3
        assert "status=sent" in side.server.maillog.read_text()
    finally:
        side.stop()
        shutil.rmtree(work, ignore_errors=True)
    assert side.server.master_pid() is None


@needs_postfix
def test_sink_counts_what_smtp_source_sends():
    sink = Sink(free_port())
    try:
        support.wait_port(sink.port)
        sink.expect(7)
        res = source.run(sink.port, 3, 7, 100, timeout=30)
        assert res.ok, res.output
        assert sink.wait(10) is not None and sink.count == 7
        conns, greeted = open_idle(sink.port, 5)
        assert greeted == 5
        for s in conns:
            s.close()
    finally:
        sink.stop()


@needs_postfix
def test_quick_run_of_the_harness_writes_matching_json_and_table(tmp_path):
    out = tmp_path / "r.json"
    assert msa_side.missing_features() == []  # the harness finds this msa (not only Postfix)
    sides = "msa,postfix"
    p = subprocess.Popen([sys.executable, str(support.ROOT / "bench" / "run.py"), "--quick",
                          "--only", "accept,e2e", "--n", "20", "--conc", "1,10", "--sides",
                          sides, "--json", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, cwd=support.ROOT)
    try:
        stdout, _ = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        p.terminate()  # run.py stops Postfix, msa and the sinks on SIGTERM
        stdout, _ = p.communicate(timeout=60)
        pytest.fail(f"bench/run.py --quick took over 90 s:\n{stdout}")
    assert p.returncode == 0, stdout
    results = json.loads(out.read_text())
    for side in ("msa", "postfix"):
        runs = [r for r in results["load"] if r["side"] == side]
        assert {r["conc"] for r in runs} == {1, 10}, side
        assert all(r["error"] == "" and r["e2e_s"] >= r["accept_s"] > 0 for r in runs), side
        assert results["rss"][side]["tree_peak_kb"] > 0
    row = next(r for r in report.load_rows(results["load"]) if r.metric == "accept"
               and r.conc == 10)
    assert f"{row.postfix:.1f}" in stdout and f"{row.msa:.1f}" in stdout
    assert results["meta"]["disk"]["creates_per_s"] > 0


@needs_postfix
def test_postfix_and_sink_stop_when_the_harness_is_killed():
    work = Path(tempfile.mkdtemp(prefix="msa-bench-test-"))
    os.chmod(work, 0o755)
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from pathlib import Path\n"
            "from bench.scenarios import Side\n"
            "s = Side('postfix', Path(%r)); s.start()\n"
            "print(s.server.master_pid(), s.sink.proc.pid, flush=True); time.sleep(60)\n"
            % (str(support.ROOT), str(work)))
    harness = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        master, sink = map(int, harness.stdout.readline().split())
        harness.kill()  # SIGKILL: no cleanup code of the harness runs
        harness.wait()
        support.wait_for(lambda: not _alive(master) and not _alive(sink), 30,
                         what="postfix master and smtp-sink to stop")
    finally:
        if harness.poll() is None:
            harness.kill()
        shutil.rmtree(work, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

"""kill -9 of the watcher loses no recipient; a 50 MB body is streamed."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

from msa.store import open_spool
from tests import support
from tests.daemon_support import MESSAGE, deposit, make_cfg, smtp_file

RUN_DRAIN = """
import sys
from pathlib import Path
from tests.daemon_support import make_cfg
from msa.store import open_spool
from msa.cleanup.watcher import Watcher
cfg = make_cfg(Path(sys.argv[1]))
sp = open_spool(cfg)
sp.recover()
Watcher(cfg, sp).drain()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent's
# image across fork+exec, VmHWM belongs to this image only.
print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
"""

RUN_FOREVER = """
import asyncio, sys
from pathlib import Path
from tests.daemon_support import make_cfg
from msa.store import open_spool
from msa.cleanup.watcher import Watcher
cfg = make_cfg(Path(sys.argv[1]))
sp = open_spool(cfg)
sp.recover()
w = Watcher(cfg, sp, workers=3)
async def main():
    asyncio.get_running_loop().call_soon(lambda: print("ready", flush=True))
    await w.run()
asyncio.run(main())
"""

DOMAINS = ["bob@one.test", "carol@two.test", "dave@three.test"]


def _drain(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_DRAIN, str(tmp_path)], cwd=support.ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=support.msa_env(**env))


def _recipients_by_origin(sp) -> dict[str, set[str]]:
    """Original qid -> every recipient found in any stage under its name
    or a part's name (``<qid>-N``)."""
    from msa.message import queuefile
    found: dict[str, set[str]] = {}
    stages = sp.stages
    for stage in stages:
        for name in sp.names(stage):
            env, _ = queuefile.load(sp.path(stage, name))
            found.setdefault(name.split("-")[0], set()).update(r.address for r in env.recipients)
    return found


def test_crash_between_split_parts_loses_no_recipient(tmp_path):
    cfg = make_cfg(tmp_path)
    sp = open_spool(cfg)
    qid = deposit(sp, "incoming", smtp_file(DOMAINS, MESSAGE))
    for committed in (1, 2):  # each run dies right after committing one part
        proc = _drain(tmp_path, MSA_TEST_CRASH_AFTER_PARTS="1")
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert sorted(sp.names("active")) == [f"{qid}-{i}" for i in range(1, committed + 1)]
        assert list(sp.names("incoming")) == [qid]  # the original is still whole
        assert _recipients_by_origin(sp)[qid] == set(DOMAINS)
    proc = _drain(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(sp.names("active")) == [f"{qid}-{i}" for i in (1, 2, 3)]
    for stage in ("incoming", "policy-headers", "policy-forward", "policy-split", "corrupt"):
        assert list(sp.names(stage)) == [], stage
    assert _recipients_by_origin(sp)[qid] == set(DOMAINS)


def test_random_sigkill_of_a_running_watcher_loses_nothing(tmp_path):
    cfg = make_cfg(tmp_path)
    sp = open_spool(cfg)
    rng = random.Random(1234)
    sent: list[str] = []
    for _ in range(12):
        p = support.Proc([sys.executable, "-c", RUN_FOREVER, str(tmp_path)], cwd=support.ROOT,
                         env=support.msa_env(), stderr=subprocess.PIPE)
        try:
            assert p.p.stdout.readline().strip() == b"ready"
            for _ in range(10):
                sent.append(deposit(sp, "incoming", smtp_file(DOMAINS, MESSAGE)))
            time.sleep(rng.uniform(0.0, 0.08))
        finally:
            p.stop(signal.SIGKILL)
        found = _recipients_by_origin(sp)
        for qid in sent:  # at the instant of the kill, every recipient is somewhere
            assert found.get(qid) == set(DOMAINS), (qid, found.get(qid))
    proc = _drain(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(sp.names("corrupt")) == []
    for stage in sp.stages:
        if stage != "active":
            assert list(sp.names(stage)) == [], stage
    active = sorted(sp.names("active"))
    assert active == sorted(f"{q}-{i}" for q in sent for i in (1, 2, 3))
    assert list(sp.names("tmp")) == []


def test_fifty_megabyte_body_is_streamed(tmp_path):
    cfg = make_cfg(tmp_path)
    sp = open_spool(cfg)
    body = b"x" * 998 + b"\r\n"
    count = 50 * 1024 * 1024 // len(body)
    header = b"From: a@example.org\r\nSubject: big\r\n\r\n"
    size = len(header) + count * len(body)
    from msa.message.queuefile import Envelope, utc_iso
    env = Envelope(sender="a@example.org", arrival=utc_iso(1_800_000_000), size=str(size),
                   origin="smtp", client_address="127.0.0.1")
    for r in DOMAINS:
        env.add_recipient(r)
    with sp.writer("incoming") as w:
        env.queue_id = w.qid
        w.write(env.to_bytes() + header)
        for _ in range(count):
            w.write(body)
        qid = w.commit()
    proc = _drain(tmp_path)
    assert proc.returncode == 0, proc.stderr
    maxrss_kb = int(proc.stdout.split()[-1])
    assert maxrss_kb < 45 * 1024, f"watcher grew to {maxrss_kb} KiB for a 50 MB message"
    parts = sorted(sp.names("active"))
    assert parts == [f"{qid}-{i}" for i in (1, 2, 3)]
    for name in parts:
        assert sp.path("active", name).stat().st_size > size

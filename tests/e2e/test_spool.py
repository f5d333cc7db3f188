"""The spool library's invariants, tested against a real filesystem and real
processes (kill -9, concurrent claimers, inotify)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from spool import DueIndex, GroupSync, Spool, StageWatcher, id_time, new_id
from spool.core import _tmp_pid
from spool.group import ThreadGroupSync
from tests import support
from tests.support import ROOT

STAGES = ["maildrop", "incoming", "active"]


def content_for(seq: int) -> bytes:
    """Deterministic, self-checking content: a header naming its own hash."""
    body = (f"message {seq}\n".encode() * (50 + seq % 200))
    return hashlib.sha256(body).hexdigest().encode() + b"\n" + body


def intact(data: bytes) -> bool:
    digest, _, body = data.partition(b"\n")
    return hashlib.sha256(body).hexdigest().encode() == digest


def test_deposit_is_atomic_and_ids_sort_by_time(spool_root):
    sp = Spool(spool_root, STAGES)
    ids = [sp.deposit("incoming", content_for(i)) for i in range(50)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 50
    assert abs(id_time(ids[0]) - time.time()) < 60
    assert sorted(sp.names("incoming")) == ids
    assert list(sp.names("tmp")) == []
    for qid in ids:
        assert intact(sp.path("incoming", qid).read_bytes())


def test_writer_abort_leaves_nothing(spool_root):
    sp = Spool(spool_root, STAGES)
    with pytest.raises(RuntimeError):
        with sp.writer("incoming") as w:
            w.write(b"partial")
            raise RuntimeError("client went away")
    assert list(sp.names("tmp")) == []
    assert list(sp.names("incoming")) == []


DEPOSIT_LOOP = textwrap.dedent("""
    import sys, os
    sys.path.insert(0, {root!r})
    from spool import Spool
    from tests.e2e.test_spool import content_for
    sp = Spool({spool!r}, ["maildrop", "incoming", "active"])
    seq = int(sys.argv[1])
    while True:
        qid = sp.deposit("incoming", content_for(seq))
        os.write(1, f"{{qid}} {{seq}}\\n".encode())
        seq += 1
""")


def test_kill_9_during_deposits_loses_nothing_acknowledged(spool_root):
    sp = Spool(spool_root, STAGES)
    script = DEPOSIT_LOOP.format(root=str(ROOT), spool=str(spool_root))
    acknowledged: dict[str, int] = {}
    rng = random.Random(7)
    seq = 0
    for _round in range(25):
        p = subprocess.Popen([sys.executable, "-c", script, str(seq)],
                             stdout=subprocess.PIPE)
        # Kill once it has acknowledged 1 to 8 deposits (a condition, not a
        # time: on a cold, busy machine start-up alone can take seconds),
        # while it is in the middle of the next ones.
        first = support.read_lines(p.stdout, rng.randint(1, 8), timeout=60)
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=10)
        for line in [*first, *out.decode().splitlines()]:
            qid, _, n = line.partition(" ")
            acknowledged[qid] = int(n)
            seq = max(seq, int(n) + 1)
        # No half-written file is ever visible outside tmp/.
        for name in sp.names("incoming"):
            assert intact(sp.path("incoming", name).read_bytes()), name
    assert len(acknowledged) >= 25, "every round acknowledged at least one deposit"
    for qid, n in acknowledged.items():
        assert sp.path("incoming", qid).read_bytes() == content_for(n)
    # Recovery clears what the killed writers left in tmp/.
    sp.recover()
    assert list(sp.names("tmp")) == []


CLAIM_LOOP = textwrap.dedent("""
    import sys, os, time
    sys.path.insert(0, {root!r})
    from spool import Spool
    sp = Spool({spool!r}, ["maildrop", "incoming", "active"])
    owners = {owners!r}
    ids = sys.argv[1].split(",")
    got = clashes = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        for qid in ids:
            c = sp.claim("active", qid)
            if c is None:
                continue
            got += 1
            try:
                fd = os.open(os.path.join(owners, qid), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                clashes += 1
            else:
                os.close(fd)
                os.unlink(os.path.join(owners, qid))
            c.release()   # unlinks the claim file: the racy case
    print(got, clashes)
""")


def test_two_processes_never_hold_one_claim(tmp_path, spool_root):
    sp = Spool(spool_root, STAGES)
    ids = [sp.deposit("active", b"x") for _ in range(5)]
    owners = tmp_path / "owners"
    owners.mkdir()
    script = CLAIM_LOOP.format(root=str(ROOT), spool=str(spool_root), owners=str(owners))
    procs = [subprocess.Popen([sys.executable, "-c", script, ",".join(ids)],
                              stdout=subprocess.PIPE) for _ in range(2)]
    results = [p.communicate(timeout=30)[0].decode().split() for p in procs]
    got = [int(r[0]) for r in results]
    clashes = [int(r[1]) for r in results]
    assert all(g > 50 for g in got), got  # both really competed
    assert clashes == [0, 0]


def test_claim_of_dead_process_is_free(spool_root):
    sp = Spool(spool_root, STAGES)
    qid = sp.deposit("active", b"x")
    code = (f"import sys,os; sys.path.insert(0,{str(ROOT)!r}); from spool import Spool;"
            f"c=Spool({str(spool_root)!r},[]).claim('active',{qid!r}); print(c is not None,"
            f" flush=True); os.kill(os.getpid(), 9)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert p.stdout.strip() == b"True"
    c = sp.claim("active", qid)
    assert c is not None
    assert sp.claim("active", qid) is None  # and it is exclusive again
    c.release()
    assert sp.recover()["claims"] >= 0
    assert list(sp.names("claims")) == []


def test_claim_of_moved_file_fails(spool_root):
    sp = Spool(spool_root, STAGES)
    qid = sp.deposit("incoming", b"x")
    c = sp.claim("incoming", qid)
    c.move("active")
    assert sp.claim("incoming", qid) is None
    assert sp.find(qid) == "active"


def test_a_claim_locks_the_file_itself_and_leaves_no_lock_file(spool_root):
    sp = Spool(spool_root, STAGES)
    qid = sp.deposit("active", b"x")
    c = sp.claim("active", qid)
    assert c is not None and sp.claim("active", qid) is None
    assert list(sp.names("claims")) == []
    c.release()
    assert sp.claim("active", qid) is not None


def test_a_rewritten_file_stays_claimed(spool_root):
    """The new version is locked before its rename: nobody can claim the
    message between the rewrite and the move that follows it."""
    sp = Spool(spool_root, STAGES)
    qid = sp.deposit("active", b"version 1")
    c = sp.claim("active", qid)
    before = os.stat(sp.path("active", qid)).st_ino
    with c.rewriter() as w:
        w.write(b"version 2")
        w.commit()
    assert os.stat(sp.path("active", qid)).st_ino != before
    assert sp.claim("active", qid) is None, "the claim lapsed with the rewrite"
    assert c.open().read() == b"version 2"
    c.defer(time.time() + 60, 1)
    assert sp.claim("deferred/1", qid) is not None


def test_claims_in_untrusted_stages_never_open_the_file(spool_root):
    """maildrop/ may hold a FIFO or a symlink a user made: claimed by a lock
    file, the file is not opened (a FIFO would block)."""
    sp = Spool(spool_root, STAGES, claim_files=["maildrop"])
    os.mkfifo(sp.path("maildrop", "F1"))
    os.symlink("/etc/passwd", sp.path("maildrop", "S1"))
    for name in ("F1", "S1"):
        c = sp.claim("maildrop", name)
        assert c is not None
        assert list(sp.names("claims")) == [f"{name}.lock"]
        assert sp.claim("maildrop", name) is None
        c.release()
        assert list(sp.names("claims")) == []
    # Elsewhere a FIFO does not hang the claimer either (and a symlink is no claim).
    os.mkfifo(sp.path("active", "F2"))
    os.symlink("/etc/passwd", sp.path("active", "S2"))
    assert sp.claim("active", "F2") is not None
    assert sp.claim("active", "S2") is None


def test_defer_sets_mtime_and_due_index(spool_root):
    sp = Spool(spool_root, STAGES)
    now = time.time()
    due_soon = sp.deposit("active", b"a")
    due_late = sp.deposit("active", b"b")
    sp.claim("active", due_soon).defer(now - 5, 1)
    sp.claim("active", due_late).defer(now + 3600, 2)
    assert int(os.stat(sp.path("deferred/1", due_soon)).st_mtime) == int(now - 5)
    idx = DueIndex(sp)
    idx.rescan_all()
    assert idx.next_due() == pytest.approx(now - 5, abs=1)
    assert idx.collect(now) == [("deferred/1", due_soon)]
    # deferred/2 is not scanned while its earliest time is in the future.
    assert idx.earliest["deferred/2"] == pytest.approx(now + 3600, abs=1)
    # What collect() returned is the caller's to move on; it is not counted
    # again until a full rescan.
    assert idx.collect(now + 7200) == [("deferred/2", due_late)]
    assert set(idx.collect(now, force=True)) == {("deferred/1", due_soon),
                                                 ("deferred/2", due_late)}


def test_due_index_limit_keeps_rest_due(spool_root):
    sp = Spool(spool_root, STAGES)
    past = time.time() - 10
    for _ in range(10):
        sp.claim("active", sp.deposit("active", b"x")).defer(past, 1)
    idx = DueIndex(sp)
    idx.rescan_all()
    first = idx.collect(limit=4)
    assert len(first) == 4
    assert idx.next_due() <= time.time()


def test_hold_and_quarantine(spool_root):
    sp = Spool(spool_root, STAGES)
    qid = sp.deposit("active", b"x")
    sp.claim("active", qid).move("hold")
    assert sp.find(qid) == "hold"
    sp.claim("hold", qid).quarantine("test")
    assert (spool_root / "corrupt" / qid).read_bytes() == b"x"


def test_recover_removes_only_dead_writers_tmp(spool_root):
    sp = Spool(spool_root, STAGES)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (spool_root / "tmp" / f"{new_id()}.{dead}").write_bytes(b"half")
    mine = spool_root / "tmp" / f"{new_id()}.{os.getpid()}"
    mine.write_bytes(b"being written")
    assert sp.recover()["tmp"] == 1
    assert list(sp.names("tmp")) == [mine.name]
    assert _tmp_pid(mine.name) == os.getpid()


def test_full_disk_raises_spool_full_and_keeps_old_files(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        from spool import SpoolFull
        sp = Spool(mnt / "spool", STAGES)
        kept = [sp.deposit("incoming", content_for(i)) for i in range(3)]
        with pytest.raises(SpoolFull):
            for i in range(1000):
                sp.deposit("incoming", content_for(i))
        for i, qid in enumerate(kept):
            assert sp.path("incoming", qid).read_bytes() == content_for(i)
        assert list(sp.names("tmp")) == []
        # Every file in the stage is whole: the failed writes left nothing.
        for name in sp.names("incoming"):
            assert intact(sp.path("incoming", name).read_bytes()), name
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_watcher_rescans_then_sees_new_files(spool_root):
    sp = Spool(spool_root, STAGES)
    before = sp.deposit("incoming", b"before")
    w = StageWatcher(sp, ["maildrop", "incoming"])
    it = iter(w)
    assert next(it) == ("incoming", before)
    after = sp.deposit("maildrop", b"after")
    assert next(it) == ("maildrop", after)
    w.close()


def test_group_sync_shares_fsyncs(spool_root):
    sp = Spool(spool_root, STAGES)
    gs = GroupSync(spool_root / "incoming")

    async def one(i):
        with sp.writer("incoming") as w:
            w.write(b"x" * 100)
            w.commit(sync_dir=False)
        await gs.sync()

    async def main():
        await asyncio.gather(*(one(i) for i in range(50)))

    asyncio.run(main())
    assert 1 <= gs.fsyncs < 50
    assert len(list(sp.names("incoming"))) == 50


def test_thread_group_sync_shares_fsyncs(spool_root):
    sp = Spool(spool_root, STAGES)
    gs = ThreadGroupSync(spool_root / "active")
    start = threading.Barrier(20)

    def one():
        start.wait()
        for _ in range(5):
            with sp.writer("active") as w:
                w.write(b"x" * 100)
                w.commit(sync_dir=False)
            gs.sync()

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert 1 <= gs.fsyncs < 100
    assert len(list(sp.names("active"))) == 100


def test_thread_group_sync_failure_raises_and_next_caller_retries(tmp_path):
    gs = ThreadGroupSync(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        gs.sync()
    (tmp_path / "missing").mkdir()
    gs.sync()
    assert gs.fsyncs == 1


def test_move_creates_a_missing_stage_only_when_needed(spool_root):
    sp = Spool(spool_root, STAGES)
    qid = sp.deposit("incoming", b"x")
    sp.claim("incoming", qid).move("deferred/7")
    assert os.path.exists(sp.path("deferred/7", qid))
    sp.claim("deferred/7", qid).move("active", sync_dirs=False)
    assert os.path.exists(sp.path("active", qid))
    claim = sp.claim("active", qid)
    os.unlink(sp.path("active", qid))
    with pytest.raises(FileNotFoundError):
        claim.move("deferred/8")  # the source is gone: no directory is made for it
    claim.release()
    assert not (spool_root / "deferred" / "8").exists()


RESCAN_MEMORY = textwrap.dedent("""
    import sys, resource
    sys.path.insert(0, {root!r})
    from spool import Spool, StageWatcher, DueIndex
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    sp = Spool({spool!r}, ["incoming", "active"], create=False)
    w = StageWatcher(sp, ["incoming", "active"])
    base = hwm()
    n = 0
    for stage, name in w.rescan():
        n += 1
    idx = DueIndex(sp); idx.rescan_all()
    print(n, hwm() - base)
""")


def test_rescan_of_100k_files_keeps_memory_bounded(spool_root):
    Spool(spool_root, STAGES)
    d = spool_root / "active"
    for i in range(100_000):
        # Plain files are enough for a rescan; writing them without fsync
        # keeps the test quick.
        with open(d / f"{i:022X}", "wb") as f:
            f.write(b"x")
    script = RESCAN_MEMORY.format(root=str(ROOT), spool=str(spool_root))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                         text=True, timeout=300).stdout.split()
    count, grown_kb = int(out[0]), int(out[1])
    assert count == 100_000
    # Holding the names alone would take ~8 MB; a streaming rescan grows by
    # far less.
    assert grown_kb < 4096, f"rescan grew the process by {grown_kb} kB"

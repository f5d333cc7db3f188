"""The commit protocol is chosen for the filesystem the spool is on
(spool.durable): real filesystems made for the test (ext4 with and
without a journal, xfs, loop-mounted images in tmp_path; root only) and
the machine's own tmpfs and procfs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import disk
from spool import Spool, durable
from tests import support


def test_kernel_release_parsing():
    assert durable.kernel_reports_syncfs_errors("5.8.0")
    assert durable.kernel_reports_syncfs_errors("6.1.0-13-amd64")
    assert durable.kernel_reports_syncfs_errors("5.10.0+")
    assert not durable.kernel_reports_syncfs_errors("5.7.19")
    assert not durable.kernel_reports_syncfs_errors("4.19.0-20-amd64")
    assert not durable.kernel_reports_syncfs_errors("garbage")


def test_tmpfs_is_journal_and_strict_forces_strict(tmpfs_path):
    auto = durable.choose(str(tmpfs_path))
    assert (auto.name, auto.fstype) == (durable.JOURNAL, "tmpfs")
    forced = durable.choose(str(tmpfs_path), "strict")
    assert (forced.name, forced.fstype) == (durable.STRICT, "tmpfs")
    assert "strict" in forced.describe()


def test_unknown_filesystem_is_strict():
    proto = durable.choose("/proc/self")
    assert (proto.name, proto.fstype) == (durable.STRICT, "proc")


def test_spool_refuses_unknown_mode(tmp_path):
    with pytest.raises(ValueError):
        Spool(tmp_path / "s", ["incoming"], sync="fast")


@pytest.mark.parametrize("fstype, protocol", [
    ("ext4", durable.JOURNAL), ("ext4-nojournal", durable.STRICT), ("xfs", durable.JOURNAL),
])
def test_detected_on_real_filesystems(tmp_path, fstype, protocol):
    """On a 300 MB image made and loop-mounted by the bench's helper."""
    if os.geteuid() != 0:
        pytest.skip("loop mounts need root")
    if not support.have(disk.MKFS[fstype][0]):
        pytest.skip(f"{disk.MKFS[fstype][0]} not installed")
    # a space in the mount point: /proc/self/mountinfo writes it \040
    try:
        with disk.loop_filesystem(tmp_path, fstype, 300, name="spool fs") as point:
            spool = Spool(point / "spool", ["incoming"])
            assert spool.protocol.name == protocol, spool.protocol
            assert spool.protocol.fstype == fstype.split("-")[0]
            # and the protocol commits there: the file is whole in its stage
            qid = spool.deposit("incoming", b"x" * 5000)
            assert (point / "spool" / "incoming" / qid).read_bytes() == b"x" * 5000
            assert list(spool.names("tmp")) == []
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make or loop-mount {fstype} here: {exc.stderr!r}")


MOVES = r"""
import sys
sys.path.insert(0, {root!r})
from spool import Spool
spool = Spool({spool!r}, ["incoming", "active"], sync={sync!r})
qid = spool.deposit("incoming", b"x" * 3000)
claim = spool.claim("incoming", qid)
print("MOVE", flush=True)
claim.move("active")
claim = spool.claim("active", qid)
print("DONE", flush=True)
claim.done()
print("STAGE", flush=True)
spool.sync_stage("active")
print("END", flush=True)
"""


@pytest.mark.parametrize("protocol", ["strict", "journal"])
def test_moves_and_removals_flush_by_the_protocol(tmp_path, tmpfs_path, protocol):
    """strict: a move fsyncs both directories, a removal its directory;
    journal: a move or a removal fsyncs the claimed file itself (its
    inode is logged with the directory change), a stage sync is one
    syncfs; nothing else is flushed."""
    if not support.have("strace"):
        pytest.skip("strace not installed")
    spool = (tmp_path if protocol == "strict" else tmpfs_path) / "spool"
    trace = tmp_path / "trace"
    code = MOVES.format(root=str(support.ROOT), spool=str(spool),
                        sync="strict" if protocol == "strict" else "auto")
    subprocess.run(["strace", "-f", "-y", "-qq", "-o", str(trace), "-e",
                    "trace=fsync,fdatasync,syncfs,write", sys.executable, "-c", code],
                   check=True, capture_output=True, timeout=60)
    calls = [line.split(None, 1)[1] for line in trace.read_text().splitlines()]
    marks = {m: next(i for i, c in enumerate(calls) if f', "{m}' in c)
             for m in ("MOVE", "DONE", "STAGE", "END")}

    def flushes(start: str, end: str) -> list[str]:
        return [c.split("(", 1)[0] + " " + c.split("<", 1)[1].split(">", 1)[0]
                for c in calls[marks[start] + 1:marks[end]]
                if c.startswith(("fsync", "fdatasync", "syncfs"))]
    active = f"{spool}/active"
    if protocol == "strict":
        assert flushes("MOVE", "DONE") == [f"fsync {active}", f"fsync {spool}/incoming"]
        assert flushes("DONE", "STAGE") == [f"fsync {active}"]
        assert flushes("STAGE", "END") == [f"fsync {active}"]
    else:
        deposit_sync = [c for c in calls[:marks["MOVE"]] if c.startswith("fsync")][-1]
        name = deposit_sync.split("<", 1)[1].split(">", 1)[0].rsplit("/", 1)[1]
        assert flushes("MOVE", "DONE") == [f"fsync {active}/{name}"]
        assert len(flushes("DONE", "STAGE")) == 1
        assert flushes("DONE", "STAGE")[0].startswith(f"fsync {active}/{name}")
        assert flushes("STAGE", "END") == [f"syncfs {spool}"]

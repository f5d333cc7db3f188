"""How a file in the spool becomes durable: the commit protocol, chosen
for the filesystem the spool is on.

Two protocols (``[spool] sync`` in msa.toml: ``auto``, the default, picks
``journal`` where it is safe and ``strict`` elsewhere; ``strict`` forces
the second):

``journal``  write in ``tmp/``, rename into the stage, then **one** flush:
             ``fsync(2)`` of the file. Used on ext4 with a journal, on
             xfs, and on tmpfs (nothing survives a reboot there; the fsync
             is a no-op).

``strict``   write in ``tmp/``, fsync the file, rename, fsync the stage
             directory: two flushes in a row. Every POSIX filesystem that
             honours fsync keeps this promise (NFS, ext4 without a
             journal, btrfs, anything not recognised).

Why one fsync of the file covers its rename on a journaled filesystem:

- ext4 (``fs/ext4/namei.c`` ``ext4_rename``): the rename updates the
  ctime of the renamed inode and marks it dirty in the same journal handle
  as the directory change (``ext4_mark_inode_dirty`` ->
  ``ext4_update_inode_fsync_trans`` records the handle's transaction as
  the inode's ``i_sync_tid``). ``fsync`` (``fs/ext4/fsync.c``
  ``ext4_fsync_journal``) writes the data, then waits for the commit of
  ``i_sync_tid``; jbd2 commits transactions in order, so the transaction
  holding the rename is on disk, with its cache flush, when fsync
  returns. ``fdatasync`` would wait for ``i_datasync_tid`` only, which a
  rename does not move: msa calls ``fsync``. Without a journal
  (``ext4_fsync_nojournal``) none of this holds, hence ``strict`` there.
- xfs (``fs/xfs/xfs_inode.c`` ``xfs_rename`` logs the source inode with
  ``xfs_trans_ichgtime`` + ``xfs_trans_log_inode`` in the rename's
  transaction; ``fs/xfs/xfs_file.c`` ``xfs_file_fsync`` forces the log up
  to that inode's last commit sequence, and the log is written in order).
- Concurrent writers each fsync their own file; the journal batches them:
  jbd2 joins handles that arrive while a commit is being prepared into
  one commit (``Documentation/filesystems/ext4.rst``, ``min_batch_time``,
  ``max_batch_time``), xfs's log force writes everything committed to the
  CIL so far (``Documentation/filesystems/xfs/xfs-delayed-logging-design.rst``).
  That is the group commit of new files; no thread of msa waits for another.

A renamed file is visible in its stage before its flush. After a power cut
between the rename and the flush the file may come back shorter than it
was written (ext4's delayed allocation writes the data later than the
rename's commit): it was never acknowledged; the reader finds it shorter
than its ``Size`` and moves it to ``corrupt/``. Files rewritten in place
of an acknowledged version (``replace``) always use ``strict``: the old
version must not go before the new one is whole.

Renames of files already durable (a move between stages) and unlinks have
no new data: in ``journal`` mode their group flush is one ``syncfs(2)`` of
the spool's filesystem, which reports writeback errors since Linux 5.8
(commit 735e4ae5ba28, "vfs: track per-sb writeback errors and report them
to syncfs"); below 5.8 ``auto`` picks ``strict``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

JOURNAL = "journal"
STRICT = "strict"
MODES = ("auto", STRICT)

# Filesystems whose fsync of a file commits the file's last rename.
_JOURNALED = {"xfs"}
_NO_DURABILITY = {"tmpfs", "ramfs"}


@dataclass(frozen=True)
class Protocol:
    name: str           # JOURNAL or STRICT
    fstype: str         # what /proc/self/mountinfo says the spool is on
    reason: str         # why this protocol, for the log line at start

    @property
    def sync_before_rename(self) -> bool:
        return self.name == STRICT

    def describe(self) -> str:
        return f"commit protocol {self.name} ({self.reason})"


def _mount_of(path: str) -> tuple[str, set[str]]:
    """(fstype, super options) of the filesystem holding
    ``path``: the mountinfo line whose device number is the path's, the
    longest mount point under which the path lies if several match."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    real = os.path.realpath(path)
    best: tuple[int, tuple[str, set[str]]] | None = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            fields = left.split()
            if not sep or len(fields) < 5 or fields[2] != dev:
                continue
            point = fields[4].replace("\\040", " ").replace("\\011", "\t") \
                .replace("\\012", "\n").replace("\\134", "\\")
            if real != point and not real.startswith(point.rstrip("/") + "/"):
                continue
            tail = right.split()       # fstype, source, super options
            found = (tail[0], set(tail[2].split(",")) if len(tail) > 2 else set())
            if best is None or len(point) > best[0]:
                best = (len(point), found)
    if best is None:
        return ("unknown", set())
    return best[1]


def ext4_has_journal(path: str) -> bool:
    """The ext4 filesystem holding ``path`` has a journal: jbd2 lists it in
    ``/proc/fs/jbd2/<device>-<journal inode>`` (``fs/jbd2/journal.c``,
    ``jbd2_stats_proc_init``), the device named as ``/sys/dev/block`` names
    it (``loop0``, ``dm-1``, ``vda``)."""
    st = os.stat(path)
    block = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    name = os.path.basename(os.path.realpath(block))
    try:
        journals = os.listdir("/proc/fs/jbd2")
    except OSError:
        return False
    return any(j.startswith(name + "-") for j in journals)


def kernel_reports_syncfs_errors(release: str | None = None) -> bool:
    """Linux 5.8 and later return writeback errors from ``syncfs(2)``."""
    release = release or os.uname().release
    parts = release.split(".")
    try:
        major, minor = int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return False
    return (major, minor) >= (5, 8)


def choose(path: str, mode: str = "auto") -> Protocol:
    """The protocol for a spool at ``path`` under ``[spool] sync = mode``."""
    try:
        fstype, options = _mount_of(path)
    except OSError:
        fstype, options = "unknown", set()
    if mode == STRICT:
        return Protocol(STRICT, fstype, f"{fstype}: [spool] sync = strict")
    if not kernel_reports_syncfs_errors():
        return Protocol(STRICT, fstype,
                        f"{fstype}: Linux {os.uname().release} is older than 5.8, "
                        "syncfs(2) does not report write errors")
    if {"nobarrier", "barrier=0"} & options:
        return Protocol(STRICT, fstype, f"{fstype}: mounted nobarrier")
    if fstype in _NO_DURABILITY:
        return Protocol(JOURNAL, fstype, f"{fstype}: in memory, nothing survives a reboot")
    if fstype in _JOURNALED:
        return Protocol(JOURNAL, fstype, f"{fstype}: fsync of a file commits its rename")
    if fstype == "ext4":
        if ext4_has_journal(path):
            return Protocol(JOURNAL, fstype,
                            "ext4 with a journal: fsync of a file commits its rename")
        return Protocol(STRICT, fstype, "ext4 without a journal: the directory needs its own fsync")
    return Protocol(STRICT, fstype, f"{fstype}: not known to commit a rename with the file")


def syncfs(fd: int) -> None:
    """``syncfs(2)`` of the filesystem holding the open file ``fd``
    (os has no syncfs; the C library's is called through ctypes)."""
    import ctypes  # here: a sendmail call never needs it (4 ms)
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    if _LIBC[0].syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_LIBC: list = []

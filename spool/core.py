"""A durable filesystem spool: a state is a directory, a change of state is
one rename.

Layout under the root (every directory is created by :class:`Spool`)::

    tmp/            files being written; never read by anyone but the writer
    <stage>/        one directory per stage the caller names (``maildrop``,
                    ``incoming``, ``active``, ...)
    deferred/<N>/   messages waiting for attempt N+1; file mtime = due time
    hold/           held by the administrator; never due, never expires
    corrupt/        files that could not be parsed; kept for a human
    claims/         ``<id>.lock`` files locked with ``filelock`` (an exclusive,
                    non-blocking ``flock(2)``), for the stages that hold
                    untrusted files; in the others the file itself is locked

Invariants (qmail INTERNALS style; each is relied on by crash recovery):

1. A file appears in a stage only by ``rename(2)`` from ``tmp/`` or from
   another stage. :meth:`Writer.commit` returns only after the file, the
   rename and the directory entry are on disk: by the ``strict`` protocol
   (fsync, rename, fsync of the directory) or, where the filesystem
   commits a rename with the file's fsync, by the ``journal`` protocol
   (rename, fsync): :mod:`spool.durable`. Under ``journal`` a file whose
   commit had not returned may come back from a power cut shorter than
   written: it was never acknowledged, and readers check lengths.
2. Nothing is modified by writing in place. A new version of a file is
   written in ``tmp/`` and renamed over the old one (:meth:`Claim.rewriter`),
   so at every instant exactly one whole version exists.
3. Work on an id is done under its claim: an exclusive ``flock(2)`` on
   the file itself, as Postfix locks its queue files, checked to be still
   the file at that name; in the stages named ``claim_files`` (files that
   untrusted users put there, which must not be opened before they are
   checked) an flock on ``claims/<id>.lock`` (``filelock``). The kernel
   drops the flock when the holder dies, so a claim of a dead process is
   free again at once; :meth:`Spool.recover` only tidies files. A claimed
   file rewritten in place (:meth:`Claim.rewriter`) is locked before its
   rename, so the claim never lapses.
4. ``tmp/<id>.<pid>`` names its writer. At start, files in ``tmp/`` whose
   writer is dead (or older than a day) are removed: they were never
   acknowledged to anyone.
5. Ids sort by arrival time: 13 hex digits of microseconds since the epoch,
   6 of the writer's pid, 3 of a per-process counter.

Nothing here knows about mail.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import itertools
import os
import stat
import threading
import time
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from . import durable


def _log():
    """The library's logger, "spool" (logging is imported on first use: a
    sendmail call, which only deposits a file, never logs here; 4 ms)."""
    import logging
    return logging.getLogger("spool")


FIXED_DIRS = ("tmp", "deferred", "hold", "corrupt", "claims")
STALE_TMP_SECONDS = 86400
WRITE_BUFFER = 65536
_counter = itertools.count()
_counter_lock = threading.Lock()


class SpoolError(Exception):
    """Base of every error this package raises."""


class SpoolFull(SpoolError):
    """The filesystem refused the write for want of space (ENOSPC, EDQUOT,
    EFBIG)."""


class SpoolUnavailable(SpoolError):
    """The spool directory does not exist or cannot be entered."""


def new_id(now: float | None = None) -> str:
    """A queue id that sorts by arrival time and is unique on this host."""
    usec = int((time.time() if now is None else now) * 1_000_000)
    with _counter_lock:
        seq = next(_counter) & 0xFFF
    return f"{usec:013X}{os.getpid() & 0xFFFFFF:06X}{seq:03X}"


def id_time(qid: str) -> float:
    """The arrival time encoded in a queue id (seconds since the epoch)."""
    return int(qid[:13], 16) / 1_000_000


def valid_name(name: str) -> bool:
    """Names the spool will ever create: no dot files, no path separators."""
    return (0 < len(name) <= 64 and not name.startswith(".")
            and all(c.isalnum() or c in "-_" for c in name))


def fsync_dir(path: Path | str, entry: str | None = None) -> None:
    """Make the directory's entries durable.

    A writer that may not read the directory (an unprivileged user putting
    a file into a write-only ``maildrop/``, mode 1733) cannot open it to
    fsync it; then, when ``entry`` names a file in it that the writer can
    open, ``syncfs(2)`` on that file flushes its whole filesystem, the new
    directory entry included.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        if entry is None:
            raise
        _syncfs(os.path.join(path, entry))
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        durable.syncfs(fd)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    with memoryview(data) as view:
        while view:
            view = view[os.write(fd, view):]


def _full(exc: OSError) -> SpoolError:
    # EIO (a failed write or flush) is no shortage of space: a SpoolError,
    # which the edge answers 451 4.3.0, not 452 4.3.1.
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return SpoolFull(f"cannot write queue file: {os.strerror(exc.errno)}")
    return SpoolError(f"cannot write queue file: {exc}")


class Writer:
    """A file being written in ``tmp/``; :meth:`commit` makes it durable.

    Use as a context manager: leaving without commit removes the temp file.
    """

    def __init__(self, spool: "Spool", stage: str, qid: str, mode: int,
                 mtime: float | None = None, replace: bool = False,
                 claim: "Claim | None" = None):
        self.spool, self.stage, self.qid = spool, stage, qid
        self.mtime, self.replace, self.claim = mtime, replace, claim
        # Plain strings, not Path objects: this runs for every message.
        self.tmp_path = f"{spool.root_s}/tmp/{qid}.{os.getpid()}"
        self.size = 0
        try:
            self.fd: int | None = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                          | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        except OSError as exc:
            raise _full(exc) from exc
        # Small writes are gathered (copied: a caller may reuse its
        # buffer) and written with one writev(2); no file object.
        self._pending: list[bytes] = []
        self._pending_size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        try:
            if self._pending_size + n > WRITE_BUFFER:
                self._flush()
            if n >= WRITE_BUFFER:
                _write_all(self.fd, data)
            else:
                self._pending.append(bytes(data))
                self._pending_size += n
        except OSError as exc:
            self.abort()
            raise _full(exc) from exc
        self.size += n

    def _flush(self) -> None:
        if self._pending:
            pending, self._pending, self._pending_size = self._pending, [], 0
            written = os.writev(self.fd, pending)
            if written < sum(len(p) for p in pending):
                _write_all(self.fd, memoryview(b"".join(pending))[written:])

    def commit(self, sync_dir: bool = True) -> str:
        """Make the file durable in its stage, by the spool's protocol
        (:mod:`spool.durable`): ``strict``: fsync the data, rename into
        the stage, fsync the stage directory; ``journal``: rename, then
        fsync the file (which commits the rename with it). A new version
        of a file (``replace``) is always fsynced before its rename.

        With ``sync_dir=False`` under ``strict`` the directory is not
        fsynced: the caller must call :meth:`Spool.sync_stage` (or a
        :class:`GroupSync`) before acknowledging the file to anyone.
        Under ``journal`` the file is durable when this returns either way
        (:attr:`Spool.commits_durable`).
        """
        dest = self.spool.fspath(self.stage, self.qid)
        strict = self.replace or not self.spool.commits_durable
        keep = None
        renamed = False
        try:
            self._flush()
            if strict:
                os.fsync(self.fd)
            if self.claim is not None and isinstance(self.claim._lock, FileLockInPlace):
                # The new version is locked before anyone can see it.
                keep = os.dup(self.fd)
                fcntl.flock(keep, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if self.mtime is not None:
                os.utime(self.fd, (self.mtime, self.mtime))
            if not self.replace and os.path.lexists(dest):
                raise SpoolError(f"{self.stage}/{self.qid} exists")
            os.rename(self.tmp_path, dest)
            renamed = True
            if keep is not None:
                self.claim._lock.adopt(keep)
                keep = None             # the claim holds it now
            if not strict:
                os.fsync(self.fd)       # the one flush: data and rename
            fd, self.fd = self.fd, None
            os.close(fd)
            if strict and sync_dir:
                fsync_dir(f"{self.spool.root_s}/{self.stage}", self.qid)
        except OSError as exc:
            _close_quietly(keep)
            self.abort()
            if renamed and not strict:
                _unlink_unacknowledged(dest)
            raise _full(exc) from exc
        except SpoolError:
            _close_quietly(keep)
            self.abort()
            raise
        return self.qid

    def abort(self) -> None:
        self._pending = []
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.fd is not None or (exc_type is not None):
            self.abort()


@functools.cache
def _claim_lock():
    """(the lock class, its Timeout), made at the first claim: filelock
    imports asyncio (20 ms), which a ``sendmail`` that only deposits a
    file never needs.

    The class is ``filelock.FileLock`` as is, made cheaper to construct:
    filelock's metaclass runs ``inspect.signature(cls.__init__)`` for every
    lock (40 us in 3.16, one lock per claim); a ``__signature__`` on the
    class's own ``__init__`` is returned by inspect at once."""
    import inspect

    import filelock

    class ClaimLock(filelock.FileLock):
        def __init__(self, lock_file: str, timeout: float = -1, mode: int = 0o644,
                     thread_local: bool = True, *, blocking: bool = True,
                     is_singleton: bool = False) -> None:
            super().__init__(lock_file, timeout, mode, thread_local, blocking=blocking,
                             is_singleton=is_singleton)

    ClaimLock.__init__.__signature__ = inspect.signature(ClaimLock.__init__)
    return ClaimLock, filelock.Timeout


class FlockFile:
    """An exclusive, non-blocking claim lock: ``filelock.FileLock`` (an
    ``flock(2)`` on the lock file) with the check that the locked inode is
    still the file's. The kernel drops the lock when the holder's descriptor
    is closed, or the holder dies.

    filelock is pinned below 3.17 in setup.py: 4.x's acquire costs about
    0.9 ms (fork tracking, singleton bookkeeping, directory creation) where
    3.16's costs 0.06 ms, and a message takes two or three claims."""

    __slots__ = ("lock_file", "_lock")

    def __init__(self, lock_file: str):
        self.lock_file = lock_file
        self._lock = _claim_lock()[0](lock_file, timeout=0, thread_local=False)

    @property
    def fd(self) -> int | None:
        return self._lock._context.lock_file_fd

    def acquire(self) -> bool:
        """True when locked; False when another open file holds it."""
        for _ in range(3):
            try:
                self._lock.acquire()
            except _claim_lock()[1]:
                return False
            except FileNotFoundError:
                # filelock opens without O_CREAT when the file existed a
                # moment before; its holder unlinked it meanwhile. Retry.
                continue
            return True
        return False

    def holds_current(self) -> bool:
        """A holder that finished may have unlinked the lock file after we
        opened it: a lock on an unlinked inode is no claim."""
        return _same_file(self.fd, self.lock_file)

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    def drop(self) -> None:
        """Release and remove the lock file (claims/ does not grow)."""
        try:
            os.unlink(self.lock_file)
        except FileNotFoundError:
            pass
        self.release()


class FileLockInPlace:
    """An exclusive, non-blocking ``flock(2)`` on a spool file itself (no
    lock file: on ext4 without a journal, creating a file costs ~0.2 ms of
    CPU while inodes freed in the last minutes are skipped, and a lock file
    per claim made two such files per message). Held until :meth:`drop`
    closes the descriptor, or the holder dies."""

    __slots__ = ("path", "fd")

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when locked; False when the file is gone or another open
        file holds it."""
        try:
            # O_NONBLOCK: a FIFO must not hang the caller; trusted stages
            # only (a file an untrusted user made is never opened here).
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def holds_current(self) -> bool:
        """The holder before us may have renamed the file away, or renamed
        a new version over it, after we opened it: a lock on an inode that
        is no longer at ``path`` is no claim."""
        return _same_file(self.fd, self.path)

    def adopt(self, fd: int) -> None:
        """Hold ``fd`` (locked: the new version of the file) instead."""
        old, self.fd = self.fd, fd
        _close_quietly(old)

    def drop(self) -> None:
        fd, self.fd = self.fd, None
        _close_quietly(fd)

    release = drop


def _same_file(fd: int | None, path: str) -> bool:
    """``fd`` is open on the inode that ``path`` names now."""
    try:
        st = os.fstat(fd)
        cur = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, TypeError):
        return False
    return (st.st_ino, st.st_dev) == (cur.st_ino, cur.st_dev)


def _close_quietly(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _unlink_unacknowledged(path: str) -> None:
    """A file renamed into its stage whose flush failed was never
    acknowledged and its data may not be on disk: take it back, unless a
    reader already moved it on (then it is delivered; the sender, told
    4xx, may send it again: a duplicate, never a loss)."""
    try:
        os.unlink(path)
    except OSError:
        pass


class Claim:
    """Exclusive right to work on one id, held until :meth:`release`.

    Every method that moves the file away also releases the claim.
    """

    def __init__(self, spool: "Spool", stage: str, qid: str,
                 lock: "FlockFile | FileLockInPlace"):
        self.spool, self.stage, self.qid, self._lock = spool, stage, qid, lock

    @property
    def path(self) -> Path:
        return self.spool.path(self.stage, self.qid)

    @property
    def fspath(self) -> str:
        """:attr:`path` as a plain string (cheaper)."""
        return self.spool.fspath(self.stage, self.qid)

    def open(self) -> BinaryIO:
        fd = os.open(self.fspath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return os.fdopen(fd, "rb")

    def rewriter(self, mode: int = 0o640) -> Writer:
        """A writer whose commit atomically replaces this file in place of
        its stage (rename over it)."""
        return Writer(self.spool, self.stage, self.qid, mode, replace=True, claim=self)

    def move(self, to_stage: str, mtime: float | None = None,
             release: bool = True, sync_dirs: bool = True) -> None:
        """Rename into ``to_stage``; set the mtime first when given.

        With ``sync_dirs=False`` the caller must make the destination
        directory durable (:meth:`Spool.sync_stage` or a group sync) before
        relying on the move; the rename is atomic, so a crash before that
        leaves the file in one of the two stages, never in neither."""
        root = self.spool.root_s
        src_dir, dest_dir = f"{root}/{self.stage}", f"{root}/{to_stage}"
        src, dest = f"{src_dir}/{self.qid}", f"{dest_dir}/{self.qid}"
        if mtime is not None:
            os.utime(src, (mtime, mtime))
        try:
            os.rename(src, dest)
        except FileNotFoundError:
            # Only a stage made on demand (deferred/<N>/) can be missing:
            # create it on failure rather than trying mkdir every move.
            if not os.path.lexists(src) or os.path.isdir(dest_dir):
                raise
            os.makedirs(dest_dir, exist_ok=True)
            fsync_dir(os.path.dirname(dest_dir))  # the new directory's own entry
            os.rename(src, dest)
        self.stage = to_stage
        # The work on the file is done once it is renamed: release before
        # the directory fsyncs, so the next stage's worker (woken by the
        # rename) can claim it at once. The fsyncs still complete before
        # this returns, so the caller's acknowledgement stays durable.
        if sync_dirs and self.spool.commits_durable:
            # journal protocol: the renamed inode's fsync commits the
            # rename (spool.durable); the claim's descriptor is that inode.
            self._flush_inode()
            if release:
                self.release()
            return
        if release:
            self.release()
        if sync_dirs:
            fsync_dir(dest_dir)
            fsync_dir(src_dir)

    def _flush_inode(self) -> None:
        """Under the journal protocol, make a rename or unlink of the
        claimed file durable: fsync of the claim's own descriptor on the
        file (ext4 and xfs log the inode in the same transaction as the
        directory change), else one syncfs of the spool's filesystem."""
        lock = self._lock
        if isinstance(lock, FileLockInPlace) and lock.fd is not None:
            os.fsync(lock.fd)
        else:
            self.spool.flush_dir(f"{self.spool.root_s}/{self.stage}")

    def defer(self, due: float, attempt: int) -> None:
        """Move to ``deferred/<attempt>/`` with mtime = due time."""
        self.move(f"deferred/{attempt}", mtime=due)

    def done(self, sync_dir: bool = True) -> None:
        """The work is finished: remove the file. ``sync_dir=False`` leaves
        the removal to the filesystem's next commit: after a power loss the
        file may come back (a duplicate, never a loss)."""
        os.unlink(self.fspath)
        if sync_dir:
            if self.spool.commits_durable:
                self._flush_inode()
            else:
                fsync_dir(f"{self.spool.root_s}/{self.stage}")
        self.release()

    def quarantine(self, reason: str) -> None:
        self.spool.quarantine(self.stage, self.qid, reason)
        self.release()

    def release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.drop()

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if getattr(self, "_lock", None) is not None:
            self._lock.release()


class Spool:
    """A spool root with the caller's stages.

    ``stages`` are relative directory names; ``modes`` may give a stage its
    own permission bits (a maildrop that any local user may write into is
    ``0o1733``: world-writable, sticky, not listable). Files of the
    ``claim_files`` stages are claimed through a lock file in ``claims/``
    and never opened by :meth:`claim` (untrusted files: a FIFO, a device,
    a symlink); the others are claimed by locking the file itself.
    """

    def __init__(self, root: str | os.PathLike, stages: Iterable[str] = (),
                 modes: dict[str, int] | None = None, create: bool = True,
                 claim_files: Iterable[str] = (), sync: str = "auto"):
        self.root = Path(root)
        self.root_s = str(self.root)
        if sync not in durable.MODES:
            raise ValueError(f"sync must be one of {', '.join(durable.MODES)}, not {sync!r}")
        self.sync_mode = sync
        self._protocol: durable.Protocol | None = None
        self._root_fd: int | None = None
        self.stages = list(stages)
        # Stages whose files untrusted users make: claimed by a lock file.
        self.claim_files = frozenset(claim_files)
        modes = modes or {}
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            for name in list(FIXED_DIRS) + self.stages:
                d = self.root / name
                d.mkdir(parents=True, exist_ok=True)
                if name in modes and stat.S_IMODE(d.stat().st_mode) != modes[name]:
                    os.chmod(d, modes[name])
        elif not (self.root / "tmp").is_dir():
            raise SpoolUnavailable(f"{self.root}: not a spool (no tmp/)")

    # -- paths and listing ------------------------------------------------

    def path(self, stage: str, qid: str) -> Path:
        return self.root / stage / qid

    def fspath(self, stage: str, qid: str) -> str:
        """:meth:`path` as a plain string: no Path object per call."""
        return f"{self.root_s}/{stage}/{qid}"

    def names(self, stage: str) -> Iterator[str]:
        """Names in a stage, unsorted, streamed (memory does not grow with
        the stage)."""
        try:
            with os.scandir(self.root / stage) as it:
                for entry in it:
                    if not entry.name.startswith("."):
                        yield entry.name
        except FileNotFoundError:
            return

    def deferred_stages(self) -> list[str]:
        out = []
        for name in self.names("deferred"):
            if name.isdigit():
                out.append(f"deferred/{name}")
        return sorted(out, key=lambda s: int(s.split("/")[1]))

    def find(self, qid: str) -> str | None:
        """The stage an id is in now, or None."""
        for stage in self.stages + self.deferred_stages() + ["hold", "corrupt"]:
            if os.path.lexists(self.path(stage, qid)):
                return stage
        return None

    # -- writing ----------------------------------------------------------

    def writer(self, stage: str, qid: str | None = None, mode: int = 0o640,
               mtime: float | None = None) -> Writer:
        return Writer(self, stage, qid or new_id(), mode, mtime)

    def deposit(self, stage: str, chunks: Iterable[bytes] | bytes,
                qid: str | None = None, mode: int = 0o640) -> str:
        """Write a whole file durably into a stage; returns its id."""
        if isinstance(chunks, (bytes, bytearray, memoryview)):
            chunks = (bytes(chunks),)
        with self.writer(stage, qid, mode) as w:
            for chunk in chunks:
                w.write(chunk)
            return w.commit()

    def sync_stage(self, stage: str) -> None:
        """Make renames and removals in ``stage`` durable."""
        self.flush_dir(f"{self.root_s}/{stage}")

    @property
    def protocol(self) -> durable.Protocol:
        """The commit protocol (:mod:`spool.durable`), chosen at the first
        commit for the filesystem the root is on."""
        if self._protocol is None:
            self._protocol = durable.choose(self.root_s, self.sync_mode)
        return self._protocol

    @property
    def commits_durable(self) -> bool:
        """:meth:`Writer.commit` leaves the file durable, whatever its
        ``sync_dir`` (the journal protocol): no directory sync to add."""
        return not self.protocol.sync_before_rename

    def flush_dir(self, path: str) -> None:
        """Make the renames and removals done so far in the directory
        ``path`` durable: its fsync (strict), or one ``syncfs(2)`` of the
        spool's filesystem (journal: it commits the journal, whatever
        directory; the group syncs call it for a batch)."""
        if not self.commits_durable:
            fsync_dir(path)
            return
        if self._root_fd is None:
            self._root_fd = os.open(self.root_s, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # One descriptor for the spool's life: syncfs reports a writeback
        # error once to each open file that had not seen it, so a
        # descriptor opened after a failed writeback could miss it.
        durable.syncfs(self._root_fd)

    # -- claims -----------------------------------------------------------

    def claim(self, stage: str, qid: str) -> Claim | None:
        """Claim ``stage/qid`` without waiting; None if another process
        holds it or it is no longer there."""
        if not valid_name(qid):
            return None
        in_place = stage not in self.claim_files
        lock: FlockFile | FileLockInPlace = (
            FileLockInPlace(self.fspath(stage, qid)) if in_place
            else FlockFile(f"{self.root_s}/claims/{qid}.lock"))
        if not lock.acquire():
            return None
        if not lock.holds_current():
            lock.release()
            return None
        # A lock file says nothing of the file itself: it may have moved on
        # between listing and locking; drop the lock file as Claim.release
        # does, or claims/ grows with every stale name a watcher is told about.
        if not in_place and not os.path.lexists(self.fspath(stage, qid)):
            Claim(self, stage, qid, lock).release()
            return None
        return Claim(self, stage, qid, lock)

    # -- administrative moves ---------------------------------------------

    def quarantine(self, stage: str, name: str, reason: str) -> Path:
        """Move a file that cannot be used to ``corrupt/``; never delete it."""
        src = self.path(stage, name)
        dest = self.root / "corrupt" / name
        if os.path.lexists(dest):
            dest = self.root / "corrupt" / f"{name}.{new_id()}"
        os.rename(src, dest)
        fsync_dir(dest.parent)
        _log().warning("%s: moved %s/%s to corrupt/: %s", name, stage, name, reason)
        return dest

    # -- crash recovery ---------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Tidy after a crash: remove dead writers' temp files and unheld
        claim files. Safe to run while other processes work."""
        removed_tmp = removed_claims = 0
        now = time.time()
        tmp = self.root / "tmp"
        for name in list(self.names("tmp")):
            pid = _tmp_pid(name)
            try:
                age = now - os.lstat(tmp / name).st_mtime
            except FileNotFoundError:
                continue
            if age > STALE_TMP_SECONDS or (pid is not None and not pid_alive(pid)):
                try:
                    os.unlink(tmp / name)
                    removed_tmp += 1
                    _log().info("recover: removed tmp/%s (writer gone)", name)
                except FileNotFoundError:
                    pass
        for name in list(self.names("claims")):
            lock = FlockFile(str(self.root / "claims" / name))
            try:
                if not lock.acquire():
                    continue
            except OSError:  # not ours to open (another user's), or gone
                continue
            try:
                if lock.holds_current():
                    os.unlink(self.root / "claims" / name)
                removed_claims += 1
            except FileNotFoundError:
                pass
            lock.release()
        return {"tmp": removed_tmp, "claims": removed_claims}


def _tmp_pid(name: str) -> int | None:
    _, _, pid = name.rpartition(".")
    return int(pid) if pid.isdigit() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

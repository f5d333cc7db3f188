"""The watcher: carries messages from the inputs through every policy
stage to ``active/`` in one pass.

Paths a message takes (each arrow is one durable rename; a crash between
two arrows leaves the message whole in at least one stage, and the watcher
resumes it from there at its next start)::

    maildrop/X ──validate, copy──> incoming/Q
    incoming/Q ──read once, apply the policies of every stage in memory,
                 write once──> active/Q, then incoming/Q is removed
    incoming/Q ──split──> active/Q-1, active/Q-2 ..., then incoming/Q is removed

The ``policy-<name>/`` directories stay stages: a file found in one (put
there by an administrator, or left by an older version) gets the policies
of that stage and of the later ones, the same way. A message no longer
stops in each of them.

Invariants:

- All work on a message is done under its claim; a file another process
  claims, or that is gone, is skipped (it will be seen again if needed).
  Names being carried by this process are skipped too (a rescan may list
  a source whose replacement is already in ``active/``).
- ``maildrop/`` is untrusted (:mod:`msa.cleanup.maildrop`): the copy in
  ``incoming/`` gets a fresh queue id (a user chooses maildrop names), is
  committed before the maildrop file is removed (a crash in between gives
  a duplicate, never a loss: RFC 5321 §6.1 allows duplicates).
- Policies edit the header section only (at most ``max_header_bytes``,
  else the file goes to ``corrupt/``); the body is streamed in 64 KiB
  chunks, never held in memory (the first 64 KiB of the file are read
  with the envelope and headers, and reused).
- The result is what passing the stages one at a time gives
  (:func:`msa.cleanup.policies.run_stages`); the applied policies are recorded in
  ``Policies:``, and the source is never rewritten, so a rerun applies
  each policy exactly once to the original and writes the same bytes.
- A source is removed only after its replacement is durable: the new file
  was fsynced, renamed into ``active/``, and a fsync of ``active/`` that
  started after the rename completed (shared by concurrent workers,
  :class:`spool.group.ThreadGroupSync`). A rerun that finds ``active/Q``
  already there (a crash before the source was removed) only removes the
  source. The removal itself is not fsynced: after a power loss the source
  may come back, which gives a duplicate, never a loss.
- A split writes ``<qid>-1``, ``<qid>-2``... into ``active/``; the original
  is removed only after all of them are durable; a rerun keeps parts that
  already exist (they were committed whole) and writes the missing ones,
  so no recipient is lost.
- Memory does not grow with the backlog: the rescan is streamed through a
  bounded queue; the kernel's inotify queue overflowing triggers a rescan.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import queue
import select
import shutil
import signal
import stat
import threading
import time
from typing import BinaryIO, Iterator

import spool as spoollib
from msa.cleanup import maildrop, pipeline, policies
from msa.cleanup.policies import Policy
from msa.config import ACTIVE, Config, ConfigError
from msa.fastlog import log_message_id
from msa.message import queuefile
from msa.message.headerblock import HeaderBlock
from msa.message.headers import HeaderTooLarge
from msa.message.queuefile import Envelope, QueueFileError
from spool import Claim, Spool, StageWatcher, ThreadGroupSync

log = logging.getLogger("msa.watcher")
# Lines Postfix's pickup and qmgr would write (msa.process.logs names them).
pickup_log = logging.getLogger("msa.pickup")
qmgr_log = logging.getLogger("msa.qmgr")
cleanup_log = logging.getLogger("msa.cleanup")

# Test hook: after this many split parts are committed, the process kills
# itself with SIGKILL (crash-consistency tests). Unset in production.
CRASH_AFTER_PARTS_ENV = "MSA_TEST_CRASH_AFTER_PARTS"

# The first read of a queue file: envelope, headers and (for most
# messages) the whole body in one read(2).
HEAD_READ = 65536
COPY_CHUNK = 1 << 20
# open(2) errors that a maildrop entry itself causes, every time: a socket
# or device (ENXIO, ENODEV, EOPNOTSUPP), a file the watcher may not read.
NEVER_OPENS = (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP, errno.EACCES, errno.EPERM)


class Head:
    """What one read of a queue file gives: its envelope, its header
    section, where the body starts, and the bytes read so far (a prefix of
    the file, reused when the message is written again)."""

    def __init__(self, f: BinaryIO, cap: int, headers: bool = True):
        self.f = f
        self.file_size = os.fstat(f.fileno()).st_size
        self.data = f.read(HEAD_READ)
        self.env, self.offset = queuefile.envelope_of(self.data, f)
        queuefile.check_size(f, self.env, self.offset)
        if headers:
            self.read_headers(cap)

    def read_headers(self, cap: int) -> None:
        """Set ``headers`` and ``body_offset`` (raises HeaderTooLarge):
        from the bytes already read when the section ends in them, else
        from the file."""
        found = pipeline.header_section(self.data, self.offset, cap,
                                        whole=len(self.data) == self.file_size)
        if found is None:
            found = pipeline.read_header_section(self.f, self.offset, cap)
        self.headers, self.body_offset = found

    def body(self) -> Iterator[bytes]:
        """The body (from its separator line), in chunks."""
        if self.body_offset < len(self.data):
            yield self.data[self.body_offset:]
        if len(self.data) < self.file_size:
            yield from queuefile.iter_message(self.f, max(len(self.data), self.body_offset))

    def body_size(self) -> int:
        return self.file_size - self.body_offset


def write_message(writer: spoollib.Writer, env: Envelope, headers: bytes, head: Head,
                  sync_dir: bool = True) -> str:
    """Write envelope + headers + the body of ``head``; commit."""
    env.size = str(len(headers) + head.body_size())
    writer.write(env.to_bytes() + headers)
    for chunk in head.body():
        writer.write(chunk)
    return writer.commit(sync_dir=sync_dir)


class Watcher:
    """Runs the policy pipeline on every file that lands in a watched stage.

    ``pipeline`` is [(stage directory, [policies])]; by default it comes
    from ``[policies].stages`` (:func:`msa.cleanup.policies.pipeline`).
    """

    def __init__(self, cfg: Config, spool: Spool,
                 pipeline: list[tuple[str, list[Policy]]] | None = None,
                 workers: int | None = None):
        self.cfg, self.spool = cfg, spool
        self.pipeline = policies.pipeline(cfg) if pipeline is None else list(pipeline)
        # Where a file found in a stage starts in the pipeline.
        self.start_at = {"incoming": 0}
        for i, (stage, _) in enumerate(self.pipeline):
            self.start_at[stage] = i
        self.max_header = cfg.policies.max_header_bytes
        self.workers = workers or cfg.policies.workers
        self.rescan_interval = cfg.policies.rescan_interval
        self.active_sync = ThreadGroupSync(spool.root / ACTIVE, spool.flush_dir)
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._stopping = False
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._crash_after = int(os.environ.get(CRASH_AFTER_PARTS_ENV, "0") or 0)
        self._reported: set[tuple[str, int]] = set()   # maildrop entries left in place
        self._parts_committed = 0

    def reload(self, cfg: Config) -> None:
        """New policy settings (forward rules, header switches) for the
        next messages; the stage directories cannot change while running."""
        if cfg.policies.stages != self.cfg.policies.stages:
            raise ConfigError("[policies] stages cannot change without a restart")
        self.cfg, self.pipeline = cfg, policies.pipeline(cfg)

    def watched_stages(self) -> list[str]:
        return ["maildrop", *self.start_at]

    # -- one message ------------------------------------------------------

    def process(self, stage: str, name: str) -> str | None:
        """Carry one file as far as it goes; returns where it ended
        (``active``), ``corrupt``, ``split``, or None when skipped."""
        if stage == "maildrop":
            qid = self._pickup(name)
            if qid is None:
                return None
            stage, name = "incoming", qid
        if stage not in self.start_at:
            return None
        with self._busy_lock:
            if name in self._busy:
                return None  # this process is carrying it already
            self._busy.add(name)
        try:
            claim = self.spool.claim(stage, name)
            if claim is None:
                return None  # most events name a file already moved on
            return self._carry(claim)
        finally:
            with self._busy_lock:
                self._busy.discard(name)

    def _carry(self, claim: Claim) -> str | None:
        try:
            f = claim.open()
        except FileNotFoundError:
            claim.release()
            return None
        try:
            with f:
                stages = [pols for _, pols in self.pipeline[self.start_at[claim.stage]:]]
                try:
                    head = Head(f, self.max_header, headers=False)
                    if _all_applied(head.env, stages):  # the edge applied them
                        self._commit_one(claim, None, head, changed=False)
                        return ACTIVE
                    head.read_headers(self.max_header)
                except (QueueFileError, HeaderTooLarge) as exc:
                    claim.quarantine(str(exc))
                    return "corrupt"
                results, changed = policies.run_stages(head.env, head.headers, stages)
                log_message_id(cleanup_log, claim.qid, results[0][1].get("Message-ID"))
                if len(results) > 1:
                    self._commit_parts(claim, results, head)
                    return "split"
                self._commit_one(claim, results[0], head, changed)
                return ACTIVE
        finally:
            claim.release()

    def _commit_one(self, claim: Claim, result: tuple[Envelope, HeaderBlock] | None,
                    head: Head, changed: bool) -> None:
        """Put the message into active/ and remove the source once that is
        durable. The claim is released right after the rename, so the
        runner (woken by it) can take the message at once. A file that
        needs no change is only renamed, not fsynced: nothing is removed
        after it, and a crash leaves it in one of the two directories."""
        source, origin = claim.fspath, claim.stage
        if os.path.lexists(self.spool.fspath(ACTIVE, claim.qid)):
            log.info("%s: already in active/ (a run stopped before removing %s/%s)",
                     claim.qid, claim.stage, claim.qid)
        elif changed:
            env, headers = result
            with self.spool.writer(ACTIVE, qid=claim.qid) as w:
                write_message(w, env, headers.to_bytes(), head, sync_dir=False)
        else:
            claim.move(ACTIVE, release=False, sync_dirs=False)
            source = None
        claim.release()
        if source is not None:
            if not self.spool.commits_durable:
                self.active_sync.sync()
            _unlink(source)
        env = result[0] if result is not None else head.env
        # Postfix's qmgr line (pflogsumm takes sender and size from it).
        qmgr_log.info("%s: from=<%s>, size=%s, nrcpt=%d (queue active; policies done, "
                      "from %s/)", claim.qid, env.sender, env.size, len(env.recipients), origin)

    def _commit_parts(self, claim: Claim, parts: list[tuple[Envelope, HeaderBlock]],
                      head: Head) -> None:
        for env, headers in parts:
            if os.path.lexists(self.spool.fspath(ACTIVE, env.queue_id)):
                continue  # committed whole by a run that crashed
            with self.spool.writer(ACTIVE, qid=env.queue_id) as w:
                write_message(w, env, headers.to_bytes(), head, sync_dir=False)
            log.info("%s: split part %s to=%s", claim.qid, env.queue_id,
                     ",".join(f"<{r.address}>" for r in env.recipients))
            self._parts_committed += 1
            if self._crash_after and self._parts_committed >= self._crash_after:
                os.kill(os.getpid(), signal.SIGKILL)
        if not self.spool.commits_durable:
            self.active_sync.sync()
        claim.done(sync_dir=False)
        log.info("%s: split into %d messages, queued in active/", claim.qid, len(parts))

    # -- maildrop ---------------------------------------------------------

    def _pickup(self, name: str) -> str | None:
        """Validate an untrusted maildrop file and copy it to incoming/;
        returns the new queue id, or None."""
        if not spoollib.valid_name(name):
            self._refuse_unclaimed(name, "file name not made by sendmail")
            return None
        claim = self.spool.claim("maildrop", name)
        if claim is None:
            return None
        try:
            return self._pickup_claimed(claim)
        finally:
            claim.release()

    def _refuse_unclaimed(self, name: str, reason: str) -> None:
        """A name sendmail never makes: nothing else can claim it."""
        path = self.spool.fspath("maildrop", name)
        try:
            f, _ = maildrop.open_untrusted(path)
        except maildrop.Refused as exc:
            self._refuse(name, f"{reason}; {exc}")
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno in NEVER_OPENS:
                self._refuse(name, f"{reason}; cannot open: {exc.strerror}")
        else:
            with f:
                self._refuse(name, reason, f)

    def _pickup_claimed(self, claim: Claim) -> str | None:
        try:
            f, st = maildrop.open_untrusted(claim.path)
        except maildrop.Refused as exc:
            self._refuse(claim.qid, str(exc))
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in NEVER_OPENS:
                self._refuse(claim.qid, f"cannot open: {exc.strerror}")
            else:   # EMFILE, EIO ...: ours, not the file's; try again later
                log.warning("maildrop/%s: cannot open: %s (left in place)", claim.qid, exc)
            return None
        with f:
            try:
                user = maildrop.owner(st)
                env, offset = maildrop.read_untrusted(f, user, self.cfg.domain)
                qid = self._copy_checked(env, f, offset)
            except maildrop.Refused as exc:
                self._refuse(claim.qid, str(exc), f)
                return None
        claim.done()
        pickup_log.info("%s: uid=%s from=<%s> nrcpt=%d (maildrop/%s)", qid, env.local_uid,
                 env.sender, len(env.recipients), claim.qid)
        return qid

    def _refuse(self, name: str, reason: str, f: BinaryIO | None = None) -> None:
        """A maildrop entry that will not be taken, handled once: a
        regular file (``f``, open) is copied to ``corrupt/`` as a file of
        the spool's owner, mode 0600 (the submitter can neither read nor
        change it there; at most ``max_message_size`` + 1 MiB is kept),
        then removed; anything else is removed without being read (a
        symlink, a FIFO, a socket, a device, a hard link to someone else's
        file: its name in maildrop/ only); a directory is removed with what
        it holds, or, when that is not permitted, left in maildrop/ and
        reported once. Nothing a user made is ever moved into corrupt/,
        where it would stay theirs."""
        path = self.spool.fspath("maildrop", name)
        try:
            if f is not None:
                kept, whole = self._copy_refused(name, f)
                os.unlink(path)
                log.warning("maildrop/%s refused: %s; %s kept as corrupt/%s (mode 0600)",
                            name, reason, "the file" if whole else "its beginning", kept)
                return
            st = os.lstat(path)
        except FileNotFoundError:
            return
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)     # fd-based: never follows a link inside
            else:
                os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            if (name, st.st_ino) not in self._reported:
                if len(self._reported) >= 4096:
                    self._reported.clear()
                self._reported.add((name, st.st_ino))
                log.warning("maildrop/%s refused: %s; cannot remove it: %s (left in place, "
                            "not reported again)", name, reason, exc.strerror or exc)
            return
        log.warning("maildrop/%s refused: %s; removed", name, reason)

    def _copy_refused(self, name: str, f: BinaryIO) -> tuple[str, bool]:
        """Copy an open refused file into corrupt/; (its name there, whole?)."""
        limit = self.cfg.edge.max_message_size + (1 << 20)
        dest = name if spoollib.valid_name(name) else spoollib.new_id()
        if os.path.lexists(self.spool.fspath("corrupt", dest)):
            dest = spoollib.new_id()
        with self.spool.writer("corrupt", qid=dest, mode=0o600) as w:
            f.seek(0)
            left = limit
            while left > 0:
                chunk = f.read(min(COPY_CHUNK, left))
                if not chunk:
                    break
                w.write(chunk)
                left -= len(chunk)
            whole = left > 0 or not f.read(1)
            w.commit()
        return dest, whole

    def _copy_checked(self, env: Envelope, f: BinaryIO, offset: int) -> str:
        with self.spool.writer("incoming") as w:
            env.queue_id = w.qid
            env.arrival = queuefile.utc_iso(time.time())
            w.write(env.to_bytes())
            endings = maildrop.LineEndings()
            for chunk in queuefile.iter_message(f, offset):
                endings.feed(chunk)
                w.write(chunk)
            endings.finish()
            return w.commit()

    # -- everything -------------------------------------------------------

    def drain(self) -> int:
        """Process every file present until nothing moves (synchronous);
        returns how many files were carried somewhere."""
        total = 0
        while True:
            moved = 0
            for stage in self.watched_stages():
                for name in list(self.spool.names(stage)):
                    if self._safe_process(stage, name) is not None:
                        moved += 1
            total += moved
            if not moved:
                return total

    def _safe_process(self, stage: str, name: str) -> str | None:
        """:meth:`process` that logs instead of raising: one bad file or a
        full disk must not stop the watcher."""
        try:
            return self.process(stage, name)
        except Exception:
            log.exception("%s: error in %s (left in place, retried at the next rescan)",
                          name, stage)
            return None

    async def run(self) -> None:
        """Watch until :meth:`stop`; in-flight messages finish first.

        The feeding and the work are plain threads with a bounded queue
        between them: no event loop round trip per message (the loop only
        waits for the feeder to end)."""
        loop = asyncio.get_running_loop()
        self._stopping = False
        sw = StageWatcher(self.spool, self.watched_stages())
        work: queue.Queue = queue.Queue(maxsize=self.workers * 8)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        threads = [threading.Thread(target=self._work_thread, args=(work,),
                                    name=f"msa-watcher-{i}", daemon=True)
                   for i in range(self.workers)]
        for t in threads:
            t.start()
        feeder = concurrent.futures.ThreadPoolExecutor(1, "msa-watcher-feed")
        try:
            await loop.run_in_executor(feeder, self._feed, sw, work)
        finally:
            self.stop()
            await loop.run_in_executor(feeder, self._finish, work, threads)
            feeder.shutdown(wait=False)
            sw.close()
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), None, None
            for fd in fds:
                os.close(fd)

    def _feed(self, sw: StageWatcher, work: queue.Queue) -> None:
        """The feeder thread: the backlog at start and at every rescan,
        then what inotify reports, into ``work`` (blocking when full)."""
        poller = select.poll()
        poller.register(sw.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        next_rescan = 0.0
        while not self._stopping:
            if sw.need_rescan or time.monotonic() >= next_rescan:
                sw.need_rescan = False
                next_rescan = time.monotonic() + self.rescan_interval
                for item in sw.rescan():
                    if not self._put(work, item):
                        return
            for item in sw.read(timeout_ms=0):
                if not self._put(work, item):
                    return
            if sw.need_rescan:
                continue
            poller.poll(max(100, int(1000 * (next_rescan - time.monotonic()))))

    def _put(self, work: queue.Queue, item: tuple[str, str]) -> bool:
        """Queue one item, waiting for room; False once stopping."""
        while not self._stopping:
            try:
                work.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _work_thread(self, work: queue.Queue) -> None:
        while True:
            item = work.get()
            if item is None:
                return
            self._safe_process(*item)

    def _finish(self, work: queue.Queue, threads: list[threading.Thread]) -> None:
        """Drop what was not started (seen again at the next start), let
        the workers finish their message, and wait for them."""
        while True:
            try:
                work.get_nowait()
            except queue.Empty:
                break
        for _ in threads:
            work.put(None)
        for t in threads:
            t.join()

    def stop(self) -> None:
        self._stopping = True
        if self._wake_w is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass


def _all_applied(env: Envelope, stages: list[list[Policy]]) -> bool:
    """Every policy of ``stages`` is recorded in ``env`` (none to run)."""
    done = set(policies.applied(env))
    return all(p.name in done for pols in stages for p in pols)


def _unlink(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

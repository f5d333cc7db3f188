"""The delivery runner: takes messages from ``active/`` and from
``deferred/<N>/`` when due, relays them, records what happened in the queue
file, retries, bounces, and removes what is done.

Life of a message here (each arrow is one rename, see ``spool.core``)::

    active/Q ──attempt──> removed                   all recipients final
             └─────────> deferred/<attempt>/Q       some recipients deferred
    deferred/N/Q (mtime = due) ──attempt──> deferred/N+1/Q | removed

Invariants and crash rules:

- Work on a message happens only under its claim (``Spool.claim``). A claim
  of a dead runner is free again at once (flock), so after kill -9 a
  message left in ``active/`` or ``deferred/`` is simply tried again: it
  may be delivered twice, it is never lost (RFC 5321 §6.1).
- Every result is written to a new version of the queue file (recipient
  states and replies, ``History``, ``Attempts``, ``Last-Attempt``,
  ``Next-Attempt``, ``Last-Error``) before the file moves on; a recipient
  marked ``sent`` or ``failed`` is never tried again.
- A DSN is spooled into ``incoming/`` *before* the queue file records the
  failure, so a crash between the two duplicates the DSN instead of losing
  it. No DSN is ever made for a message whose sender is null (a bounce);
  such a message that cannot be delivered is logged and dropped after
  ``[retry].bounce_lifetime``.
- Memory is bounded by configuration: names are streamed from the stage
  directories into a queue of ``[relay].max_deliveries`` entries, and at
  most that many messages are being delivered; nothing lists a whole stage.
  Deferred messages are found through :class:`spool.DueIndex` (one number
  per ``deferred/<N>`` directory), with a full rescan every
  ``[retry].scan_interval`` seconds.
- ``hold/`` is never looked at; a held message neither retries nor expires.
- A queue file that does not parse goes to ``corrupt/`` with a log line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from typing import Callable

from msa.config import ACTIVE, Config
from msa.delivery import outcome
from msa.delivery.relay import BytesMessage, FileMessage, RcptResult, relay_from_config
from msa.fastlog import InfoWriter
from msa.message.dsn import DsnRequest, RecipientReport, build_dsn, dsn_envelope
from msa.message.headers import normalize_address
from msa.message.queuefile import Envelope, QueueFileError, check_size, envelope_of, parse_iso
from spool import (
    DueIndex,
    GroupSync,
    Spool,
    SpoolError,
    StageWatcher,
    id_time,
    new_id,
    valid_name,
)

log = logging.getLogger("msa.runner")

COPY_CHUNK = 1 << 20
MAX_BUSY = 10000
INFINITY = float("inf")
# A queue file up to this size is read whole with one read(2) and sent
# from memory; a larger one is read through a file object and streamed.
READ_WHOLE = 65536


class Runner:
    """Deliver what lands in ``active/`` and what becomes due in ``deferred/``."""

    def __init__(self, cfg: Config, spool: Spool, resolver=None,
                 clock: Callable[[], float] = time.time, client_factory=None,
                 relay=None, rng: random.Random | None = None):
        self.cfg, self.spool, self.clock = cfg, spool, clock
        self.retry = cfg.retry
        self.relay = relay or relay_from_config(cfg, resolver=resolver,
                                                client_factory=client_factory)
        self.rng = rng or random.Random()
        self.due = DueIndex(spool)
        self.concurrency = max(1, cfg.relay.max_deliveries)
        self.pending: set[str] = set()    # queued or being delivered
        self.delivered_attempts = 0       # finished attempts (tests, status)
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._wake_due = asyncio.Event()
        self._wake_active = asyncio.Event()
        self._progress = asyncio.Event()
        self._flush = False
        self._stopped = asyncio.Event()
        self._done = asyncio.Event()
        self._grace = 0.0
        self._watcher: StageWatcher | None = None
        self._unread: list[tuple[str, str]] = []   # read by readable(), not queued yet
        self._notes: list[tuple[str, float]] | None = None
        self._busy: dict[str, int] = {}
        # Messages whose deferral could not be written at all (a full
        # disk): name -> (stage, due, attempt), kept back until due.
        self._held: dict[str, tuple[str, float, int]] = {}
        self._next_wake = 0.0             # when the due feeder looks again
        self._retry_tasks: set[asyncio.Task] = set()
        self._dir_syncs: dict[str, GroupSync] = {}

    # -- control ---------------------------------------------------------------

    async def run(self) -> None:
        """Run until :meth:`stop`."""
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self.concurrency)
        self._watcher = StageWatcher(self.spool, [ACTIVE])
        self._add_reader()
        await self._rescan_due()
        self._tasks = [asyncio.create_task(self._worker(), name=f"deliver-{i}")
                       for i in range(self.concurrency)]
        self._tasks += [asyncio.create_task(self._feed_active(), name="feed-active"),
                        asyncio.create_task(self._feed_due(), name="feed-due")]
        log.info("runner started: %d deliveries at once", self.concurrency)
        try:
            await self._stopped.wait()
        finally:
            await self._shutdown(loop)

    def flush(self) -> None:
        """Make every deferred message due now (``sendmail -q``)."""
        self._flush = True
        self._wake_due.set()

    def clock_changed(self) -> None:
        """The wall clock (``clock``) jumped: an injected clock was moved,
        or the system time was set. What is due is looked at again now,
        not at the end of a sleep computed from the old time. (Due times
        are wall-clock times, file mtimes; the feeder's sleeps are on the
        event loop's monotonic clock, so a jump is only seen here.)"""
        self._wake_due.set()

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking work; let deliveries in progress finish for up to
        ``grace`` seconds (default: the data timeout), then cancel them,
        and return when :meth:`run` has cleaned up. A cancelled delivery
        stays in the spool and is tried again."""
        self._grace = self.cfg.relay.data_timeout if grace is None else grace
        self._stopped.set()
        if self._queue is not None:  # run() was started
            await self._done.wait()

    async def _shutdown(self, loop) -> None:
        try:
            await self._wind_down(loop, self._grace)
        finally:
            self._done.set()
            log.info("runner stopped")

    async def _wind_down(self, loop, grace: float) -> None:
        for t in self._tasks:
            if t.get_name().startswith("feed"):
                t.cancel()
        for t in list(self._retry_tasks):
            t.cancel()
        if self._queue is not None:
            while not self._queue.empty():
                _, name = self._queue.get_nowait()
                self.pending.discard(name)
        deadline = loop.time() + grace
        while self.pending and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._remove_reader()
        if self._watcher is not None:
            self._watcher.close()
        await self.relay.close()

    # -- feeding ---------------------------------------------------------------

    def _add_reader(self) -> None:
        loop = asyncio.get_running_loop()
        watcher, queue = self._watcher, self._queue

        def readable():
            # The usual wake-up (a file renamed into active/ while there is
            # room): queue its name here, with no hop through the feeder
            # task and the reader left in place. Anything else (no room,
            # an overflow to rescan) goes to the feeder: stop watching until
            # it has read the events, or the loop would call us again and
            # again while it waits for room.
            if not queue.full() and not watcher.need_rescan:
                events = watcher.read(timeout_ms=0)
                while events and not queue.full():
                    self._offer(*events.pop(0))
                if not events and not watcher.need_rescan:
                    return
                self._unread = events
            loop.remove_reader(watcher.fileno())
            self._wake_active.set()
        loop.add_reader(watcher.fileno(), readable)

    def _remove_reader(self) -> None:
        if self._watcher is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._watcher.fileno())
            except (ValueError, OSError):
                pass

    def _offer(self, stage: str, name: str) -> None:
        """:meth:`_submit` for a queue known to have room."""
        if name not in self.pending and _valid_name(name) and not self._kept_back(name):
            self.pending.add(name)
            self._queue.put_nowait((stage, name))

    async def _submit(self, stage: str, name: str) -> bool:
        if name in self.pending or not _valid_name(name) or self._kept_back(name):
            return False
        self.pending.add(name)
        await self._queue.put((stage, name))
        return True

    def _kept_back(self, name: str) -> bool:
        """A held message (see :meth:`_record_failed`) before its time."""
        held = self._held.get(name)
        return held is not None and held[1] > self.clock()

    async def _feed_active(self) -> None:
        """The backlog of ``active/`` first, then what inotify reports, and a
        full rescan every ``scan_interval`` (or after an event overflow)."""
        watcher = self._watcher
        last_scan = -float("inf")
        loop = asyncio.get_running_loop()
        while True:
            if watcher.need_rescan or loop.time() - last_scan >= self.retry.scan_interval:
                watcher.need_rescan = False
                last_scan = loop.time()
                for stage, name in watcher.rescan():  # streamed: scandir
                    await self._submit(stage, name)
            self._wake_active.clear()
            unread, self._unread = self._unread, []
            for stage, name in unread:
                await self._submit(stage, name)
            for stage, name in watcher.read(timeout_ms=0):
                await self._submit(stage, name)
            self._add_reader()
            try:
                await asyncio.wait_for(self._wake_active.wait(),
                                       max(0.1, self.retry.scan_interval))
            except asyncio.TimeoutError:
                pass

    async def _feed_due(self) -> None:
        """Deferred messages whose time has come."""
        loop = asyncio.get_running_loop()
        last_scan = loop.time()
        while True:
            self._wake_due.clear()
            if self._flush:
                self._flush = False
                await self._make_all_due()
                await self._rescan_due()
                last_scan = loop.time()
            elif loop.time() - last_scan >= self.retry.scan_interval:
                await self._rescan_due()
                last_scan = loop.time()
            now = self.clock()
            items = await self._collect_due(now)
            items += [(stage, name) for name, (stage, due, _) in self._held.items()
                      if due <= now and name not in self.pending]
            fresh = 0
            for stage, name in items:
                fresh += await self._submit(stage, name)
            if items and not fresh:
                # Everything due is already queued: wait for a delivery to end.
                self._progress.clear()
                waiter = self._progress.wait()
                self._next_wake = now
            else:
                delay = 0.0 if items else min(
                    self.due.next_due() - now,
                    min((due for _, due, _ in self._held.values()), default=INFINITY) - now,
                    last_scan + self.retry.scan_interval - loop.time(), 3600.0)
                delay = max(0.0, delay)
                self._next_wake = now + delay
                waiter = asyncio.sleep(delay)
            wake = asyncio.ensure_future(self._wake_due.wait())
            wait = asyncio.ensure_future(waiter)
            await asyncio.wait({wake, wait}, return_when=asyncio.FIRST_COMPLETED)
            for t in (wake, wait):
                t.cancel()

    async def _collect_due(self, now: float) -> list[tuple[str, str]]:
        return await self._index_job(lambda: self.due.collect(now, limit=self.concurrency))

    async def _rescan_due(self) -> None:
        await self._index_job(self.due.rescan_all)

    async def _index_job(self, job):
        """Run a DueIndex scan in a thread; deferrals noted meanwhile are
        applied after it, so the index never forgets one (its invariant:
        never later than the truth)."""
        self._notes = []
        try:
            return await asyncio.to_thread(job)
        finally:
            notes, self._notes = self._notes, None
            for stage, due in notes:
                self.due.note(stage, due)

    def _note_due(self, stage: str, due: float) -> None:
        # While a scan runs in its thread the index is the thread's: the
        # note waits (changing the dict under its iteration would break it).
        if self._notes is not None:
            self._notes.append((stage, due))
        else:
            self.due.note(stage, due)
        if due < self._next_wake:
            self._wake_due.set()  # earlier than the feeder's planned wake

    async def _make_all_due(self) -> None:
        now = self.clock()

        def touch():
            n = 0
            for stage in self.spool.deferred_stages():
                for name in self.spool.names(stage):
                    try:
                        os.utime(self.spool.path(stage, name), (now, now))
                        n += 1
                    except FileNotFoundError:
                        pass
            return n
        n = await asyncio.to_thread(touch)
        log.info("flush: %d deferred messages made due", n)

    # -- delivering ------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            stage, name = await self._queue.get()
            try:
                await self._process(stage, name)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad message must not stop the runner
                log.exception("%s: cannot process", name)
            finally:
                self.pending.discard(name)
                self._progress.set()

    async def _process(self, stage: str, qid: str) -> None:
        claim = self.spool.claim(stage, qid)
        if claim is None:
            self._busy_later(stage, qid)
            return
        self._busy.pop(qid, None)
        try:
            # What Claim.open() opens, without a buffered file object.
            f = _QueueFile(os.open(claim.fspath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
        except FileNotFoundError:
            claim.release()
            return
        try:
            with f:
                try:
                    env, offset, message = f.load()
                except QueueFileError as exc:
                    log.warning("%s: corrupt queue file: %s", qid, exc)
                    await asyncio.to_thread(claim.quarantine, str(exc))
                    return
                try:
                    await self._deliver(claim, f, env, offset, qid, message)
                except Exception:
                    # A bug: leave the message for later rather than
                    # retrying it in a tight loop.
                    log.exception("%s: delivery failed unexpectedly; deferred", qid)
                    if os.path.lexists(claim.fspath):
                        await self._defer_as_is(claim, qid, self._attempt(env, claim, qid),
                                                self.clock() + self.retry.min_delay)
        finally:
            claim.release()

    def _busy_later(self, stage: str, qid: str) -> None:
        """A file another process holds a claim on (the watcher releases
        its claim just after the rename into active/ that woke us): look
        again after 0.1, 0.2, 0.4 ... 6.4 s; after that the periodic rescan
        finds it. Bounded: at most :data:`MAX_BUSY` names are remembered."""
        if not os.path.lexists(self.spool.path(stage, qid)):
            self._busy.pop(qid, None)
            return
        tries = self._busy.get(qid, 0)
        if tries >= 7 or (qid not in self._busy and len(self._busy) >= MAX_BUSY):
            self._busy.pop(qid, None)
            return
        self._busy[qid] = tries + 1

        def again():
            if self._stopped.is_set():
                return
            task = asyncio.ensure_future(self._submit(stage, qid))
            self._retry_tasks.add(task)
            task.add_done_callback(self._retry_tasks.discard)
        asyncio.get_running_loop().call_later(0.1 * 2 ** tries, again)

    async def _deliver(self, claim, f, env: Envelope, offset: int, qid: str,
                       message=None) -> None:
        """One attempt: relay, then do what :func:`outcome.decide` says."""
        start = self.clock()
        arrival = _arrival(env, qid, start)
        attempt = self._attempt(env, claim, qid)
        todo = env.pending()
        if not todo:
            await self._finish(claim, qid)
            return
        if message is None:
            message = FileMessage(f, offset, int(env.size))
        results = await self.relay.attempt(env, message, todo)
        now = self.clock()
        self.delivered_attempts += 1
        out = outcome.decide(env, todo, results, attempt=attempt, arrival=arrival,
                             start=start, now=now, retry=self.retry, rand=self.rng.random())
        if log.isEnabledFor(logging.INFO):
            for res in results:
                _log_result(qid, res, now - arrival, start - arrival, now - start)
            for rcpt, res in out.expired:
                log.info("%s: to=<%s>, relay=%s, delay=%.1f, dsn=%s, status=expired, "
                         "returned to sender (%s)", qid, rcpt.address, res.relay,
                         now - arrival, outcome.EXPIRED, res.reply)
        new = out.envelope
        # DSNs first: a crash before the file records the failure
        # duplicates a DSN, it never loses one.
        postmaster = self._postmaster()
        if out.failed and new.sender == "" and not (out.notice and postmaster):
            for rcpt, res, _ in out.failed:
                log.info("%s: to=<%s>: not bouncing a message from the null sender; "
                         "dropped (%s)", qid, rcpt.address, res.reply)
        for reports, what, to in ((out.bounce, "non-delivery", None),
                                  (out.warn, "delay", None),
                                  (out.notice if postmaster else [], "postmaster", postmaster)):
            if reports:
                try:
                    dsn_qid = await asyncio.to_thread(self._spool_dsn, new, f, offset, qid,
                                                      reports, arrival, now, to)
                except (OSError, SpoolError) as exc:
                    # Not recorded either: the next attempt reports again.
                    await self._record_failed(claim, qid, attempt,
                                              now + self.retry.min_delay, exc)
                    return
                if to is None:
                    bounce_log.info("%s: sender %s notification: %s", qid, what, dsn_qid)
                else:   # Postfix: "postmaster non-delivery notification"
                    bounce_log.info("%s: postmaster non-delivery notification: %s (to <%s>)",
                                    qid, dsn_qid, to)
        if out.remove:
            await self._finish(claim, qid)
        else:
            try:
                await asyncio.to_thread(self._rewrite_and_defer, claim, f, new, offset,
                                        out.due, attempt)
            except (OSError, SpoolError) as exc:
                await self._record_failed(claim, qid, attempt, out.due, exc)
                return
            self._note_due(f"deferred/{attempt}", out.due)

    def _attempt(self, env: Envelope, claim, qid: str) -> int:
        """This attempt's number: one more than the file records, or than
        its ``deferred/<N>/`` says, or than a held message was at (the
        last two differ from the file when its results could not be
        written: :meth:`_record_failed`)."""
        held = self._held.pop(qid, None)
        stage_n = claim.stage.rpartition("/")[2]
        return max(env.attempt_count, int(stage_n) if stage_n.isdigit() else 0,
                   held[2] if held else 0) + 1

    async def _record_failed(self, claim, qid: str, attempt: int, due: float,
                             exc: Exception) -> None:
        """The new version of the file could not be written (a full disk,
        an I/O error): the file stays as it was, and the message backs off
        as if it had been: see :meth:`_defer_as_is`. One line per attempt,
        so once per message per retry interval, and no traceback."""
        where = await self._defer_as_is(claim, qid, attempt, due)
        log.warning("%s: cannot record delivery attempt %d: %s; the message stays in %s "
                    "unchanged, next try in %.0fs", qid, attempt,
                    getattr(exc, "strerror", None) or exc, where, max(0.0, due - self.clock()))

    async def _defer_as_is(self, claim, qid: str, attempt: int, due: float) -> str:
        """Move the file unchanged to ``deferred/<attempt>/`` with mtime =
        due (a rename needs no space, the directory's number keeps the
        count); if even that fails, keep it where it is and out of the
        work queue until due. Returns the stage it is in."""
        try:
            await asyncio.to_thread(claim.defer, due, attempt)
        except OSError:
            self._held[qid] = (claim.stage, due, attempt)
            if due < self._next_wake:
                self._wake_due.set()
        else:
            self._note_due(claim.stage, due)
        return claim.stage

    async def _finish(self, claim, qid: str) -> None:
        """Remove the file; the directory fsync that makes the removal
        durable is shared by the deliveries finishing at the same time
        (GroupSync). Until it is durable a crash may bring the file back:
        a duplicate, never a loss."""
        stage = claim.stage
        if len(self.pending) <= 1:
            # Alone (messages arriving one at a time): nobody to share the
            # sync with, so no thread hop, Condition and loop wake-up for
            # it; it starts after the unlink, as the group's would.
            claim.done()
        else:
            claim.done(sync_dir=False)
            sync = self._dir_syncs.get(stage)
            if sync is None:
                sync = self._dir_syncs[stage] = GroupSync(
                    f"{self.spool.root_s}/{stage}", self.spool.flush_dir)
            await sync.sync()
        if log.isEnabledFor(logging.INFO):
            _info(qid + ": removed")

    def _rewrite_and_defer(self, claim, f, env: Envelope, offset: int, due: float,
                           attempt: int) -> None:
        """A new version of the file with the results, then
        ``deferred/<attempt>/`` with mtime = due (Postfix's convention)."""
        size = int(env.size)
        with claim.rewriter() as w:
            w.write(env.to_bytes())
            pos = 0
            while pos < size:
                data = os.pread(f.fileno(), min(COPY_CHUNK, size - pos), offset + pos)
                if not data:
                    raise OSError("queue file shrank while being copied")
                w.write(data)
                pos += len(data)
            w.commit()
        claim.defer(due, attempt)

    # -- DSNs ------------------------------------------------------------------

    def _postmaster(self) -> str:
        """``[server] postmaster``, qualified; "" when unset (msa check
        refuses a value that is not an address)."""
        who = self.cfg.server.postmaster.strip()
        return normalize_address(who, self.cfg.domain) if who else ""

    def _spool_dsn(self, env: Envelope, f, offset: int, qid: str,
                   reports: list[RecipientReport], arrival: float, now: float,
                   to: str | None = None) -> str:
        """Write the DSN into ``incoming/``; it reads at most
        ``dsn_original_limit`` bytes of the original. ``to``: the
        postmaster, for a bounce that failed (the notice's Origin is
        :data:`outcome.DOUBLE_BOUNCE`, so that its own failure is dropped)."""
        size = int(env.size)
        limit = self.retry.dsn_original_limit
        head = os.pread(f.fileno(), min(size, limit), offset)
        boundary = f"{qid}/{self.rng.getrandbits(64):016x}/{self.cfg.server.hostname}"
        while boundary.encode() in head:
            boundary = f"{qid}/{self.rng.getrandbits(64):016x}"
        req = DsnRequest(queue_id=qid, reporting_mta=self.cfg.server.hostname,
                         sender=env.sender if to is None else to, arrival=arrival, now=now,
                         recipients=reports,
                         original_size=size, original_head=head, boundary=boundary,
                         envid=env.envid, ret=env.ret,
                         eight_bit=env.body.upper() == "8BITMIME", limit=limit)
        dsn = build_dsn(req)
        dsn_qid = new_id()
        denv = dsn_envelope(req, dsn, dsn_qid)
        if to is not None:
            denv.origin = outcome.DOUBLE_BOUNCE
        with self.spool.writer("incoming", dsn_qid) as w:
            for part in (denv.to_bytes(), dsn.head, head[:dsn.include], dsn.tail):
                w.write(part)
            return w.commit()


def _arrival(env: Envelope, qid: str, now: float) -> float:
    try:
        return parse_iso(env.arrival)
    except ValueError:
        try:
            return id_time(qid)
        except ValueError:
            return now


_WORD = {"sent": "sent", "failed": "bounced", "deferred": "deferred"}


class _QueueFile:
    """A queue file open for reading (a descriptor): :meth:`load` reads a
    small file whole with one ``read(2)`` and parses the envelope from
    that, with :func:`queuefile.read_envelope`'s rules and errors."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def __enter__(self) -> "_QueueFile":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def load(self):
        """(envelope, offset of the message, the message to send)."""
        data = os.read(self.fd, READ_WHOLE)
        if len(data) < READ_WHOLE:  # the whole file
            env, offset = envelope_of(data)
            check_size(self, env, offset)
            return env, offset, BytesMessage(data[offset:])
        with os.fdopen(self.fd, "rb", closefd=False) as f:
            env, offset = envelope_of(data, f)
        check_size(self, env, offset)
        return env, offset, FileMessage(self, offset, int(env.size))


def _valid_name(name: str) -> bool:
    """:func:`spool.valid_name`, with one C-level ``isalnum`` for the
    usual queue id instead of a test per character."""
    if name.isalnum() and len(name) <= 64:
        return True
    return valid_name(name)


_info = InfoWriter(log, __file__)
# Lines Postfix's smtp and bounce would write (msa.process.logs names them).
_smtp_info = InfoWriter(logging.getLogger("msa.smtp"), __file__)
bounce_log = logging.getLogger("msa.bounce")


def _log_result(qid: str, res: RcptResult, delay: float, waited: float,
                attempt: float) -> None:
    """The Postfix-style line of one recipient (``status=sent|bounced|deferred``).
    ``delays=a/b/c/d`` as Postfix's: a before this attempt (in the queue,
    retries' waits included), b 0 (a message goes from active/ to a
    delivery slot at once), c the connection setup (DNS, connect, EHLO,
    TLS, AUTH), d the transmission; ``attempt`` is this attempt's length."""
    c = min(res.setup, attempt) if attempt > 0 else res.setup
    d = max(0.0, attempt - c)
    # Postfix's field order (pflogsumm parses up to status=); then ours.
    _smtp_info(f"{qid}: to=<{res.address}>, relay={res.relay}, delay={delay:.1f}, "
               f"delays={_fig(waited)}/0/{_fig(c)}/{_fig(d)}, "
               f"dsn={res.status}, status={_WORD[res.state]} ({res.reply}), "
               f"tls={res.tls or 'none'}")


def _fig(seconds: float) -> str:
    """A delays= figure as Postfix writes one: 0 below 0.01 s, else at
    most two decimals (0.06, 1.2, 37)."""
    seconds = max(0.0, seconds)
    if seconds < 0.01:
        return "0"
    return f"{seconds:.2f}".rstrip("0").rstrip(".") if seconds < 10 else f"{seconds:.0f}"

"""The watcher: moves messages from the inputs through the policy stages
to ``active/``.

Paths a message takes (each arrow is one durable rename or one atomic
replace; a crash between two arrows leaves the message whole in one stage,
and the watcher resumes it from there at its next start)::

    maildrop/X ──validate, copy──> incoming/Q ──move──> policy-<1>/Q
    policy-<n>/Q ──apply n's policies, replace in place──> policy-<n>/Q
                 ──move──> policy-<n+1>/Q ... ──move──> active/Q

Invariants:

- All work on a message is done under its claim; a file another process
  claims, or that is gone, is skipped (it will be seen again if needed).
- ``maildrop/`` is untrusted (:mod:`msa.maildrop`): the copy in
  ``incoming/`` gets a fresh queue id (a user chooses maildrop names), is
  committed before the maildrop file is removed (a crash in between gives
  a duplicate, never a loss: RFC 5321 §6.1 allows duplicates).
- Policies edit the header section only (at most ``max_header_bytes``,
  else the file goes to ``corrupt/``); the body is streamed in 64 KiB
  chunks, never held in memory.
- A stage's policies are recorded in ``Policies:`` in the same replace
  that applies them, so a rerun never applies one twice.
- A split writes ``<qid>-1``, ``<qid>-2``... into the next stage, each
  committed (fsynced, renamed, directory fsynced) before the original is
  removed; a rerun keeps parts that already exist (they were committed
  whole) and writes the missing ones, so no recipient is lost.
- Memory does not grow with the backlog: the rescan is streamed through a
  bounded queue; the kernel's inotify queue overflowing triggers a rescan.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import time
from typing import BinaryIO

import spool as spoollib
from spool import Claim, Spool, StageWatcher

from . import maildrop, policies, queuefile
from .config import ACTIVE, Config, ConfigError
from .headerblock import CONTINUATION, END_BODY, END_EMPTY, HeaderBlock, line_kind
from .policies import Policy
from .queuefile import Envelope, QueueFileError

log = logging.getLogger("msa.watcher")

# Test hook: after this many split parts are committed, the process kills
# itself with SIGKILL (crash-consistency tests). Unset in production.
CRASH_AFTER_PARTS_ENV = "MSA_TEST_CRASH_AFTER_PARTS"


class HeaderTooBig(Exception):
    pass


def read_headers(f: BinaryIO, offset: int, cap: int) -> tuple[HeaderBlock, int]:
    """Read the header section of the message at ``offset``; returns it and
    the offset where the body (including its empty separator line) starts."""
    f.seek(offset)
    buf = bytearray()
    pos = offset
    while True:
        line = f.readline(cap + 1 - len(buf))
        if not line:
            return HeaderBlock.parse(bytes(buf)), pos
        kind = line_kind(line, bool(buf))
        if kind in (END_EMPTY, END_BODY):
            return HeaderBlock.parse(bytes(buf), missing_separator=kind == END_BODY), pos
        buf += line
        pos += len(line)
        if len(buf) > cap:
            raise HeaderTooBig(f"header section larger than {cap} bytes")


def write_message(writer: spoollib.Writer, env: Envelope, headers: bytes,
                  f: BinaryIO, body_offset: int) -> str:
    """Write envelope + headers + the body streamed from ``f``; commit."""
    body_len = os.fstat(f.fileno()).st_size - body_offset
    env.size = str(len(headers) + body_len)
    writer.write(env.to_bytes())
    writer.write(headers)
    for chunk in queuefile.iter_message(f, body_offset):
        writer.write(chunk)
    return writer.commit()


class Stop(Exception):
    """The message left the pipeline here (quarantined, split, gone)."""


class Watcher:
    """Runs the policy pipeline on every file that lands in a watched stage.

    ``pipeline`` is [(stage directory, [policies])]; by default it comes
    from ``[policies].stages`` (:func:`msa.policies.pipeline`).
    """

    def __init__(self, cfg: Config, spool: Spool,
                 pipeline: list[tuple[str, list[Policy]]] | None = None,
                 workers: int | None = None):
        self.cfg, self.spool = cfg, spool
        self.pipeline = policies.pipeline(cfg) if pipeline is None else list(pipeline)
        order = ["incoming", *(stage for stage, _ in self.pipeline), ACTIVE]
        self.next_stage = dict(zip(order, order[1:]))
        self.stage_policies = dict(self.pipeline)
        self.max_header = cfg.policies.max_header_bytes
        self.workers = workers or cfg.policies.workers
        self.rescan_interval = cfg.policies.rescan_interval
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._crash_after = int(os.environ.get(CRASH_AFTER_PARTS_ENV, "0") or 0)
        self._parts_committed = 0

    def reload(self, cfg: Config) -> None:
        """New policy settings (forward rules, header switches) for the
        next messages; the stage directories cannot change while running."""
        if cfg.policies.stages != self.cfg.policies.stages:
            raise ConfigError("[policies] stages cannot change without a restart")
        pipeline = policies.pipeline(cfg)
        self.cfg, self.pipeline, self.stage_policies = cfg, pipeline, dict(pipeline)

    def watched_stages(self) -> list[str]:
        return ["maildrop", *self.next_stage]

    # -- one message ------------------------------------------------------

    def process(self, stage: str, name: str) -> str | None:
        """Carry one file as far as it goes; returns the stage it ended in
        (``active``), ``corrupt``, ``split``, or None when skipped."""
        if stage == "maildrop":
            qid = self._pickup(name)
            if qid is None:
                return None
            stage, name = "incoming", qid
        if stage not in self.next_stage or not os.path.lexists(self.spool.path(stage, name)):
            return None  # most events name a file this process already moved on
        claim = self.spool.claim(stage, name)
        if claim is None:
            return None
        try:
            while claim.stage != ACTIVE:
                self._step(claim)
            log.info("%s: policies done, queued in active/", claim.qid)
            return ACTIVE
        except Stop as stop:
            return str(stop)
        finally:
            claim.release()

    def _step(self, claim: Claim) -> None:
        nxt = self.next_stage[claim.stage]
        pols = self.stage_policies.get(claim.stage, [])
        if pols:
            try:
                with claim.open() as f:
                    self._apply(claim, pols, f, nxt)
            except FileNotFoundError:
                raise Stop("gone") from None
        claim.move(nxt, release=False)

    def _apply(self, claim: Claim, pols: list[Policy], f: BinaryIO, nxt: str) -> None:
        try:
            env, offset = queuefile.read_envelope(f)
            queuefile.check_size(f, env, offset)
            todo = [p for p in pols if p.name not in policies.applied(env)]
            if not todo:
                return
            headers, body_offset = read_headers(f, offset, self.max_header)
        except (QueueFileError, HeaderTooBig) as exc:
            claim.quarantine(str(exc))
            raise Stop("corrupt") from None
        before = (headers.to_bytes(), env.to_bytes())
        parts = None
        for p in todo:
            parts = p.apply(env, headers)
            if parts:
                break
        new_headers = headers.to_bytes()
        if parts:
            self._commit_parts(claim, parts, todo, new_headers, f, body_offset, nxt)
            raise Stop("split")
        if (new_headers, env.to_bytes()) == before:
            return  # nothing changed: a rerun would change nothing either
        for p in todo:
            policies.mark_applied(env, p.name)
        with claim.rewriter() as w:
            write_message(w, env, new_headers, f, body_offset)
        log.info("%s: applied %s in %s", claim.qid, ",".join(p.name for p in todo), claim.stage)

    def _commit_parts(self, claim: Claim, parts: list[Envelope], done: list[Policy],
                      headers: bytes, f: BinaryIO, body_offset: int, nxt: str) -> None:
        for part in parts:
            for p in done:
                policies.mark_applied(part, p.name)
            if os.path.lexists(self.spool.path(nxt, part.queue_id)):
                continue  # committed whole by a run that crashed
            with self.spool.writer(nxt, qid=part.queue_id) as w:
                write_message(w, part, headers, f, body_offset)
            log.info("%s: split part %s to=%s", claim.qid, part.queue_id,
                     ",".join(f"<{r.address}>" for r in part.recipients))
            self._parts_committed += 1
            if self._crash_after and self._parts_committed >= self._crash_after:
                os.kill(os.getpid(), signal.SIGKILL)
        claim.done()
        log.info("%s: split into %d messages", claim.qid, len(parts))

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
        try:
            self.spool.quarantine("maildrop", name, reason)
        except FileNotFoundError:
            pass

    def _pickup_claimed(self, claim: Claim) -> str | None:
        try:
            f, st = maildrop.open_untrusted(claim.path)
        except maildrop.Refused as exc:
            claim.quarantine(str(exc))
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("maildrop/%s: cannot open: %s (left in place)", claim.qid, exc)
            return None
        with f:
            try:
                user = maildrop.owner(st)
                env, offset = maildrop.read_untrusted(f, user, self.cfg.domain)
                qid = self._copy_checked(env, f, offset)
            except maildrop.Refused as exc:
                claim.quarantine(str(exc))
                return None
        claim.done()
        log.info("%s: uid=%s from=<%s> nrcpt=%d (maildrop/%s)", qid, env.local_uid,
                 env.sender, len(env.recipients), claim.qid)
        return qid

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
        """Watch until :meth:`stop`; in-flight messages finish first."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopping = False
        sw = StageWatcher(self.spool, self.watched_stages())
        work: asyncio.Queue = asyncio.Queue(maxsize=self.workers * 8)
        executor = concurrent.futures.ThreadPoolExecutor(self.workers, "msa-watcher")
        tasks = [asyncio.create_task(self._worker(work, executor))
                 for _ in range(self.workers)]
        loop.add_reader(sw.fileno(), self._wake.set)
        try:
            await self._feed(sw, work)
        finally:
            loop.remove_reader(sw.fileno())
            while not work.empty():  # not started: seen again at next start
                work.get_nowait()
            for _ in tasks:
                await work.put(None)
            await asyncio.gather(*tasks, return_exceptions=True)
            executor.shutdown(wait=True)
            sw.close()

    async def _feed(self, sw: StageWatcher, work: asyncio.Queue) -> None:
        next_rescan = 0.0
        while not self._stopping:
            if sw.need_rescan or time.monotonic() >= next_rescan:
                sw.need_rescan = False
                next_rescan = time.monotonic() + self.rescan_interval
                for item in sw.rescan():
                    if self._stopping:
                        return
                    await work.put(item)
            self._wake.clear()
            for item in sw.read(timeout_ms=0):
                await work.put(item)
            if sw.need_rescan:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       max(0.1, next_rescan - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    async def _worker(self, work: asyncio.Queue, executor) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await work.get()
            if item is None:
                return
            await loop.run_in_executor(executor, self._safe_process, *item)

    def stop(self) -> None:
        self._stopping = True
        if self._wake is not None:
            self._wake.set()

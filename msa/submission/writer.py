"""Where the edge puts a message: a bounded in-memory or spilled body,
then one queue file in the spool (I/O only; the rules are the session's).

Invariants:

- A body is held in memory up to ``memory_limit`` bytes; beyond that it
  goes to an unnamed file (O_TMPFILE) in the spool's ``tmp/``, on the same
  filesystem, which the kernel removes if the process dies.
- :func:`write_message` writes envelope + body to ``tmp/<id>.<pid>``,
  fsyncs it and renames it into the stage; only after a fsync of the
  stage directory that began after the rename has completed may the
  caller say 250. The edge runs it in a thread of :func:`store_pool` (the
  edge's own, so a slow disk does
  not hold up other users of the loop's default executor, nor they the
  edge), which then hands the session's future to the stage's
  :class:`DirSyncer`: one thread that fsyncs the directory for every
  rename handed in before that fsync began, and resolves that batch's
  futures with one ``call_soon_threadsafe``. A store thread never waits
  for the directory, and the loop is woken once per directory fsync, not
  once per message (no concurrent.futures Future, Condition or chained
  wrapper per message either).
- A message held in memory gets the ``[policies]`` first (unless
  ``[edge] apply_policies`` is off, or it splits), so the file the watcher
  finds needs only a rename into ``active/``; a spilled (large) message is
  written as received and the watcher applies them.
- Any failure before the rename leaves no file behind (the spool Writer
  removes its temp file); a full disk is :data:`SpoolFull` and becomes
  ``452 4.3.1``. A failed directory fsync after the rename is a 4xx too:
  the file may stay and be delivered (a duplicate if the client sends it
  again, never a loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import queue
import tempfile
import threading
from typing import Any, Callable, Iterator

from msa.cleanup.pipeline import apply_in_memory
from msa.fastlog import log_message_id
from msa.message import queuefile
from spool import SpoolFull, fsync_dir

# Threads writing queue files at once: fsyncs in flight together let the
# filesystem journal commit them together.
STORE_WORKERS = 32
_cleanup_log = logging.getLogger("msa.cleanup")   # msa/cleanup in the log
_lock = threading.Lock()
_dir_syncers: dict[str, "DirSyncer"] = {}


class StorePool:
    """At most ``workers`` threads running calls for event loops. A thread
    is started only when no started one is free (as ThreadPoolExecutor
    does); the threads are daemon threads: a call cut off at exit has not
    been acknowledged, and its temp file is the spool's to recover."""

    def __init__(self, workers: int, name: str = "msa-store"):
        self.workers, self.name = workers, name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0            # free threads not yet claimed by a call

    def run(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any],
            *args: Any, then: "DirSyncer | None" = None) -> asyncio.Future:
        """``fn(*args)`` in a thread; the future is resolved on ``loop``
        (with ``then``: its result is handed to ``then.add``, which
        resolves it once the directory is synced)."""
        future = loop.create_future()
        with self._lock:
            if self._idle:
                self._idle -= 1
                start = False
            else:
                start = self._threads < self.workers
                self._threads += start
        self._queue.put((loop, future, fn, args, then))
        if start:
            threading.Thread(target=self._work, name=f"{self.name}-{self._threads}",
                             daemon=True).start()
        return future

    def _work(self) -> None:
        get, lock = self._queue.get, self._lock
        while True:
            loop, future, fn, args, then = get()
            try:
                result, error = fn(*args), None
            except Exception as exc:
                result, error = None, exc
            if then is not None and error is None:
                then.add(loop, future, result)
            else:
                _call_soon(loop, _resolve, future, result, error)
            del loop, future, fn, args, then, result, error
            with lock:
                self._idle += 1


def _call_soon(loop: asyncio.AbstractEventLoop, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(*args)
    except RuntimeError:                # the loop was closed meanwhile
        pass


def _resolve_all(batch: list, error: BaseException | None) -> None:
    for future, result in batch:
        _resolve(future, result, error)


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():                   # the waiting session was cancelled
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


_store_pool: StorePool | None = None


def store_pool() -> StorePool:
    global _store_pool
    with _lock:
        if _store_pool is None:
            _store_pool = StorePool(STORE_WORKERS)
        return _store_pool


class BodySink:
    """Where a message goes while it is read: memory up to ``memory_limit``
    bytes, then an unnamed temp file (O_TMPFILE) in ``spill_dir``, which
    disappears by itself if the process dies."""

    def __init__(self, spill_dir: str, memory_limit: int):
        self.spill_dir, self.memory_limit = spill_dir, memory_limit
        self.buf = bytearray()
        self.file: Any = None
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.size += len(data)
        try:
            if self.file is None and len(self.buf) + len(data) <= self.memory_limit:
                self.buf += data
                return
            if self.file is None:
                self.file = tempfile.TemporaryFile(dir=self.spill_dir)
                self.file.write(self.buf)
                self.buf = bytearray()
            self.file.write(data)
        except OSError as exc:
            self.error = exc
            self.close()

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes | memoryview]:
        """The message, in pieces (a view of the memory buffer: no copy)."""
        if self.file is None:
            with memoryview(self.buf) as view:
                yield view
            return
        self.file.flush()
        self.file.seek(0)
        while True:
            data = self.file.read(size)
            if not data:
                return
            yield data

    def detach(self) -> "BodySink":
        """A sink that owns this one's body, leaving this one empty: the
        store thread gets the body, and the session closing its sink
        (when the client leaves while the message is being stored) can no
        longer take it away from under that thread."""
        other = BodySink.__new__(BodySink)
        other.__dict__.update(self.__dict__)
        self.buf, self.file = bytearray(), None
        return other

    def close(self) -> None:
        self.buf = bytearray()
        file, self.file = self.file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()


class DirSyncer:
    """Group commit of one directory's fsyncs for futures of event loops.
    :meth:`add` (called after the rename) queues a future; one daemon
    thread takes everything queued, fsyncs the directory (so that fsync
    began after each of those renames), and resolves those futures with
    the given results, or all with the fsync's error, with one
    ``call_soon_threadsafe`` per loop and fsync."""

    def __init__(self, path: str):
        self.path = path
        self.fsyncs = 0
        self.inline = 0             # fsyncs run by the caller (nobody else syncing)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._syncing = False

    def sync_now(self) -> None:
        """fsync the directory in the calling thread, now (raises OSError).
        For a caller that renamed its file just before."""
        fsync_dir(self.path)
        self.inline += 1

    def add(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future,
            result: Any) -> None:
        # Nobody syncing (one client at a time): the calling store thread
        # fsyncs itself, one thread hop less before the reply.
        with self._lock:
            inline = not self._syncing
            self._syncing = True
        if inline:
            error = self._fsync()
            self.inline += error is None
            _call_soon(loop, _resolve_all, [(future, result)], error)
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="msa-dirsync", daemon=True)
                    self._thread.start()
        self._queue.put((loop, future, result))

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            batch = [get()]
            try:
                while True:
                    batch.append(get_nowait())
            except queue.Empty:
                pass
            with self._lock:
                self._syncing = True
            error = self._fsync()
            self.fsyncs += error is None
            loops: dict[Any, list] = {}
            for loop, future, result in batch:
                loops.setdefault(loop, []).append((future, result))
            for loop, items in loops.items():
                _call_soon(loop, _resolve_all, items, error)
            del batch, loops


    def _fsync(self) -> OSError | None:
        """One fsync of the directory, by a caller that set ``_syncing``
        (cleared after); its error, or None."""
        try:
            fsync_dir(self.path)
            return None
        except OSError as exc:
            return exc
        finally:
            with self._lock:
                self._syncing = False


def dir_syncer_for(spool, stage: str) -> DirSyncer:
    """The :class:`DirSyncer` of ``stage``'s directory in this process."""
    path = f"{spool.root_s}/{stage}"
    with _lock:
        sync = _dir_syncers.get(path)
        if sync is None:
            sync = _dir_syncers[path] = DirSyncer(path)
        return sync


def open_writer(spool, stage: str, qid: str):
    """The queue file of ``qid``, created in ``tmp/`` (run in a store thread
    while the body arrives: creating a file is the costly part of the
    write on some filesystems)."""
    return spool.writer(stage, qid)


def discard_writer(opening: asyncio.Future) -> None:
    """Remove a queue file opened by :func:`open_writer` that will not be
    used (the transaction failed), now or once it is open."""
    def abort(done: asyncio.Future) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().abort()
    if opening.done():
        abort(opening)
    else:
        opening.add_done_callback(abort)


def write_message(spool, stage: str, env: queuefile.Envelope, sink: BodySink,
                  stages: list | None = None, max_header: int = 0,
                  writer=None) -> str:
    """Write envelope + message into ``tmp/``, fsync, rename into the
    stage. NOT yet durable: the stage directory must be fsynced after
    this returns (:class:`DirSyncer`) before anyone is told.

    With ``stages`` (policy lists), a message held in memory gets their
    policies first (:func:`msa.cleanup.pipeline.apply_in_memory`) unless it splits,
    so the watcher only has to rename it. ``writer``: the file, already
    opened by :func:`open_writer` for ``env.queue_id``."""
    with writer or spool.writer(stage, env.queue_id) as w:
        stamped = None
        if stages and sink.file is None:
            stamped = apply_in_memory(env, sink.buf, stages, max_header)
        if stamped is None:
            w.write(env.to_bytes())
            for chunk in sink.chunks():
                w.write(chunk)
        else:
            new_env, headers, body_offset, message_id = stamped
            log_message_id(_cleanup_log, new_env.queue_id, message_id)
            w.write(new_env.to_bytes() + headers)
            with memoryview(sink.buf) as view:
                w.write(view[body_offset:])
        return w.commit(sync_dir=False)


def spool_reply(exc: BaseException) -> str:
    if isinstance(exc, SpoolFull) or getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return "452 4.3.1 Insufficient system storage"
    return "451 4.3.0 Error: queue file write error"

"""Group commit of directory fsyncs for concurrent writers (asyncio tasks:
:class:`GroupSync`; threads: :class:`ThreadGroupSync`).

Each writer fsyncs its own file and renames it into the stage itself; the
fsync of the *directory* that makes the rename durable is shared: a caller
of :meth:`GroupSync.sync` waits for an fsync that *started after* it
called, so its own rename is covered, and every writer that arrives while
one fsync runs is covered by the next single fsync. No caller is released
before a directory fsync that began after its rename has completed.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Callable

from .core import fsync_dir

if TYPE_CHECKING:     # asyncio is imported by the first sync(), not by the
    import asyncio  # package: a sendmail call never needs it (20 ms)


class GroupSync:
    """``flush`` (default: fsync the directory) is what one sync runs:
    :meth:`spool.Spool.flush_dir`, for the spool's commit protocol."""

    def __init__(self, path: str | os.PathLike,
                 flush: Callable[[str | os.PathLike], None] = fsync_dir):
        self.path, self.flush = path, flush
        self._started = 0
        self._completed = 0
        self._running = False
        self._cond: asyncio.Condition | None = None
        self.fsyncs = 0

    async def sync(self) -> None:
        import asyncio
        if self._cond is None:
            self._cond = asyncio.Condition()
        target = self._started + 1
        async with self._cond:
            while self._completed < target:
                if self._running:
                    await self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                gen = self._started
                try:
                    self._cond.release()
                    try:
                        await asyncio.get_running_loop().run_in_executor(
                            None, self.flush, self.path)
                    finally:
                        await self._cond.acquire()
                    self.fsyncs += 1
                    self._completed = gen
                finally:
                    self._running = False
                    self._cond.notify_all()


class ThreadGroupSync:
    """:class:`GroupSync` for threads: the same rule (a caller returns only
    after a directory fsync that started after it called has completed),
    for workers that run in a thread pool instead of on an event loop.

    A failed fsync raises in the thread that ran it; the others waiting
    on it are not released by it, one of them runs the next fsync.
    """

    def __init__(self, path: str | os.PathLike,
                 flush: Callable[[str | os.PathLike], None] = fsync_dir):
        self.path, self.flush = path, flush
        self._cond = threading.Condition()
        self._started = 0
        self._completed = 0
        self._running = False
        self.fsyncs = 0

    def sync(self) -> None:
        with self._cond:
            target = self._started + 1
            while self._completed < target:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                self._started += 1
                gen = self._started
                ok = False
                self._cond.release()
                try:
                    self.flush(self.path)
                    ok = True
                finally:
                    self._cond.acquire()
                    self._running = False
                    if ok:
                        self.fsyncs += 1
                        self._completed = gen
                    self._cond.notify_all()

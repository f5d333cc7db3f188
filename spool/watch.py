"""Watch stage directories for files that land in them (inotify).

:class:`StageWatcher` first yields every file already present (a full
rescan, streamed with ``scandir`` so memory does not grow with the backlog),
then the files that inotify reports as renamed into or closed in a stage.
If the kernel's event queue overflows (``IN_Q_OVERFLOW``), it rescans: a
file can be yielded twice, never missed. Consumers must therefore tolerate
a name that is already gone or already claimed (``Spool.claim`` returns
None for both).
"""

from __future__ import annotations

from typing import Iterator

from inotify_simple import INotify, flags

from .core import Spool

WATCH_FLAGS = flags.MOVED_TO | flags.CLOSE_WRITE


class StageWatcher:
    def __init__(self, spool: Spool, stages: list[str]):
        self.spool = spool
        self.stages = list(stages)
        self.inotify = INotify()
        self.wd_stage: dict[int, str] = {}
        for stage in self.stages:
            wd = self.inotify.add_watch(str(spool.root / stage), WATCH_FLAGS)
            self.wd_stage[wd] = stage
        self.need_rescan = True

    def fileno(self) -> int:
        return self.inotify.fileno()

    def rescan(self) -> Iterator[tuple[str, str]]:
        for stage in self.stages:
            for name in self.spool.names(stage):
                yield stage, name

    def read(self, timeout_ms: int | None = 0) -> list[tuple[str, str]]:
        """Pending events as (stage, name); waits up to ``timeout_ms``."""
        out = []
        for event in self.inotify.read(timeout=timeout_ms):
            if event.mask & flags.Q_OVERFLOW:
                self.need_rescan = True
                continue
            stage = self.wd_stage.get(event.wd)
            if stage and event.name and not event.name.startswith("."):
                out.append((stage, event.name))
        return out

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """Blocking: the backlog first, then arrivals, forever."""
        while True:
            if self.need_rescan:
                self.need_rescan = False
                yield from self.rescan()
            yield from self.read(timeout_ms=None)

    def close(self) -> None:
        self.inotify.close()

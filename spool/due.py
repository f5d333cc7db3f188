"""Which deferred files are due, without rescanning the whole queue.

A deferred file's mtime is its due time (Postfix's convention), so ``ls -l
deferred/*`` shows when each retries. :class:`DueIndex` keeps one number per
``deferred/<N>/`` directory: the earliest due time in it. Only directories
whose earliest time has passed are scanned, and a scan collects at most
``limit`` names, so memory is O(directories + limit) whatever the backlog.

Invariant: ``earliest[d]`` is never later than the true earliest due time of
any file in ``d``. :meth:`note` (called when we defer) lowers it; a scan
recomputes it exactly; a file that appeared behind our back (another
process deferred it) is covered by :meth:`rescan_all`, which callers run at
start and on a slow timer. Names that :meth:`collect` returns are the
caller's to move on; one it could not claim (another runner has it) is
found again by the next :meth:`rescan_all`.
"""

from __future__ import annotations

import os
import time

from .core import Spool

INFINITY = float("inf")


class DueIndex:
    def __init__(self, spool: Spool):
        self.spool = spool
        self.earliest: dict[str, float] = {}

    def rescan_all(self) -> None:
        for stage in self.spool.deferred_stages():
            self._scan(stage, None, 0)

    def note(self, stage: str, due: float) -> None:
        if due < self.earliest.get(stage, INFINITY):
            self.earliest[stage] = due

    def next_due(self) -> float:
        """The earliest time anything may be due (inf when nothing waits)."""
        return min(self.earliest.values(), default=INFINITY)

    def collect(self, now: float | None = None, limit: int = 1000,
                force: bool = False) -> list[tuple[str, str]]:
        """(stage, name) pairs due at ``now`` (all of them with ``force``),
        oldest directories first, at most ``limit``."""
        now = time.time() if now is None else now
        out: list[tuple[str, str]] = []
        stages = self.spool.deferred_stages() if force else sorted(
            (s for s, t in self.earliest.items() if t <= now),
            key=lambda s: int(s.split("/")[1]))
        for stage in stages:
            if len(out) >= limit:
                break
            self._scan(stage, None if force else now, limit, out)
        return out

    def _scan(self, stage: str, now: float | None, limit: int,
              out: list | None = None) -> None:
        earliest = INFINITY
        full = False
        try:
            it = os.scandir(self.spool.root / stage)
        except FileNotFoundError:
            self.earliest.pop(stage, None)
            return
        with it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                if out is not None and not full and (now is None or mtime <= now):
                    out.append((stage, entry.name))
                    full = len(out) >= limit
                    continue
                earliest = min(earliest, mtime)
        if full:
            # Not everything due was taken: look again next time.
            earliest = 0.0
        if earliest == INFINITY:
            self.earliest.pop(stage, None)
        else:
            self.earliest[stage] = earliest

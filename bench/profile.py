"""Summarise a py-spy ``--format raw`` profile (folded stacks: one line per
distinct stack, ``frame;frame;...;leaf COUNT``) into the functions where
time goes: self time (the leaf) and inclusive time (anywhere on the stack).
Pure text in, text out."""

from __future__ import annotations

import re
from collections import Counter


def parse_folded(text: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


# Leaf frames where a thread waits for work rather than doing it. py-spy
# counts a thread blocked on a Python-level queue as active; these are
# dropped from the totals (a thread blocked in fsync() is kept: that is
# real waiting for the disk).
IDLE_LEAVES = (("_worker", "concurrent/futures/thread.py:81"), ("select", "selectors.py:"),
               ("wait", "threading.py:"), ("_wait_for_tstate_lock", "threading.py:"))


def is_idle(frame: str) -> bool:
    name, _, where = frame.partition(" (")
    return any(name.endswith(func) and path in where for func, path in IDLE_LEAVES)


# A stack belongs to the component whose process it was sampled in
# (py-spy --subprocesses adds a ``process PID:"CMDLINE"`` frame per
# process level; ``msa daemon`` runs ``python -m msa.cli edge|watch|deliver``
# children); else to the first component one of whose files it passes
# through; what none claims is the event loop, logging and the rest.
COMPONENTS = (("edge", ("msa/submission/",)), ("watcher", ("msa/cleanup/",)),
              ("runner", ("msa/delivery/",)))
_PROCESS = re.compile(r'^process \d+:".*\bmsa(?:\.cli)? (edge|watch|deliver)\b')
_BY_COMMAND = {"edge": "edge", "watch": "watcher", "deliver": "runner"}


def is_process(frame: str) -> bool:
    return frame.startswith("process ")


def component(frames: list[str]) -> str:
    for frame in reversed(frames):
        m = _PROCESS.match(frame)
        if m:
            return _BY_COMMAND[m.group(1)]
    for name, files in COMPONENTS:
        if any(f in frame for frame in frames for f in files):
            return name
    return "other"


def summarise(text: str, top: int = 25, per_component: int = 8) -> str:
    stacks = parse_folded(text)
    own, incl, comp = Counter(), Counter(), Counter()
    own_by: dict[str, Counter] = {}
    idle = 0
    for frames, count in stacks:
        name = component(frames)
        frames = [_short(f) for f in frames if not is_process(f)]
        if not frames or is_idle(frames[-1]):
            idle += count
            continue
        own[frames[-1]] += count
        own_by.setdefault(name, Counter())[frames[-1]] += count
        comp[name] += count
        for f in set(frames):
            incl[f] += count
    total = sum(own.values()) or 1
    lines = [f"{total} samples of working threads ({idle} idle pool/selector samples left "
             "out)", "by component: " + ", ".join(
                 f"{name} {100 * c / total:.1f}%" for name, c in comp.most_common()),
             "self%  function"]
    lines += [f"{100 * c / total:5.1f}  {f}" for f, c in own.most_common(top)]
    lines += ["", "incl%  function"]
    lines += [f"{100 * c / total:5.1f}  {f}" for f, c in incl.most_common(top)]
    for name, _ in comp.most_common():
        sub = own_by[name]
        n = sum(sub.values())
        lines += ["", f"{name}: self% of its {n} samples"]
        lines += [f"{100 * c / n:5.1f}  {f}" for f, c in sub.most_common(per_component)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``func (/long/path/pkg/mod.py:12)`` -> ``func (pkg/mod.py:12)``."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    path = where.rstrip(")")
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"

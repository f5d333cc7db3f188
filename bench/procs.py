"""Memory of a process and its descendants, read from ``/proc``.

RSS figures are kibibytes as the kernel reports them (``VmRSS``,
``VmHWM`` in ``/proc/PID/status``). A tree's RSS is the plain sum over
its processes, so pages shared between Postfix's processes (its shared
libraries) are counted once per process: the same way ``ps`` users add
them up, and an overestimate of Postfix's real footprint. The PSS sum
(``smaps_rollup``) counts each shared page once and is printed beside it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` for a child that must not outlive the harness: the
    kernel sends it SIGTERM when the harness dies, even by SIGKILL. (The
    kernel forgets this when the child changes user: see :func:`watchdog`.)"""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def watchdog(command: str) -> subprocess.Popen:
    """A shell that runs ``command`` once this process is gone, for what
    :func:`die_with_parent` cannot cover (a Postfix master that detaches,
    an smtp-sink that drops root). Kill it when the thing is stopped."""
    me = os.getpid()
    return subprocess.Popen(
        ["sh", "-c", f"while kill -0 {me} 2>/dev/null; do sleep 1; done; {command}"],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)


def end_watchdog(dog: subprocess.Popen | None) -> None:
    if dog is not None:
        dog.kill()
        dog.wait()


def _status(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _kb(value: str) -> int:
    return int(value.split()[0]) if value else 0


def vm_rss_kb(pid: int) -> int:
    return _kb(_status(pid).get("VmRSS", ""))


def vm_hwm_kb(pid: int) -> int:
    """Peak RSS of one process since it started (``VmHWM``)."""
    return _kb(_status(pid).get("VmHWM", ""))


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time a process has used (``/proc/PID/stat``);
    with ``children``, plus that of its children it has reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process tree: every live member plus the reaped children
    (a Postfix smtpd that exits is counted in the master's child time)."""
    return sum(cpu_seconds(p, children=True) for p in tree(pid))


def _parents() -> dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        out[int(name)] = int(fields[1])
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants now alive."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in parents or p == pid:
            out.append(p)
            todo.extend(children.get(p, ()))
    return out


def tree_rss_kb(pid: int) -> int:
    return sum(vm_rss_kb(p) for p in tree(pid))


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages divided among their users, so a
    sum over processes counts each page once (``smaps_rollup``)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return _kb(line.split(":", 1)[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def tree_pss_kb(pid: int) -> int:
    return sum(pss_kb(p) for p in tree(pid))


class RssSampler:
    """Samples a process tree's summed RSS in a thread; ``peak_kb`` is the
    highest sample. Use as a context manager around the load."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.peak_pss_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        pids = tree(self.pid)
        kb = sum(vm_rss_kb(p) for p in pids)
        self.peak_kb = max(self.peak_kb, kb)
        self.peak_pss_kb = max(self.peak_pss_kb, sum(pss_kb(p) for p in pids))
        self.samples += 1
        return kb

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def mb(kb: int | float | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def wait_until(pred, timeout: float, interval: float = 0.02):
    """Poll ``pred`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)

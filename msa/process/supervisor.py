"""``msa daemon`` as several processes: a supervisor and its children.

One Python process has one GIL, which caps the whole daemon at what one
CPU can do. So ``msa daemon`` (unless ``[daemon] processes = false`` or
``--single-process``) is a supervisor that runs no mail code and starts
one child process per component, each on the very code path of ``msa
edge``, ``msa watch`` or ``msa deliver`` (``python -m msa.cli COMPONENT
--supervised PID:FD``): ``[daemon] edge_workers`` edge processes sharing
the listening addresses (``SO_REUSEPORT``, ``--reuse-port``), one watcher,
one runner. Invariants:

- The supervisor binds no listener: each edge child binds its own
  sockets and then drops privileges, as ``msa edge`` does. So the
  supervisor keeps the identity it was started with (root, like Postfix's
  ``master``) in order to start a child again on a privileged port.
- Children report over a pipe: ``R`` once started (listening, privileges
  dropped, signal handlers in place), ``H`` after a reload, ``E`` after a
  failed one. End of file on the pipe means the child is gone (the kernel
  closes it even after SIGKILL).
- A child that fails before its first ``R`` during start-up (bad config,
  address in use) stops the daemon with that child's exit status, as the
  single process would. A child that dies later is started again after
  1, 2, 4 ... 60 s (the count starts over once a child has run 60 s);
  each death and restart is logged.
- SIGTERM/SIGINT go to every child (graceful: each child lets its work in
  flight finish for ``[daemon] grace`` seconds); the supervisor exits
  once all children have, killing any still there ``grace + 10`` s later.
  SIGHUP and ``reload`` re-read the config and reach every child: the
  edge processes first, then the others, so that once another process
  says "reloaded" the listeners already use the new settings; ``reload``
  answers after every child has acknowledged.
- The supervisor holds the per-client counters of every edge child (the
  anvil, :mod:`msa.submission.anvil`): each edge child gets its end of a
  socket pair (``--anvil FD``), made anew at each start; a dead child's
  open connections are forgotten when its end closes.
- The supervisor serves the control socket. ``flush`` reaches the runner
  as SIGUSR1. A signal is sent to a child only after its ``R`` (before it,
  the default action of SIGHUP/SIGUSR1 would kill it; a child ignores
  both until it is ready); a reload or a flush asked for meanwhile is
  sent when ``R`` arrives (a starting runner scans ``deferred/`` but
  takes only what is due).
- Children do not outlive the supervisor: each asks the kernel for
  SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, asked again after
  dropping privileges, which clears it) and also stops when its parent
  pid changes (checked every second), so a ``kill -9`` of the supervisor
  alone leaves no process running for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import msa
from msa import config, sysexits, system
from msa.admin.control import ControlServer
from msa.admin.mailq import queue_listing
from msa.process import logs
from msa.submission.anvil import AnvilServer

log = logging.getLogger("msa.daemon")

RESTART_MIN = 1.0
RESTART_MAX = 60.0
STABLE_AFTER = 60.0      # a child up this long restarts its backoff
RELOAD_TIMEOUT = 30.0
KILL_AFTER = 10.0        # beyond [daemon] grace
_PR_SET_PDEATHSIG = 1

READY, RELOADED, RELOAD_FAILED = b"R", b"H", b"E"


# -- pure decisions -------------------------------------------------------------

def restart_delay(failures: int) -> float:
    """Seconds before starting a child again after its ``failures``-th
    death in a row (1, 2, 4 ... 60)."""
    return min(RESTART_MAX, RESTART_MIN * 2 ** max(0, failures - 1))


# The most edge processes ``edge_workers = 0`` makes (each is a Python
# process of ~25 MB before its first connection).
MAX_AUTO_EDGES = 8


def edge_workers(setting: int, cpus: int) -> int:
    """How many edge processes: ``setting``; 0 = one per CPU, at least one
    and at most :data:`MAX_AUTO_EDGES`. Accepting is where clients wait,
    and the watcher and the runner (a process each, at a lower priority:
    ``background_nice``) now take about a third of the CPU a message
    costs: on 2 CPUs two edges accepted 10-16% more than one at
    concurrency 10 and 50 (``bench/run.py --edge-workers``); at 1 the
    difference was within the noise."""
    if setting > 0:
        return setting
    return max(1, min(MAX_AUTO_EDGES, cpus))


def parse_supervised(text: str) -> tuple[int, int]:
    """``--supervised PID:FD`` → (parent pid, notify fd)."""
    pid, _, fd = text.partition(":")
    if not (pid.isdigit() and fd.isdigit()):
        raise ValueError(f"--supervised wants PID:FD, not {text!r}")
    return int(pid), int(fd)


# -- child side -----------------------------------------------------------------

def die_with_parent(parent: int) -> bool:
    """Ask for SIGTERM when the parent dies; False when it is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent


class ChildLink:
    """A supervised child's end: notifications to the supervisor and the
    watch on its parent."""

    def __init__(self, parent: int, fd: int):
        self.parent, self.fd = parent, fd
        os.set_inheritable(fd, False)
        # Until the event loop's handlers are in place a reload or flush
        # must not kill us (their default action).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def notify(self, what: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(self.fd, what)

    def orphaned(self) -> bool:
        return os.getppid() != self.parent

    async def watch_parent(self, stop: asyncio.Event) -> None:
        """Re-arm PDEATHSIG (a change of user cleared it) and stop when the
        parent is gone."""
        if not die_with_parent(self.parent):
            log.warning("supervisor %d is gone; stopping", self.parent)
            stop.set()
            return
        while not stop.is_set():
            await asyncio.sleep(1.0)
            if self.orphaned():
                log.warning("supervisor %d is gone; stopping", self.parent)
                stop.set()


# -- supervisor side -------------------------------------------------------------

@dataclass
class Child:
    """One supervised process slot (``edge-2``, ``watch``, ``deliver``)."""

    component: str
    name: str
    proc: subprocess.Popen | None = None
    rfd: int | None = None
    ready: bool = False
    was_ready: bool = False
    started: float = 0.0
    failures: int = 0
    reload_pending: bool = False
    flush_pending: bool = False
    reload_ack: asyncio.Future | None = None
    restart: asyncio.TimerHandle | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and not self.exited.is_set()


class Supervisor:
    """The parent of ``msa daemon`` in process mode (see module docstring).

    ``child_args`` are the options every child gets after its component
    name (``--config``, ``--log`` ...); ``cwd`` is where children start
    (the directory relative config paths were resolved from)."""

    def __init__(self, cfg: config.Config, spool, child_args: list[str], cwd: str,
                 components: tuple[str, ...] = ("edge", "watch", "deliver")):
        self.cfg, self.spool, self.child_args, self.cwd = cfg, spool, child_args, cwd
        self.components = components
        self.children: list[Child] = []
        self.control: ControlServer | None = None
        # Per-client counters for every edge child (msa.submission.anvil).
        self.anvil = AnvilServer()
        self.started = time.time()
        self.starting = True
        self.stopping = False
        self.code = 0
        self._stop = asyncio.Event()
        self._startup_failed = asyncio.Event()
        self._env = _child_env()

    # -- building ---------------------------------------------------------

    def plan(self) -> list[Child]:
        out = []
        if "edge" in self.components and (self.cfg.edge.submission or self.cfg.edge.submissions):
            n = edge_workers(self.cfg.daemon.edge_workers, os.cpu_count() or 1)
            out += [Child("edge", "edge" if n == 1 else f"edge-{i + 1}") for i in range(n)]
        out += [Child(c, c) for c in self.components if c != "edge"]
        return out

    def _argv(self, child: Child, wfd: int, anvil_fd: int | None = None) -> list[str]:
        argv = [sys.executable, "-m", "msa.cli", child.component, *self.child_args,
                "--supervised", f"{os.getpid()}:{wfd}"]
        if child.component == "edge" and child.name != "edge":
            argv.append("--reuse-port")
        if anvil_fd is not None:
            argv += ["--anvil", str(anvil_fd)]
        return argv

    def spawn(self, child: Child) -> None:
        child.restart = None
        rfd, wfd = os.pipe()
        # An edge child's end of a socket pair to the anvil (served here).
        theirs = self.anvil.pair() if child.component == "edge" else None
        fds = (wfd,) if theirs is None else (wfd, theirs.fileno())
        try:
            child.proc = subprocess.Popen(
                self._argv(child, wfd, theirs.fileno() if theirs is not None else None),
                pass_fds=fds, env=self._env, cwd=self.cwd)
        except OSError as exc:
            os.close(rfd)
            log.error("cannot start %s: %s", child.name, exc)
            child.exited = asyncio.Event()
            self._exited(child, None)
            return
        finally:
            os.close(wfd)
            if theirs is not None:
                theirs.close()
        os.set_blocking(rfd, False)
        child.rfd, child.ready, child.started = rfd, False, time.monotonic()
        child.exited = asyncio.Event()
        asyncio.get_running_loop().add_reader(rfd, self._readable, child)
        log.debug("started %s (pid %d)", child.name, child.pid)

    # -- what children say -------------------------------------------------

    def _readable(self, child: Child) -> None:
        try:
            data = os.read(child.rfd, 256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_pipe(child)
            self._reap(child)
            return
        for byte in data:
            self._message(child, bytes([byte]))

    def _message(self, child: Child, what: bytes) -> None:
        if what == READY:
            child.ready = child.was_ready = True
            if child.reload_pending:
                child.reload_pending = False
                self._signal(child, signal.SIGHUP)
            if child.flush_pending:
                child.flush_pending = False
                self._signal(child, signal.SIGUSR1)
            if self.starting and all(c.ready for c in self.children):
                self.starting = False
                log.info("started %s as %d processes: %s (pid %d)", "+".join(self.components),
                         len(self.children), self.describe(), os.getpid())
                system.sd_notify(f"READY=1\nSTATUS=running as {len(self.children)} processes")
        elif what in (RELOADED, RELOAD_FAILED):
            if child.reload_ack is not None and not child.reload_ack.done():
                child.reload_ack.set_result(what == RELOADED)

    def _close_pipe(self, child: Child) -> None:
        if child.rfd is not None:
            asyncio.get_running_loop().remove_reader(child.rfd)
            os.close(child.rfd)
            child.rfd = None

    def _reap(self, child: Child) -> None:
        """The pipe closed: wait for the exit status without blocking."""
        code = child.proc.poll()
        if code is None:
            asyncio.get_running_loop().call_later(0.02, self._reap, child)
            return
        self._exited(child, code)

    def _exited(self, child: Child, code: int | None) -> None:
        child.ready = False
        child.exited.set()
        if child.reload_ack is not None and not child.reload_ack.done():
            child.reload_ack.set_result(False)
        if self.stopping:
            return
        how = _status_text(code)
        if self.starting and not child.was_ready:
            log.error("%s %s while starting; stopping", child.name, how)
            self.code = sysexits.EX_SOFTWARE if code is None or code <= 0 else code
            self._startup_failed.set()
            return
        up = time.monotonic() - child.started
        child.failures = 1 if up >= STABLE_AFTER else child.failures + 1
        delay = restart_delay(child.failures)
        log.error("%s (pid %s) %s after %.0fs; starting it again in %.0fs",
                  child.name, child.pid, how, up, delay)
        child.restart = asyncio.get_running_loop().call_later(delay, self._restart, child)

    def _restart(self, child: Child) -> None:
        if self.stopping:
            return
        # A dead writer's temp files are tidied as at start; recover()
        # is safe while the other processes work.
        with contextlib.suppress(OSError):
            self.spool.recover()
        self.spawn(child)

    def _signal(self, child: Child, sig: int) -> bool:
        if not child.alive():
            return False
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(sig)
            return True
        return False

    # -- commands ---------------------------------------------------------

    def flush(self) -> str:
        for child in self.children:
            if child.component == "deliver":
                if child.ready:
                    self._signal(child, signal.SIGUSR1)
                else:
                    # A starting runner scans deferred/ but takes only
                    # what is due: the flush is sent once it is ready.
                    child.flush_pending = True
        return "flushing"

    async def reload(self) -> str:
        """Read the config again (a bad file raises and changes nothing),
        then reload the edge processes, then the others."""
        new = config.load(self.cfg.path or None)
        self.cfg = new
        failed: list[str] = []
        for group in ([c for c in self.children if c.component == "edge"],
                      [c for c in self.children if c.component != "edge"]):
            failed += await self._reload_group(group)
        if failed:
            raise RuntimeError(f"not reloaded in {', '.join(failed)} (see the log)")
        log.info("reloaded %s", new.path or "built-in defaults")
        return "reloaded"

    async def _reload_group(self, group: list[Child]) -> list[str]:
        loop = asyncio.get_running_loop()
        waits = []
        for child in group:
            if not child.ready:
                child.reload_pending = True   # sent when it says R
                continue
            child.reload_ack = loop.create_future()
            if self._signal(child, signal.SIGHUP):
                waits.append(child)
        failed = []
        for child in waits:
            try:
                ok = await asyncio.wait_for(asyncio.shield(child.reload_ack), RELOAD_TIMEOUT)
            except asyncio.TimeoutError:
                ok = False
            if not ok:
                failed.append(child.name)
        return failed

    def describe(self) -> str:
        """``name:pid`` of each child, ``name:-`` while it is not ready."""
        return ",".join(f"{c.name}:{c.pid if c.ready else '-'}" for c in self.children)

    def status(self) -> str:
        return (f"pid={os.getpid()} components={','.join(self.components)} "
                f"uptime={int(time.time() - self.started)} processes={self.describe()}")

    async def _sighup(self) -> None:
        logs.reopen()
        system.sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            await self.reload()
        except Exception as exc:  # keep running on the old config
            log.error("reload failed: %s", exc)
        finally:
            system.sd_notify("READY=1")

    # -- running ----------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        log.info("spool %s: %s", self.spool.root_s, self.spool.protocol.describe())
        recovered = self.spool.recover()
        if any(recovered.values()):
            log.info("recovered spool: removed %(tmp)d temp files, %(claims)d claims", recovered)
        self.control = ControlServer(self.cfg.control_socket(), {
            "flush": self.flush, "reload": self.reload, "status": self.status,
            **queue_listing(self.cfg, self.spool)},
            owner_uid=_uid_of(self.cfg.daemon.user))
        try:
            await self.control.start()
        except OSError as exc:
            log.error("cannot start: %s", exc)
            return sysexits.EX_OSERR
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._sighup()))
        self.children = self.plan()
        for child in self.children:
            self.spawn(child)
        stopper = asyncio.ensure_future(self._stop.wait())
        failed = asyncio.ensure_future(self._startup_failed.wait())
        await asyncio.wait({stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        failed.cancel()
        await self._shutdown()
        log.info("stopped (pid %d)", os.getpid())
        return self.code

    async def _shutdown(self) -> None:
        self.stopping = True
        system.sd_notify("STOPPING=1")
        for child in self.children:
            if child.restart is not None:
                child.restart.cancel()
            self._signal(child, signal.SIGTERM)
        waits = [asyncio.ensure_future(c.exited.wait()) for c in self.children if c.alive()]
        if waits:
            _, late = await asyncio.wait(waits, timeout=self.cfg.daemon.grace + KILL_AFTER)
            if late:
                for child in self.children:
                    if child.alive():
                        log.warning("%s (pid %d) did not stop; killing it",
                                    child.name, child.pid)
                        self._signal(child, signal.SIGKILL)
                await asyncio.wait(late, timeout=KILL_AFTER)
        for child in self.children:
            self._close_pipe(child)
            if child.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(0.5)
        if self.control is not None:
            await self.control.stop()
        await self.anvil.close()


def _status_text(code: int | None) -> str:
    if code is None:
        return "could not be started"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _uid_of(user: str) -> int | None:
    if not user:
        return None
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _child_env() -> dict[str, str]:
    """The environment with the directory msa is imported from first on
    PYTHONPATH, so ``python -m msa.cli`` finds the same msa (a checkout
    run through ``bin/msa`` is not on the default path)."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)      # systemd hears from the supervisor only
    here = os.path.dirname(os.path.dirname(os.path.abspath(msa.__file__)))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env

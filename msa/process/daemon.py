"""``msa daemon|edge|watch|deliver``: run the long-lived components.

``msa daemon`` supervises the SMTP submission listeners, the watcher and
the delivery runner as child processes (:mod:`msa.process.supervisor`; each child
is the code path of ``msa edge``, ``msa watch`` or ``msa deliver``), or,
with ``[daemon] processes = false`` or ``--single-process``, runs all
three in one asyncio loop. ``msa edge``, ``msa watch`` and ``msa deliver``
run one each (they share nothing but the spool, so they may run as
separate processes, even as different users). Invariants:

- At start the spool is tidied (:meth:`spool.Spool.recover`) before any
  component touches it.
- Listening sockets are bound before privileges are dropped (``--user``),
  then nothing runs as root.
- SIGTERM/SIGINT: the listeners stop accepting, work in flight gets
  ``[daemon].grace`` seconds to finish, every claim is released (a claim
  is an flock: even an unfinished one is released by the exit), exit 0.
- SIGHUP or ``reload`` on the control socket: the config file is read
  again and the listeners take the new certificates and password file
  (``SmtpEdge.reload``) without dropping open connections, the watcher
  new policy settings (not new stages); a bad new config is logged and
  the old one kept.
- The control socket (``flush``, ``reload``, ``status``) is served by
  ``msa daemon`` (the supervisor, or the single process) or ``msa
  deliver``. SIGUSR1 to a process with a runner is ``flush``.
- A supervised child (``--supervised PID:FD``, only ever given by the
  supervisor) writes no pid file, serves no control socket, does not tidy
  the spool (the supervisor did) and reports to the supervisor over FD;
  an edge child counts clients in the supervisor's anvil (``--anvil FD``,
  :mod:`msa.submission.anvil`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time

from msa import config, sysexits, system
from msa.admin.control import ControlServer
from msa.admin.mailq import queue_listing
from msa.process import logs
from msa.process.supervisor import (
    READY,
    RELOAD_FAILED,
    RELOADED,
    ChildLink,
    Supervisor,
    parse_supervised,
)
from msa.store import open_spool

log = logging.getLogger("msa.daemon")

COMPONENTS = {
    "daemon": ("edge", "watch", "deliver"),
    "edge": ("edge",),
    "watch": ("watch",),
    "deliver": ("deliver",),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    name = argv[0] if argv and argv[0] in COMPONENTS else "daemon"
    p = argparse.ArgumentParser(prog=f"msa {name}", description={
        "daemon": "Run the submission listeners, the watcher and the runner.",
        "edge": "Run the SMTP submission listeners only.",
        "watch": "Run the policy-stage watcher only.",
        "deliver": "Run the delivery runner only."}[name])
    p.add_argument("--config", help="config file (default: $MSA_CONFIG, /etc/msa/msa.toml)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--foreground", action="store_true",
                      help="stay attached to the terminal (the default)")
    mode.add_argument("--detach", action="store_true",
                      help="become a daemon (fork, setsid, stdio to /dev/null)")
    p.add_argument("--pidfile", help="write the pid here ([daemon].pidfile)")
    p.add_argument("--user", help="after binding, run as this user ([daemon].user)")
    p.add_argument("--group", help="and this group ([daemon].group)")
    p.add_argument("--log", help="stderr, syslog or a file path ([daemon].log)")
    p.add_argument("--log-level", help="debug, info, warning, error ([daemon].log_level)")
    if name == "daemon":
        p.add_argument("--single-process", action="store_true",
                       help="run the components in this one process ([daemon].processes = false)")
    # Given by the supervisor to its children only (msa.process.supervisor).
    p.add_argument("--supervised", help=argparse.SUPPRESS)
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--anvil", type=int, help=argparse.SUPPRESS)
    opts = p.parse_args(argv[1:])
    opts.command = name
    return opts


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    link = ChildLink(*parse_supervised(opts.supervised)) if opts.supervised else None
    try:
        cfg = config.load(opts.config)
    except config.ConfigError as exc:
        print(f"msa {opts.command}: {exc}", file=sys.stderr)
        return sysexits.EX_CONFIG
    # The values `msa check` checks, before anything starts (a bad one
    # would otherwise end a child process with a traceback).
    from msa.admin.check import value_problems
    problems = value_problems(cfg)
    for problem in problems:
        print(f"msa {opts.command}: {cfg.path}: {problem}", file=sys.stderr)
    if problems:
        return sysexits.EX_CONFIG
    d = cfg.daemon
    for key in ("pidfile", "user", "group", "log", "log_level"):
        value = getattr(opts, key)
        if value:
            setattr(d, key, value)
    if link is not None:
        d.pidfile = ""  # the supervisor's
    if d.pidfile:
        d.pidfile = os.path.abspath(d.pidfile)
    if d.log not in ("", "stderr") and not logs.is_syslog(d.log):
        d.log = os.path.abspath(d.log)  # --detach changes directory to /
    cwd = os.getcwd()
    if opts.detach and link is None:
        if d.log in ("", "stderr"):
            d.log = "syslog"
        problem = (logs.syslog_problem(logs.syslog_path(d.log))
                   if logs.is_syslog(d.log) else None)
        if problem:
            # Detached, stderr is /dev/null: the lines would be lost.
            print(f"msa {opts.command}: --detach logs to syslog, and syslog is not there "
                  f"({problem}): set [daemon] log = a file, or run a syslog daemon",
                  file=sys.stderr)
            return sysexits.EX_CONFIG
        system.detach()
    logs.setup(d.log, d.log_level)
    try:
        spool = open_spool(cfg)
    except OSError as exc:
        log.error("spool %s unavailable: %s", cfg.spool.root, exc)
        return sysexits.EX_UNAVAILABLE
    if d.pidfile:
        try:
            system.write_pidfile(d.pidfile)
        except OSError as exc:
            log.error("%s", exc)
            return sysexits.EX_TEMPFAIL
    try:
        if opts.command == "daemon" and d.processes and not opts.single_process:
            return run_loop(Supervisor(cfg, spool, child_options(cfg), cwd).serve(), cfg)
        return run_loop(Daemon(cfg, spool, COMPONENTS[opts.command], link=link,
                               reuse_port=opts.reuse_port, anvil_fd=opts.anvil).serve(), cfg)
    except config.ConfigError as exc:
        log.error("config: %s", exc)
        return sysexits.EX_CONFIG
    finally:
        if d.pidfile:
            system.remove_pidfile(d.pidfile)


# Allocations between two collections of the youngest generation (the
# interpreter's default is 700). Per message the edge allocates a few
# thousand objects, nearly all freed by reference counting; fewer
# collections cost less and do not keep more memory (cycles are rare and
# still collected).
GC_THRESHOLD0 = 20000


def settle_garbage_collector() -> None:
    """After start-up: move what start-up made (modules, config, TLS
    context...) out of the collector's sight, which it would otherwise
    traverse again at every full collection, and collect less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, gen1, gen2)


def lower_priority(increment: int) -> None:
    """``nice(2)`` by ``increment`` ([daemon] background_nice): the
    supervised watcher and runner yield the CPU to the edge, where a
    client waits for each reply; they catch up when it is idle."""
    if increment:
        os.nice(increment)
        log.debug("running at nice %d", os.nice(0))


EVENT_LOOPS = ("uvloop", "asyncio")


def loop_factory(name: str):
    """The event loop ``[daemon] event_loop`` names; without the uvloop
    package installed, asyncio's (with a warning)."""
    if name not in EVENT_LOOPS:
        raise config.ConfigError(f"daemon.event_loop: {name!r} is not one of "
                                 f"{', '.join(EVENT_LOOPS)}")
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("daemon.event_loop: uvloop is not installed; using asyncio's loop")
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_loop(coro, cfg: config.Config):
    """Run ``coro`` to its end in a new event loop of the configured kind."""
    try:
        factory = loop_factory(cfg.daemon.event_loop)
        if not 0 <= cfg.daemon.background_nice <= 19:
            raise config.ConfigError(f"daemon.background_nice: {cfg.daemon.background_nice}"
                                     " is not within 0..19")
    except config.ConfigError:
        coro.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def child_options(cfg: config.Config) -> list[str]:
    """The options a supervised child needs to run as its supervisor was
    told to (command-line overrides included)."""
    d = cfg.daemon
    out = ["--config", cfg.path] if cfg.path else []
    for option, value in (("--log", d.log), ("--log-level", d.log_level),
                          ("--user", d.user), ("--group", d.group)):
        if value:
            out += [option, value]
    return out


class Daemon:
    """The components of one process and their lifecycle. ``link`` is set
    in a child of :class:`msa.process.supervisor.Supervisor`."""

    def __init__(self, cfg: config.Config, spool, components: tuple[str, ...],
                 link: ChildLink | None = None, reuse_port: bool = False,
                 anvil_fd: int | None = None):
        self.cfg, self.spool, self.components = cfg, spool, components
        self.link, self.reuse_port = link, reuse_port
        self.anvil_fd = anvil_fd    # the supervisor's per-client counters
        self.anvil = None
        self.edges: list = []
        self.watcher = None
        self.runner = None
        self.control: ControlServer | None = None
        self.started = time.time()
        self._stop = asyncio.Event()

    # -- building ---------------------------------------------------------

    def build(self) -> None:
        """Create the components (raises ConfigError early)."""
        if "edge" in self.components:
            from msa.submission.edge import edges_from_config
            # Several edge processes on one address: SO_REUSEPORT.
            shared = {"reuse_port": True} if self.reuse_port else {}
            if self.anvil_fd is not None:
                import socket

                from msa.submission.anvil import AnvilClient
                self.anvil = AnvilClient(socket.socket(fileno=self.anvil_fd))
                shared["anvil"] = self.anvil
            self.edges = list(edges_from_config(self.cfg, self.spool, **shared))
        if "watch" in self.components:
            from msa.cleanup.watcher import Watcher
            self.watcher = Watcher(self.cfg, self.spool)
        if "deliver" in self.components:
            from msa.delivery.runner import Runner
            self.runner = Runner(self.cfg, self.spool)
        if "deliver" in self.components and self.link is None:
            self.control = ControlServer(self.cfg.control_socket(), {
                "flush": self.flush, "reload": self.reload, "status": self.status,
                **queue_listing(self.cfg, self.spool)})

    async def start(self) -> None:
        """Bind everything, then drop privileges."""
        if self.anvil is not None:
            await self.anvil.start()
        for edge in self.edges:
            await edge.start()
        if self.control is not None:
            await self.control.start()
        d = self.cfg.daemon
        if system.drop_privileges(d.user, d.group):
            log.info("running as user %s", d.user)

    # -- commands ---------------------------------------------------------

    def flush(self) -> str:
        if self.runner is None:
            return "no runner in this process"
        self.runner.flush()
        return "flushing"

    def reload(self) -> str:
        """Read the config again; the listeners take new certificates and
        passwords. A bad file keeps the old config."""
        new = config.load(self.cfg.path or None)
        if self.watcher is not None:
            self.watcher.reload(new)
        for edge in self.edges:
            edge.reload(new)
        self.cfg = new
        log.info("reloaded %s", new.path or "built-in defaults")
        return "reloaded"

    def status(self) -> str:
        return (f"pid={os.getpid()} components={','.join(self.components)} "
                f"uptime={int(time.time() - self.started)}")

    def _sighup(self) -> None:
        logs.reopen()
        if self.link is None:
            system.sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            self.reload()
        except Exception as exc:  # keep running on the old config
            log.error("reload failed, keeping the old config: %s", exc)
            self._notify(RELOAD_FAILED)
        else:
            self._notify(RELOADED)
        if self.link is None:
            system.sd_notify("READY=1")

    def _notify(self, what: bytes) -> None:
        if self.link is not None:
            self.link.notify(what)

    # -- running ----------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        if self.link is None:
            log.info("spool %s: %s", self.spool.root_s, self.spool.protocol.describe())
            recovered = self.spool.recover()
            if any(recovered.values()):
                log.info("recovered spool: removed %(tmp)d temp files, %(claims)d claims",
                         recovered)
        self.build()
        try:
            await self.start()
        except OSError as exc:
            log.error("cannot start: %s", exc)
            await self._shutdown([])
            return sysexits.EX_OSERR
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        tasks = []
        if self.watcher is not None:
            tasks.append(asyncio.create_task(self.watcher.run(), name="watcher"))
        if self.runner is not None:
            tasks.append(asyncio.create_task(self.runner.run(), name="runner"))
            loop.add_signal_handler(signal.SIGUSR1, self.runner.flush)
        log.info("started %s (pid %d)", "+".join(self.components), os.getpid())
        settle_garbage_collector()
        if self.link is not None and "edge" not in self.components:
            lower_priority(self.cfg.daemon.background_nice)
        if self.link is not None:
            watch = asyncio.create_task(self.link.watch_parent(self._stop), name="parent")
            self._notify(READY)
        else:
            system.sd_notify("READY=1")
        stopper = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        for task in done:
            if task is not stopper:
                exc = task.exception()
                log.error("%s stopped unexpectedly: %r", task.get_name(), exc)
                code = sysexits.EX_SOFTWARE
        stopper.cancel()
        if self.link is not None:
            watch.cancel()
        await self._shutdown(tasks)
        log.info("stopped (pid %d)", os.getpid())
        return code

    async def _shutdown(self, tasks: list[asyncio.Task]) -> None:
        if self.link is None:
            system.sd_notify("STOPPING=1")
        grace = self.cfg.daemon.grace
        if self.control is not None:
            await self.control.stop()
        stops = [edge.stop(grace) for edge in self.edges]
        if self.watcher is not None:
            self.watcher.stop()
        if self.runner is not None:
            stops.append(self.runner.stop(grace))
        pending = [asyncio.ensure_future(s) for s in stops] + list(tasks)
        if not pending:
            return
        done, late = await asyncio.wait(pending, timeout=grace)
        for task in late:
            log.warning("did not stop within %.0fs grace: %s", grace,
                        getattr(task, "get_name", lambda: task)())
            task.cancel()
        for task in done:
            with contextlib.suppress(asyncio.CancelledError):
                if task.exception() is not None:
                    log.error("error while stopping: %r", task.exception())

"""The benchmark's phases. Each starts what it needs under its own
directory, measures, stops what it started and returns a plain dict for
:mod:`bench.report`.

- :func:`load_phase`: msa and Postfix both running; for each concurrency,
  rounds of (msa run, Postfix run) interleaved so drift on a shared machine
  hits both. A run sends N messages with smtp-source; *accept* is when
  smtp-source exits (every message got 250), *end to end* is when the sink
  counted the Nth message. The next run starts only after the previous
  side's queue drained.
- :func:`big_phase`: one 50 MB message through each, on fresh instances so
  msa's ``VmHWM`` minus its idle ``VmRSS`` is the growth the message caused.
- :func:`idle_phase`: 1,000 connections opened to msa that read the
  greeting and then say nothing.
- :func:`backlog_phase`: 100,000 queue files written into ``active/``
  before ``msa deliver`` starts; time to the sink's first message.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import procs, source
from .msa_side import ROOT, MsaInstance, write_backlog
from .postfix_ref import PostfixRef
from .sink import Sink


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Side:
    """One system under test with its own sink."""

    def __init__(self, name: str, work: Path, big_limit: bool = False):
        self.name = name
        self.sink = Sink(free_port())
        port = free_port()
        if name == "postfix":
            self.server = PostfixRef(work / "postfix", port, self.sink.port)
        else:
            self.server = MsaInstance(work / "msa", port, self.sink.port)
        self.port = port

    def start(self) -> None:
        self.server.start()
        if self.name == "postfix":
            procs.wait_until(lambda: _answers(self.port), 20)

    @property
    def pid(self) -> int:
        return self.server.master_pid() if self.name == "postfix" else self.server.pid

    def backlog(self) -> int:
        if self.name == "postfix":
            return self.server.queue_count()
        return self.server.spool_count()

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            self.sink.stop()

    def log_tail(self) -> str:
        return self.server.log_tail()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(512).startswith(b"220")
    except OSError:
        return False


def send_and_wait(side: Side, conc: int, n: int, size: int, timeout: float,
                  sampler: procs.RssSampler | None = None) -> dict:
    """One run: smtp-source N messages, then wait for the sink to count them."""
    target = side.sink.count + n
    side.sink.expect(target)
    cpu0 = procs.tree_cpu_seconds(side.pid)
    start = time.monotonic()
    res = source.run(side.port, conc, n, size, timeout=timeout)
    out = {"side": side.name, "conc": conc, "n": n, "accept_s": res.seconds,
           "e2e_s": None, "error": ""}
    if not res.ok:
        out["error"] = f"smtp-source exit {res.returncode}: {res.output[-300:]}"
        return out
    reached = side.sink.wait(timeout)
    if reached is None:
        out["error"] = (f"sink got {side.sink.count - (target - n)}/{n} within {timeout:.0f}s; "
                        f"{side.backlog()} still queued")
    else:
        out["e2e_s"] = max(reached - start, res.seconds)
        out["cpu_s"] = procs.tree_cpu_seconds(side.pid) - cpu0
    return out


def drain(side: Side, timeout: float) -> bool:
    return bool(procs.wait_until(lambda: side.backlog() == 0, timeout, 0.05))


def load_phase(work: Path, sides: list[str], concs: list[int], n: int, size: int,
               rounds: int, profile=None, log=print) -> dict:
    """Accept and end-to-end rates; returns {"load": [...], "rss": {...}}."""
    running = [Side(name, work) for name in sides]
    runs = []
    rss = {name: {"tree_peak_kb": 0, "tree_peak_pss_kb": 0, "max_procs": 0} for name in sides}
    timeout = max(120.0, n / 10)
    try:
        for side in running:
            side.start()
            warm = send_and_wait(side, 5, 20, size, 60)
            if warm["error"]:
                raise RuntimeError(f"{side.name} warm-up failed: {warm['error']}\n"
                                   f"{side.log_tail()}")
        for conc in concs:
            for rnd in range(rounds):
                for side in running:
                    drain(side, 60)
                    with procs.RssSampler(side.pid) as sampler:
                        r = send_and_wait(side, conc, n, size, timeout)
                        nprocs = len(procs.tree(side.pid))
                    r["round"] = rnd
                    runs.append(r)
                    peak = rss[side.name]
                    peak["tree_peak_kb"] = max(peak["tree_peak_kb"], sampler.peak_kb)
                    peak["tree_peak_pss_kb"] = max(peak["tree_peak_pss_kb"],
                                                   sampler.peak_pss_kb)
                    peak["max_procs"] = max(peak["max_procs"], nprocs)
                    log(_run_line(r))
        for side in running:
            if side.name == "msa":
                rss["msa"]["hwm_kb"] = procs.vm_hwm_kb(side.pid)
                if profile:
                    profiled_run(side, profile, n, size, timeout, log)
    finally:
        for side in running:
            side.stop()
    return {"load": runs, "rss": rss}


def profiled_run(side: Side, profile: "Profiler", n: int, size: int, timeout: float,
                 log=print) -> None:
    """Two extra concurrency-10 runs of msa under py-spy (not in the table:
    sampling slows the process it samples): wall clock of every working
    thread (waits for fsync included), then only samples holding the GIL
    (where the CPU goes)."""
    for mode in ("wall", "gil"):
        drain(side, 60)
        ps = profile.start(side.pid, mode)
        try:
            r = send_and_wait(side, 10, n, size, timeout)
        finally:
            profile.stop(ps)
        r["round"] = f"profiled ({mode})"
        log(_run_line(r))


def _run_line(r: dict) -> str:
    acc = r["n"] / r["accept_s"] if r["accept_s"] and not r["error"] else None
    e2e = r["n"] / r["e2e_s"] if r["e2e_s"] else None
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    tail = f"  {r['error']}" if r["error"] else ""
    return (f"  {r['side']:<8} c={r['conc']:<3} round {r['round']}: accept {fmt(acc)}/s, "
            f"e2e {fmt(e2e)}/s{tail}")


def big_phase(work: Path, sides: list[str], size: int, log=print) -> dict:
    out: dict = {"size": size}
    for name in sides:
        side = Side(name, work / f"big-{name}")
        try:
            side.start()
            time.sleep(1.0)
            base_tree, base_main = procs.tree_rss_kb(side.pid), procs.vm_rss_kb(side.pid)
            with procs.RssSampler(side.pid, 0.05) as sampler:
                r = send_and_wait(side, 1, 1, size, 600)
            for key in ("conc", "n", "side"):
                r.pop(key)
            r["rss_growth_kb"] = sampler.peak_kb - base_tree
            if name == "msa":
                # VmHWM also catches a peak between two samples.
                r["rss_growth_kb"] = max(r["rss_growth_kb"],
                                         procs.vm_hwm_kb(side.pid) - base_main)
            out[name] = r
            e2e = "-" if r["e2e_s"] is None else f"{r['e2e_s']:.2f}"
            log(f"  {name:<8} {size >> 20} MB: accept {r['accept_s']:.2f}s e2e {e2e}s "
                f"RSS growth {r['rss_growth_kb'] / 1024:.1f} MB {r['error']}")
        except Exception as exc:  # noqa: BLE001 - reported in the table
            out[name] = {"error": f"{exc}"[:500]}
        finally:
            side.stop()
    return out


def idle_phase(work: Path, count: int, size: int, log=print) -> dict:
    side = Side("msa", work / "idle")
    out: dict = {"count": count}
    conns: list[socket.socket] = []
    try:
        side.start()
        time.sleep(1.0)
        out["baseline_kb"] = procs.tree_rss_kb(side.pid)
        # From ten addresses that are not trusted, so that each connection
        # is counted by the anvil (msa.submission.anvil) as a client's would.
        conns, greeted = open_idle(side.port, count, sources=IDLE_SOURCES)
        out["greeted"] = greeted
        time.sleep(2.0)
        out["rss_kb"] = procs.tree_rss_kb(side.pid)
        out["hwm_kb"] = procs.vm_hwm_kb(side.pid)
        r = send_and_wait(side, 1, 1, size, 60)
        out["message_ok"] = not r["error"]
        log(f"  idle: {greeted}/{count} greeted, RSS {out['rss_kb'] / 1024:.1f} MB")
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{exc}"[:500]
    finally:
        for s in conns:
            s.close()
        side.stop()
    return out


IDLE_SOURCES = [f"127.0.0.{n}" for n in range(11, 21)]


def open_idle(port: int, count: int, batch: int = 50, timeout: float = 60.0,
              sources: list[str] | None = None) -> tuple[list[socket.socket], int]:
    """Open ``count`` connections that read the greeting and then say
    nothing. Returns the sockets and how many got a ``220`` greeting.

    Connections are opened ``batch`` at a time, each batch greeted before
    the next: a burst of 1,000 SYNs overflows a listen backlog of 100 and,
    with SYN cookies, leaves clients that believe they are connected to a
    server that never saw them (the server speaks first, so nothing
    repairs it). That is the listener's backlog, not memory per idle
    connection, which is what this measures."""
    conns: list[socket.socket] = []
    greeted = 0
    deadline = time.monotonic() + timeout
    while len(conns) < count and time.monotonic() < deadline:
        new = [_connect(port, sources[(len(conns) + i) % len(sources)] if sources else None)
               for i in range(min(batch, count - len(conns)))]
        conns += new
        greeted += _greetings(new, deadline)
    return conns, greeted


def _connect(port: int, source: str | None = None) -> socket.socket:
    s = socket.socket()
    if source:
        s.bind((source, 0))
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    return s


def _greetings(socks: list[socket.socket], deadline: float) -> int:
    """Read one greeting from each socket (until ``deadline``)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    greeted, pending = 0, len(socks)
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            try:
                data = key.fileobj.recv(512)
            except OSError:
                data = b""
            greeted += data.startswith(b"220")
            pending -= 1
            sel.unregister(key.fileobj)
    sel.close()
    return greeted


def backlog_phase(work: Path, count: int, window: float, log=print) -> dict:
    """Write ``count`` queue files, start ``msa deliver``, time the first
    delivery, then watch RSS for ``window`` seconds."""
    base = work / "backlog"
    sink = Sink(free_port())
    inst = MsaInstance(base, free_port(), sink.port, command="deliver")
    out: dict = {"count": count, "window_s": window}
    try:
        inst.write_config()
        _create_spool(inst.config)
        t = time.monotonic()
        write_backlog(inst.spool / "active", count)
        out["write_s"] = time.monotonic() - t
        log(f"  wrote {count} queue files in {out['write_s']:.1f}s")
        sink.expect(1)
        start = time.monotonic()
        inst.start(wait_listen=False)
        with procs.RssSampler(inst.pid, 0.05) as sampler:
            first = sink.wait_first(max(60.0, window))
            if first is not None:
                end = first + window
                while time.monotonic() < end and inst.proc.poll() is None:
                    time.sleep(0.1)
            out["hwm_kb"] = procs.vm_hwm_kb(inst.pid)
        out["first_s"] = None if first is None else first - start
        out["delivered"] = sink.count
        out["rss_peak_kb"] = max(sampler.peak_kb, out["hwm_kb"])
        if first is None:
            out["error"] = f"no delivery within {max(60.0, window):.0f}s\n{inst.log_tail()}"
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{exc}"[:500]
    finally:
        inst.stop()
        sink.stop()
    return out


def stages_phase(work: Path, n: int, size: int, log=print) -> dict:
    """Each msa component alone, as its own process on its own spool: the
    edge takes N messages (c=10) into ``incoming/``; those files are renamed
    into an idle ``msa watch``'s ``incoming/`` and it carries them to
    ``active/``; those are renamed into an idle ``msa deliver``'s
    ``active/`` and it relays them to a sink. For each: messages/s and CPU
    ms per message (start-up excluded)."""
    base = work / "stages"
    sink = Sink(free_port())
    out: dict = {"n": n}
    insts = {name: MsaInstance(base / name, free_port(), sink.port, command=name)
             for name in ("edge", "watch", "deliver")}
    try:
        edge = insts["edge"]
        edge.start()
        cpu0 = procs.cpu_seconds(edge.pid)
        res = source.run(edge.port, 10, n, size)
        out["edge"] = {"seconds": res.seconds, "cpu_s": procs.cpu_seconds(edge.pid) - cpu0,
                       "error": "" if res.ok else res.output[-300:]}
        edge.stop()
        src = edge.spool / "incoming"
        for name, dest, done in (
                ("watch", "incoming", lambda i: _count(i.spool / "active") >= n),
                ("deliver", "active", lambda i: sink.count >= n)):
            inst = insts[name]
            inst.write_config()
            _create_spool(inst.config)
            inst.start(wait_listen=False)
            time.sleep(2.0)  # start-up done, idle
            cpu0, t0 = procs.cpu_seconds(inst.pid), time.monotonic()
            for qid in os.listdir(src):
                os.rename(src / qid, inst.spool / dest / qid)
            ok = procs.wait_until(lambda: done(inst), max(120.0, n / 5), 0.01)
            out[name] = {"seconds": time.monotonic() - t0,
                         "cpu_s": procs.cpu_seconds(inst.pid) - cpu0,
                         "error": "" if ok else f"not done: {inst.log_tail(5)}"}
            inst.stop()
            src = inst.spool / "active"
        for name in ("edge", "watch", "deliver"):
            r = out[name]
            log(f"  {name:<8} {n / r['seconds']:.1f} msg/s, {1000 * r['cpu_s'] / n:.2f} ms CPU "
                f"per message {r['error']}")
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{exc}"[:500]
    finally:
        for inst in insts.values():
            inst.stop()
        sink.stop()
    return out


def _count(directory: Path) -> int:
    try:
        return len(os.listdir(directory))
    except FileNotFoundError:
        return 0


def _create_spool(config: Path) -> None:
    """Create the spool's directories as msa does (modes included)."""
    from msa import config as msa_config
    from msa.store import open_spool
    open_spool(msa_config.load(str(config)))


class Profiler:
    """py-spy attached to msa for one run (``--profile DIR``)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.outputs: list[Path] = []

    def start(self, pid: int, mode: str = "wall") -> list[subprocess.Popen]:
        path = self.dir / f"msa-c10-{mode}.folded"
        self.outputs.append(path)
        argv = ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
                "--subprocesses", "-o", str(path)] + (["--gil"] if mode == "gil" else [])
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let py-spy attach before the load starts
        return [p]

    def stop(self, ps: list[subprocess.Popen]) -> None:
        for p in ps:
            p.send_signal(signal.SIGINT)
        for p in ps:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def sendmail_phase(work: Path, sides: list[str], calls: int, size: int, log=print) -> dict:
    """``calls`` sequential ``sendmail -t`` calls, one message each, with
    the system running (Postfix: its ``sendmail``/``postdrop`` into its
    private instance's maildrop, ``-C``; msa: ``bin/sendmail`` with the
    instance's config): calls per second, each call durable when it exits."""
    # Byte-compiled first, as an installed msa is (pip and Debian compile
    # at install time); a checkout run with PYTHONDONTWRITEBYTECODE set (as
    # here) would otherwise compile its modules again in every call.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "msa"),
                    str(ROOT / "spool")], check=True, capture_output=True, timeout=300)
    body = (b"From: bench@example.org\nTo: sink@example.test\nSubject: bench\n\n"
            + b"x" * max(0, size - 80) + b"\n")
    out: dict = {}
    for name in sides:
        side = Side(name, work / f"sendmail-{name}")
        try:
            side.start()
            if name == "postfix":
                argv = ["/usr/sbin/sendmail", "-C", str(side.server.etc), "-t"]
                env = dict(os.environ)
            else:
                argv = [sys.executable, str(ROOT / "bin" / "sendmail"), "-t"]
                env = dict(os.environ, MSA_CONFIG=str(side.server.config))
            start = time.monotonic()
            for _ in range(calls):
                subprocess.run(argv, input=body, env=env, check=True, timeout=60,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            seconds = time.monotonic() - start
            out[name] = {"calls": calls, "seconds": seconds, "per_s": calls / seconds}
            log(f"  {name}: {calls / seconds:.1f} sendmail calls/s")
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": f"{exc}"[:500]}
        finally:
            side.stop()
    return out

#!/usr/bin/env python3
"""msa's benchmark against a reference Postfix on loopback (``make bench``).

Load comes from Postfix's ``smtp-source``, the destination is
``smtp-sink``; both systems accept plain SMTP from 127.0.0.0/8 on a
loopback port and relay everything to their own sink, with their default
durability (fsync before 250). Prints a table (and ``--json`` writes the
raw results); see ``bench/report.py`` for the targets.

    python3 bench/run.py                 # everything (several minutes)
    python3 bench/run.py --quick         # small N: a smoke test
    python3 bench/run.py --only accept --n 5000
    python3 bench/run.py --sides postfix # the reference alone
    python3 bench/run.py --profile DIR   # plus py-spy of msa at c=10
    python3 bench/run.py --workdir /dev/shm          # both spools on tmpfs
    python3 bench/run.py --workdir /var/tmp --fs ext4  # ext4 with a journal
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import disk, msa_side, postfix_ref, report, scenarios  # noqa: E402
from bench import profile as profile_mod  # noqa: E402
from bench.sink import SMTP_SINK  # noqa: E402
from bench.source import SMTP_SOURCE  # noqa: E402

PHASES = ("accept", "e2e", "sendmail", "stages", "big", "idle", "backlog")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one round")
    p.add_argument("--only", default="", help="comma list of " + "|".join(PHASES))
    p.add_argument("--n", type=int, help="messages per load run (default 2000; quick 100)")
    p.add_argument("--rounds", type=int, help="rounds per concurrency (default 3; quick 1)")
    p.add_argument("--conc", default="1,10,50", help="concurrencies (default 1,10,50)")
    p.add_argument("--size", type=int, default=2048, help="payload bytes (default 2048)")
    p.add_argument("--big", type=int, help="big message bytes (default 50 MiB; quick 5 MiB)")
    p.add_argument("--idle", type=int, help="idle connections (default 1000; quick 100)")
    p.add_argument("--backlog", type=int, help="queued messages (default 100000; quick 2000)")
    p.add_argument("--backlog-window", type=float, help="seconds to watch after the first "
                   "delivery (default 10; quick 2)")
    p.add_argument("--sides", default="msa,postfix", help="msa,postfix (default both)")
    p.add_argument("--profile", metavar="DIR", help="py-spy msa in an extra c=10 run")
    p.add_argument("--msa-toml", default="", metavar="TOML",
                   help="append this to msa's generated msa.toml (experiments; noted)")
    p.add_argument("--edge-workers", type=int, metavar="N",
                   help="msa's [daemon] edge_workers (default: msa's own default)")
    p.add_argument("--json", metavar="PATH", help="write the raw results here")
    p.add_argument("--workdir", help="parent of the temp dir (default: system temp)")
    p.add_argument("--fs", choices=("ext4", "ext4-nojournal", "xfs"),
                   help="run on a file system of this type made in an image file under "
                   "--workdir (so on that disk) and loop-mounted (root)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, spools)")
    a = p.parse_args(argv)
    q = a.quick
    a.n = a.n or (100 if q else 2000)
    a.rounds = a.rounds or (1 if q else 3)
    a.big = a.big or (5 if q else 50) * 1024 * 1024
    a.idle = a.idle or (100 if q else 1000)
    a.backlog = a.backlog or (2000 if q else 100_000)
    a.backlog_window = a.backlog_window or (2.0 if q else 10.0)
    a.concs = [int(c) for c in a.conc.split(",") if c]
    a.phases = [x for x in a.only.split(",") if x] or list(PHASES)
    a.side_list = [s for s in a.sides.split(",") if s]
    for x in a.phases:
        if x not in PHASES:
            p.error(f"--only: unknown phase {x!r}")
    for s in a.side_list:
        if s not in ("msa", "postfix"):
            p.error(f"--sides: unknown side {s!r}")
    return a


def meta(args: argparse.Namespace) -> dict:
    def out(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                                  cwd=ROOT).stdout.strip()
        except OSError:
            return "?"
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "kernel": f"Linux {platform.release()}",
            "postfix_version": out("postconf", "-h", "-d", "mail_version"),
            "msa_rev": out("git", "rev-parse", "--short", "HEAD"),
            "n": args.n, "size": args.size, "rounds": args.rounds, "notes": []}


def missing_tools() -> list[str]:
    missing = [t for t in (SMTP_SOURCE, SMTP_SINK) if not os.access(t, os.X_OK)]
    if not postfix_ref.available():
        missing.append("postfix (binaries, user postfix, group postdrop)")
    return missing


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(args: argparse.Namespace, work: Path, results: dict) -> None:
    log = lambda s: print(s, flush=True)  # noqa: E731
    m = results["meta"]
    m["disk"] = disk.ceilings(work / "disk", 200 if args.quick else 1000)
    try:
        from spool import durable
        m["disk"]["protocol"] = durable.choose(str(work)).describe()
    except OSError as exc:
        m["disk"]["protocol"] = f"? ({exc})"
    sides = list(args.side_list)
    if args.edge_workers is not None:
        msa_side.EDGE_WORKERS = args.edge_workers
        m["notes"].append(f"msa [daemon] edge_workers = {args.edge_workers}")
    if args.msa_toml:
        msa_side.EXTRA_TOML = "\n" + args.msa_toml.replace("\\n", "\n") + "\n"
        m["notes"].append(f"msa.toml extra: {args.msa_toml!r}")
    if "msa" in sides:
        missing = msa_side.missing_features()
        if missing:
            m["notes"].append("msa side skipped, missing: " + "; ".join(missing))
            sides.remove("msa")
    if "postfix" in sides and os.geteuid() != 0:
        m["notes"].append("postfix side skipped: a private Postfix instance needs root")
        sides.remove("postfix")
    if not sides:
        return
    if {"accept", "e2e"} & set(args.phases):
        log(f"load phase: {', '.join(sides)} at concurrency {args.concs}, N={args.n}")
        prof = scenarios.Profiler(Path(args.profile)) if args.profile and "msa" in sides \
            else None
        results.update(scenarios.load_phase(work / "load", sides, args.concs, args.n,
                                            args.size, args.rounds, prof, log))
        if prof:
            results["profile"] = []
            for folded in prof.outputs:
                summary = profile_mod.summarise(folded.read_text())
                path = folded.with_suffix(".summary.txt")
                path.write_text(summary + "\n")
                results["profile"].append(str(path))
                log(f"profile of msa at c=10 ({folded.name}):\n{summary}")
    if "sendmail" in args.phases:
        calls = 20 if args.quick else 100
        log(f"sendmail phase: {calls} calls, one message each")
        results["sendmail"] = scenarios.sendmail_phase(work, sides, calls, args.size, log)
    if "msa" in sides and "stages" in args.phases:
        log(f"components phase: edge, watcher, runner alone, N={args.n}")
        results["stages"] = scenarios.stages_phase(work, args.n, args.size, log)
    if "big" in args.phases:
        log(f"big message phase: {args.big} bytes")
        results["big"] = scenarios.big_phase(work / "big", sides, args.big, log)
    if "msa" in sides and "idle" in args.phases:
        log(f"idle phase: {args.idle} connections")
        results["idle"] = scenarios.idle_phase(work, args.idle, args.size, log)
    if "msa" in sides and "backlog" in args.phases:
        log(f"backlog phase: {args.backlog} messages")
        results["backlog"] = scenarios.backlog_phase(work, args.backlog, args.backlog_window,
                                                     log)


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the phases' cleanup


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    missing = missing_tools()
    if args.profile and not shutil.which("py-spy"):
        missing.append("py-spy for --profile (pip install py-spy)")
    if missing:
        print("bench: missing " + ", ".join(missing) + " (run `sh .ci/setup` as root)",
              file=sys.stderr)
        return 69
    raise_nofile()
    with contextlib.ExitStack() as stack:
        parent = args.workdir
        if args.fs:
            parent = str(stack.enter_context(disk.loop_filesystem(
                Path(args.workdir or tempfile.gettempdir()), args.fs)))
        return _main(args, parent)


def _main(args: argparse.Namespace, parent: str | None) -> int:
    work = Path(tempfile.mkdtemp(prefix="msa-bench-", dir=parent))
    os.chmod(work, 0o755)  # Postfix's unprivileged daemons must reach their queue
    results: dict = {"meta": meta(args)}
    started = time.monotonic()
    try:
        run(args, work, results)
    finally:
        results["meta"]["seconds"] = round(time.monotonic() - started, 1)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    metrics = tuple(x for x in ("accept", "e2e") if x in args.phases)
    print()
    print(report.format_all(results, metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())

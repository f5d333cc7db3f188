"""``msa queue``: the administrator's view of the spool (Postfix's
``postqueue``, ``postsuper`` and ``postcat`` in one command).

::

    msa queue list [--json]         like mailq
    msa queue show ID               the whole queue file, like postcat
    msa queue delete ID... | ALL --yes
    msa queue hold ID...            active/ or deferred/<N>/ -> hold/
    msa queue release ID...         hold/ -> active/
    msa queue requeue ID...         deferred/<N>/ -> active/ (retry now)
    msa queue flush                 every deferred message due now
    msa queue corrupt [--json]      what is in corrupt/ (quarantined files)
    msa queue purge-corrupt [--older-than DAYS | --all]
                                    remove quarantined files older than
                                    [spool] corrupt_max_age days

Invariants:

- Every change is made under the id's claim (:meth:`spool.Spool.claim`),
  so it never races a runner delivering the same message; a message that
  is claimed is reported busy (exit 75), never touched.
- Each change is one rename or one unlink (spool invariant 2).
- Only ``active/`` and ``deferred/<N>/`` messages can be held: a message in
  ``maildrop/``, ``incoming/`` or a policy stage has not been through the
  policies yet, and release would put it straight into ``active/``.
- Flush sets each deferred file's mtime (its due time) to now with
  ``utime`` (no rewrite), then asks the daemon over the control socket to
  look (:func:`msa.admin.control.send_control`); no daemon is fine.
- Exit status: 0 done, 64 usage, 67 unknown queue id, 75 busy or the
  daemon refused, 77 not permitted, 78 config error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from msa import config, logsafe, sysexits
from msa.admin.control import send_control
from msa.admin.mailq import show_queue
from msa.store import open_spool
from spool import Spool, SpoolError, valid_name

PROG = "msa queue"
HOLDABLE = ("active", "deferred/")


class QueueCommandError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="list and change the mail queue "
                                "(no action: list)")
    p.add_argument("-C", "--config", help="config file (default $MSA_CONFIG, /etc/msa/msa.toml)")
    p.set_defaults(json=False)
    # -C/--config is accepted after the action too (msa queue flush -C F).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-C", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="action")
    lst = sub.add_parser("list", help="list the queue (like mailq)", parents=[common])
    lst.add_argument("--json", action="store_true", help="one JSON object per line")
    show = sub.add_parser("show", help="print a queue file (envelope and message)",
                          parents=[common])
    show.add_argument("ids", nargs=1, metavar="ID")
    delete = sub.add_parser("delete", help="delete messages (ALL: every message)",
                            parents=[common])
    delete.add_argument("ids", nargs="+", metavar="ID")
    delete.add_argument("--yes", action="store_true", help="confirm delete ALL")
    for name, doc in (("hold", "put messages on hold"),
                      ("release", "release held messages to active/"),
                      ("requeue", "move deferred messages to active/ now")):
        sub.add_parser(name, help=doc, parents=[common]).add_argument(
            "ids", nargs="+", metavar="ID")
    sub.add_parser("flush", help="make every deferred message due now", parents=[common])
    bad = sub.add_parser("corrupt", help="list quarantined files (corrupt/)", parents=[common])
    bad.add_argument("--json", action="store_true", help="one JSON object per line")
    purge = sub.add_parser("purge-corrupt", parents=[common],
                           help="remove quarantined files older than [spool] corrupt_max_age")
    age = purge.add_mutually_exclusive_group()
    age.add_argument("--older-than", type=float, metavar="DAYS",
                     help="instead of [spool] corrupt_max_age")
    age.add_argument("--all", action="store_true", help="whatever their age")
    return p


def locate(spool: Spool, qid: str) -> str:
    """The stage of ``qid``, or a QueueCommandError (exit 67)."""
    stage = spool.find(qid) if valid_name(qid) else None
    if stage is None:
        raise QueueCommandError(f"{qid}: no such message in the queue", sysexits.EX_NOUSER)
    return stage


def _claim(spool: Spool, stage: str, qid: str):
    claim = spool.claim(stage, qid)
    if claim is None:
        if spool.find(qid) is None:
            raise QueueCommandError(f"{qid}: no such message in the queue", sysexits.EX_NOUSER)
        raise QueueCommandError(f"{qid}: busy (being delivered or moved); try again",
                                sysexits.EX_TEMPFAIL)
    return claim


def show(spool: Spool, qid: str, out) -> None:
    stage = locate(spool, qid)
    fd = os.open(spool.path(stage, qid), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        shutil.copyfileobj(f, out, 65536)


def delete(spool: Spool, qid: str) -> None:
    _claim(spool, locate(spool, qid), qid).done()


class Progress:
    """``N messages ...`` rewritten in place on a terminal (stderr) at
    most ten times a second, for long runs; nothing when stderr is not a
    terminal (the summary line says what was done)."""

    def __init__(self, what: str, stream=None, clock=time.monotonic):
        self.what, self.stream, self.clock = what, stream or sys.stderr, clock
        self.on = self.stream.isatty()
        self.shown = 0.0
        self.count = 0

    def step(self) -> None:
        self.count += 1
        if self.on and self.clock() - self.shown >= 0.1:
            self.shown = self.clock()
            self.stream.write(f"\r{PROG}: {self.what}: {self.count} messages")
            self.stream.flush()

    def end(self) -> None:
        if self.on and self.shown:
            self.stream.write("\r\033[K")     # the summary line replaces it
            self.stream.flush()


def delete_all(cfg: config.Config, spool: Spool) -> int:
    """Delete every message of every stage but corrupt/; returns how many."""
    progress = Progress("deleting")
    for stage in [*cfg.stages(), *spool.deferred_stages(), "hold"]:
        before = progress.count
        for qid in spool.names(stage):
            claim = spool.claim(stage, qid)
            if claim is not None:
                # One directory fsync per stage, not per file (30,000
                # messages took 47 s): until it, a crash may bring a
                # deleted file back, never lose one that was kept.
                claim.done(sync_dir=False)
                progress.step()
        if progress.count > before:
            spool.sync_stage(stage)
    progress.end()
    return progress.count


def corrupt_entries(spool: Spool, now: float | None = None) -> list[dict]:
    """What is in corrupt/, oldest first: name, size, mtime, age in days."""
    now = time.time() if now is None else now
    out = []
    with os.scandir(spool.root / "corrupt") as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            out.append({"name": entry.name, "size": st.st_size, "mtime": st.st_mtime,
                        "age_days": round((now - st.st_mtime) / 86400, 2)})
    return sorted(out, key=lambda e: e["mtime"])


def list_corrupt(spool: Spool, out, as_json: bool = False) -> int:
    entries = corrupt_entries(spool)
    for e in entries:
        if as_json:
            out.write(json.dumps(e) + "\n")
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["mtime"]))
            out.write(f"{logsafe.escape(e['name']):<40} {e['size']:>10} {when}\n")
    if not as_json:
        total = sum(e["size"] for e in entries)
        out.write(f"-- {total // 1024} Kbytes in {len(entries)} quarantined files.\n"
                  if entries else "corrupt/ is empty\n")
    return len(entries)


def purge_corrupt(spool: Spool, older_than_days: float, now: float | None = None) -> int:
    """Remove the files of corrupt/ last changed more than
    ``older_than_days`` ago; returns how many."""
    now = time.time() if now is None else now
    count = 0
    for e in corrupt_entries(spool, now):
        if now - e["mtime"] < older_than_days * 86400:
            break
        path = spool.root / "corrupt" / e["name"]
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)     # left by an older msa
            else:
                os.unlink(path)
        except FileNotFoundError:
            continue
        count += 1
    return count


def hold(spool: Spool, qid: str) -> None:
    stage = locate(spool, qid)
    if stage == "hold":
        return
    if not stage.startswith(HOLDABLE):
        raise QueueCommandError(f"{qid}: in {stage}/, not yet through the policies; "
                                "only active and deferred messages can be held",
                                sysexits.EX_USAGE)
    _claim(spool, stage, qid).move("hold")


def release(spool: Spool, qid: str, from_prefix: str = "hold") -> None:
    stage = locate(spool, qid)
    if not stage.startswith(from_prefix):
        raise QueueCommandError(f"{qid}: in {stage}/, not in {from_prefix}/",
                                sysexits.EX_USAGE)
    _claim(spool, stage, qid).move("active", mtime=time.time())


def flush(cfg: config.Config, spool: Spool | None = None) -> tuple[int, int, str | None]:
    """Make every deferred message due now, then tell the daemon.

    Returns (files made due, files not permitted, daemon's answer or None)."""
    spool = spool or open_spool(cfg, create=False)
    touched = denied = 0
    now = time.time()
    try:
        for stage in spool.deferred_stages():
            for name in spool.names(stage):
                try:
                    os.utime(spool.path(stage, name), (now, now), follow_symlinks=False)
                    touched += 1
                except FileNotFoundError:
                    continue
                except PermissionError:
                    denied += 1
    except PermissionError:  # a user who may not even list deferred/
        denied += 1
    return touched, denied, send_control(cfg, "flush")


def flush_command(cfg: config.Config, verbose: bool, prog: str) -> int:
    """``sendmail -q`` and ``msa queue flush``: exit status and messages."""
    try:
        touched, denied, answer = flush(cfg)
    except SpoolError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return sysexits.EX_UNAVAILABLE
    if answer is not None and not answer.startswith("ok"):
        print(f"{prog}: daemon refused flush: {answer}", file=sys.stderr)
        return sysexits.EX_TEMPFAIL
    if denied and answer is None:
        print(f"{prog}: not permitted to change {denied} deferred files, "
              "and no daemon answers on the control socket", file=sys.stderr)
        return sysexits.EX_NOPERM
    if verbose:
        if denied:      # a user who may not touch the files: the daemon does it
            print(f"{prog}: the daemon makes every deferred message due now (this user "
                  "may not change the queue files)", file=sys.stderr)
        else:
            told = "daemon notified" if answer else "no daemon running; they go when it starts"
            print(f"{prog}: {touched} deferred messages due now; {told}", file=sys.stderr)
    return sysexits.EX_OK


def run(args: argparse.Namespace) -> int:
    args.action = args.action or "list"   # `msa queue` alone lists, as mailq
    cfg = config.load(args.config)
    if args.action == "flush":
        return flush_command(cfg, True, PROG)
    spool = open_spool(cfg, create=False)
    if args.action == "list":
        problems = show_queue(cfg, spool, sys.stdout, as_json=args.json)
        for problem in problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
        return sysexits.EX_NOPERM if problems else sysexits.EX_OK
    if args.action == "corrupt":
        list_corrupt(spool, sys.stdout, args.json)
        return sysexits.EX_OK
    if args.action == "purge-corrupt":
        days = 0.0 if args.all else (cfg.spool.corrupt_max_age if args.older_than is None
                                     else args.older_than)
        if days <= 0 and not args.all:
            raise QueueCommandError("[spool] corrupt_max_age is 0 (keep forever): "
                                    "give --older-than DAYS or --all", sysexits.EX_USAGE)
        n = purge_corrupt(spool, days)
        print(f"{PROG}: Deleted: {n} quarantined file{'' if n == 1 else 's'}", file=sys.stderr)
        return sysexits.EX_OK
    if args.action == "show":
        sys.stdout.flush()
        show(spool, args.ids[0], sys.stdout.buffer)
        return sysexits.EX_OK
    if args.action == "delete" and args.ids == ["ALL"]:
        if not args.yes:
            raise QueueCommandError("delete ALL needs --yes", sysexits.EX_USAGE)
        print(f"{PROG}: Deleted: {delete_all(cfg, spool)} messages", file=sys.stderr)
        return sysexits.EX_OK
    action = {"delete": delete, "hold": hold, "release": release,
              "requeue": lambda s, q: release(s, q, "deferred/")}[args.action]
    status = sysexits.EX_OK
    done = 0
    for qid in args.ids:
        try:
            action(spool, qid)
            done += 1
        except QueueCommandError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            status = status or exc.code
    verb = {"delete": "Deleted", "hold": "Placed on hold", "release": "Released",
            "requeue": "Requeued"}[args.action]
    print(f"{PROG}: {verb}: {done} message{'' if done == 1 else 's'}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, a usage error 2
        return sysexits.EX_OK if exc.code == 0 else sysexits.EX_USAGE
    try:
        return run(args)
    except config.ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return sysexits.EX_CONFIG
    except QueueCommandError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except PermissionError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return sysexits.EX_NOPERM
    except SpoolError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return sysexits.EX_UNAVAILABLE
    except BrokenPipeError:
        return sysexits.EX_OK

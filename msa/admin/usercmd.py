"""``msa user``: manage the submission password file.

    msa user add NAME [--password-stdin] [--sender ADDR]...
    msa user passwd NAME [--password-stdin]
    msa user remove NAME
    msa user list

The file is ``[auth].passwd_file`` of the config (``--config PATH``). Every
change rewrites it atomically under a lock (see :mod:`msa.submission.auth`); the edge
rereads it by itself, so no reload is needed. Without ``--password-stdin``
the password is asked twice on the terminal. ``--sender`` adds addresses
(or ``@domain``) the user may send as, on top of ``[auth].senders``.
Exit codes: 0, 64 usage, 65 bad password input, 67 no such user or user
exists, 73 cannot write the file, 78 bad config.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from msa import config, sysexits
from msa.admin.common import args_and_config
from msa.submission.auth import PasswdEntry, PasswdFile, hash_password, locked, valid_username

MIN_PASSWORD = 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa user", description="Manage submission users.")
    p.add_argument("-C", "--config",
                   help="config file (default: $MSA_CONFIG, /etc/msa/msa.toml)")
    # -C/--config is accepted after the action too (``msa user list --config F``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-C", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add a user", parents=[common])
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of stdin")
    add.add_argument("--sender", action="append", default=[], metavar="ADDR",
                     help="an address or @domain the user may send as (repeatable)")
    pw = sub.add_parser("passwd", help="set a user's password", parents=[common])
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true")
    rm = sub.add_parser("remove", help="remove a user", parents=[common])
    rm.add_argument("name")
    sub.add_parser("list", help="list users and the addresses they may send as",
                   parents=[common])
    return p


def read_password(from_stdin: bool) -> str | None:
    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    if not sys.stdin.isatty():
        print("msa user: no terminal; use --password-stdin", file=sys.stderr)
        return None
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        print("msa user: passwords differ", file=sys.stderr)
        return None
    return first


def main(argv: list[str]) -> int:
    loaded = args_and_config(parser(), argv, "msa user")
    if isinstance(loaded, int):
        return loaded
    args, cfg = loaded
    path = cfg.auth.passwd_file
    if args.action == "list":
        return list_users(cfg, path)
    if not valid_username(args.name):
        print(f"msa user: bad user name {args.name!r} (no ':' or white space)",
              file=sys.stderr)
        return sysexits.EX_USAGE
    password = None
    if args.action in ("add", "passwd"):
        password = read_password(args.password_stdin)
        if password is None or len(password) < MIN_PASSWORD:
            print("msa user: no password given", file=sys.stderr)
            return sysexits.EX_DATAERR
    try:
        with locked(path):
            return change(args, path, password)
    except OSError as exc:
        print(f"msa user: {path}: {exc.strerror or exc}", file=sys.stderr)
        return sysexits.EX_CANTCREAT


def change(args: argparse.Namespace, path: str, password: str | None) -> int:
    pf = PasswdFile(path)
    entry = pf.get(args.name)
    if args.action == "add":
        if entry is not None:
            print(f"msa user: {args.name} exists (use passwd)", file=sys.stderr)
            return sysexits.EX_NOUSER
        bad = [s for s in args.sender if "@" not in s or ":" in s or "," in s]
        if bad:
            print(f"msa user: bad --sender {bad[0]!r}", file=sys.stderr)
            return sysexits.EX_USAGE
        pf.set(PasswdEntry(args.name, hash_password(password), list(args.sender)))
    elif entry is None:
        print(f"msa user: no user {args.name}", file=sys.stderr)
        return sysexits.EX_NOUSER
    elif args.action == "passwd":
        entry.hash = hash_password(password)
    else:
        pf.remove(args.name)
    pf.save()
    return sysexits.EX_OK


def list_users(cfg: config.Config, path: str) -> int:
    try:
        pf = PasswdFile(path)
    except OSError as exc:
        print(f"msa user: {path}: {exc.strerror}", file=sys.stderr)
        return sysexits.EX_NOINPUT
    for entry in pf.entries():
        senders = entry.senders + cfg.auth.senders.get(entry.name, [])
        print(f"{entry.name}\t{','.join(senders)}")
    return sysexits.EX_OK

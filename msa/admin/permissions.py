"""``msa set-permissions [--user U] [--group G]``: make the spool the
daemon's (Postfix's ``postfix set-permissions``).

A spool first made by root (a first ``msa daemon`` before ``[daemon]
user`` was set, a restore from backup) leaves directories and queue files
a daemon running as another user cannot write; this creates what is
missing and repairs owners and modes for the user the daemon runs as
(``--user``, else ``[daemon] user``):

- every directory and queue file under the spool root belongs to the
  user and its group (``--group``, else ``[daemon] group``, else the
  user's primary group); symbolic links are never followed (``lchown``);
- except what local users own by design: the files in ``maildrop/`` and
  ``tmp/`` (a maildrop file's owner *is* its submitter: msa.cleanup.maildrop)
  and the control socket's directory entry is left to the daemon;
- ``maildrop/`` and ``tmp/`` are 3733 (anyone may drop a file, nobody may
  list; setgid so the daemon's group can read what is dropped), the root
  0755 (users reach maildrop/), other directories lose group and world
  write, ``corrupt/`` files are 0600, other queue files lose every world
  bit and group write.

Prints what it changed; exit 0, 64 usage, 67 no such user, 77 not root,
78 config error.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import stat
import sys

from msa import sysexits
from msa.admin.common import args_and_config
from msa.store import MODES, open_spool

PROG = "msa set-permissions"
USERS_FILES = ("maildrop", "tmp")     # files there belong to local users


def plan_mode(rel: str, is_dir: bool, mode: int) -> int:
    """The mode a spool entry should have (pure); ``rel`` is its path
    relative to the spool root ("" for the root)."""
    top = rel.split("/", 1)[0]
    if is_dir:
        if rel == "":
            return 0o755
        if rel in MODES:
            return MODES[rel]
        return mode & ~0o022
    if top == "corrupt":
        return 0o600
    return mode & ~0o027


def repair(root: str, uid: int, gid: int) -> tuple[int, int]:
    """Walk the spool; returns (owners changed, modes changed)."""
    owners = modes = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir in USERS_FILES:
            dirnames[:] = []          # what a user put there stays theirs
        entries = [(dirpath, rel_dir, True)]
        if rel_dir.split("/", 1)[0] not in USERS_FILES:
            entries += [(os.path.join(dirpath, f), os.path.join(rel_dir, f), False)
                        for f in filenames]
        for path, rel, is_dir in entries:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                continue
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.lchown(path, uid, gid)
                owners += 1
                st = os.lstat(path)   # chown clears setuid/setgid bits
            want = plan_mode(rel, is_dir, stat.S_IMODE(st.st_mode))
            if stat.S_IMODE(st.st_mode) != want:
                os.chmod(path, want)
                modes += 1
    return owners, modes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog=PROG, description="create the spool and repair its "
                                "owners and modes for the daemon's user")
    p.add_argument("-C", "--config", help="config file (default $MSA_CONFIG, /etc/msa/msa.toml)")
    p.add_argument("--user", help="the daemon's user (default [daemon] user)")
    p.add_argument("--group", help="its group (default [daemon] group, else the user's)")
    loaded = args_and_config(p, argv, PROG)
    if isinstance(loaded, int):
        return loaded
    args, cfg = loaded
    user = args.user or cfg.daemon.user
    if not user:
        print(f"{PROG}: no user: give --user or set [daemon] user", file=sys.stderr)
        return sysexits.EX_USAGE
    try:
        pw = pwd.getpwnam(user)
        gid = grp.getgrnam(args.group or cfg.daemon.group).gr_gid \
            if (args.group or cfg.daemon.group) else pw.pw_gid
    except KeyError as exc:
        print(f"{PROG}: no such user or group: {exc.args[0]}", file=sys.stderr)
        return sysexits.EX_NOUSER
    if os.geteuid() != 0:
        print(f"{PROG}: must be run as root", file=sys.stderr)
        return sysexits.EX_NOPERM
    # The daemon's group on maildrop/ and tmp/ (store.open_spool), then
    # everything else.
    cfg.daemon.user, cfg.daemon.group = user, grp.getgrgid(gid).gr_name
    spool = open_spool(cfg, create=True)
    owners, modes = repair(str(spool.root), pw.pw_uid, gid)
    print(f"{PROG}: {spool.root}: {owners} owners and {modes} modes repaired "
          f"for {user}:{grp.getgrgid(gid).gr_name}")
    return sysexits.EX_OK

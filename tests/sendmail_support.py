"""Helpers for the sendmail, mailq and ``msa queue`` tests: a spool with a
config, reading what landed in ``maildrop/``, and writing queue files
directly (fast, for listings of many messages)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from msa import config
from msa.message import queuefile
from msa.message.queuefile import Envelope
from msa.store import open_spool
from tests import support

SENDMAIL = str(support.BIN / "sendmail")
MAILQ = str(support.BIN / "mailq")
MSA = str(support.BIN / "msa")


@dataclass
class Queued:
    path: Path
    env: Envelope
    message: bytes

    def header_block(self) -> bytes:
        return self.message.split(b"\r\n\r\n", 1)[0] + b"\r\n"

    def body(self) -> bytes:
        return self.message.split(b"\r\n\r\n", 1)[1]

    def recipients(self) -> list[str]:
        return [r.address for r in self.env.recipients]


def make_config(directory: Path, extra: str = "") -> Path:
    """A config whose spool is ``directory/spool`` (created, as the daemon
    would: maildrop/ and tmp/ mode 3733)."""
    path = support.write_config(directory, None, extra)
    open_spool(config.load(str(path)))
    return path


def public_dir() -> Path:
    """A temp dir that other uids can enter (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="msa-sendmail-"))
    os.chmod(d, 0o755)
    return d


def spool_root(config_path: Path) -> Path:
    return Path(config.load(str(config_path)).spool.root)


def read_queue_file(path: Path) -> Queued:
    with open(path, "rb") as f:
        env, offset = queuefile.read_envelope(f)
        queuefile.check_size(f, env, offset)
        return Queued(path, env, f.read())


def maildrop(config_path: Path) -> list[Queued]:
    d = spool_root(config_path) / "maildrop"
    return [read_queue_file(d / n) for n in sorted(os.listdir(d))]


def only_message(config_path: Path) -> Queued:
    files = maildrop(config_path)
    assert len(files) == 1, f"expected one file in maildrop/, found {len(files)}"
    return files[0]


def sendmail(args: list[str], stdin: bytes, config_path: Path, **kw) -> subprocess.CompletedProcess:
    return support.run_sendmail(args, stdin, config_path, **kw)


def run_tool(argv: list[str], config_path: Path, stdin: bytes = b"", **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], input=stdin, capture_output=True,
                          env=support.msa_env(config_path), timeout=120, **kw)


def write_queue_file(root: Path, stage: str, qid: str, env: Envelope, message: bytes,
                     mtime: float | None = None) -> Path:
    """Write a queue file straight into ``root/stage`` (no fsync: for
    building test queues fast)."""
    env.queue_id = qid
    env.size = str(len(message))
    if not env.arrival:
        env.arrival = queuefile.utc_iso(int(qid[:13], 16) / 1_000_000)
    d = root / stage
    d.mkdir(parents=True, exist_ok=True)
    path = d / qid
    with open(path, "wb") as f:
        f.write(env.to_bytes())
        f.write(message)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def envelope(sender: str, *recipients: str, **kw) -> Envelope:
    env = Envelope(sender=sender, origin="local", **kw)
    for r in recipients:
        env.add_recipient(r)
    return env


# The interpreter lives under /root (mode 0700), which another uid cannot
# enter, so a command cannot simply be exec'ed as that uid. Instead a root
# Python loads the command's module and everything it imports, then drops
# to the uid (setgid, setgroups, setuid: for good, like a login) and runs
# the command's main() in the same process.
_AS_UID = r"""
import os, sys
uid = int(sys.argv[1]); script = sys.argv[2]
sys.argv = sys.argv[2:]
code = compile(open(script).read(), script, "exec")
import email.utils, json, tempfile, pwd, errno, argparse, shutil, socket
import encodings.latin_1, encodings.utf_8, encodings.idna, encodings.ascii, tomllib, stringprep, unicodedata
import msa.submission.sendmail, msa.admin.queuecmd, msa.admin.mailq
os.chdir("/")
os.setgroups([]); os.setgid(uid); os.setuid(uid)
assert os.getuid() == uid and os.geteuid() == uid
exec(code, {"__name__": "__main__", "__file__": script})
"""


def run_as(uid: int, argv: list[str], stdin: bytes, config_path: Path) -> subprocess.CompletedProcess:
    """Run ``argv[0]`` (one of bin/*) as ``uid`` with ``argv[1:]``."""
    env = support.msa_env(config_path)
    env.pop("HOME", None)
    return subprocess.run([sys.executable, "-c", _AS_UID, str(uid), *argv], input=stdin,
                          capture_output=True, env=env, timeout=60)


def run_measured(argv: list[str], config_path: Path, stdin=None, stdout=None,
                 tmp: Path | None = None) -> tuple[int, bytes, float]:
    """Run a command under ``/usr/bin/time`` and return (exit status,
    stderr, peak RSS in MB). ``os.wait4`` on a child of pytest would count
    the forked pytest image too (Linux keeps the pre-exec high-water mark),
    so the small ``time`` program does the fork instead."""
    if not os.path.exists("/usr/bin/time"):
        import pytest
        pytest.skip("/usr/bin/time (Debian package time) is not installed")
    report = Path(tempfile.mkstemp(dir=tmp)[1])
    try:
        p = subprocess.run(["/usr/bin/time", "-o", str(report), "-f", "%M", *argv],
                           stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                           env=support.msa_env(config_path, TZ="UTC"), timeout=300)
        kb = int(report.read_text().split()[-1])
    finally:
        report.unlink()
    return p.returncode, p.stderr, kb / 1024

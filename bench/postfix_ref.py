"""A private reference Postfix instance configured for msa's job.

The instance has its own ``config_directory``, ``queue_directory`` and
``data_directory`` under one directory, is started with ``postfix -c DIR
start`` (no ``postmulti``) and does exactly what the benchmark's msa does:
accept SMTP on one loopback port from ``127.0.0.0/8`` and relay every
message to one loopback sink. No local delivery, no TLS, no chroot (a
chroot would need copies of /etc files in the private queue directory).

Durability is Postfix's default: cleanup fsyncs the queue file before
smtpd answers 250, as msa does.

:func:`main_cf` and :func:`master_cf` are pure (text out); :class:`PostfixRef`
is the thin I/O part.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

from . import procs

POSTFIX = "/usr/sbin/postfix"
MAIL_OWNER = "postfix"
SETGID_GROUP = "postdrop"


def available() -> bool:
    """Postfix binaries and its users exist (the Debian ``postfix`` package)."""
    try:
        pwd.getpwnam(MAIL_OWNER)
        grp.getgrnam(SETGID_GROUP)
    except KeyError:
        return False
    return os.access(POSTFIX, os.X_OK) and os.path.isdir(daemon_directory())


def daemon_directory() -> str:
    return "/usr/lib/postfix/sbin"


def main_cf(base: Path, sink_port: int) -> str:
    """main.cf for an instance rooted at ``base`` relaying to the sink."""
    return f"""\
# Reference Postfix for msa's benchmark (bench/postfix_ref.py). Generated.
compatibility_level = 3.6
config_directory = {base}/etc
queue_directory = {base}/queue
data_directory = {base}/data
command_directory = /usr/sbin
daemon_directory = {daemon_directory()}
shlib_directory = /usr/lib/postfix
meta_directory = /etc/postfix
mail_owner = {MAIL_OWNER}
setgid_group = {SETGID_GROUP}
myhostname = postfix-ref.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 no local delivery
alias_maps =
alias_database =
relay_domains =
relayhost = [127.0.0.1]:{sink_port}
mynetworks = 127.0.0.0/8
inet_interfaces = loopback-only
inet_protocols = ipv4
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
smtpd_tls_security_level = none
smtp_tls_security_level = none
smtp_dns_support_level = disabled
disable_dns_lookups = yes
biff = no
# msa's default limit is 51 MB; Postfix's 10 MB would refuse the 50 MB test.
message_size_limit = 104857600
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C
"""


# name type private unpriv chroot wakeup maxproc command
_SERVICES = [
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
]


def master_cf(listen_port: int, max_smtpd: int = 100) -> str:
    """master.cf: one inet smtpd listener on 127.0.0.1 plus the services a
    relay-only Postfix needs (no local, virtual, pipe transports)."""
    rows = [("127.0.0.1:%d" % listen_port, "inet", "n", "-", "n", "-",
             str(max_smtpd), "smtpd")] + _SERVICES
    return "".join("%-16s %-10s %-2s %-2s %-2s %-6s %-4s %s\n" % row for row in rows)


class PostfixRef:
    """Start, query and stop a private Postfix under ``base``."""

    def __init__(self, base: Path, port: int, sink_port: int, max_smtpd: int = 100):
        self.base, self.port, self.sink_port = Path(base), port, sink_port
        self.max_smtpd = max_smtpd
        self.etc = self.base / "etc"
        self.maillog = self.base / "maillog"

    def write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        for parent in self.base.resolve().parents:
            if not os.stat(parent).st_mode & 0o001:
                raise RuntimeError(f"{parent} is not searchable by others: Postfix's "
                                   f"daemons (user {MAIL_OWNER}) could not reach {self.base}")
        for sub in ("etc", "queue", "data"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        (self.etc / "main.cf").write_text(main_cf(self.base, self.sink_port))
        (self.etc / "master.cf").write_text(master_cf(self.port, self.max_smtpd))
        postfix = pwd.getpwnam(MAIL_OWNER)
        os.chown(self.base / "data", postfix.pw_uid, postfix.pw_gid)
        os.chmod(self.base / "data", 0o700)

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", str(self.etc), *args], capture_output=True,
                              text=True, timeout=60, check=check)

    def start(self, timeout: float = 20.0) -> None:
        self.write_config()
        self._guard()
        r = self._postfix("start", check=False)
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed: {r.stdout}{r.stderr}{self.log_tail()}")
        deadline = time.monotonic() + timeout
        while self.master_pid() is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postfix master did not start:{self.log_tail()}")
            time.sleep(0.05)

    def _guard(self) -> None:
        """The master detaches from us: a watchdog stops it if this process
        dies without stopping it (killed by a test timeout, say)."""
        self.guard = procs.watchdog(f"{POSTFIX} -c '{self.etc}' stop >/dev/null 2>&1")

    def stop(self) -> None:
        procs.end_watchdog(getattr(self, "guard", None))
        self.guard = None
        if self.master_pid() is None:
            return
        self._postfix("stop", check=False)
        deadline = time.monotonic() + 20
        while self.master_pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = self.master_pid()
        if pid is not None:  # still up: postfix abort
            self._postfix("abort", check=False)

    def master_pid(self) -> int | None:
        """The running master's pid (from its pid file), or None."""
        try:
            pid = int((self.base / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def queue_count(self) -> int:
        """Messages in incoming/active/deferred/maildrop (0 when drained)."""
        n = 0
        for q in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(self.base / "queue" / q):
                n += len(files)
        return n

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.maillog.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n" + "\n".join(text[-lines:])

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

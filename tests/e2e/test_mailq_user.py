"""A user who does not own the spool: ``mailq`` (and ``sendmail -bp``,
``msa queue``) shows what root sees, senders and recipients included, by
asking the running daemon over its control socket (Postfix's showq);
with no daemon it lists what it can and says why the rest is missing
(exit 77); ``sendmail -q -v`` says the daemon makes the messages due."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from msa import config
from msa.store import open_spool
from tests import support
from tests.daemon_support import queue_file, start_daemon, write_daemon_config

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def open_dir():
    path = Path(tempfile.mkdtemp(prefix="msa-mailq-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_nobody(*argv, cfg) -> subprocess.CompletedProcess:
    def drop():
        os.setgid(NOBODY.pw_gid)
        os.setgroups([])
        os.setuid(NOBODY.pw_uid)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60,
                          env=support.msa_env(cfg), preexec_fn=drop, cwd="/")


def test_mailq_for_a_user_who_does_not_own_the_spool(open_dir, ca):
    if os.geteuid() != 0:
        pytest.skip("needs root (to run a command as nobody)")
    ports = support.free_port(), support.free_port()
    path = write_daemon_config(open_dir, ca, *ports)
    path.chmod(0o644)
    (open_dir / "passwd").write_text("")
    cfg = config.load(str(path))
    sp = open_spool(cfg)
    (sp.root / "deferred" / "1").mkdir(parents=True, exist_ok=True)
    qid = sp.deposit("deferred/1", queue_file(["bob@example.test"], b"Subject: x\r\n\r\nhi\r\n",
                                              sender="carol@example.org"))
    later = time.time() + 3600
    os.utime(sp.path("deferred/1", qid), (later, later))     # due in an hour
    os.chmod(sp.path("deferred/1", qid), 0o600)
    mailq = str(support.BIN / "mailq")
    root_view = subprocess.run([sys.executable, mailq], capture_output=True, text=True,
                               timeout=60, env=support.msa_env(path))
    assert "carol@example.org" in root_view.stdout

    # No daemon: what can be listed, and why the rest is not (exit 77).
    alone = _as_nobody(mailq, cfg=path)
    assert alone.returncode == 77, alone
    assert "carol@example.org" not in alone.stdout
    assert "shown to root and the spool's owner, or by a running daemon" in alone.stderr

    proc = start_daemon(path, "daemon")
    try:
        support.wait_for(lambda: os.path.exists(cfg.control_socket()), what="control socket")
        seen = _as_nobody(mailq, cfg=path)
        as_json = _as_nobody(str(support.BIN / "msa"), "queue", "list", "--json", cfg=path)
        flush = _as_nobody(str(support.BIN / "sendmail"), "-q", "-v", cfg=path)
        # The daemon made it due: it is tried (to a closed port) and
        # deferred again, into deferred/2.
        try:
            support.wait_for(lambda: sp.find(qid) == "deferred/2", timeout=60,
                             what="the message tried after nobody's flush")
        except TimeoutError:
            raise AssertionError((sp.find(qid), flush.stderr, proc.output())) from None
    finally:
        proc.stop()
    assert seen.returncode == 0, seen
    assert seen.stdout == root_view.stdout            # what root sees
    assert as_json.returncode == 0 and '"sender": "carol@example.org"' in as_json.stdout
    assert flush.returncode == 0, flush
    assert "the daemon makes every deferred message due now" in flush.stderr, flush.stderr

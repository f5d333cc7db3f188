"""``msa set-permissions``: a spool made by root becomes the daemon
user's (owners and modes), maildrop files keep their submitters, and
``msa daemon --user nobody`` then works on it (it defers a message root
had queued, which needs writing in active/ and deferred/)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from msa import config
from msa.admin.permissions import plan_mode
from msa.store import open_spool
from tests import support
from tests.daemon_support import queue_file, start_daemon, write_daemon_config

NOBODY = pwd.getpwnam("nobody")


def _msa(*args, cfg) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(support.BIN / "msa"), *args, "-C", str(cfg)],
                          capture_output=True, text=True, timeout=60, env=support.msa_env())


def test_plan_mode():
    assert plan_mode("", True, 0o700) == 0o755
    assert plan_mode("maildrop", True, 0o755) == 0o3733
    assert plan_mode("active", True, 0o777) == 0o755
    assert plan_mode("corrupt/x", False, 0o644) == 0o600
    assert plan_mode("active/Q", False, 0o666) == 0o640


@pytest.fixture
def open_dir():
    """A directory every user can reach (pytest's tmp_path is under a
    0700 directory of root's, where nobody cannot go)."""
    path = Path(tempfile.mkdtemp(prefix="msa-perm-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_spool_made_by_root_becomes_the_daemons(open_dir, ca):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tmp_path = open_dir
    ports = support.free_port(), support.free_port()
    path = write_daemon_config(tmp_path, ca, *ports)
    (tmp_path / "passwd").write_text("")
    os.chmod(tmp_path / "passwd", 0o644)
    cfg = config.load(str(path))
    sp = open_spool(cfg)                         # made by root
    qid = sp.deposit("active", queue_file(["bob@example.test"], b"Subject: x\r\n\r\nhi\r\n"))
    os.chmod(sp.path("active", qid), 0o666)
    dropped = sp.path("maildrop", "userfile")
    dropped.write_bytes(b"x")
    os.chown(dropped, NOBODY.pw_uid + 1 if NOBODY.pw_uid < 65534 else 1, -1)
    owner_before = os.lstat(dropped).st_uid
    (sp.root / "corrupt" / "bad").write_bytes(b"x")
    os.chmod(sp.root / "active", 0o777)

    r = _msa("set-permissions", "--user", "nobody", cfg=path)
    assert r.returncode == 0, r.stderr
    assert "owners and" in r.stdout and "for nobody:" in r.stdout
    for p in (sp.root, sp.root / "active", sp.path("active", qid), sp.root / "corrupt" / "bad",
              sp.root / "maildrop"):
        st = os.lstat(p)
        assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid), p
    assert stat.S_IMODE(os.stat(sp.root / "active").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(sp.path("active", qid)).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(sp.root / "corrupt" / "bad").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sp.root / "maildrop").st_mode) == 0o3733
    assert os.lstat(dropped).st_uid == owner_before      # the submitter's still
    # Run again: nothing to repair.
    again = _msa("set-permissions", "--user", "nobody", cfg=path)
    assert "0 owners and 0 modes repaired" in again.stdout, again.stdout

    os.unlink(dropped)
    proc = start_daemon(path, "daemon", "--user", "nobody")
    try:
        support.wait_for(lambda: sp.deferred_stages() and qid in sp.names(
            sp.deferred_stages()[0]), timeout=60, what="the message deferred by nobody")
    except TimeoutError:
        raise AssertionError(proc.output()) from None
    finally:
        proc.stop()
    out = proc.output()
    assert "PermissionError" not in out and "Traceback" not in out, out


def test_refusals(tmp_path):
    path = support.write_config(tmp_path)
    r = _msa("set-permissions", cfg=path)
    assert r.returncode == 64 and "give --user" in r.stderr
    r = _msa("set-permissions", "--user", "no-such-user-here", cfg=path)
    assert r.returncode == 67 and "no such user" in r.stderr

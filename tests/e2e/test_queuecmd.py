"""``msa queue``: list, show, delete (one, ALL), hold, release, requeue,
flush, unknown ids and busy (claimed) messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from msa import config
from msa.store import open_spool
from tests import sendmail_support as ss
from tests import support

A = "66168A0F24AC0000001000"
B = "66168A0F24AC0000002000"
C = "66168A0F24AC0000003000"


@pytest.fixture
def cfg(tmp_path):
    path = ss.make_config(tmp_path)
    root = ss.spool_root(path)
    ss.write_queue_file(root, "active", A, ss.envelope("a@x.test", "r1@y.test"), b"Subject: a\r\n\r\nA\r\n")
    ss.write_queue_file(root, "deferred/1", B, ss.envelope("b@x.test", "r2@y.test"),
                        b"Subject: b\r\n\r\nB\r\n", mtime=time.time() + 3600)
    ss.write_queue_file(root, "maildrop", C, ss.envelope("c@x.test", "r3@y.test"), b"C\r\n")
    return path


def queue(cfg, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, ss.MSA, "queue", *args], capture_output=True,
                          env=support.msa_env(cfg), timeout=60)


def where(cfg, qid):
    return open_spool(config.load(str(cfg)), create=False).find(qid)


def test_list_json(cfg):
    r = queue(cfg, "list", "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [(x["queue_name"], x["queue_id"]) for x in recs] == [
        ("maildrop", C), ("active", A), ("deferred", B)]


def test_show_prints_the_whole_file(cfg):
    r = queue(cfg, "show", B)
    assert r.returncode == 0
    assert r.stdout == (ss.spool_root(cfg) / "deferred/1" / B).read_bytes()
    assert r.stdout.startswith(b"MSA-Queue-File: 1\n") and r.stdout.endswith(b"\r\n\r\nB\r\n")


def test_unknown_id_is_67(cfg):
    for args in (["show", "NOSUCHID"], ["delete", "NOSUCHID"], ["hold", "../etc"],
                 ["release", "NOSUCHID"]):
        r = queue(cfg, *args)
        assert r.returncode == 67, (args, r.stderr)
        assert b"no such message in the queue" in r.stderr


def test_delete_claims_and_removes(cfg):
    r = queue(cfg, "delete", A, "NOSUCHID")
    assert r.returncode == 67  # the unknown one; A is still deleted
    assert where(cfg, A) is None and b"Deleted: 1 message" in r.stderr


def test_delete_refuses_a_claimed_message(cfg):
    spool = open_spool(config.load(str(cfg)), create=False)
    claim = spool.claim("active", A)
    assert claim is not None
    try:
        r = queue(cfg, "delete", A)
        assert r.returncode == 75 and b"busy" in r.stderr
        assert where(cfg, A) == "active"
    finally:
        claim.release()
    assert queue(cfg, "delete", A).returncode == 0


def test_delete_all_needs_yes(cfg):
    r = queue(cfg, "delete", "ALL")
    assert r.returncode == 64 and b"--yes" in r.stderr
    assert where(cfg, A) == "active"
    r = queue(cfg, "delete", "ALL", "--yes")
    assert r.returncode == 0 and b"Deleted: 3 messages" in r.stderr
    assert queue(cfg, "list").stdout == b"Mail queue is empty\n"


def test_hold_and_release(cfg):
    assert queue(cfg, "hold", A, B).returncode == 0
    assert where(cfg, A) == "hold" and where(cfg, B) == "hold"
    listing = queue(cfg, "list").stdout.decode()
    assert f"{A}!" in listing and f"{B}!" in listing
    # Not through the policies yet: maildrop cannot be held.
    r = queue(cfg, "hold", C)
    assert r.returncode == 64 and b"only active and deferred" in r.stderr
    assert queue(cfg, "release", A, B).returncode == 0
    assert where(cfg, A) == "active" and where(cfg, B) == "active"
    r = queue(cfg, "release", A)
    assert r.returncode == 64 and b"not in hold/" in r.stderr


def test_requeue_moves_deferred_to_active(cfg):
    assert queue(cfg, "requeue", B).returncode == 0
    assert where(cfg, B) == "active"


def test_flush_makes_deferred_due(cfg):
    path = ss.spool_root(cfg) / "deferred/1" / B
    assert path.stat().st_mtime > time.time() + 3000
    r = queue(cfg, "flush")
    assert r.returncode == 0, r.stderr
    assert path.stat().st_mtime <= time.time()
    assert b"1 deferred messages due now; no daemon running" in r.stderr


def test_usage_errors(cfg):
    assert queue(cfg, "frobnicate").returncode == 64
    assert queue(cfg, "show").returncode == 64


def test_no_action_lists_and_config_goes_before_or_after_the_action(cfg):
    env = support.msa_env()
    env.pop("MSA_CONFIG", None)

    def msa(*args):
        return subprocess.run([sys.executable, ss.MSA, *args], capture_output=True, env=env,
                              timeout=60)
    listed = msa("queue", "-C", str(cfg))
    assert listed.returncode == 0 and A.encode() in listed.stdout, listed.stderr
    assert msa("queue", "list", "-C", str(cfg)).stdout == listed.stdout
    assert msa("queue", "--config", str(cfg), "list").stdout == listed.stdout
    for args in (("queue", "flush", "--config", str(cfg)), ("queue", "-C", str(cfg), "flush"),
                 ("user", "-C", str(cfg), "list"), ("user", "list", "-C", str(cfg))):
        p = msa(*args)
        assert p.returncode == 0, (args, p.stderr)
    assert b"requeue" in msa("queue", "--help").stdout


def test_corrupt_list_and_purge_by_age(cfg):
    root = ss.spool_root(cfg)
    now = time.time()
    for name, days in (("old1", 40), ("old2", 31), ("young", 2)):
        path = root / "corrupt" / name
        path.write_bytes(b"x" * 100)
        os.utime(path, (now - days * 86400, now - days * 86400))
    r = queue(cfg, "corrupt", "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [(x["name"], x["size"], int(x["age_days"])) for x in recs] == [
        ("old1", 100, 40), ("old2", 100, 31), ("young", 100, 2)]
    text = queue(cfg, "corrupt").stdout.decode()
    assert text.splitlines()[0].startswith("old1 ") and "in 3 quarantined files" in text
    # The default age limit, [spool] corrupt_max_age, is 30 days.
    r = queue(cfg, "purge-corrupt")
    assert r.returncode == 0 and b"Deleted: 2 quarantined files" in r.stderr, r.stderr
    assert sorted(os.listdir(root / "corrupt")) == ["young"]
    r = queue(cfg, "purge-corrupt", "--older-than", "1")
    assert b"Deleted: 1 quarantined file\n" in r.stderr
    assert os.listdir(root / "corrupt") == []
    assert queue(cfg, "corrupt").stdout == b"corrupt/ is empty\n"
    # Other stages are never touched.
    assert where(cfg, A) == "active" and where(cfg, B) == "deferred/1"


def test_purge_corrupt_with_keep_forever(tmp_path):
    path = ss.make_config(tmp_path)
    path.write_text(path.read_text().replace("[spool]\n", "[spool]\ncorrupt_max_age = 0\n", 1))
    root = ss.spool_root(path)
    (root / "corrupt").mkdir(parents=True, exist_ok=True)
    (root / "corrupt" / "f").write_bytes(b"x")
    r = queue(path, "purge-corrupt")
    assert r.returncode == 64 and b"--older-than DAYS or --all" in r.stderr
    assert queue(path, "purge-corrupt", "--all").returncode == 0
    assert os.listdir(root / "corrupt") == []


def test_delete_all_shows_progress_on_a_terminal(cfg):
    """On a terminal: a progress line rewritten in place, then the
    summary; through a pipe: the summary only."""
    import pty
    root = ss.spool_root(cfg)
    for n in range(50):
        ss.write_queue_file(root, "active", f"66168A0F24AC00000{n:05d}",
                            ss.envelope("a@x.test", "r@y.test"), b"x\r\n")
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, ss.MSA, "queue", "delete", "ALL", "--yes"],
                  support.msa_env(cfg))
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode()
    assert "\rmsa queue: deleting: 1 messages" in text, text
    assert text.rstrip().endswith("msa queue: Deleted: 53 messages"), text   # 50 + A, B, C
    assert list(open_spool(config.load(str(cfg)), create=False).names("active")) == []
    piped = queue(cfg, "delete", "ALL", "--yes")
    assert piped.stderr == b"msa queue: Deleted: 0 messages\n"

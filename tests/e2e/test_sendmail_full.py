"""sendmail on a full filesystem: a 256 KiB tmpfs holds the spool.

A deposit that hits ENOSPC exits 75 (EX_TEMPFAIL) with a clear message,
leaves nothing in ``maildrop/`` or ``tmp/``, and the messages queued
before it stay whole (their Size matches).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import sendmail_support as ss


@pytest.fixture
def full_cfg(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        cfg = ss.support.write_config(tmp_path, None)
        cfg.write_text(cfg.read_text().replace(str(tmp_path / "spool"), str(mnt / "spool")))
        yield cfg
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(cfg, body_size: int) -> tuple[list[bytes], subprocess.CompletedProcess]:
    """Queue messages until one fails; the bodies that were accepted and
    the failing run."""
    accepted = []
    for n in range(40):
        body = (f"message {n} ".encode() + b"z" * 70 + b"\n") * (body_size // 80)
        msg = f"Subject: fill {n}\n\n".encode() + body
        r = ss.sendmail(["-i", "r@x.test"], msg, cfg)
        if r.returncode != 0:
            return accepted, r
        accepted.append(body.replace(b"\n", b"\r\n"))
    pytest.fail("the 256 KiB filesystem never filled up")


def _assert_intact(cfg, accepted: list[bytes]) -> None:
    root = ss.spool_root(cfg)
    queued = ss.maildrop(cfg)  # read_queue_file checks Size against the file
    assert sorted(q.body() for q in queued) == sorted(accepted)
    assert os.listdir(root / "tmp") == [], "a failed attempt left a file in tmp/"


def test_full_disk_exits_75_and_keeps_earlier_messages(full_cfg):
    accepted, r = _fill(full_cfg, 40 * 1024)
    assert len(accepted) >= 2
    assert r.returncode == 75, r.stderr
    assert r.stderr == (b"sendmail: cannot write queue file: No space left on device; "
                        b"try again later\n")
    _assert_intact(full_cfg, accepted)
    # After making room, the same command works again.
    os.unlink(ss.maildrop(full_cfg)[0].path)
    assert ss.sendmail(["r@x.test"], b"Subject: again\n\nok\n", full_cfg).returncode == 0


def test_full_disk_while_buffering_a_large_message(full_cfg):
    """A message over the in-memory buffer spills to an unnamed file in
    tmp/; ENOSPC there also exits 75 and leaves nothing behind."""
    accepted, _ = _fill(full_cfg, 60 * 1024)
    os.unlink(ss.maildrop(full_cfg)[0].path)
    accepted = [q.body() for q in ss.maildrop(full_cfg)]
    big = b"Subject: big\n\n" + (b"b" * 79 + b"\n") * (2 * 1024 * 1024 // 80)
    r = ss.sendmail(["r@x.test"], big, full_cfg)
    assert r.returncode == 75, r.stderr
    assert b"No space left on device" in r.stderr
    _assert_intact(full_cfg, accepted)


def test_full_disk_in_smtp_mode_is_452(full_cfg):
    accepted, _ = _fill(full_cfg, 40 * 1024)
    body = b"y" * 78 + b"\r\n"
    dialogue = (b"HELO me\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
                + b"Subject: s\r\n\r\n" + body * 1000 + b".\r\nQUIT\r\n")
    r = ss.sendmail(["-bs"], dialogue, full_cfg)
    replies = r.stdout.decode().splitlines()
    assert "452 4.3.1 Insufficient system storage" in replies, replies
    assert replies[-1].startswith("221")
    _assert_intact(full_cfg, accepted)


@pytest.mark.parametrize("protocol", ["strict", "journal"])
def test_failed_flush_exits_75_and_queues_nothing(tmp_path, tmpfs_path, protocol):
    """strace fails every fsync and syncfs of a sendmail call with EIO:
    it exits 75 with the reason, and maildrop/ and tmp/ stay empty (under
    the journal protocol the file, renamed before its fsync, is taken
    back)."""
    if not ss.support.have("strace"):
        pytest.skip("strace not installed")
    cfg = ss.support.write_config(tmp_path, None)
    text = cfg.read_text()
    if protocol == "journal":     # tmpfs: where [spool] sync = auto takes journal
        text = text.replace(str(tmp_path / "spool"), str(tmpfs_path / "spool"))
    else:
        text = text.replace("[spool]\n", '[spool]\nsync = "strict"\n')
    cfg.write_text(text)
    assert ss.sendmail(["r@x.test"], b"Subject: first\n\nkept\n", cfg).returncode == 0
    r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync,syncfs",
                        "-e", "inject=fsync,syncfs:error=EIO", sys.executable,
                        str(ss.support.BIN / "sendmail"), "r@x.test"],
                       input=b"Subject: second\n\nlost\n", capture_output=True,
                       env=ss.support.msa_env(cfg), timeout=120)
    assert r.returncode == 75, r.stderr
    assert r.stderr == (b"sendmail: cannot write queue file: Input/output error; "
                        b"try again later\n")
    root = ss.spool_root(cfg)
    assert [q.body() for q in ss.maildrop(cfg)] == [b"kept\r\n"]
    assert os.listdir(root / "tmp") == []

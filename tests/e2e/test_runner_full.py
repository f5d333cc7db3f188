"""The delivery runner on a full filesystem (a 512 KiB tmpfs holds the
spool): a deferral it cannot write is logged once per message per retry
interval, without a traceback; the message stays whole where it was; the
runner backs off (the next try is a retry interval later, on the clock
the test moves) instead of trying again at once; and once there is room
the deferral is written as usual."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess

import pytest

from msa.message.queuefile import load
from tests import support
from tests.relay_support import RunnerHarness, Sink, load_config, relay_config, write_queue_file

BIG = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 1200      # ~96 KB


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,nr_inodes=64", "tmpfs",
                        str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory, inodes: bool) -> str:
    """Fill the filesystem's blocks with one file (and with ``inodes``
    its inodes with empty files, so that no directory can be made
    either); the directory to remove to make room again."""
    directory = os.path.join(directory, "filler")
    os.mkdir(directory)
    path = os.path.join(directory, "blocks")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    n = 0
    while inodes:
        try:
            os.close(os.open(os.path.join(directory, str(n)), os.O_WRONLY | os.O_CREAT))
        except OSError:
            break
        n += 1
    return directory


@pytest.mark.parametrize("inodes", [False, True], ids=["blocks", "blocks+inodes"])
def test_deferral_on_a_full_disk_is_logged_once_and_backs_off(tmp_path, small_fs, caplog,
                                                               inodes):
    """Blocks full: the file moves unchanged to deferred/1/ (a rename
    needs no room). Inodes full too (deferred/1/ cannot be made): it
    stays in active/, held back until due."""
    caplog.set_level(logging.INFO, logger="msa")
    sink = Sink().start()
    sink.rules = {"bob@x.test": "450 4.2.1 Mailbox busy"}
    clock = support.FakeClock()
    try:
        path = relay_config(tmp_path, None, {"force_mx": {"x.test": f"127.0.0.1:{sink.port}"}},
                            {"min_delay": 300, "max_delay": 300, "jitter": 0})
        path.write_text(path.read_text().replace(str(tmp_path / "spool"),
                                                 str(small_fs / "spool")))
        cfg = load_config(path)

        async def go():
            async with RunnerHarness(cfg, clock=clock) as h:
                await h.runner.stop(grace=0)  # built the spool; start again below
            h = RunnerHarness(cfg, clock=clock)
            qid = write_queue_file(h.spool, "active", "alice@example.org", ["bob@x.test"], BIG)
            before = open(h.spool.path("active", qid), "rb").read()
            filler = _fill(small_fs, inodes)
            async with h:
                await h.until(lambda: _attempts(sink) >= 1, what="a first attempt")
                await h.until(lambda: _lines(caplog, "cannot record"), what="the failure logged")
                # No retry at once: the next is due a retry interval later.
                first = _attempts(sink)
                for _ in range(50):
                    await asyncio.sleep(0)
                here = h.spool.find(qid)
                assert here == ("active" if inodes else "deferred/1")
                assert open(h.spool.path(here, qid), "rb").read() == before
                # The clock moves one interval: one more attempt, one more line.
                clock.advance(301)
                h.runner.clock_changed()
                await h.until(lambda: _attempts(sink) > first, what="the retry")
                await h.until(lambda: len(_lines(caplog, "cannot record")) >= 2,
                              what="the second failure logged")
                # Room again: the next deferral is recorded.
                shutil.rmtree(filler)
                clock.advance(301)
                h.runner.clock_changed()
                await h.until(lambda: h.deferred() and load(
                    h.spool.path(*h.deferred()[0]))[0].attempt_count >= 1,
                    what="a recorded deferral")
                env, _ = load(h.spool.path(*h.deferred()[0]))
                assert env.recipients[0].state == "deferred"
            return qid, first, _attempts(sink)
        qid, first, attempts = asyncio.run(asyncio.wait_for(go(), 90))
    finally:
        sink.stop()
    failures = _lines(caplog, "cannot record")
    assert len(failures) == 2, failures
    assert attempts == first + 2
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert all(qid in line and "No space left on device" in line for line in failures)


def _lines(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if what in r.getMessage()]


def _attempts(sink) -> int:
    return sink.commands.count("RCPT")

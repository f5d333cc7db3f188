"""mailq: Postfix's layout, --json, an empty queue, and 100,000 messages
listed with bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from msa.message import queuefile
from tests import sendmail_support as ss
from tests import support

ARRIVAL = 1795949955  # Sun Nov 29 10:59:15 2026 UTC
A = "66168A0F24AC0000001000"
B = "66168A0F24AC0000002000"
C = "66168A0F24AC0000003000"


@pytest.fixture
def cfg(tmp_path):
    return ss.make_config(tmp_path)


def _mailq(cfg, *args, **env):
    r = subprocess.run([sys.executable, ss.MAILQ, *args], capture_output=True,
                       env=support.msa_env(cfg, TZ="UTC", **env), timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def _three_messages(root):
    env_a = ss.envelope("alice@example.org", "bob@example.test",
                        arrival=queuefile.utc_iso(ARRIVAL))
    ss.write_queue_file(root, "active", A, env_a, b"x" * 1834)
    env_b = ss.envelope("", arrival=queuefile.utc_iso(ARRIVAL + 45), attempts="2",
                        last_error="450 4.2.0 Mailbox busy")
    env_b.add_recipient("carol@example.test", state="deferred", reply="450 4.2.0 Mailbox busy")
    env_b.add_recipient("dave@example.test", state="deferred", reply="450 4.2.0 Mailbox busy")
    env_b.add_recipient("erin@example.test", state="sent", reply="250 2.0.0 Ok")
    env_b.add_recipient("fred@example.net", state="deferred",
                        reply="connect to mx.example.net[192.0.2.1]:25: Connection refused")
    env_b.add_history("2026-11-29T11:04:15Z mx1.example.test[127.0.0.2] deferred 450 4.2.0")
    ss.write_queue_file(root, "deferred/2", B, env_b, b"y" * 500, mtime=ARRIVAL + 4000)
    env_c = ss.envelope("held@example.org", "zed@example.test",
                        arrival=queuefile.utc_iso(ARRIVAL + 3600))
    ss.write_queue_file(root, "hold", C, env_c, b"z" * 20)


def test_postfix_layout(cfg):
    root = ss.spool_root(cfg)
    _three_messages(root)
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and f.name in (A, B, C))
    pad = " " * 41
    expected = (
        "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
        f"{A}*    1834 Sun Nov 29 10:59:15  alice@example.org\n"
        f"{pad}bob@example.test\n"
        "\n"
        f"{B}      500 Sun Nov 29 11:00:00  MAILER-DAEMON\n"
        f"{' ' * 54}(450 4.2.0 Mailbox busy)\n"
        f"{pad}carol@example.test\n"
        f"{pad}dave@example.test\n"
        f"{' ' * 17}(connect to mx.example.net[192.0.2.1]:25: Connection refused)\n"
        f"{pad}fred@example.net\n"
        "\n"
        f"{C}!      20 Sun Nov 29 11:59:15  held@example.org\n"
        f"{pad}zed@example.test\n"
        "\n"
        f"-- {total // 1024} Kbytes in 3 Requests.\n")
    assert _mailq(cfg) == expected
    # sendmail -bp and msa queue list say the same.
    r = subprocess.run([sys.executable, ss.SENDMAIL, "-bp"], capture_output=True,
                       env=support.msa_env(cfg, TZ="UTC"), timeout=60)
    assert r.stdout.decode() == expected
    r = subprocess.run([sys.executable, ss.MSA, "queue", "list"], capture_output=True,
                       env=support.msa_env(cfg, TZ="UTC"), timeout=60)
    assert r.stdout.decode() == expected


def test_json(cfg):
    root = ss.spool_root(cfg)
    _three_messages(root)
    records = [json.loads(line) for line in _mailq(cfg, "--json").splitlines()]
    by_id = {r["queue_id"]: r for r in records}
    assert [r["queue_id"] for r in records] == [A, B, C]
    assert by_id[A] == {
        "queue_name": "active", "queue_id": A, "arrival_time": ARRIVAL, "message_size": 1834,
        "forced_expire": False, "sender": "alice@example.org",
        "recipients": [{"address": "bob@example.test"}],
        "attempts": 0, "history": [], "next_attempt": None}
    b = by_id[B]
    assert (b["queue_name"], b["sender"], b["attempts"], b["next_attempt"]) == (
        "deferred", "", 2, ARRIVAL + 4000)
    assert b["recipients"][0] == {"address": "carol@example.test",
                                  "delay_reason": "450 4.2.0 Mailbox busy"}
    assert [r["address"] for r in b["recipients"]] == [
        "carol@example.test", "dave@example.test", "fred@example.net"]
    assert b["history"] == ["2026-11-29T11:04:15Z mx1.example.test[127.0.0.2] deferred 450 4.2.0"]
    assert by_id[C]["queue_name"] == "hold" and by_id[C]["next_attempt"] is None


def test_empty_queue(cfg):
    assert _mailq(cfg) == "Mail queue is empty\n"
    assert _mailq(cfg, "--json") == ""


def test_sendmail_output_listed_and_bad_file_shown_not_moved(cfg):
    assert ss.sendmail(["-F", "Me", "r@x.test"], b"Subject: q\n\nx\n", cfg).returncode == 0
    root = ss.spool_root(cfg)
    (root / "maildrop" / "66168A0F24AC0000009000").write_bytes(b"garbage\n")
    out = _mailq(cfg)
    assert "root@example.org\n" + " " * 41 + "r@x.test\n" in out
    assert ("66168A0F24AC0000009000 ") in out and "(unreadable queue file, owner UID 0: " in out
    assert out.endswith(" Kbytes in 2 Requests.\n")
    assert (root / "maildrop" / "66168A0F24AC0000009000").exists()


# -- 100,000 messages ------------------------------------------------------------

N_BIG = 100_000


@pytest.fixture(scope="module")
def big_queue(tmp_path_factory):
    """100,000 queue files written directly (no fsync): 30,000 active,
    60,000 in deferred/1..3, 10,000 held."""
    d = tmp_path_factory.mktemp("bigq")
    cfg = ss.make_config(d)
    root = ss.spool_root(cfg)
    started = time.monotonic()
    base = 0x66168A0F24AC0
    msg = b"Subject: load\r\n\r\n" + b"m" * 400 + b"\r\n"
    for i in range(N_BIG):
        stage = ("active" if i % 10 < 3 else "hold" if i % 10 == 9
                 else f"deferred/{i % 3 + 1}")
        env = ss.envelope(f"s{i}@example.org", f"r{i}@example.test", f"q{i}@example.net")
        ss.write_queue_file(root, stage, f"{base + i:013X}{i % 0xFFFFFF:06X}000", env, msg)
    print(f"\ncreated {N_BIG} queue files in {time.monotonic() - started:.1f}s")
    yield cfg
    import shutil
    shutil.rmtree(d, ignore_errors=True)


def _peak_rss(cfg, argv, out_path) -> float:
    """Run a command with stdout to a file; its peak RSS in MB."""
    with open(out_path, "wb") as out:
        code, err, peak = ss.run_measured([sys.executable, *argv], cfg, stdout=out)
    assert code == 0, err
    return peak


def test_mailq_100k_bounded_memory(big_queue, tmp_path):
    started = time.monotonic()
    peak = _peak_rss(big_queue, [ss.MAILQ], tmp_path / "out")
    took = time.monotonic() - started
    with open(tmp_path / "out", "rb") as f:
        f.seek(-200, os.SEEK_END)
        tail = f.read().decode()
    assert tail.endswith(f" Kbytes in {N_BIG} Requests.\n")
    print(f"mailq over {N_BIG} messages: peak RSS {peak:.1f} MB, {took:.1f}s")
    assert peak < 150, f"mailq peak RSS {peak:.1f} MB: entries are being accumulated"


def test_queue_list_json_100k_bounded_memory(big_queue, tmp_path):
    started = time.monotonic()
    peak = _peak_rss(big_queue, [ss.MSA, "queue", "list", "--json"], tmp_path / "out")
    took = time.monotonic() - started
    count = 0
    names = set()
    with open(tmp_path / "out") as f:
        for line in f:
            rec = json.loads(line)
            names.add(rec["queue_name"])
            count += 1
    assert count == N_BIG and names == {"active", "deferred", "hold"}
    print(f"msa queue list --json over {N_BIG} messages: peak RSS {peak:.1f} MB, {took:.1f}s")
    assert peak < 150, f"queue list peak RSS {peak:.1f} MB: entries are being accumulated"

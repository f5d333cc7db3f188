"""Durability and memory of the edge as a separate process: kill -9 while
a client submits in a loop loses no acknowledged message; fsync(file) ->
rename -> fsync(dir) -> 250 in that order under the strict protocol,
rename -> fsync(file) -> 250 under the journal protocol (strace); a 50 MB message grows
the process by less than 64 MB."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import smtplib
import threading

import pytest

from tests import support
from tests.edge_support import (
    RawClient,
    add_user,
    client_context,
    edge_config,
    edge_process,
    read_queued,
    reset_hwm,
    session,
    vm_kb,
)


def submitter(port, ca, acked, stop, seed):
    """Submit messages over implicit TLS until the server dies or ``stop``;
    append (qid, its header fields, sha256 of its body) for every 250."""
    rnd = random.Random(seed)
    ctx = client_context(ca)
    n = 0
    try:
        with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=20) as s:
            s.login("alice", "alice-pw")
            while not stop.is_set():
                n += 1
                filler = (b"%08d " % n) * rnd.randint(10, 20000)
                fields = b"From: alice@example.org\r\nSubject: %d\r\n" % n
                text = (b"\r\n".join(filler[i:i + 72] for i in range(0, len(filler), 72))
                        + b"\r\n")
                body = fields + b"\r\n" + text
                s.mail("alice@example.org")
                s.rcpt("bob@example.test")
                code, msg = s.data(body)
                if code == 250:
                    qid = msg.decode().rsplit(" ", 1)[1]
                    acked.append((qid, fields, hashlib.sha256(text).hexdigest()))
    except (smtplib.SMTPException, OSError):
        pass


@pytest.mark.parametrize("round_, protocol", [(0, "strict"), (1, "strict"), (1, "journal")])
def test_kill9_loses_no_acknowledged_message(tmp_path, tmpfs_path, ca, round_, protocol):
    """journal: the spool on tmpfs, where [spool] sync = auto picks it."""
    port = support.free_port()
    cfg = edge_config(tmp_path, ca, submissions=[f"127.0.0.1:{port}"])
    root = tmp_path / "spool"
    if protocol == "journal":
        text = cfg.read_text().replace(f'root = "{root}"', f'root = "{tmpfs_path / "spool"}"')
        root = tmpfs_path / "spool"
    else:
        text = cfg.read_text().replace("[spool]\n", '[spool]\nsync = "strict"\n')
    assert f'root = "{root}"' in text
    cfg.write_text(text)
    add_user(tmp_path / "passwd", "alice", "alice-pw")
    proc = edge_process(cfg)
    acked, stop = [], threading.Event()
    threads = [threading.Thread(target=submitter, args=(port, ca, acked, stop, i))
               for i in range(3)]
    for t in threads:
        t.start()
    try:
        support.wait_for(lambda: len(acked) >= 15 + 10 * round_, timeout=60,
                         what="acknowledged messages")
    finally:
        os.killpg(proc.p.pid, signal.SIGKILL)
        proc.p.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
    incoming = root / "incoming"
    assert acked
    for qid, fields, digest in list(acked):
        env, message = read_queued(incoming / qid)     # whole: Size matches
        # The edge applied the policies (a Received, a Date, a Message-ID
        # around the client's fields); the client's fields and body are
        # there byte for byte.
        head, _, text = message.partition(b"\r\n\r\n")
        assert fields in head + b"\r\n"
        assert head.startswith(b"Received: ") and b"\r\nMessage-ID: <" in head
        assert hashlib.sha256(text).hexdigest() == digest
        assert env.queue_id == qid
    # Files that were never acknowledged may be there too (duplicates are
    # allowed), but every file in incoming/ is whole.
    for path in incoming.iterdir():
        read_queued(path)


@pytest.mark.parametrize("protocol", ["strict", "journal"])
@pytest.mark.parametrize("bystander", [False, True], ids=["alone", "with another client"])
def test_flushes_before_250(tmp_path, tmpfs_path, bystander, protocol):
    """Alone, the client's messages are stored by the edge's event loop;
    with another client connected, by a store thread (the file created
    while the body arrives) and, under strict, the directory syncer. Same
    order both ways. strict: fsync(file), rename, fsync(dir), 250;
    journal (on tmpfs, where auto picks it): rename, fsync(file), 250 and
    no other flush on the way."""
    if not support.have("strace"):
        pytest.skip("strace not installed")
    port = support.free_port()
    trace = tmp_path / "trace"
    spool = (tmp_path if protocol == "strict" else tmpfs_path) / "spool"
    proc = edge_process(prefix=["strace", "-f", "-y", "-s", "120", "-o", str(trace),
                                "-e", "trace=fsync,fdatasync,syncfs,rename,renameat,renameat2,"
                                "sendto,write"],
                        open_port=port, spool=spool,
                        sync="strict" if protocol == "strict" else "auto")
    try:
        other = RawClient(port) if bystander else None
        c = RawClient(port)
        c.cmd("EHLO client.test")
        qids = []
        for i in range(3):
            assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
            assert c.cmd("RCPT TO:<b@example.test>").startswith("250")
            assert c.cmd("DATA").startswith("354")
            c.send(b"Subject: %d\r\n\r\nbody\r\n.\r\n" % i)
            r = c.reply()
            assert r.startswith("250 2.0.0 Ok: queued as "), r
            qids.append(r.rsplit(" ", 1)[1])
        c.cmd("QUIT")
        if other is not None:
            other.close()
    finally:
        proc.stop()
    calls = completed_calls(trace.read_text().splitlines())

    def where(pattern: str) -> list[int]:
        return [i for i, text in calls if re.search(pattern, text)]

    flushes = where(r"^(f(data)?sync|syncfs)\(")
    last_reply = 0
    for qid in qids:
        reply = where(f"queued as {qid}")[0]
        rename = where(rf"rename\w*\(.*tmp/{qid}\.\d+.*incoming/{qid}.*= 0")[0]
        if protocol == "strict":
            file_sync = where(rf"f(data)?sync\(\d+</[^>]*/tmp/{qid}\.\d+>.*= 0")[0]
            dir_syncs = where(r"fsync\(\d+</[^>]*/incoming>.*= 0")
            assert file_sync < rename < reply
            assert any(rename < i < reply for i in dir_syncs), (rename, dir_syncs, reply)
        else:
            file_sync = where(rf"fsync\(\d+</[^>]*/incoming/{qid}>.*= 0")[0]
            assert rename < file_sync < reply
            # one flush for this message, none of them before its rename
            assert [i for i in flushes if last_reply < i < reply] == [file_sync]
        last_reply = reply
        # Which thread wrote the file: the one that sent the reply (alone)
        # or another (with another client).
        lines = trace.read_text().splitlines()
        tid = {kind: lines[i].split()[0] for kind, i in (("sync", file_sync), ("reply", reply))}
        assert (tid["sync"] != tid["reply"]) == bystander, tid


def completed_calls(lines: list[str]) -> list[tuple[int, str]]:
    """(line of completion, whole call) from ``strace -f`` output, joining
    ``<unfinished ...>`` with its ``<... resumed>`` line."""
    pending: dict[str, str] = {}
    out = []
    for i, line in enumerate(lines):
        pid, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[:-len("<unfinished ...>")]
        elif rest.startswith("<..."):
            out.append((i, pending.pop(pid, "") + rest))
        else:
            out.append((i, rest))
    return out


def test_50mb_message_bounded_rss(tmp_path, ca, record_property):
    port = support.free_port()
    cfg = edge_config(tmp_path, ca, submissions=[f"127.0.0.1:{port}"])
    add_user(tmp_path / "passwd", "alice", "alice-pw")
    proc = edge_process(cfg)
    pid = proc.p.pid
    try:
        c = session(port, ca, "alice", "alice-pw", implicit=True)
        line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n"
        block = line * (1024 * 1024 // len(line))
        head = b"From: alice@example.org\r\nSubject: big\r\n\r\n"
        size = len(head) + 50 * len(block)
        assert size > 50 * 1000 * 1000
        assert c.cmd(f"MAIL FROM:<alice@example.org> SIZE={size}").startswith("250")
        assert c.cmd("RCPT TO:<bob@example.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        rss_before = vm_kb(pid, "VmRSS")
        reset_hwm(pid)
        digest = hashlib.sha256(head)
        c.send(head)
        for _ in range(50):
            c.send(block)
            digest.update(block)
        c.send(b".\r\n")
        r = c.reply()
        assert r.startswith("250 2.0.0 Ok: queued as"), r
        growth_kb = vm_kb(pid, "VmHWM") - rss_before
        record_property("rss_growth_kb", growth_kb)
        print(f"\n50 MB message: edge RSS before {rss_before} kB, peak growth {growth_kb} kB")
        assert growth_kb < 64 * 1024
        qid = r.rsplit(" ", 1)[1]
        env, body = read_queued(tmp_path / "spool" / "incoming" / qid)
        assert int(env.size) == size and hashlib.sha256(body).digest() == digest.digest()
    finally:
        proc.stop()


@pytest.mark.parametrize("protocol", ["strict", "journal"])
def test_failed_flush_answers_451_and_keeps_what_it_acknowledged(tmp_path, tmpfs_path,
                                                                  protocol):
    """strace makes the edge's third fsync and every later one fail with
    EIO (counted per thread: a lone client's messages are all stored by
    the event loop's thread). The messages before get 250 and stay whole;
    from the failed flush on every message gets 451 4.3.0 and, under the
    journal protocol (whose failed fsync comes after the rename), its file
    is taken back out of incoming/."""
    if not support.have("strace"):
        pytest.skip("strace not installed")
    port = support.free_port()
    spool = (tmp_path if protocol == "strict" else tmpfs_path) / "spool"
    proc = edge_process(prefix=["strace", "-f", "-qq", "-o", str(tmp_path / "trace"),
                                "-e", "trace=fsync", "-e", "inject=fsync:error=EIO:when=3+"],
                        open_port=port, spool=spool,
                        sync="strict" if protocol == "strict" else "auto")
    replies, bodies = [], {}
    try:
        c = RawClient(port)
        c.cmd("EHLO client.test")
        for i in range(5):
            assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
            assert c.cmd("RCPT TO:<b@example.test>").startswith("250")
            assert c.cmd("DATA").startswith("354")
            body = b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i)
            c.send(body + b".\r\n")
            r = c.reply()
            replies.append(r)
            if r.startswith("250"):
                bodies[r.rsplit(" ", 1)[1]] = body
        c.cmd("QUIT")
    finally:
        proc.stop()
    codes = [r[:3] for r in replies]
    # 250s first, then only 451s: strict spends two fsyncs per message
    # (so message 2 fails), journal one (message 3)
    first_bad = 1 if protocol == "strict" else 2
    assert codes == ["250"] * first_bad + ["451"] * (5 - first_bad), replies
    assert all("4.3.0" in r for r in replies[first_bad:]), replies
    stored = {name: read_queued(spool / "incoming" / name) for name in
              os.listdir(spool / "incoming")}
    assert set(stored) == set(bodies)
    for qid, body in bodies.items():
        assert stored[qid][1].endswith(body)
    assert os.listdir(spool / "tmp") == []

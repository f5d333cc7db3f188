"""The watcher carries messages through the policy stages to active/."""

from __future__ import annotations

import asyncio
import threading

import pytest

import msa.cleanup.watcher
import spool.core
from msa.cleanup import policies
from msa.cleanup.watcher import Watcher
from msa.message import queuefile
from msa.store import open_spool
from spool import StageWatcher
from tests import support
from tests.daemon_support import MESSAGE, deposit, load_all, make_cfg, smtp_file

THREE = ["bob@one.test", "carol@two.test", "dave@three.test", "erin@one.test"]


@pytest.fixture
def cfg(tmp_path):
    return make_cfg(tmp_path)


@pytest.fixture
def sp(cfg):
    return open_spool(cfg)


def test_three_domains_become_three_files_in_active(cfg, sp):
    qid = deposit(sp, "incoming", smtp_file(THREE, MESSAGE))
    assert Watcher(cfg, sp).drain() == 1
    active = load_all(sp, "active")
    assert sorted(active) == [f"{qid}-1", f"{qid}-2", f"{qid}-3"]
    rcpts = {name: [r.address for r in env.recipients] for name, (env, _) in active.items()}
    assert rcpts == {f"{qid}-1": ["bob@one.test", "erin@one.test"],
                     f"{qid}-2": ["carol@two.test"], f"{qid}-3": ["dave@three.test"]}
    for name, (env, message) in active.items():
        assert env.queue_id == name and env.policies.split(",") == [
            "received", "date", "message-id", "remove-bcc", "split"]
        assert message.startswith(b"Received: from client.example (localhost [127.0.0.1])")
        assert b"(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)" in message
        assert b"(authenticated as alice)" in message and b"with ESMTPSA id " + qid.encode() in message
        assert b"\r\nDate: " in message and f"Message-ID: <{qid}@msa.test>".encode() in message
        assert b"Bcc" not in message and b"secret@example.net" not in message
        assert b"\r\nSubject: hi\r\nDate: " in message
        assert message.endswith(b"@msa.test>\r\n\r\nHello.\r\n")
    for stage in ("incoming", "policy-headers", "policy-forward", "policy-split", "corrupt"):
        assert list(sp.names(stage)) == []


def test_single_domain_is_not_split_and_forward_rewrites(tmp_path):
    cfg = make_cfg(tmp_path, forward=[[r"^bob@one\.test$", "robert@one.test, erin@one.test"]])
    sp = open_spool(cfg)
    qid = deposit(sp, "incoming", smtp_file(["bob@one.test", "erin@one.test"], MESSAGE))
    Watcher(cfg, sp).drain()
    active = load_all(sp, "active")
    assert list(active) == [qid]
    env, _ = active[qid]
    assert [r.address for r in env.recipients] == ["robert@one.test", "erin@one.test"]
    assert env.recipients[0].orcpt == "rfc822;bob@one.test"


def test_one_pass_no_message_stops_in_a_policy_stage(cfg, sp):
    policy_stages = [s for s in sp.stages if s.startswith("policy-")]
    sw = StageWatcher(sp, policy_stages)
    try:
        assert list(sw.rescan()) == []
        sw.need_rescan = False
        qids = [deposit(sp, "incoming", smtp_file(rcpts, MESSAGE))
                for rcpts in (["bob@one.test"], THREE)]
        assert Watcher(cfg, sp).drain() == 2
        assert sw.read(timeout_ms=0) == []  # nothing was renamed into a policy stage
    finally:
        sw.close()
    assert sorted(sp.names("active")) == sorted([qids[0], *(f"{qids[1]}-{i}" for i in (1, 2, 3))])
    assert list(sp.names("incoming")) == [] and list(sp.names("tmp")) == []


def test_rerun_after_crash_before_the_source_is_removed_applies_nothing_twice(
        cfg, sp, monkeypatch):
    qid = deposit(sp, "incoming", smtp_file(["bob@one.test"], MESSAGE))
    original = sp.path("incoming", qid).read_bytes()

    def crash(path):
        raise RuntimeError("simulated crash after the commit to active/")

    monkeypatch.setattr(msa.cleanup.watcher, "_unlink", crash)
    Watcher(cfg, sp).drain()
    assert sp.path("incoming", qid).read_bytes() == original  # the source is never rewritten
    first = sp.path("active", qid).read_bytes()
    assert first.count(b"Received:") == 1
    monkeypatch.undo()
    Watcher(cfg, sp).drain()
    assert list(sp.names("incoming")) == []
    env, message = load_all(sp, "active")[qid]
    assert message.count(b"Received:") == 1 and message.count(b"Message-ID:") == 1
    assert sp.path("active", qid).read_bytes() == first


def _as_left_in(stage_policies, data: bytes) -> bytes:
    """A queue file as a per-stage watcher left it after applying (and
    recording) ``stage_policies`` and before moving it on."""
    import tempfile

    from msa.cleanup.watcher import Head
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        head = Head(f, 1 << 20)
        (env, headers), = policies.run_stages(head.env, head.headers, [stage_policies])[0]
        body = b"".join(head.body())
    env.size = str(len(headers.to_bytes()) + len(body))
    return env.to_bytes() + headers.to_bytes() + body


def test_file_found_in_a_policy_stage_gets_that_stage_and_the_later_ones_once(cfg, sp):
    pipe = dict(policies.pipeline(cfg))
    data = smtp_file(["bob@one.test"], MESSAGE)
    qid = spool.core.new_id()
    left = _as_left_in(pipe["policy-headers"], data.replace(
        b"\nSender:", f"\nQueue-ID: {qid}\nSender:".encode(), 1))
    assert left.count(b"Received:") == 1 and b"Policies: received," in left
    sp.deposit("policy-headers", left, qid=qid)
    split_me = deposit(sp, "policy-split", smtp_file(THREE, MESSAGE))
    assert Watcher(cfg, sp).drain() == 2
    env, message = load_all(sp, "active")[qid]
    assert message.count(b"Received:") == 1 and message.count(b"Message-ID:") == 1
    assert env.policies.split(",") == ["received", "date", "message-id", "remove-bcc"]
    active = load_all(sp, "active")
    parts = [f"{split_me}-{i}" for i in (1, 2, 3)]
    for name in parts:  # only the split stage ran: no header policy
        env, message = active[name]
        assert env.policies == "split" and b"Received:" not in message
        assert message.endswith(MESSAGE)
    assert sorted(active) == sorted([qid, *parts])
    for stage in ("incoming", "policy-headers", "policy-forward", "policy-split", "corrupt"):
        assert list(sp.names(stage)) == []


def test_split_before_header_policies_gives_each_part_its_own_headers(tmp_path):
    cfg = make_cfg(tmp_path, stages=["split", "headers"])
    sp = open_spool(cfg)
    qid = deposit(sp, "incoming", smtp_file(["bob@one.test", "carol@two.test"], MESSAGE))
    Watcher(cfg, sp).drain()
    active = load_all(sp, "active")
    assert sorted(active) == [f"{qid}-1", f"{qid}-2"]
    for name, rcpt in ((f"{qid}-1", "bob@one.test"), (f"{qid}-2", "carol@two.test")):
        env, message = active[name]
        assert env.policies.split(",") == ["split", "received", "date", "message-id",
                                           "remove-bcc"]
        assert f"for <{rcpt}>;".encode() in message  # one recipient each: named
        assert f"Message-ID: <{name}@msa.test>".encode() in message
        assert message.count(b"Received:") == 1


def test_corrupt_and_oversized_headers_are_quarantined(tmp_path, caplog):
    cfg = make_cfg(tmp_path, max_header_bytes=4096)
    sp = open_spool(cfg)
    sp.deposit("incoming", b"this is not a queue file\n", qid="bad1")
    truncated = smtp_file(["b@x.test"], MESSAGE)[:-3]
    sp.deposit("incoming", truncated, qid="bad2")
    big = b"X-Big: " + b"a" * 5000 + b"\r\n\r\nbody\r\n"
    sp.deposit("incoming", smtp_file(["b@x.test"], big), qid="big")
    good = deposit(sp, "incoming", smtp_file(["b@x.test"], MESSAGE))
    with caplog.at_level("WARNING"):
        Watcher(cfg, sp).drain()
    assert sorted(sp.names("corrupt")) == ["bad1", "bad2", "big"]
    assert list(sp.names("active")) == [good]
    assert "bad2: moved incoming/bad2 to corrupt/: message is" in caplog.text
    assert "header section larger than 4096" in caplog.text


def test_message_without_separator_or_headers(cfg, sp):
    no_sep = deposit(sp, "incoming", smtp_file(["b@x.test"], b"Subject: x\r\nbody line\r\n"))
    no_hdr = deposit(sp, "incoming", smtp_file(["b@x.test"], b"\r\njust a body\r\n"))
    Watcher(cfg, sp).drain()
    active = load_all(sp, "active")
    assert b"Subject: x\r\nDate: " in active[no_sep][1]
    assert active[no_sep][1].endswith(b"@msa.test>\r\n\r\nbody line\r\n")
    assert active[no_hdr][1].endswith(b"@msa.test>\r\n\r\njust a body\r\n")
    for env, message in active.values():
        assert int(env.size) == len(message)


def test_run_watches_and_stops(cfg, sp):
    watcher = Watcher(cfg, sp, workers=2)
    early = deposit(sp, "incoming", smtp_file(["b@x.test"], MESSAGE))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(watcher.run(),))
    thread.start()
    try:
        support.wait_for(lambda: early in list(sp.names("active")), what="backlog processed")
        late = deposit(sp, "incoming", smtp_file(["c@y.test", "d@z.test"], MESSAGE))
        support.wait_for(lambda: len(list(sp.names("active"))) == 3, what="new file processed")
        assert sorted(sp.names("active")) == sorted([early, f"{late}-1", f"{late}-2"])
        # Events for files already moved on leave no claim files behind.
        support.wait_for(lambda: list(sp.names("claims")) == [], what="claims/ empty")
    finally:
        loop.call_soon_threadsafe(watcher.stop)
        thread.join(20)
        loop.close()
    assert not thread.is_alive()


def test_size_of_rewritten_file_matches(cfg, sp):
    qid = deposit(sp, "incoming", smtp_file(["b@x.test"], MESSAGE))
    Watcher(cfg, sp).drain()
    env, offset = queuefile.load(sp.path("active", qid))  # checks Size against the file
    assert int(env.size) == sp.path("active", qid).stat().st_size - offset

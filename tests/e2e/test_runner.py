"""The delivery runner (msa.delivery.runner) in-process against aiosmtpd sinks:
delivery from active/, deferral into deferred/<N>/ with mtime = due,
retry, partial failure with one DSN, expiry, null sender, corrupt files,
hold/, connection reuse and bounded work in flight."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import os
import re
import time

import pytest

from msa.message.queuefile import load
from tests import support
from tests.relay_support import RunnerHarness, Sink, load_config, relay_config, write_queue_file

MSG = (b"From: alice@example.org\r\nTo: bob@x.test\r\nMessage-ID: <m1@example.org>\r\n"
       b"Subject: test\r\n\r\nHello.\r\n")


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


def cfg_for(tmp_path, sink, relay=None, retry=None, ca=None):
    relay = {"force_mx": {"x.test": f"127.0.0.1:{sink.port}"}, **(relay or {})}
    return load_config(relay_config(tmp_path, ca, relay, retry))


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def incoming_dsns(h: RunnerHarness):
    out = []
    for name in h.names("incoming"):
        env, offset = load(h.spool.path("incoming", name))
        with open(h.spool.path("incoming", name), "rb") as f:
            f.seek(offset)
            out.append((env, email.message_from_bytes(f.read(), policy=email.policy.default)))
    return out


def test_delivers_from_active_and_removes(tmp_path, sink, caplog):
    caplog.set_level(logging.INFO, logger="msa")
    cfg = cfg_for(tmp_path, sink)

    async def go():
        async with RunnerHarness(cfg) as h:
            qid = write_queue_file(h.spool, "active", "alice@example.org", ["bob@x.test"], MSG)
            await h.until(lambda: sink.messages and h.queue_empty(), what="delivery")
            return qid
    qid = run(go())
    assert sink.messages[0].data == MSG and sink.messages[0].rcpt_tos == ["bob@x.test"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(qid)]
    assert any(f"{qid}: to=<bob@x.test>, relay=127.0.0.1[127.0.0.1]:{sink.port}, delay=" in x
               and ", dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as M1), tls=none" in x
               and re.search(r", delays=[\d.]+/0/[\d.]+/[\d.]+, dsn=", x)
               for x in lines), lines
    assert f"{qid}: removed" in lines


def test_4xx_defers_into_deferred_1_with_future_mtime_then_flush_delivers(tmp_path, sink):
    sink.rules = {"bob@x.test": "450 4.2.1 Mailbox busy"}
    cfg = cfg_for(tmp_path, sink)

    async def go():
        async with RunnerHarness(cfg) as h:
            qid = write_queue_file(h.spool, "active", "alice@example.org", ["bob@x.test"], MSG)
            await h.until(lambda: h.names("deferred/1"), what="deferral")
            path = h.spool.path("deferred/1", qid)
            env, _ = load(path)
            mtime = os.stat(path).st_mtime
            assert mtime > time.time() + 200  # min_delay 300, no jitter
            assert env.attempts == "1" and env.next_attempt and env.last_attempt
            assert env.recipients[0].state == "deferred"
            assert env.recipients[0].reply == "450 4.2.1 Mailbox busy"
            assert env.last_error == "450 4.2.1 Mailbox busy"
            assert env.history and "deferred 450 4.2.1 Mailbox busy" in env.history[-1]
            assert not h.names("active")
            sink.rules = {}
            h.runner.flush()
            await h.until(lambda: sink.messages and h.queue_empty(), what="retry")
            assert not incoming_dsns(h)
    run(go())


def test_retried_when_due_without_flush(tmp_path, sink):
    """A deferred message is tried again when its time comes, with no
    flush; the wall clock is the test's (FakeClock), moved past each due
    time, so nothing waits for real minutes."""
    sink.rules = {"bob@x.test": "450 4.2.1 Mailbox busy"}
    cfg = cfg_for(tmp_path, sink)  # min_delay 300 s, then 600 s, +-10 %
    clock = support.FakeClock()

    async def go():
        async with RunnerHarness(cfg, clock=clock) as h:
            qid = write_queue_file(h.spool, "active", "alice@example.org", ["bob@x.test"], MSG)
            await h.until(lambda: h.names("deferred/1"), what="first deferral")
            due = os.stat(h.spool.path("deferred/1", qid)).st_mtime
            assert clock.now + 270 <= due <= clock.now + 330
            clock.advance(400)
            h.runner.clock_changed()
            await h.until(lambda: h.names("deferred/2"), what="second attempt")
            assert load(h.spool.path("deferred/2", qid))[0].attempts == "2"
            sink.rules = {}
            clock.advance(700)
            h.runner.clock_changed()
            await h.until(lambda: sink.messages and h.queue_empty(), what="delivery")
    run(go())


def test_partial_failure_one_delivery_one_dsn_no_second_delivery(tmp_path, sink):
    sink.rules = {"bad@x.test": "550 5.1.1 <bad@x.test>: No such user",
                  "busy@x.test": "450 4.2.1 busy"}
    cfg = cfg_for(tmp_path, sink)

    async def go():
        async with RunnerHarness(cfg) as h:
            qid = write_queue_file(h.spool, "active", "alice@example.org",
                                   ["bad@x.test", "ok@x.test", "busy@x.test"], MSG)
            await h.until(lambda: h.names("deferred/1") and h.names("incoming"))
            dsns = incoming_dsns(h)
            assert len(dsns) == 1
            env, msg = dsns[0]
            assert env.sender == "" and env.bounce_of == qid
            assert [r.address for r in env.recipients] == ["alice@example.org"]
            text = msg.as_string()
            assert "550 5.1.1 <bad@x.test>: No such user" in text
            assert "Final-Recipient: rfc822; bad@x.test" in text
            assert "ok@x.test" not in text.split("Undelivered Message")[0].split(
                "Content-Type: message/delivery-status")[-1]
            state = {r.address: r.state for r in load(h.spool.path("deferred/1", qid))[0].recipients}
            assert state == {"bad@x.test": "failed", "ok@x.test": "sent", "busy@x.test": "deferred"}
            sink.rules = {}
            h.runner.flush()
            await h.until(lambda: len(sink.messages) == 2 and h.queue_empty())
            assert [m.rcpt_tos for m in sink.messages] == [["ok@x.test"], ["busy@x.test"]]
            assert len(incoming_dsns(h)) == 1  # no second DSN
    run(go())


def test_expiry_bounces_with_dsn_and_leaves_queue(tmp_path, sink):
    sink.rules = {"*": "451 4.3.0 Try again"}
    cfg = cfg_for(tmp_path, sink, retry={"lifetime": 3600.0})
    clock = support.FakeClock()

    async def go():
        async with RunnerHarness(cfg, clock=clock) as h:
            qid = write_queue_file(h.spool, "active", "alice@example.org", ["bob@x.test"], MSG)
            await h.until(lambda: h.names("deferred/1"), what="first deferral")
            assert h.names("incoming") == []  # not expired yet: no DSN
            clock.advance(3601)
            h.runner.clock_changed()
            await h.until(lambda: h.names("incoming") and h.queue_empty(), what="expiry")
            (env, msg), = incoming_dsns(h)
            text = msg.as_string()
            assert env.bounce_of == qid
            assert "Action: failed" in text and "Status: 4.4.7" in text
            assert "451 4.3.0 Try again" in text
    run(go())


def _no_postmaster(cfg_path):
    text = cfg_path.read_text().replace('domain = "example.org"\n',
                                        'domain = "example.org"\npostmaster = ""\n', 1)
    cfg_path.write_text(text)
    return load_config(cfg_path)


def test_a_failed_bounce_goes_to_the_postmaster_once(tmp_path, sink, caplog):
    """A bounce (null sender) that fails is never bounced; the postmaster
    ([server] postmaster, qualified) hears of it, once: that notice
    failing in turn is dropped (Postfix's 2bounce_notice_recipient)."""
    caplog.set_level(logging.INFO, logger="msa")
    sink.rules = {"*": "550 5.1.1 No such user"}
    cfg = cfg_for(tmp_path, sink)

    async def go():
        async with RunnerHarness(cfg) as h:
            qid = write_queue_file(h.spool, "active", "", ["bob@x.test"], MSG, bounce_of="X1")
            await h.until(lambda: h.names("incoming"), what="the notice")
            [(env, message)] = [(e, m) for e, m in incoming_dsns(h)]
            assert env.sender == "" and env.origin == "double-bounce" and env.bounce_of == qid
            assert [r.address for r in env.recipients] == ["postmaster@example.org"]
            assert "bob@x.test" in message.as_string()
            # The notice itself cannot be delivered: dropped, nothing new.
            notice = h.names("incoming")[0]
            os.rename(h.spool.path("incoming", notice), h.spool.path("active", notice))
            await h.until(h.queue_empty, what="the notice dropped")
            assert h.names("incoming") == []
            return qid, notice
    qid, notice = run(go())
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"{qid}: postmaster non-delivery notification: {notice}" in x for x in lines)
    assert any(f"{notice}: to=<postmaster@example.org>: not bouncing a message from the null "
               "sender" in x for x in lines), lines


def test_without_a_postmaster_a_failed_bounce_is_dropped(tmp_path, sink, caplog):
    caplog.set_level(logging.INFO, logger="msa")
    sink.rules = {"*": "550 5.1.1 No such user"}
    cfg = _no_postmaster(relay_config(tmp_path, None,
                                      {"force_mx": {"x.test": f"127.0.0.1:{sink.port}"}}))

    async def go():
        async with RunnerHarness(cfg) as h:
            write_queue_file(h.spool, "active", "", ["bob@x.test"], MSG)
            await h.until(h.queue_empty, what="drop")
            assert h.names("incoming") == []
    run(go())
    assert any("not bouncing a message from the null sender" in r.getMessage()
               for r in caplog.records)


def test_failed_bounce_is_dropped_after_bounce_lifetime_not_looped(tmp_path, sink, caplog):
    caplog.set_level(logging.INFO, logger="msa")
    sink.rules = {"*": "451 4.3.0 later"}
    cfg = _no_postmaster(relay_config(tmp_path, None,
                                      {"force_mx": {"x.test": f"127.0.0.1:{sink.port}"}},
                                      {"bounce_lifetime": 3600.0}))
    clock = support.FakeClock()

    async def go():
        async with RunnerHarness(cfg, clock=clock) as h:
            write_queue_file(h.spool, "active", "", ["alice@x.test"], MSG, bounce_of="X1")
            await h.until(lambda: h.names("deferred/1"), what="first deferral")
            clock.advance(3601)
            h.runner.clock_changed()
            await h.until(h.queue_empty, what="bounce dropped")
            # A DSN is spooled before the file it reports on is removed
            # (runner invariant), so none can appear after this.
            assert h.names("incoming") == []
    run(go())
    assert any("status=expired" in r.getMessage() for r in caplog.records)


def test_notify_never_suppresses_dsn(tmp_path, sink):
    sink.rules = {"*": "550 5.1.1 No"}
    cfg = cfg_for(tmp_path, sink)
    from msa.message.queuefile import Envelope, utc_iso
    from spool import new_id

    async def go():
        async with RunnerHarness(cfg) as h:
            qid = new_id()
            env = Envelope(sender="alice@example.org", queue_id=qid, arrival=utc_iso(time.time()),
                           origin="smtp", size=str(len(MSG)))
            env.add_recipient("bob@x.test", notify="NEVER")
            h.spool.deposit("active", [env.to_bytes(), MSG], qid=qid)
            await h.until(h.queue_empty)
            assert h.names("incoming") == []
    run(go())


def test_delay_warning_sent_once(tmp_path, sink):
    """No warning before ``delay_warning``, one at the first attempt after
    it, none at the attempts after that."""
    sink.rules = {"*": "450 4.2.1 busy"}
    cfg = cfg_for(tmp_path, sink, retry={"delay_warning": 500.0})
    clock = support.FakeClock()

    async def go():
        async with RunnerHarness(cfg, clock=clock) as h:
            write_queue_file(h.spool, "active", "alice@example.org", ["bob@x.test"], MSG)
            warnings = []
            for attempt, wait in ((1, 400), (2, 700), (3, 1300), (4, 0)):
                await h.until(lambda: h.names(f"deferred/{attempt}"), what=f"attempt {attempt}")
                warnings.append(len(incoming_dsns(h)))
                clock.advance(wait)
                h.runner.clock_changed()
            assert warnings == [0, 0, 1, 1]  # ages 0, 400, 1100, 2400 s
            env, msg = incoming_dsns(h)[0]
            text = msg.as_string()
            assert "Action: delayed" in text and "Will-Retry-Until:" in text
            assert msg["Subject"].startswith("Delayed Mail")
    run(go())


def test_corrupt_file_is_quarantined(tmp_path, sink):
    cfg = cfg_for(tmp_path, sink)

    async def go():
        async with RunnerHarness(cfg) as h:
            h.spool.deposit("active", b"this is not a queue file\n", qid="0000000000000000000BAD")
            await h.until(lambda: h.names("corrupt"), what="quarantine")
            assert h.names("active") == []
            truncated = write_queue_file(h.spool, "hold", "a@example.org", ["b@x.test"], MSG)
            path = h.spool.path("hold", truncated)
            os.truncate(path, os.path.getsize(path) - 3)
            os.rename(path, h.spool.path("active", truncated))
            await h.until(lambda: truncated in h.names("corrupt"), what="truncated quarantine")
    run(go())
    assert sink.messages == []


def test_held_message_is_never_touched(tmp_path, sink):
    cfg = cfg_for(tmp_path, sink, retry={"lifetime": 0.5})

    async def go():
        async with RunnerHarness(cfg) as h:
            qid = write_queue_file(h.spool, "hold", "alice@example.org", ["bob@x.test"], MSG,
                                   arrival="2000-01-01T00:00:00.000000Z")
            write_queue_file(h.spool, "active", "alice@example.org", ["other@x.test"], MSG)
            await h.until(lambda: sink.messages and h.queue_empty())
            # A flush that demonstrably ran (it delivers a deferred message
            # due in a day) leaves the held one alone, although it expired.
            late = write_queue_file(h.spool, "incoming", "alice@example.org", ["late@x.test"],
                                    MSG)
            tomorrow = time.time() + 86400
            os.utime(h.spool.path("incoming", late), (tomorrow, tomorrow))
            os.makedirs(h.spool.path("deferred/1", ""), exist_ok=True)
            os.rename(h.spool.path("incoming", late), h.spool.path("deferred/1", late))
            h.runner.flush()
            await h.until(lambda: len(sink.messages) == 2 and h.queue_empty(), what="flush")
            assert h.names("hold") == [qid] and h.names("incoming") == []
    run(go())
    assert [m.rcpt_tos for m in sink.messages] == [["other@x.test"], ["late@x.test"]]


def test_backlog_at_start_five_messages_one_connection(tmp_path, sink):
    """Files already in active/ at start are delivered; with one
    connection per destination they share one connection (RSET between)."""
    cfg = cfg_for(tmp_path, sink, relay={"max_connections_per_domain": 1})
    from msa.store import open_spool
    spool = open_spool(cfg)
    for i in range(5):
        write_queue_file(spool, "active", "alice@example.org", [f"r{i}@x.test"], MSG)

    async def go():
        async with RunnerHarness(cfg) as h:
            await h.until(lambda: len(sink.messages) == 5 and h.queue_empty())
    run(go())
    assert sink.connections == 1


def test_required_tls_to_untrusted_certificate_defers(tmp_path, ca):
    from tests.relay_support import server_tls_context
    sink = Sink(tls_context=server_tls_context(ca)).start()
    try:
        cfg = cfg_for(tmp_path, sink, relay={"tls_required_domains": ["x.test"]})

        async def go():
            async with RunnerHarness(cfg) as h:
                qid = write_queue_file(h.spool, "active", "a@example.org", ["b@x.test"], MSG)
                await h.until(lambda: h.names("deferred/1"))
                env, _ = load(h.spool.path("deferred/1", qid))
                assert env.recipients[0].reply.startswith("451 4.7.5 TLS handshake")
        run(go())
        assert sink.messages == []
    finally:
        sink.stop()


def test_file_arriving_under_someone_elses_claim_is_picked_up(tmp_path, sink):
    """The watcher renames into active/ and releases its claim just after:
    the runner's claim fails at the event and must try again (long before
    the 30 s rescan)."""
    cfg = cfg_for(tmp_path, sink)

    async def go():
        async with RunnerHarness(cfg) as h:
            qid = write_queue_file(h.spool, "hold", "alice@example.org", ["bob@x.test"], MSG)
            claim = h.spool.claim("hold", qid)
            claim.move("active", release=False)
            # The runner has seen it and found it claimed (it will look again).
            await h.until(lambda: qid in h.runner._busy, what="claim refused")
            assert not sink.messages
            claim.release()
            await h.until(lambda: sink.messages and h.queue_empty(), timeout=10)
    run(go())


def test_small_and_large_files_are_relayed_intact(tmp_path, sink, monkeypatch):
    """A queue file read whole (one read, sent from memory) and one larger
    than runner.READ_WHOLE (streamed from the file) reach the server with
    the same bytes, dots and line ends included; a large file whose Size
    is wrong is quarantined like a small one."""
    from msa.delivery import runner
    monkeypatch.setattr(runner, "READ_WHOLE", 4096)
    big = MSG + b"".join(b".line %05d of a big message\r\n" % i for i in range(2000))
    cfg = cfg_for(tmp_path, sink)

    async def go():
        async with RunnerHarness(cfg) as h:
            write_queue_file(h.spool, "active", "alice@example.org", ["bob@x.test"], MSG)
            write_queue_file(h.spool, "active", "alice@example.org", ["carol@x.test"], big)
            bad = write_queue_file(h.spool, "active", "alice@example.org", ["dan@x.test"], big,
                                   size=str(len(big) - 1))
            await h.until(lambda: len(sink.messages) == 2 and h.names("corrupt") == [bad]
                          and not h.names("active"), what="two deliveries, one quarantine")
    run(go())
    got = {m.rcpt_tos[0]: m.data for m in sink.messages}
    assert got == {"bob@x.test": MSG, "carol@x.test": big}


def test_info_records_are_those_of_makerecord(caplog):
    """The copied log records of the per-message lines carry the fields a
    record made by the logger has (a formatter may use any of them)."""
    from msa.delivery import runner
    caplog.set_level(logging.INFO, logger="msa.runner")
    for i in range(3):
        runner._info(f"Q{i}: removed")
    ref = runner.log.makeRecord(runner.log.name, logging.INFO, runner.__file__, 0, "x",
                                None, None)
    records = [r for r in caplog.records if r.name == "msa.runner"]
    assert [r.getMessage() for r in records] == ["Q0: removed", "Q1: removed", "Q2: removed"]
    for r in records:
        assert type(r) is logging.LogRecord
        assert set(vars(ref)) <= set(vars(r))
        for key in ("levelname", "levelno", "pathname", "filename", "module", "thread",
                    "threadName", "process", "processName", "args", "exc_info", "name"):
            assert getattr(r, key) == getattr(ref, key), key
        assert abs(r.created - ref.created) < 60 and r.msecs == int((r.created % 1) * 1000)

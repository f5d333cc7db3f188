"""Round trips of the SMTP client (msa.delivery.relay): RFC 2920 PIPELINING when the
server offers it, and no RSET between completed transactions on a reused
connection (RFC 5321 §4.1.1.4), against aiosmtpd sinks and Postfix
smtp-sink on loopback."""

from __future__ import annotations

import asyncio

import pytest

from msa.delivery.relay import BytesMessage
from tests import support
from tests.e2e.test_relay import MSG, attempt_and_close, envelope, relay_to
from tests.relay_support import Sink, run_async, start_smtp_sink, stop_smtp_sink

MIXED = {"ok@x.test": "250 2.1.5 fine",
         "busy@x.test": "450 4.2.1 mailbox busy",
         "gone@x.test": "550 5.1.1 no such user"}


@pytest.fixture(params=[True, False], ids=["pipelining", "plain"])
def any_sink(request):
    s = Sink(pipelining=request.param).start()
    yield s
    s.stop()


def outcome(results):
    return [(r.address, r.state, r.status, r.reply) for r in results]


def test_pipelines_mail_rcpt_data_when_offered():
    s = Sink(pipelining=True).start()
    try:
        results = run_async(attempt_and_close(relay_to(s), envelope("a@x.test", "b@x.test")))
        assert [r.state for r in results] == ["sent", "sent"]
        (got,) = s.wait_messages(1)
        assert got.rcpt_tos == ["a@x.test", "b@x.test"] and got.data.endswith(b"hello\r\n")
        assert s.pipelined == [True]
        assert s.commands == ["MAIL", "RCPT", "RCPT", "DATA"]
    finally:
        s.stop()


def test_no_pipelining_when_not_offered():
    s = Sink(pipelining=False).start()
    try:
        results = run_async(attempt_and_close(relay_to(s), envelope("a@x.test", "b@x.test")))
        assert [r.state for r in results] == ["sent", "sent"]
        s.wait_messages(1)
        assert s.pipelined == [False]
    finally:
        s.stop()


def test_pipelined_mixed_replies_same_as_unpipelined():
    rcpts = ("ok@x.test", "busy@x.test", "gone@x.test", "other@x.test")
    got = {}
    for pipelining in (True, False):
        s = Sink(pipelining=pipelining, rules=MIXED).start()
        try:
            got[pipelining] = outcome(run_async(attempt_and_close(relay_to(s),
                                                                  envelope(*rcpts))))
            assert s.wait_messages(1)[0].rcpt_tos == ["ok@x.test", "other@x.test"]
            assert s.pipelined == [pipelining]
        finally:
            s.stop()
    assert got[True] == got[False]
    assert [(a, st, code) for a, st, code, _ in got[True]] == [
        ("ok@x.test", "sent", "2.0.0"), ("busy@x.test", "deferred", "4.2.1"),
        ("gone@x.test", "failed", "5.1.1"), ("other@x.test", "sent", "2.0.0")]
    assert got[True][1][3] == "450 4.2.1 mailbox busy"


def test_pipelined_no_recipient_accepted_then_rset_and_next_message(any_sink):
    """No RCPT accepted: the pipelined DATA is refused (aiosmtpd: 503) and no
    message is sent; the aborted transaction is reset before the next one,
    which goes over the same connection."""
    any_sink.rules.update(MIXED)

    async def go():
        relay = relay_to(any_sink, max_connections_per_domain=1)
        try:
            first = await relay.attempt(envelope("busy@x.test", "gone@x.test"),
                                        BytesMessage(MSG))
            second = await relay.attempt(envelope("ok@x.test"), BytesMessage(MSG))
            return first, second
        finally:
            await relay.close()
    first, second = run_async(go())
    assert [(r.state, r.reply) for r in first] == [
        ("deferred", "450 4.2.1 mailbox busy"), ("failed", "550 5.1.1 no such user")]
    assert second[0].state == "sent"
    (msg,) = any_sink.wait_messages(1)
    assert msg.rcpt_tos == ["ok@x.test"]
    assert any_sink.connections == 1
    assert any_sink.commands.count("RSET") == 1
    assert any_sink.commands.index("RSET") == any_sink.commands.index("MAIL", 1) - 1


def test_five_messages_one_connection_no_rset(any_sink):
    async def go():
        relay = relay_to(any_sink, max_connections_per_domain=1)
        try:
            return [await relay.attempt(envelope(f"r{i}@x.test"), BytesMessage(MSG))
                    for i in range(5)]
        finally:
            await relay.close()
    results = run_async(go())
    assert [r[0].state for r in results] == ["sent"] * 5
    assert [m.rcpt_tos for m in any_sink.wait_messages(5)] == [[f"r{i}@x.test"] for i in range(5)]
    assert any_sink.connections == 1
    assert "RSET" not in any_sink.commands
    assert any_sink.commands.count("MAIL") == 5


def test_reused_connection_closed_by_server_is_replaced(any_sink):
    """The second MAIL on a pooled connection gets 421 and the server hangs
    up (its idle timeout): the message goes out on a fresh connection
    instead of being deferred."""
    any_sink.drop_at_mail = 2

    async def go():
        relay = relay_to(any_sink, max_connections_per_domain=1)
        try:
            first = await relay.attempt(envelope("a@x.test"), BytesMessage(MSG))
            second = await relay.attempt(envelope("b@x.test"), BytesMessage(MSG))
            return first, second, relay.pool.opened
        finally:
            await relay.close()
    first, second, opened = run_async(go())
    assert (first[0].state, second[0].state) == ("sent", "sent")
    assert [m.rcpt_tos for m in any_sink.wait_messages(2)] == [["a@x.test"], ["b@x.test"]]
    assert opened == 2 and any_sink.connections == 2


def test_fresh_connection_421_to_mail_still_defers(any_sink):
    any_sink.drop_at_mail = 1
    results = run_async(attempt_and_close(relay_to(any_sink), envelope("a@x.test")))
    assert (results[0].state, results[0].status) == ("deferred", "4.4.2"), results[0].reply
    assert "421" in results[0].reply
    assert any_sink.connections == 1 and not any_sink.messages


def test_pipelining_against_postfix_smtp_sink(tmp_path):
    """smtp-sink offers PIPELINING; several messages with several
    recipients over one connection all arrive intact."""
    proc, port, dump = start_smtp_sink()
    try:
        s = Sink(port=port)  # only for relay_to's host and port

        async def go():
            relay = relay_to(s, max_connections_per_domain=1)
            try:
                out = []
                for i in range(3):
                    out.append(await relay.attempt(envelope(f"a{i}@x.test", f"b{i}@x.test"),
                                                   BytesMessage(MSG)))
                return out, relay.pool.opened
            finally:
                await relay.close()
        results, opened = run_async(go())
        assert [r.state for rs in results for r in rs] == ["sent"] * 6
        assert opened == 1
        from tests import support
        support.wait_for(lambda: len(list(dump.iterdir())) == 3, what="3 dumped messages")
        for f in dump.iterdir():  # smtp-sink writes LF line ends
            data = f.read_bytes()
            assert b"Subject: t\n\nhello\n" in data and data.count(b"X-Rcpt-Args:") == 2
    finally:
        stop_smtp_sink(proc, dump)


def test_pipelined_replies_split_across_reads_are_kept():
    """A server that writes the replies of a pipelined group in pieces: two
    in one segment, one cut in the middle, then the rest; every reply
    still pairs with its command."""
    from tests import support

    replies = [b"250 2.1.0 sender ok\r\n", b"250 2.1.5 first ok\r\n",
               b"550 5.1.1 second unknown\r\n", b"250 2.1.5 third ok\r\n",
               b"354 go ahead\r\n"]
    port = support.free_port()
    seen = []

    async def serve(reader, writer):
        writer.write(b"220 slow.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-slow.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        for _ in range(5):
            seen.append((await reader.readline()).split(b":")[0].split(b" ")[0].strip())
        blob = b"".join(replies)
        cut = len(replies[0] + replies[1])
        # all commands were read before any reply
        for piece in (blob[:cut], blob[cut:cut + 6], blob[cut + 6:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        while (await reader.readline()) != b".\r\n":
            pass
        writer.write(b"250 2.0.0 queued\r\n")
        await reader.readline()
        writer.write(b"221 bye\r\n")
        writer.close()

    async def go():
        server = await asyncio.start_server(serve, "127.0.0.1", port)
        try:
            relay = relay_to(Sink(port=port), command_timeout=5)
            return await attempt_and_close(relay, envelope("a@x.test", "b@x.test", "c@x.test"))
        finally:
            server.close()
    results = run_async(go())
    assert seen == [b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"]
    assert [(r.state, r.reply) for r in results] == [
        ("sent", "250 2.0.0 queued"), ("failed", "550 5.1.1 second unknown"),
        ("sent", "250 2.0.0 queued")]


def test_idle_timer_counts_from_the_last_use(any_sink):
    """The idle timer is armed once and re-armed for the time left: a
    connection used again and again stays open past one idle_timeout from
    its first use, and closes once it has been idle that long. The loop's
    clock is moved by the test (SkewedLoop), so no real time is waited."""
    async def go():
        loop = asyncio.get_running_loop()
        relay = relay_to(any_sink, idle_timeout=100.0, max_connections_per_domain=1)
        try:
            for i in range(5):  # 240 s from the first use to the last
                if i:
                    loop.advance(60.0)
                    await asyncio.sleep(0)  # the timers now due run
                await relay.attempt(envelope(f"r{i}@x.test"), BytesMessage(MSG))
            busy_opened, open_after_use = relay.pool.opened, relay.pool.open
            loop.advance(100.5)
            for _ in range(200):  # the QUIT exchange is real I/O
                if relay.pool.open == 0:
                    return busy_opened, open_after_use, True
                await asyncio.sleep(0.05)
            return busy_opened, open_after_use, False
        finally:
            await relay.close()
    # No wait_for around it: its deadline is on the same clock the test moves.
    with asyncio.Runner(loop_factory=support.SkewedLoop) as runner:
        opened, open_after_use, closed = runner.run(go())
    assert opened == 1 and any_sink.connections == 1 and open_after_use == 1
    assert closed
    assert len(any_sink.wait_messages(5)) == 5


def _silent_after(stop_at: bytes, jump: float = 0.0):
    """A server offering PIPELINING that answers everything up to the
    command starting with ``stop_at`` and then says nothing more (the
    connection stays open). With ``jump``, it moves its SkewedLoop's clock
    that far on when it goes silent: the client's wait for that reply,
    already armed, is over at once."""
    async def serve(reader, writer):
        writer.write(b"220 mute.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-mute.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        answers = {b"MAIL": b"250 2.1.0 ok\r\n", b"RCPT": b"250 2.1.5 ok\r\n",
                   b"DATA": b"354 go ahead\r\n"}
        in_data = mute = False
        while line := await reader.readline():
            if in_data:
                in_data = line != b".\r\n"
                if not in_data and stop_at == b"." and not mute and jump:
                    asyncio.get_running_loop().advance(jump)
                mute = mute or (not in_data and stop_at == b".")
                if not in_data and not mute:
                    writer.write(b"250 2.0.0 queued\r\n")
                continue
            verb = line[:4].upper()
            if verb == stop_at and not mute and jump:
                asyncio.get_running_loop().advance(jump)
            mute = mute or verb == stop_at  # from here on, never a reply
            if not mute:
                writer.write(answers.get(verb, b"250 2.0.0 ok\r\n"))
            in_data = verb == b"DATA" and not mute
        writer.close()
    return serve


@pytest.mark.parametrize("stop_at,during", [(b"MAIL", ""), (b".", "while sending message data")])
def test_reply_that_never_comes_times_out_and_defers(stop_at, during):
    """No reply to the pipelined MAIL (the command timeout), or none to
    the end of the data (the data timeout): the recipient is deferred
    with "timed out", and the relay does not hang. The server moves the
    loop's clock past the timeout when it goes silent (SkewedLoop): every
    reply it does give comes however slow the machine is."""
    port = support.free_port()

    async def go():
        server = await asyncio.start_server(_silent_after(stop_at, jump=6.0), "127.0.0.1", port)
        try:
            relay = relay_to(Sink(port=port), command_timeout=5.0, data_timeout=5.0)
            # its deadline is 20 s on: past the 6 s the server moves the clock
            return await asyncio.wait_for(attempt_and_close(relay, envelope("a@x.test")), 20)
        finally:
            server.close()
    with asyncio.Runner(loop_factory=support.SkewedLoop) as runner:
        (result,) = runner.run(go())
    assert (result.state, result.status) == ("deferred", "4.4.2"), result.reply
    assert "timed out" in result.reply and during in result.reply


REPLY_BUFFERS = [b"250 2.0.0 Ok: queued as X\r\n", b"250-a\r\n250 b\r\n", b"354 go ahead\r\n",
                 b"550 5.1.1 \xff\xfe bad\r\n", b"250\r\n", b"250 \r\n", b" 25 x\r\n", b"abc d\r\n",
                 b"250 partial", b"25", b"+25 x\r\n", b"250 ok\n", b"250 ok \t\r\n",
                 b"421-x\r\n421 y\r\n250 z\r\n", b"250 " + b"x" * 1100 + b"\r\n",
                 b"250 2.0.0 a\r\n250 b\r\n", b"", b"\r\n"]


@pytest.mark.parametrize("data", REPLY_BUFFERS)
def test_reply_parser_shortcut_is_aiosmtplib_parser(data):
    """PipeliningProtocol's shortcut for one-line replies parses what
    aiosmtplib's parser parses (replies, errors, what stays buffered)."""
    from aiosmtplib.protocol import SMTPProtocol

    from msa.delivery.relay import PipeliningProtocol
    loop = asyncio.new_event_loop()
    try:
        outcomes = []
        for proto in (PipeliningProtocol(loop=loop), SMTPProtocol(loop=loop)):
            proto._buffer = bytearray(data)
            seq = []
            for _ in range(3):
                try:
                    reply = proto._read_response_from_buffer()
                except Exception as exc:  # noqa: BLE001 - compared, not hidden
                    reply = (type(exc).__name__, str(exc))
                seq.append((reply, bytes(proto._buffer)))
            outcomes.append(seq)
    finally:
        loop.close()
    assert outcomes[0] == outcomes[1]

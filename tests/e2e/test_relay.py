"""The SMTP client (msa.delivery.relay) against real servers on loopback: aiosmtpd
sinks in threads, Postfix smtp-sink, DNS from a dnspython server."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from msa.delivery import mx
from msa.delivery.relay import BytesMessage, MxSmtpRelay, SmarthostRelay
from msa.message.queuefile import Envelope
from tests import support
from tests.relay_support import DnsServer, ScriptedServer, Sink, run_async, server_tls_context

MSG = b"From: a@example.org\r\nTo: b@x.test\r\nSubject: t\r\n\r\nhello\r\n"


def envelope(*rcpts: str, sender: str = "a@example.org", **kw) -> Envelope:
    env = Envelope(sender=sender, queue_id="Q", size=str(len(MSG)), **kw)
    for r in rcpts:
        env.add_recipient(r)
    return env


def relay_to(sink: Sink, domain: str = "x.test", **kw) -> MxSmtpRelay:
    kw.setdefault("connect_timeout", 5)
    kw.setdefault("command_timeout", 5)
    kw.setdefault("data_timeout", 5)
    kw.setdefault("idle_timeout", 5)
    return MxSmtpRelay(force_mx={domain: f"{sink.host}:{sink.port}"}, ehlo_as="msa.test", **kw)


async def attempt_and_close(relay, env, message=MSG):
    try:
        return await relay.attempt(env, BytesMessage(message))
    finally:
        await relay.close()


@pytest.fixture
def sink():
    s = Sink().start()
    yield s
    s.stop()


@pytest.fixture
def tls_sink(ca):
    s = Sink(tls_context=server_tls_context(ca)).start()
    yield s
    s.stop()


def test_delivers_and_reports_the_reply(sink):
    results = run_async(attempt_and_close(relay_to(sink), envelope("b@x.test")))
    assert [(r.address, r.state, r.status) for r in results] == [("b@x.test", "sent", "2.0.0")]
    assert results[0].reply.startswith("250 2.0.0 Ok: queued as M1")
    assert results[0].relay == f"{sink.host}[{sink.host}]:{sink.port}"
    m = sink.wait_messages(1)[0]
    assert m.mail_from == "a@example.org" and m.rcpt_tos == ["b@x.test"]
    assert m.data == MSG


def test_dot_stuffing_and_bare_lf_arrive_intact(sink):
    body = b"Subject: dots\n\n.leading dot\n..two\n.\nbare\rcr\r\nend without newline"
    run_async(attempt_and_close(relay_to(sink), envelope("b@x.test"), body))
    want = (b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nbare\r\ncr\r\n"
            b"end without newline\r\n")
    assert sink.wait_messages(1)[0].data == want


def test_per_recipient_results(sink):
    sink.rules = {"bad@x.test": "550 5.1.1 No such user", "busy@x.test": "450 4.2.1 Try later"}
    results = run_async(attempt_and_close(relay_to(sink),
                                          envelope("bad@x.test", "ok@x.test", "busy@x.test")))
    assert [(r.address, r.state, r.status) for r in results] == [
        ("bad@x.test", "failed", "5.1.1"), ("ok@x.test", "sent", "2.0.0"),
        ("busy@x.test", "deferred", "4.2.1")]
    assert results[0].reply == "550 5.1.1 No such user"
    assert [m.rcpt_tos for m in sink.wait_messages(1)] == [["ok@x.test"]]


def test_no_recipient_accepted_sends_no_data(sink):
    sink.rules = {"*": "550 5.1.1 No"}
    results = run_async(attempt_and_close(relay_to(sink), envelope("b@x.test")))
    assert results[0].state == "failed" and sink.messages == []


def test_data_rejected_temporarily(sink):
    sink.data_reply = "451 4.3.0 Queue full"
    results = run_async(attempt_and_close(relay_to(sink), envelope("b@x.test")))
    assert (results[0].state, results[0].status) == ("deferred", "4.3.0")


def test_size_too_big_is_permanent_and_nothing_sent(sink):
    sink.size_limit = 10
    results = run_async(attempt_and_close(relay_to(sink), envelope("b@x.test")))
    assert (results[0].state, results[0].status) == ("failed", "5.3.4")
    assert sink.messages == []


def test_eight_bit_and_smtputf8_parameters(sink):
    env = envelope("j\u00f6rg@x.test", body="8BITMIME")
    results = run_async(attempt_and_close(relay_to(sink), env, b"Subject: \xc3\xa9\r\n\r\n\xff\r\n"))
    assert results[0].state == "sent"
    m = sink.wait_messages(1)[0]
    assert "BODY=8BITMIME" in m.mail_options and "SMTPUTF8" in m.mail_options
    assert m.rcpt_tos == ["j\u00f6rg@x.test"]


def test_null_sender(sink):
    run_async(attempt_and_close(relay_to(sink), envelope("b@x.test", sender="")))
    assert sink.wait_messages(1)[0].mail_from == "<>"


def test_opportunistic_tls_with_untrusted_certificate(tls_sink):
    results = run_async(attempt_and_close(relay_to(tls_sink), envelope("b@x.test")))
    assert results[0].state == "sent" and results[0].tls.startswith("TLSv1")
    assert tls_sink.wait_messages(1)[0].tls


def test_required_tls_with_untrusted_certificate_defers(tls_sink):
    relay = relay_to(tls_sink, tls_required_domains=["x.test"])
    results = run_async(attempt_and_close(relay, envelope("b@x.test")))
    assert (results[0].state, results[0].status) == ("deferred", "4.7.5")
    assert tls_sink.messages == []


def test_required_tls_with_trusted_certificate(tls_sink, ca):
    relay = relay_to(tls_sink, tls_required_domains=["x.test"], cafile=str(ca.ca_pem))
    results = run_async(attempt_and_close(relay, envelope("b@x.test")))
    assert results[0].state == "sent" and results[0].tls


def test_required_tls_not_offered_defers(sink):
    relay = relay_to(sink, tls="required")
    results = run_async(attempt_and_close(relay, envelope("b@x.test")))
    assert (results[0].state, results[0].status) == ("deferred", "4.7.4")


def test_tls_none_never_starts_tls(tls_sink):
    results = run_async(attempt_and_close(relay_to(tls_sink, tls="none"), envelope("b@x.test")))
    assert results[0].state == "sent" and not results[0].tls
    assert not tls_sink.wait_messages(1)[0].tls


def test_connection_reuse_five_messages_one_connection(sink):
    async def go():
        relay = relay_to(sink, max_connections_per_domain=1)
        try:
            results = await asyncio.gather(*(relay.attempt(envelope(f"r{i}@x.test"),
                                                           BytesMessage(MSG)) for i in range(5)))
            return results, relay.pool.opened
        finally:
            await relay.close()
    results, opened = run_async(go())
    assert all(r[0].state == "sent" for r in results)
    assert len(sink.wait_messages(5)) == 5
    assert opened == 1 and sink.connections == 1
    assert {m.connection for m in sink.messages} == {1}


def test_max_messages_per_connection(sink):
    async def go():
        relay = relay_to(sink, max_connections_per_domain=1, max_messages_per_connection=2)
        try:
            for i in range(5):
                await relay.attempt(envelope(f"r{i}@x.test"), BytesMessage(MSG))
        finally:
            await relay.close()
    run_async(go())
    sink.wait_messages(5)
    assert sink.connections == 3


def test_idle_connection_is_closed_after_idle_timeout(sink):
    async def go():
        relay = relay_to(sink, idle_timeout=0.3)
        await relay.attempt(envelope("b@x.test"), BytesMessage(MSG))
        assert relay.pool.open == 1
        for _ in range(100):
            if relay.pool.open == 0:
                return True
            await asyncio.sleep(0.05)
        return False
    assert run_async(go())


def test_total_connection_limit_evicts_idle(sink):
    other = Sink().start()
    try:
        async def go():
            relay = MxSmtpRelay(force_mx={"x.test": f"127.0.0.1:{sink.port}",
                                          "y.test": f"127.0.0.1:{other.port}"},
                                max_connections=1, connect_timeout=5, command_timeout=5)
            try:
                await relay.attempt(envelope("b@x.test"), BytesMessage(MSG))
                await relay.attempt(envelope("b@y.test"), BytesMessage(MSG))
                sequential = relay.pool.open
                results = await asyncio.gather(*(
                    relay.attempt(envelope(f"c{i}@{d}.test"), BytesMessage(MSG))
                    for i in range(3) for d in "xy"))
                return sequential, relay.pool.peak, [r[0].state for r in results]
            finally:
                await relay.close()
        sequential, peak, states = run_async(go())
        assert sequential == 1 and peak == 1 and states == ["sent"] * 6
        assert len(sink.wait_messages(4)) == 4 and len(other.wait_messages(4)) == 4
    finally:
        other.stop()


ZONE = """
$TTL 60
@            IN SOA ns.test. root.test. 1 60 60 60 60
two          IN MX 10 mx1.two
two          IN MX 20 mx2.two
mx1.two      IN A 127.0.0.2
mx2.two      IN A 127.0.0.3
nullmx       IN MX 0 .
"""


@pytest.fixture
def dnsserver():
    server = DnsServer(ZONE)
    yield server
    server.stop()


def mx_relay(dnsserver, port, **kw):
    return MxSmtpRelay(port=port, connect_timeout=2, command_timeout=5, data_timeout=5,
                       resolver=mx.MxResolver([dnsserver.address], timeout=2), **kw)


def test_first_mx_refuses_second_gets_it(dnsserver):
    port = support.free_port("127.0.0.3")
    sink = Sink(host="127.0.0.3", port=port).start()  # nothing on 127.0.0.2:port
    try:
        results = run_async(attempt_and_close(mx_relay(dnsserver, port), envelope("b@two.test")))
        assert results[0].state == "sent" and results[0].host == "mx2.two.test"
        assert sink.wait_messages(1)[0].rcpt_tos == ["b@two.test"]
    finally:
        sink.stop()


def test_first_mx_greets_4xx_second_gets_it(dnsserver):
    port = support.free_port("127.0.0.3")
    bad = ScriptedServer("127.0.0.2", port, b"421 4.3.2 busy, go away\r\n")
    sink = Sink(host="127.0.0.3", port=port).start()
    try:
        results = run_async(attempt_and_close(mx_relay(dnsserver, port), envelope("b@two.test")))
        assert results[0].state == "sent" and bad.connections == 1
    finally:
        sink.stop()
        bad.stop()


def test_all_mx_down_defers_with_the_reason(dnsserver):
    port = support.free_port("127.0.0.3")
    results = run_async(attempt_and_close(mx_relay(dnsserver, port), envelope("b@two.test")))
    assert results[0].state == "deferred" and results[0].status == "4.4.1"
    assert "Connection refused" in results[0].reply


def test_greeting_timeout_defers(dnsserver):
    port = support.free_port("127.0.0.2")
    hung = [ScriptedServer(h, port, hang=True) for h in ("127.0.0.2", "127.0.0.3")]
    try:
        relay = mx_relay(dnsserver, port)
        relay.connect_timeout = 0.5
        results = run_async(attempt_and_close(relay, envelope("b@two.test")))
        assert results[0].state == "deferred" and "timed out" in results[0].reply
    finally:
        for h in hung:
            h.stop()


def test_null_mx_fails_permanently(dnsserver):
    results = run_async(attempt_and_close(mx_relay(dnsserver, 25), envelope("b@nullmx.test")))
    assert (results[0].state, results[0].status) == ("failed", "5.1.10")
    assert results[0].reply.startswith("556 5.1.10")


def test_nxdomain_fails_and_servfail_defers(dnsserver):
    dnsserver.servfail.add("sf.test")
    env = envelope("b@nx.test", "c@sf.test")
    results = run_async(attempt_and_close(mx_relay(dnsserver, 25), env))
    assert [(r.state, r.status) for r in results] == [("failed", "5.1.2"), ("deferred", "4.4.3")]


def test_smarthost_with_auth_and_required_tls(ca):
    from aiosmtpd.smtp import AuthResult

    seen = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        seen.append((auth_data.login, auth_data.password))
        ok = auth_data.login == b"relayuser" and auth_data.password == b"pw"
        return AuthResult(success=ok, handled=False)

    sink = Sink(tls_context=server_tls_context(ca)).start()
    ctl_factory = sink.controller.factory

    def factory():
        server = ctl_factory()
        server._authenticator = authenticator
        server._auth_require_tls = True
        server._auth_required = True
        return server
    sink.controller.factory = factory
    try:
        relay = SmarthostRelay(f"localhost:{sink.port}", auth=("relayuser", "pw"),
                               cafile=str(ca.ca_pem), connect_timeout=5, command_timeout=5)
        results = run_async(attempt_and_close(relay, envelope("b@anywhere.test", "c@else.test")))
        assert [r.state for r in results] == ["sent", "sent"]
        assert seen == [(b"relayuser", b"pw")], seen
        assert sink.wait_messages(1)[0].tls
        bad = SmarthostRelay(f"localhost:{sink.port}", auth=("relayuser", "wrong"),
                             cafile=str(ca.ca_pem), connect_timeout=5, command_timeout=5)
        results = run_async(attempt_and_close(bad, envelope("b@anywhere.test")))
        assert (results[0].state, results[0].status) == ("deferred", "4.7.8")
    finally:
        sink.stop()


def test_smarthost_dns_failure_defers_never_bounces(dnsserver):
    relay = SmarthostRelay("nosuchhost.test:25", tls="none", connect_timeout=2,
                           resolver=mx.MxResolver([dnsserver.address], timeout=2))
    results = run_async(attempt_and_close(relay, envelope("b@example.com")))
    assert (results[0].state, results[0].status) == ("deferred", "4.4.3")


def test_large_message_is_streamed_not_loaded(tmp_path):
    """30 MB through Postfix smtp-sink with Python allocations staying small."""
    import tracemalloc

    from tests.relay_support import start_smtp_sink, stop_smtp_sink

    proc, port, dump = start_smtp_sink()
    path = tmp_path / "big"
    line = b"x" * 76 + b"\n"  # bare LF: converted on the fly
    with open(path, "wb") as f:
        f.write(b"Subject: big\n\n")
        for _ in range(30 * 1024 * 1024 // len(line)):
            f.write(line)
    size = path.stat().st_size
    try:
        relay = MxSmtpRelay(force_mx={"x.test": f"127.0.0.1:{port}"}, connect_timeout=5,
                            command_timeout=10, data_timeout=30)
        with open(path, "rb") as f:
            tracemalloc.start()
            results = run_async(_attempt_file(relay, f, size))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert results[0].state == "sent", results[0].reply
        assert peak < 8 * 1024 * 1024, peak
        dumped = list(dump.iterdir())
        assert len(dumped) == 1
        # smtp-sink's dump adds its own headers and stores lines with LF.
        with open(dumped[0], "rb") as f:
            data = f.read()
        assert data.count(b"x" * 76 + b"\n") == 30 * 1024 * 1024 // len(line)
    finally:
        stop_smtp_sink(proc, dump)


async def _attempt_file(relay, f, size):
    from msa.delivery.relay import FileMessage
    try:
        return await relay.attempt(envelope("b@x.test"), FileMessage(f, 0, size))
    finally:
        await relay.close()


def test_opportunistic_tls_that_cannot_be_negotiated_falls_back_to_plain(ca):
    ctx = server_tls_context(ca)
    ctx.set_ciphers("NULL")            # nothing a client will agree to
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    sink = Sink(tls_context=ctx).start()
    try:
        results = run_async(attempt_and_close(relay_to(sink), envelope("b@x.test")))
        assert results[0].state == "sent" and not results[0].tls
        assert sink.wait_messages(1)[0].tls is False and sink.connections == 2
        strict = relay_to(sink, tls="required", cafile=str(ca.ca_pem))
        results = run_async(attempt_and_close(strict, envelope("b@x.test")))
        assert (results[0].state, results[0].status) == ("deferred", "4.7.5")
    finally:
        sink.stop()


def test_relay_from_config(tmp_path):
    from msa import config
    from msa.delivery.relay import relay_from_config
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    cfg = config.from_dict({"server": {"hostname": "msa.test"}, "relay": {
        "smarthost": "smart.example:587", "smarthost_user": "u",
        "smarthost_password_file": str(pw), "command_timeout": 3.0}})
    relay = relay_from_config(cfg)
    assert isinstance(relay, SmarthostRelay)
    dest = relay.destination("anything.test")
    assert (dest.tls, dest.auth, dest.hosts[0].name, dest.hosts[0].port) == (
        "required", ("u", "s3cret"), "smart.example", 587)
    assert relay.ehlo_as == "msa.test" and relay.command_timeout == 3.0
    cfg = config.from_dict({"relay": {"force_mx": {"X.test": "127.0.0.1:2525"}, "port": 26,
                                      "tls_required_domains": ["secure.test"]}})
    relay = relay_from_config(cfg)
    assert isinstance(relay, MxSmtpRelay) and relay.port == 26
    forced = relay.destination("x.test")
    assert [(h.name, h.port, h.configured) for h in forced.hosts] == [("127.0.0.1", 2525, True)]
    assert relay.destination("secure.test").tls == "required"
    assert relay.destination("other.test").tls == "opportunistic"
    assert relay.destination("other.test").hosts is None

"""End to end delivery with real programs: dnsmasq answering MX queries,
aiosmtpd and Postfix smtp-sink playing the MX hosts, the runner as its own
process (``bin/msa deliver``) and the whole daemon fed by ``bin/sendmail``
and by SMTP submission."""

from __future__ import annotations

import email
import email.policy
import signal
import socket
import time

import pytest

from msa.message.queuefile import load
from msa.store import open_spool
from tests import support
from tests.daemon_support import add_user, smtp_login, start_daemon
from tests.relay_support import (
    Sink,
    load_config,
    relay_config,
    start_dnsmasq,
    start_smtp_sink,
    stop_smtp_sink,
    write_queue_file,
)


def shared_port(hosts: list[str]) -> int:
    """A port free on every one of ``hosts``."""
    for _ in range(50):
        port = support.free_port(hosts[0])
        socks = []
        try:
            for h in hosts:
                s = socket.socket()
                socks.append(s)
                s.bind((h, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no common free port")


def spool_files(spool) -> list[tuple[str, str]]:
    return [(st, n) for st in ["active", *spool.deferred_stages()] for n in spool.names(st)]


def dsn_messages(spool):
    out = []
    for name in spool.names("incoming"):
        env, offset = load(spool.path("incoming", name))
        data = spool.path("incoming", name).read_bytes()[offset:]
        out.append((env, email.message_from_bytes(data, policy=email.policy.default)))
    return out


MSG = (b"From: alice@example.org\r\nTo: many@example.test\r\nMessage-ID: <e2e@example.org>\r\n"
       b"Subject: e2e\r\n\r\nHello over MX.\r\n")


def test_mx_routing_end_to_end_with_dnsmasq(tmp_path):
    """One message to five domains: MX, second MX after the first refuses,
    implicit MX, null MX and NXDOMAIN; one runner process."""
    hosts = ["127.0.0.2", "127.0.0.5", "127.0.0.6"]
    port = shared_port(hosts + ["127.0.0.4"])
    dns, dns_port = start_dnsmasq(tmp_path, [
        "--mx-host=example.test,mx1.example.test,10", "--host-record=mx1.example.test,127.0.0.2",
        "--mx-host=two.test,mx1.two.test,10", "--mx-host=two.test,mx2.two.test,20",
        "--host-record=mx1.two.test,127.0.0.4", "--host-record=mx2.two.test,127.0.0.5",
        "--host-record=amx.test,127.0.0.6", "--mx-host=nullmx.test,.,0"])
    sinks = {h: Sink(host=h, port=port).start() for h in hosts}
    cfg_path = relay_config(tmp_path, relay={"resolver": [f"127.0.0.1:{dns_port}"], "port": port})
    spool = open_spool(load_config(cfg_path))
    qid = write_queue_file(spool, "active", "alice@example.org",
                           ["a@example.test", "b@two.test", "c@amx.test", "d@nullmx.test",
                            "e@nx.test"], MSG)
    runner = start_daemon(cfg_path, "deliver")
    try:
        support.wait_for(lambda: not spool_files(spool) and list(spool.names("incoming")),
                         timeout=30, what="delivery and bounce")
    finally:
        out = runner.output()
        dns.stop()
        for s in sinks.values():
            s.stop()
    assert [m.rcpt_tos for m in sinks["127.0.0.2"].messages] == [["a@example.test"]]
    assert [m.rcpt_tos for m in sinks["127.0.0.5"].messages] == [["b@two.test"]]
    assert [m.rcpt_tos for m in sinks["127.0.0.6"].messages] == [["c@amx.test"]]
    assert all(s.messages[0].data == MSG for s in sinks.values())
    (env, dsn), = dsn_messages(spool)
    assert env.sender == "" and env.bounce_of == qid
    text = dsn.as_string()
    assert "Final-Recipient: rfc822; d@nullmx.test" in text and "Status: 5.1.10" in text
    assert "Final-Recipient: rfc822; e@nx.test" in text and "Status: 5.1.2" in text
    assert "a@example.test" not in text.split("message/delivery-status")[1].split("--")[0]
    assert f"{qid}: to=<b@two.test>, relay=mx2.two.test[127.0.0.5]:{port}" in out
    assert f"{qid}: removed" in out


def test_mx_on_port_25(tmp_path):
    """The default port, a sink on 127.0.0.7:25 (we run as root)."""
    try:
        sink = Sink(host="127.0.0.7", port=25).start()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"cannot bind 127.0.0.7:25: {exc}")
    dns, dns_port = start_dnsmasq(tmp_path, ["--mx-host=p25.test,mx.p25.test,5",
                                             "--host-record=mx.p25.test,127.0.0.7"])
    try:
        cfg_path = relay_config(tmp_path, relay={"resolver": [f"127.0.0.1:{dns_port}"]})
        cfg = load_config(cfg_path)
        assert cfg.relay.port == 25
        spool = open_spool(cfg)
        write_queue_file(spool, "active", "alice@example.org", ["x@p25.test"], MSG)
        runner = start_daemon(cfg_path, "deliver")
        try:
            sink.wait_messages(1)
            support.wait_for(lambda: not spool_files(spool), what="removal")
        finally:
            runner.stop()
    finally:
        dns.stop()
        sink.stop()


def test_kill_9_during_delivery_loses_nothing(tmp_path):
    """kill -9 of the runner while it delivers: every message is either at
    the sink or still in the spool; after a restart all arrive (some
    perhaps twice, RFC 5321 §6.1), none is lost."""
    sink = Sink(data_delay=0.15).start()
    cfg_path = relay_config(tmp_path, relay={"force_mx": {"x.test": f"127.0.0.1:{sink.port}"},
                                             "max_deliveries": 4})
    spool = open_spool(load_config(cfg_path))
    n = 30
    for i in range(n):
        write_queue_file(spool, "active", "alice@example.org", [f"r{i}@x.test"],
                         f"Subject: {i}\r\nX-Seq: {i}\r\n\r\nbody {i}\r\n".encode())
    runner = start_daemon(cfg_path, "deliver")
    try:
        support.wait_for(lambda: len(sink.messages) >= 6, timeout=30, what="some deliveries")
        runner.stop(sig=signal.SIGKILL)
        assert runner.p.returncode == -signal.SIGKILL
        # No wait for the sink: it records a message before it answers 250,
        # and the runner removes a file only after that 250, so a message
        # not yet at the sink is still in the spool.
        delivered = {m.rcpt_tos[0] for m in sink.messages}
        queued = set()
        for stage, name in spool_files(spool):
            queued.update(r.address for r in load(spool.path(stage, name))[0].pending())
        everyone = {f"r{i}@x.test" for i in range(n)}
        assert delivered | queued == everyone, everyone - (delivered | queued)
        assert delivered and queued

        runner = start_daemon(cfg_path, "deliver")
        support.wait_for(lambda: not spool_files(spool), timeout=60, what="the rest")
        assert {m.rcpt_tos[0] for m in sink.messages} == everyone
        assert len(sink.messages) <= n + 4  # at most the in-flight ones twice
    finally:
        runner.stop()
        sink.stop()


def test_sendmail_and_smtp_through_the_daemon(tmp_path, ca):
    """The whole path: bin/sendmail → maildrop/ and SMTP submission →
    incoming/, policy stages, active/, delivery; a 5xx recipient's DSN goes
    back through the same path to the sender."""
    sink = Sink(rules={"nobody@example.test": "550 5.1.1 <nobody@example.test>: unknown"}).start()
    sub = support.free_port()
    mx = f"127.0.0.1:{sink.port}"
    extra = (f'[edge]\nsubmission = ["127.0.0.1:{sub}"]\nsubmissions = []\nclient_dns = false\n'
             f'certfile = "{ca.cert_pem}"\nkeyfile = "{ca.key_pem}"\n\n')
    cfg_path = relay_config(tmp_path, relay={"force_mx": {"example.test": mx, "example.org": mx}})
    text = cfg_path.read_text()
    # write_config put an [edge] without listeners: replace it with ours.
    start = text.index("[edge]")
    end = text.index("[auth]")
    cfg_path.write_text(text[:start] + extra + text[end:])
    add_user(tmp_path / "passwd", "alice", "secret", ["alice@example.org"])
    daemon = start_daemon(cfg_path, "daemon")
    try:
        support.wait_port(sub)
        r = support.run_sendmail(["-f", "alice@example.org", "bob@example.test"],
                                 b"Subject: via sendmail\n\nbody one\n.dot line\n", cfg_path)
        assert r.returncode == 0, r.stderr
        s = smtp_login(sub, ca, "alice", "secret")
        s.sendmail("alice@example.org", ["carol@example.test", "nobody@example.test"],
                   b"From: alice@example.org\r\nTo: carol@example.test\r\n"
                   b"Subject: via smtp\r\n\r\nbody two\r\n")
        s.quit()
        spool = open_spool(load_config(cfg_path))
        try:
            got = sink.wait_messages(3, timeout=40)
            support.wait_for(lambda: not spool_files(spool) and not list(spool.names("incoming")),
                             timeout=30, what="empty queue")
        except TimeoutError:
            raise AssertionError(f"{sink.messages}\n{daemon.output()}") from None
    finally:
        out = daemon.output()
        sink.stop()
    by_rcpt = {tuple(m.rcpt_tos): m for m in got}
    one = by_rcpt[("bob@example.test",)]
    assert b"\r\n..dot line\r\n" not in one.data and b"\r\n.dot line\r\n" in one.data
    headers = email.message_from_bytes(one.data, policy=email.policy.default)
    assert headers["Subject"] == "via sendmail"
    for name in ("Received", "Message-ID", "Date"):
        assert headers[name], (name, one.data[:500], out)
    two = by_rcpt[("carol@example.test",)]
    assert email.message_from_bytes(two.data)["Received"]
    bounce = by_rcpt[("alice@example.org",)]
    assert bounce.mail_from == "<>"
    assert b"550 5.1.1 <nobody@example.test>: unknown" in bounce.data
    assert b"report-type=delivery-status" in bounce.data


def test_smtp_sink_as_mx_defers_on_4xx_and_delivers_on_recovery(tmp_path):
    """Postfix smtp-sink answering 450 to RCPT (-r RCPT): the message goes
    to deferred/1 with a future mtime; a new sink that accepts gets it
    after flush, via the runner process and the control socket."""
    import os
    port = support.free_port()
    proc, port, dump = start_smtp_sink(port=port, options=["-r", "RCPT"])
    cfg_path = relay_config(tmp_path, relay={"force_mx": {"x.test": f"127.0.0.1:{port}"}})
    spool = open_spool(load_config(cfg_path))
    qid = write_queue_file(spool, "active", "alice@example.org", ["b@x.test"], MSG)
    runner = start_daemon(cfg_path, "deliver")
    try:
        support.wait_for(lambda: list(spool.names("deferred/1")), what="deferral")
        path = spool.path("deferred/1", qid)
        assert os.stat(path).st_mtime > time.time() + 60
        env = load(path)[0]
        assert env.recipients[0].state == "deferred" and env.recipients[0].reply.startswith("450")
        stop_smtp_sink(proc, dump)
        proc, port2, dump = start_smtp_sink(port=port)
        r = support.run_sendmail(["-q"], b"", cfg_path)
        assert r.returncode == 0, r.stderr
        support.wait_for(lambda: not spool_files(spool), timeout=30, what="delivery after -q")
        assert len(list(dump.iterdir())) == 1
    finally:
        runner.stop()
        stop_smtp_sink(proc, dump)

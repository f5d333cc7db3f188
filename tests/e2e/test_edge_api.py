"""The edge from Python as the tutorial writes it (Auth subclass,
SmtpValidators subclass, tls dict, tls_immediately), reload and stop."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

import pytest

from msa.config import ConfigError
from msa.submission.auth import Auth, CredentialsInvalidError
from msa.submission.edge import SmtpEdge, edges_from_config, parse_listen
from msa.submission.validators import Reply, SmtpValidators, enhance
from spool import Spool
from tests import support
from tests.edge_support import Edges, EdgeThread, RawClient, add_user, read_queued, send_message

MSG = b"From: testuser@example.org\r\nSubject: t\r\n\r\nhi\r\n"


class MyAuth(Auth):
    def verify_secret(self, username, password, identity=None):
        if username != "testuser" or password != "testpassword":
            raise CredentialsInvalidError()
        return "testuser"

    def get_secret(self, username, identity=None):
        if username == "testuser":
            return "testpassword", "testuser"
        raise CredentialsInvalidError()


class MyValidators(SmtpValidators):
    seen: list = []

    def handle_banner(self, reply, address):
        reply.message = "msa.test welcome " + address[0]

    def handle_ehlo(self, reply, name):
        if name == "bad.test":
            reply.code = "550"
            reply.message = "5.7.1 go away"

    def handle_mail(self, reply, sender):          # the tutorial's two arguments
        if not self.session.auth_result:
            reply.code = "550"
            reply.message = "5.7.1 <{0}> Not authenticated"

    async def handle_rcpt(self, reply, recipient, params):
        if recipient.startswith("blocked@"):
            reply.code = "550"
            reply.message = "5.7.1 <{0}> blocked"
        self.seen.append((recipient, params, self.session.tls, self.session.helo))

    def handle_have_data(self, reply, envelope):
        if envelope.size == "0":
            reply.code = "554"
            reply.message = "5.6.0 empty"

    def handle_queued(self, reply, qid):
        reply.message = "2.0.0 Ok: queued as {0}, thanks"


@pytest.fixture
def tutorial(tmp_path, ca):
    spool = Spool(tmp_path / "spool", ["incoming"])
    tls_args = {"keyfile": str(ca.key_pem), "certfile": str(ca.cert_pem)}
    port, tls_port = support.free_port(), support.free_port()
    t = EdgeThread()
    senders = {"testuser": ["@example.org"]}
    t.start(lambda: [
        SmtpEdge(("127.0.0.1", port), spool, tls=tls_args, validator_class=MyValidators,
                 auth_class=MyAuth, hostname="msa.test", senders=senders, require_auth=False),
        SmtpEdge(("127.0.0.1", tls_port), spool, tls=tls_args, tls_immediately=True,
                 validator_class=MyValidators, auth_class=MyAuth, hostname="msa.test",
                 senders=senders)])
    yield spool, port, tls_port
    t.stop()


def test_tutorial_edge_with_validators(tutorial, ca):
    spool, port, tls_port = tutorial
    c = RawClient(port, ca=ca)
    assert c.banner == "220 msa.test welcome 127.0.0.1"
    assert c.cmd("EHLO bad.test") == "550 5.7.1 go away"
    c.cmd("EHLO good.test")
    c.starttls()
    c.cmd("EHLO good.test")
    # require_auth=False: here the tutorial's validator is what refuses.
    assert c.cmd("MAIL FROM:<x@example.org>") == "550 5.7.1 <x@example.org> Not authenticated"
    assert c.login("testuser", "wrong").startswith("535 5.7.8")
    assert c.login("testuser", "testpassword").startswith("235")
    assert c.cmd("MAIL FROM:<x@example.net>").startswith("553 5.7.1")   # not owned
    assert c.cmd("MAIL FROM:<x@example.org>").startswith("250")
    assert c.cmd("RCPT TO:<blocked@example.test>") == "550 5.7.1 <blocked@example.test> blocked"
    assert c.cmd("RCPT TO:<ok@example.test> NOTIFY=NEVER").startswith("250")
    assert c.cmd("DATA").startswith("354")
    c.send(b".\r\n")                                   # empty: handle_have_data refuses
    assert c.reply() == "554 5.6.0 empty"
    r = send_message(c, "x@example.org", ["ok@example.test"], MSG)
    assert r.startswith("250 2.0.0 Ok: queued as ") and r.endswith(", thanks"), r
    qid = r.split()[-2].rstrip(",")
    env, body = read_queued(spool.root / "incoming" / qid)
    assert body == MSG and env.auth_user == "testuser"
    rcpt, params, tls, helo = MyValidators.seen[-1]
    assert rcpt == "ok@example.test" and tls.startswith("TLSv1.") and helo == "good.test"
    assert ("ok@example.test", {"NOTIFY": "NEVER"}) in [s[:2] for s in MyValidators.seen]
    # Implicit TLS with AUTH required (the default): AUTH is offered (the
    # aiosmtpd gotcha) and MAIL before it is 530.
    d = RawClient(tls_port, ca=ca, implicit=True)
    assert "AUTH PLAIN LOGIN" in d.cmd("EHLO good.test")
    assert d.cmd("MAIL FROM:<x@example.org>").startswith("530 5.7.0")
    assert d.login("testuser", "testpassword").startswith("235")
    assert send_message(d, "x@example.org", ["ok@example.test"], MSG).startswith("250")


def test_reply_object():
    r = Reply("250", "2.1.0 Sender ok")
    assert r.enhanced_status_code == "2.1.0" and str(r) == "250 2.1.0 Sender ok"
    r.code = "550"
    assert str(r) == "550 5.1.0 Sender ok"
    r.message = "5.7.1 <{0}> Not authenticated"
    assert r.line("a@b") == "550 5.7.1 <a@b> Not authenticated"
    assert str(Reply("451", "try later")) == "451 4.3.0 try later"
    assert str(Reply("354", "go ahead")) == "354 go ahead"
    assert enhance("250 OK") == "250 2.0.0 OK"
    assert enhance("503 Error: need MAIL") == "503 5.5.1 need MAIL"
    assert enhance("535 5.7.8 bad") == "535 5.7.8 bad"
    assert enhance("250-SIZE 10") == "250-SIZE 10"


def test_parse_listen():
    assert parse_listen("127.0.0.1:587") == ("127.0.0.1", 587)
    assert parse_listen("[::1]:465") == ("::1", 465)
    assert parse_listen("*:587") == ("", 587) == parse_listen(":587")
    for bad in ("::1:587", "localhost", "1.2.3.4:99999"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


def test_config_needs_certificate(tmp_path):
    from msa import config
    cfg = config.from_dict({"spool": {"root": str(tmp_path / "s")},
                            "edge": {"submission": ["127.0.0.1:0"], "submissions": []}})
    with pytest.raises(ConfigError):
        edges_from_config(cfg, Spool(tmp_path / "s", ["incoming"]))
    cfg.edge.submission = []
    assert edges_from_config(cfg, Spool(tmp_path / "s", ["incoming"])) == []


def wrong_ca_fails(port: int, ca) -> bool:
    try:
        RawClient(port, ca=ca, implicit=True).close()
    except ssl.SSLCertVerificationError:
        return True
    return False


def test_reload_certificate_password_and_limits(tmp_path, ca):
    e = Edges(tmp_path, ca)
    try:
        old = e.session("alice", implicit=True)
        assert old.cmd("MAIL FROM:<alice@example.org>").startswith("250")
        (tmp_path / "ca2").mkdir()
        ca2 = support.make_ca(tmp_path / "ca2")
        text = e.config_path.read_text().replace(str(ca.cert_pem), str(ca2.cert_pem))
        text = text.replace(str(ca.key_pem), str(ca2.key_pem))
        e.config_path.write_text(text.replace("[edge]\n", "[edge]\nmax_recipients = 1\n"))
        from msa import config
        cfg2 = config.load(str(e.config_path))

        async def reload(cfg):
            for edge in e.edges:
                edge.reload(cfg)
        e.thread.call(reload(cfg2))
        # New connections: new certificate, new limit.
        assert wrong_ca_fails(e.tls_port, ca)
        new = RawClient(e.tls_port, ca=ca2, implicit=True)
        new.cmd("EHLO client.test")
        assert new.login("alice", "alice-pw").startswith("235")
        assert new.cmd("MAIL FROM:<alice@example.org>").startswith("250")
        assert new.cmd("RCPT TO:<a@example.test>").startswith("250")
        assert new.cmd("RCPT TO:<b@example.test>").startswith("452 4.5.3")
        # The session from before keeps its certificate and its limits.
        assert old.cmd("RCPT TO:<a@example.test>").startswith("250")
        assert old.cmd("RCPT TO:<b@example.test>").startswith("250")
        assert old.cmd("DATA").startswith("354")
        old.send(b"From: alice@example.org\r\n\r\nx\r\n.\r\n")
        assert old.reply().startswith("250")
        # The password file is reread when it changes, no reload needed.
        add_user(e.passwd, "carol", "carol-pw")
        c = RawClient(e.tls_port, ca=ca2, implicit=True)
        c.cmd("EHLO client.test")
        assert c.login("carol", "carol-pw").startswith("235")
        # A bad certificate changes nothing.
        (tmp_path / "bad.pem").write_text("not a certificate")
        cfg2.edge.certfile = str(tmp_path / "bad.pem")
        with pytest.raises(ConfigError):
            e.thread.call(reload(cfg2))
        RawClient(e.tls_port, ca=ca2, implicit=True).close()
    finally:
        e.stop()


def test_stop_finishes_transactions_and_closes_idle(tmp_path, ca):
    e = Edges(tmp_path, ca)
    idle = e.session("alice")
    busy = e.session("alice", implicit=True)
    assert busy.cmd("MAIL FROM:<alice@example.org>").startswith("250")
    assert busy.cmd("RCPT TO:<b@example.test>").startswith("250")
    stopper = threading.Thread(target=e.thread.call, args=(e.edges[0].stop(10),))
    stopper2 = threading.Thread(target=e.thread.call, args=(e.edges[1].stop(10),))
    stopper.start()
    stopper2.start()
    assert idle.closed(timeout=10)
    assert idle.buf.startswith(b"421 4.3.2")
    support.wait_for(lambda: _refused(e.tls_port), timeout=10, what="listener closed")
    assert busy.cmd("DATA").startswith("354")
    busy.send(b"From: alice@example.org\r\n\r\nlast one\r\n.\r\n")
    assert busy.reply().startswith("250 2.0.0 Ok: queued as")
    assert busy.reply().startswith("421 4.3.2")
    stopper.join(20)
    stopper2.join(20)
    assert not stopper.is_alive() and not stopper2.is_alive()
    assert len(e.queued()) == 1
    e.thread.edges = []
    e.stop()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_max_connections(tmp_path, ca):
    e = Edges(tmp_path, ca, "max_connections = 2\n")
    try:
        a, b = e.client(), e.client()
        c = RawClient(e.port)
        assert c.banner.startswith("421 4.7.0")
        a.close()
        support.wait_for(lambda: RawClient(e.port).banner.startswith("220"), timeout=10,
                         what="a free slot")
        assert b.cmd("NOOP") == "250 2.0.0 OK"
    finally:
        e.stop()


def test_async_auth_backend(tmp_path, ca):
    class AsyncAuth(Auth):
        async def verify_secret(self, username, password, identity=None):
            await asyncio.sleep(0)
            if password != "pw":
                raise CredentialsInvalidError()
            return username

    spool = Spool(tmp_path / "spool", ["incoming"])
    port = support.free_port()
    t = EdgeThread()
    t.start(lambda: SmtpEdge(("127.0.0.1", port), spool, tls=ssl_ctx(ca), tls_immediately=True,
                             auth_class=AsyncAuth, hostname="msa.test", auth_failure_delay=0.05))
    try:
        c = RawClient(port, ca=ca, implicit=True)
        c.cmd("EHLO x.test")
        assert c.login("someone@example.org", "bad").startswith("535")
        assert c.login("someone@example.org", "pw").startswith("235")
        # Login names that are addresses may send as themselves.
        assert c.cmd("MAIL FROM:<someone@example.org>").startswith("250")
    finally:
        t.stop()


def ssl_ctx(ca) -> ssl.SSLContext:
    from msa.submission.tls import server_context
    return server_context(str(ca.cert_pem), str(ca.key_pem))

"""``[edge] trusted_networks`` (MAIL without AUTH from listed networks),
the listen backlog (a burst of connects is greeted), and the tutorial's
``auth_class=MyAuth`` (a class) with its user sending without extra
arguments."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from pathlib import Path

import pytest

from msa.config import ConfigError
from msa.submission.auth import Auth, CredentialsInvalidError, TrustedNetworks
from msa.submission.edge import SmtpEdge, edges_from_config, listen_backlog
from spool import Spool
from tests import support
from tests.edge_support import Edges, EdgeThread, RawClient, read_queued, send_message

MSG = b"From: someone@elsewhere.test\r\nSubject: t\r\n\r\nhi\r\n"


def test_trusted_networks_contains():
    t = TrustedNetworks(["127.0.0.0/8", "::1/128"])
    assert t.contains("127.0.0.1") and t.contains("127.9.9.9") and t.contains("::1")
    assert t.contains("::ffff:127.0.0.1")          # IPv4-mapped is its IPv4 address
    assert not t.contains("10.0.0.1") and not t.contains("::2") and not t.contains("")
    assert not t.contains("not an address")
    assert TrustedNetworks(["192.0.2.7"]).contains("192.0.2.7")
    assert not TrustedNetworks() and TrustedNetworks(["10.0.0.0/8"])
    for bad in ("10.0.0.1/8", "example.org", "10.0.0.0/33"):   # host bits set: a typo
        with pytest.raises(ValueError):
            TrustedNetworks([bad])


def _plain_mail(e: Edges, sender: str = "someone@elsewhere.test") -> tuple[RawClient, str]:
    c = e.client()
    ehlo = c.cmd("EHLO client.test")
    assert "STARTTLS" in ehlo            # TLS still offered to trusted clients
    return c, c.cmd(f"MAIL FROM:<{sender}>")


def test_trusted_client_sends_without_auth(tmp_path, ca):
    e = Edges(tmp_path, ca, 'trusted_networks = ["127.0.0.0/8"]\n')
    try:
        c, r = _plain_mail(e)
        assert r.startswith("250"), r
        assert c.cmd("RCPT TO:<rcpt@example.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.send(MSG + b".\r\n")
        r = c.reply()
        assert r.startswith("250 2.0.0 Ok: queued as "), r
        env, body = read_queued(e.spool / "incoming" / r.split()[-1])
        assert body == MSG and env.sender == "someone@elsewhere.test"
        assert env.auth_user == "" and env.client_address == "127.0.0.1"
        assert env.origin == "smtp" and env.recipients[0].address == "rcpt@example.test"
        # The null sender too; and AUTH is still offered and works (then the
        # session is checked like any authenticated one).
        assert send_message(c, "", ["rcpt@example.test"], MSG).startswith("250")
        c.starttls()
        assert "AUTH PLAIN LOGIN" in c.cmd("EHLO client.test")
        assert c.login("bob", "bob-pw").startswith("235")
        assert c.cmd("MAIL FROM:<someone@elsewhere.test>").startswith("553 5.7.1")
        assert c.cmd("MAIL FROM:<bob@example.net>").startswith("250")
        assert len(e.queued()) == 2
    finally:
        e.stop()


@pytest.mark.parametrize("opts", ["", 'trusted_networks = ["10.0.0.0/8", "::2/128"]\n'])
def test_untrusted_client_needs_auth(tmp_path, ca, opts):
    e = Edges(tmp_path, ca, opts)
    try:
        c, r = _plain_mail(e)
        assert r.startswith("530 5.7.0"), r
        assert c.cmd("RCPT TO:<rcpt@example.test>").startswith("530 5.7.0")
        assert c.cmd("DATA").startswith("530 5.7.0")
        assert e.queued() == []
    finally:
        e.stop()


def test_bad_trusted_network_is_a_config_error(tmp_path, ca):
    from msa import config
    path = support.write_config(tmp_path, ca)
    cfg = config.load(str(path))
    cfg.edge.submission = ["127.0.0.1:0"]
    cfg.edge.trusted_networks = ["127.0.0.1/8"]
    with pytest.raises(ConfigError, match="trusted_networks"):
        edges_from_config(cfg, Spool(tmp_path / "s", ["incoming"]))


def test_reload_changes_trusted_networks(tmp_path, ca):
    e = Edges(tmp_path, ca)
    try:
        assert _plain_mail(e)[1].startswith("530")
        from msa import config
        cfg2 = config.load(str(e.config_path))
        cfg2.edge.trusted_networks = ["127.0.0.1/32"]

        async def reload(cfg):
            for edge in e.edges:
                edge.reload(cfg)
        e.thread.call(reload(cfg2))
        assert _plain_mail(e)[1].startswith("250")
        cfg2.edge.trusted_networks = ["nonsense"]
        with pytest.raises(ConfigError):
            e.thread.call(reload(cfg2))
        assert _plain_mail(e)[1].startswith("250")       # unchanged
    finally:
        e.stop()


# -- listen backlog -----------------------------------------------------------


def test_listen_backlog():
    assert listen_backlog(2000) == 2000
    assert listen_backlog(100000) == 4096
    assert listen_backlog(2) == 100


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except OSError:
        return 0


@pytest.mark.skipif(_somaxconn() < 300, reason="net.core.somaxconn < 300")
def test_burst_of_connects_is_greeted(tmp_path):
    """300 clients connect while the event loop cannot accept (it is
    blocked): all must complete the TCP handshake (the accept queue holds
    them), then all are greeted."""
    n = 300
    port = support.free_port()
    t = EdgeThread()
    t.start(lambda: SmtpEdge(("127.0.0.1", port), Spool(tmp_path / "spool", ["incoming"]),
                             require_auth=False, hostname="msa.test", max_connections=1000,
                             max_connections_per_client=0))
    gate = threading.Event()
    t.loop.call_soon_threadsafe(gate.wait, 60)      # the loop accepts nothing meanwhile
    socks = []
    try:
        sel = selectors.DefaultSelector()
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
            sel.register(s, selectors.EVENT_WRITE)
        connected = set()
        deadline = time.monotonic() + 20          # bounds a failure only
        while len(connected) < n and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                sel.unregister(key.fileobj)
                if key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    connected.add(key.fileobj)
        sel.close()
        assert len(connected) == n, f"only {len(connected)} of {n} connected"
        gate.set()
        for s in socks:
            s.setblocking(True)
            s.settimeout(30)
            assert s.recv(512).startswith(b"220 msa.test"), "not greeted"
    finally:
        gate.set()
        for s in socks:
            s.close()
        t.stop()


# -- the tutorial's Auth class and its user's sender ---------------------------


class TutorialAuth(Auth):
    made: list = []

    def verify_secret(self, username, password, identity=None):
        TutorialAuth.made.append(self)
        if username != "testuser" or password != "testpassword":
            raise CredentialsInvalidError()
        return "testuser"


class NoArgAuth(Auth):
    def __init__(self):                 # a class that takes no session
        super().__init__()

    def verify_secret(self, username, password, identity=None):
        if password != "pw":
            raise CredentialsInvalidError()
        return username


def test_auth_class_and_default_sender_domain(tmp_path, ca):
    """As the tutorial writes it: ``auth_class=MyAuth`` (the class, made
    per session) and no sender arguments: testuser may send as
    testuser@<hostname>, and only that."""
    spool = Spool(tmp_path / "spool", ["incoming"])
    tls = {"keyfile": str(ca.key_pem), "certfile": str(ca.cert_pem)}
    port, port2 = support.free_port(), support.free_port()
    t = EdgeThread()
    t.start(lambda: [
        SmtpEdge(("127.0.0.1", port), spool, tls=tls, tls_immediately=True,
                 auth_class=TutorialAuth, hostname="mail.example.org"),
        SmtpEdge(("127.0.0.1", port2), spool, tls=tls, tls_immediately=True,
                 auth_class=NoArgAuth, hostname="mail.example.org")])
    try:
        sessions = []
        for _ in range(2):
            c = RawClient(port, ca=ca, implicit=True)
            c.cmd("EHLO client.test")
            assert c.login("testuser", "testpassword").startswith("235")
            assert c.cmd("MAIL FROM:<x@example.org>").startswith("553 5.7.1")
            msg = b"From: testuser@mail.example.org\r\n\r\nhi\r\n"
            r = send_message(c, "testuser@mail.example.org", ["r@example.test"], msg)
            assert r.startswith("250 2.0.0 Ok: queued as"), r
            sessions.append(c)
        # One instance per session, made with the session.
        assert len(TutorialAuth.made) == 2 and TutorialAuth.made[0] is not TutorialAuth.made[1]
        assert all(a.session is not None for a in TutorialAuth.made)
        c = RawClient(port2, ca=ca, implicit=True)
        c.cmd("EHLO client.test")
        assert c.login("someone", "pw").startswith("235")
        assert c.cmd("MAIL FROM:<someone@mail.example.org>").startswith("250")
    finally:
        t.stop()

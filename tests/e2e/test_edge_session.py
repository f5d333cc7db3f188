"""What the edge does to spend less CPU per message, checked against what
it replaces: the protocol set up as aiosmtpd's ``SMTP.__init__`` would,
validator hooks called with the arguments they take, the lazy command
timer, one log line per message, several edges on one port
(``reuse_port``)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import pytest
from aiosmtpd.smtp import SMTP

from msa.submission.edge import SmtpEdge
from msa.submission.session import _NO_HOOK, _NO_HOOKS, SmtpSession, hook_arity
from msa.submission.validators import SmtpValidators
from spool import Spool
from tests import support
from tests.edge_support import Edges, EdgeThread, RawClient, send_message

MSG = b"From: someone@elsewhere.test\r\n\r\nhi\r\n"
# Values compared by type only: objects made anew for every protocol.
_BY_TYPE = {"_stream_reader", "_stream_reader_wr", "_closed", "_drain_waiters", "_loop",
            "loop", "_strong_reader", "_source_traceback"}


def _sessions(edge: SmtpEdge) -> tuple[SmtpSession, SmtpSession]:
    loop = asyncio.get_running_loop()
    fast = SmtpSession(edge, edge.settings)
    slow = object.__new__(SmtpSession)
    slow.edge, slow.settings = edge, edge.settings
    SMTP.__init__(slow, _NO_HOOKS, **SmtpSession.aiosmtpd_options(edge.settings, loop))
    return fast, slow


@pytest.mark.parametrize("implicit", [False, True])
def test_protocol_set_up_as_aiosmtpd_does(tmp_path, ca, implicit):
    """_init_protocol sets every attribute SMTP.__init__ sets, to the same
    values; the command and AUTH tables are the same methods. (Fails when
    an aiosmtpd upgrade adds or changes one.)"""
    spool = Spool(tmp_path / "spool", ["incoming"])
    tls = {"keyfile": str(ca.key_pem), "certfile": str(ca.cert_pem)}

    async def go():
        edge = SmtpEdge(("127.0.0.1", 0), spool, tls=tls, tls_immediately=implicit,
                        hostname="msa.test", require_auth=not implicit)
        fast, slow = _sessions(edge)
        theirs = {k: v for k, v in vars(slow).items()
                  if k not in ("_smtp_methods", "_auth_methods")}
        mine = vars(fast)
        assert set(theirs) <= set(mine), set(theirs) - set(mine)
        for key, value in theirs.items():
            if key in _BY_TYPE:
                assert type(mine[key]) is type(value), key
            elif hasattr(value, "__func__"):                # bound to each protocol
                assert mine[key].__func__ is value.__func__, key
            elif isinstance(value, ssl.SSLContext) or callable(value):
                assert mine[key] is value, key
            else:
                assert mine[key] == value, (key, mine[key], value)
        assert "_smtp_methods" not in mine            # made on first use only
        assert {k: m.__func__ for k, m in fast._smtp_methods.items()} == \
            {k: m.__func__ for k, m in slow._smtp_methods.items()}
        assert {k: (a.method.__func__, a.is_builtin) for k, a in fast._auth_methods.items()} \
            == {k: (a.method.__func__, a.is_builtin) for k, a in slow._auth_methods.items()}
        with pytest.raises(AttributeError):
            fast.no_such_attribute
    asyncio.run(go())


def test_hook_arity():
    class V(SmtpValidators):
        def handle_mail(self, reply, sender):
            pass

        async def handle_rcpt(self, reply, recipient, params):
            pass

        def handle_data(self, *args):
            pass

    v = V(None)
    assert hook_arity(v, "handle_mail") == 2
    assert hook_arity(v, "handle_rcpt") == 3
    assert hook_arity(v, "handle_data") > 10           # takes whatever is given
    assert hook_arity(v, "handle_ehlo") == _NO_HOOK     # the base no-op: not called
    assert hook_arity(v, "handle_nothing") == _NO_HOOK
    v.handle_ehlo = lambda reply, name: None            # set on the instance
    assert hook_arity(v, "handle_ehlo") == 2
    assert hook_arity(V(None), "handle_ehlo") == _NO_HOOK


def test_one_info_line_per_message(tmp_path, ca, caplog):
    caplog.set_level(logging.INFO, logger="msa.edge")
    e = Edges(tmp_path, ca, 'trusted_networks = ["127.0.0.0/8"]\n')
    try:
        caplog.clear()
        c = e.client()
        c.cmd("EHLO client.test")
        for _ in range(2):
            assert send_message(c, "s@elsewhere.test", ["r@example.test"], MSG).startswith("250")
        assert c.cmd("QUIT").startswith("221")
        assert c.closed()
        idle = e.client()
        assert idle.cmd("QUIT").startswith("221")
        assert idle.closed()
        support.wait_for(lambda: sum("disconnect" in r.getMessage() for r in caplog.records),
                         timeout=10, what="disconnect line")
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "msa.edge" and r.levelno >= logging.INFO]
        queued = [x for x in lines if "client=" in x]
        assert len(queued) == 2 and all("from=<s@elsewhere.test>" in x for x in queued)
        # The session without mail is logged; the one with mail is not again.
        assert [x for x in lines if x not in queued] == [
            "disconnect from unknown[127.0.0.1] quit=1 commands=1"]
    finally:
        e.stop()


def test_command_timer_rearms_while_client_is_busy(tmp_path, ca):
    """The timer is moved lazily: each command moves the deadline on, so a
    client that sends a command within every timeout is never cut off,
    however long it stays; one that is idle past it is. The loop's clock
    is moved by the test (SkewedLoop): no real waits, nothing a slow
    machine can change."""
    e = Edges(tmp_path, ca, "command_timeout = 100.0\n", loop_factory=support.SkewedLoop)
    loop = e.thread.loop
    try:
        c = e.client()
        for _ in range(5):  # 300 s in all: the first deadline is long past
            loop.advance_threadsafe(60.0)
            assert c.cmd("NOOP").startswith("250"), "cut off while busy"
        loop.advance_threadsafe(100.5)
        assert c.closed(timeout=30)
        assert c.buf.startswith(b"421 4.4.2")
    finally:
        e.stop()


def test_reuse_port_lets_several_edges_share_an_address(tmp_path):
    spool = Spool(tmp_path / "spool", ["incoming"])
    port = support.free_port()

    def edge(reuse: bool) -> SmtpEdge:
        return SmtpEdge(("127.0.0.1", port), spool, require_auth=False, hostname="msa.test",
                        reuse_port=reuse)
    t = EdgeThread()
    try:
        t.start(lambda: [edge(True), edge(True)])
        assert all(len(x.sockets) == 1 for x in t.edges)
        assert RawClient(port).banner.startswith("220 msa.test")
        with pytest.raises(OSError):
            t.start(lambda: edge(False))      # without it, the address is taken
    finally:
        t.stop()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_connect_and_close_frees_the_session(tmp_path, loop):
    """A client that connects and closes at once (a port check, a load
    balancer's probe) must not keep its session: uvloop reports that EOF
    before the command loop's first step, and aiosmtpd then cancels the
    loop, which would never close the socket (CLOSE-WAIT until shutdown)."""
    uvloop = pytest.importorskip("uvloop") if loop == "uvloop" else None
    spool = Spool(tmp_path / "spool", ["incoming", "tmp"])
    port = support.free_port()
    t = EdgeThread(uvloop.new_event_loop if uvloop else asyncio.new_event_loop)
    try:
        edge, = t.start(lambda: SmtpEdge(("127.0.0.1", port), spool, require_auth=False,
                                         hostname="msa.test"))
        for i in range(10):
            with socket.create_connection(("127.0.0.1", port)) as s:
                if i % 2:
                    s.recv(100)          # half of them read the greeting first
        support.wait_for(lambda: not edge._sessions, timeout=10,
                         what=f"{len(edge._sessions)} sessions left open")
        assert RawClient(port).banner.startswith("220 msa.test")
    finally:
        t.stop()

"""The submission edge's rules, driven over real TLS sockets byte by byte:
extensions, the open-relay matrix, SMTP smuggling, limits, errors,
STARTTLS buffer, envelope fields."""

from __future__ import annotations

import socket

import pytest

from tests import support
from tests.edge_support import Edges, RawClient, read_queued, send_message

SMUGGLE_VARIANTS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
                    b"\r.\r", b"\r.\n", b"\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]
MSG = b"From: alice@example.org\r\nTo: b@example.test\r\nSubject: t\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def edges(tmp_path_factory, ca):
    e = Edges(tmp_path_factory.mktemp("edge"), ca,
              "max_message_size = 20000\nmax_recipients = 3\nmax_errors = 8\n")
    yield e
    e.stop()


@pytest.fixture
def clean(edges):
    for p in edges.queued():
        p.unlink()
    return edges


def test_extensions_before_and_after_tls(clean):
    c = clean.client()
    plain = c.cmd("EHLO client.test").split("\n")
    assert plain[0] == "250-msa.test"
    words = [x[4:] for x in plain]
    for ext in ("SIZE 20000", "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                "STARTTLS", "DSN"):
        assert ext in words
    assert not any(w.startswith("AUTH") for w in words)
    c.starttls()
    words = [x[4:] for x in c.cmd("EHLO client.test").split("\n")]
    assert "AUTH PLAIN LOGIN" in words and "STARTTLS" not in words
    assert c.cmd("STARTTLS").startswith("503 5.5.1")
    implicit = clean.client(implicit=True)
    words = [x[4:] for x in implicit.cmd("EHLO client.test").split("\n")]
    assert "AUTH PLAIN LOGIN" in words and "STARTTLS" not in words
    assert implicit.cmd("STARTTLS").startswith("503 5.5.1")


def test_open_relay_matrix(clean):
    # No AUTH, before and after TLS.
    c = clean.client()
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith("530 5.7.0")
    assert c.cmd("RCPT TO:<x@example.test>").startswith("530 5.7.0")
    assert c.cmd("DATA").startswith("530 5.7.0")
    # AUTH before TLS: refused without reading credentials.
    assert c.login("alice", "alice-pw").startswith("538 5.7.11")
    c.starttls()
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith("530 5.7.0")
    # Wrong password, unknown user.
    assert c.login("alice", "nope").startswith("535 5.7.8")
    assert c.login("mallory", "alice-pw").startswith("535 5.7.8")
    assert c.cmd("MAIL FROM:<alice@example.org>").startswith("530 5.7.0")
    c.close()
    s = clean.session("alice")
    # A second client is connected meanwhile: with 2-4 sessions the edge
    # creates each queue file while the body arrives (alone, it stores in
    # its loop), so the removal of the refused messages' files is checked.
    bystander = clean.client()
    # Envelope sender not owned.
    r = s.cmd("MAIL FROM:<carol@example.org>")
    assert r.startswith("553 5.7.1"), r
    assert s.cmd("MAIL FROM:<bob@example.net>").startswith("553 5.7.1")
    # From header not owned: refused after DATA, nothing queued.
    r = send_message(s, "alice@example.org", ["b@example.test"],
                     b"From: Carol <carol@example.org>\r\nSubject: x\r\n\r\nhi\r\n")
    assert r.startswith("553 5.7.1") and "carol@example.org" in r, r
    r = send_message(s, "alice@example.org", ["b@example.test"],
                     b"From: alice@example.org, carol@example.org\r\n\r\nhi\r\n")
    assert r.startswith("553 5.7.1"), r
    r = send_message(s, "alice@example.org", ["b@example.test"], b"From: garbage\r\n\r\nhi\r\n")
    assert r.startswith("553 5.7.1"), r
    assert clean.queued() == []
    # The queue files created while those bodies arrived are removed.
    support.wait_for(lambda: not list((clean.spool / "tmp").iterdir()), timeout=10,
                     what="tmp/ empty after refused messages")
    bystander.close()
    # What alice does own: the map, @domain, login@domain, null sender.
    for sender in ("alice@example.org", "anyone@alice.test", "ALICE@Example.ORG", ""):
        r = send_message(s, sender, ["b@example.test"],
                         b"From: x@alice.test\r\n\r\nhi\r\n")
        assert r.startswith("250 2.0.0 Ok: queued as "), (sender, r)
    # bob's addresses come from the password file.
    b = clean.session("bob", implicit=True)
    assert b.cmd("MAIL FROM:<alice@example.org>").startswith("553 5.7.1")
    r = send_message(b, "bob@example.net", ["c@example.test"], b"From: bob@example.net\r\n\r\n")
    assert r.startswith("250"), r
    assert len(clean.queued()) == 5


@pytest.mark.parametrize("variant", SMUGGLE_VARIANTS, ids=repr)
def test_smuggling_is_never_executed(clean, variant):
    s = clean.session()
    assert s.cmd("MAIL FROM:<alice@example.org>").startswith("250")
    assert s.cmd("RCPT TO:<friend@example.test>").startswith("250")
    assert s.cmd("DATA").startswith("354")
    smuggled = (b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<victim@evil.test>\r\nDATA\r\n"
                b"From: alice@example.org\r\nSubject: smuggled\r\n\r\nevil\r\n")
    s.send(MSG + b"before" + variant + smuggled + b".\r\n" + b"NOOP\r\n")
    r = s.reply()
    assert r.startswith("550 5.6.0"), r
    # The very next reply is NOOP's: no MAIL/RCPT/DATA reply came in between.
    assert s.reply() == "250 2.0.0 OK"
    assert clean.queued() == []
    # The session is clean: a normal message goes through.
    r = send_message(s, "alice@example.org", ["friend@example.test"], MSG)
    assert r.startswith("250 2.0.0 Ok: queued as"), r
    (path,) = clean.queued()
    env, body = read_queued(path)
    assert [x.address for x in env.recipients] == ["friend@example.test"]
    assert body == MSG and b"evil" not in path.read_bytes()


def test_pipelined_commands_after_data_are_kept(clean):
    s = clean.session()
    s.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<a@example.test>\r\nDATA\r\n")
    assert [s.reply()[:3] for _ in range(3)] == ["250", "250", "354"]
    s.send(MSG + b".\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<b@example.test>\r\n"
           b"DATA\r\n" + MSG + b"..dot\r\n.\r\nQUIT\r\n")
    replies = [s.reply() for _ in range(6)]
    assert [r[:3] for r in replies] == ["250", "250", "250", "354", "250", "221"]
    bodies = sorted(read_queued(p)[1] for p in clean.queued())
    assert bodies == sorted([MSG, MSG + b".dot\r\n"])


def test_plaintext_after_starttls_is_discarded(clean):
    c = clean.client()
    c.cmd("EHLO client.test")
    c.send(b"STARTTLS\r\nNOOP\r\n")
    assert c.reply().startswith("220")
    c.sock = c.ctx.wrap_socket(c.sock, server_hostname="localhost")
    # Had the plaintext NOOP survived, its 250 would come first.
    assert c.cmd("EHLO again.test").startswith("250-msa.test")
    assert c.cmd("NOOP") == "250 2.0.0 OK"


def test_size_limits(clean):
    s = clean.session()
    assert s.cmd("MAIL FROM:<alice@example.org> SIZE=20001").startswith("552 5.3.4")
    big = b"From: alice@example.org\r\n\r\n" + (b"x" * 98 + b"\r\n") * 250
    r = send_message(s, "alice@example.org", ["b@example.test"], big)
    assert r.startswith("552 5.3.4"), r
    assert s.cmd("NOOP") == "250 2.0.0 OK"
    assert clean.queued() == []
    ok = b"From: alice@example.org\r\n\r\n" + (b"x" * 98 + b"\r\n") * 150
    assert send_message(s, "alice@example.org", ["b@example.test"], ok).startswith("250")


@pytest.mark.parametrize("value", [b"alice@example.org (x) <bob@example.net>",
                                   b"<alice@example.org> <bob@example.net>",
                                   b"alice@example.org;bob@example.net", b"<", b"x:;c@d"])
def test_from_a_client_could_read_otherwise_is_refused(clean, value):
    """From fields a mail client may read as bob's, and two that made the
    parser raise (451 4.3.0 and a traceback, so clients retried forever):
    553 5.7.1, nothing queued."""
    s = clean.session("alice")
    r = send_message(s, "alice@example.org", ["b@example.test"],
                     b"From: " + value + b"\r\n\r\nhi\r\n")
    assert r.startswith("553 5.7.1"), (value, r)
    assert clean.queued() == []


def _start_data(e):
    s = e.session(implicit=True)
    assert s.cmd("MAIL FROM:<alice@example.org>").startswith("250")
    assert s.cmd("RCPT TO:<b@example.test>").startswith("250")
    assert s.cmd("DATA").startswith("354")
    s.sent = 0
    _send_data(e, s, b"From: alice@example.org\r\n\r\n")
    return s


def _send_data(e, s, data: bytes) -> None:
    """Send DATA bytes and wait until the edge has read them (the clock is
    only moved once the edge has seen what came before: a jump between
    the client's send and the edge's read would be time without data)."""
    s.send(data)
    s.sent += len(data)
    sessions = e.edges[1]._sessions   # the implicit-TLS listener's
    support.wait_for(lambda: not sessions or any(x.data_read >= s.sent for x in sessions),
                     timeout=10, what="the edge to read the data (or end the session)")


def test_a_trickling_client_is_cut_off_at_the_minimum_data_rate(tmp_path, ca):
    """A byte every 50 s resets the 100 s per-read timeout every time, but
    the DATA phase may only last data_timeout + bytes / min_data_rate
    (100 + n / 1) seconds: 421 4.4.2 and nothing queued. The loop's clock
    is the test's (SkewedLoop)."""
    e = Edges(tmp_path, ca, "data_timeout = 100.0\nmin_data_rate = 1\ndata_deadline = 0\n",
              loop_factory=support.SkewedLoop)
    try:
        s = _start_data(e)   # 27 bytes sent: the phase may last 127 s
        answered = None
        for i in range(10):  # 50 s a byte: never idle for data_timeout
            e.thread.loop.advance_threadsafe(50.0)
            try:
                _send_data(e, s, b"x")
            except OSError:  # cut off already
                pass
            if not e.edges[1]._sessions:
                answered = i
                break
        assert s.closed(timeout=10)
        assert s.buf.startswith(b"421 4.4.2"), s.buf
        assert answered is not None and answered <= 3, answered   # by 200 s in, not later
        assert e.queued() == []
    finally:
        e.stop()


def test_a_steady_client_is_not_cut_off_and_the_deadline_caps_the_phase(tmp_path, ca):
    e = Edges(tmp_path, ca, "data_timeout = 100.0\nmin_data_rate = 1\ndata_deadline = 250\n",
              loop_factory=support.SkewedLoop)
    try:
        s = _start_data(e)
        for _ in range(4):   # 60 s and 100 bytes at a time: 1.7 bytes/s, 240 s in all
            e.thread.loop.advance_threadsafe(60.0)
            _send_data(e, s, b"y" * 98 + b"\r\n")
        s.send(b".\r\n")
        assert s.reply().startswith("250 2.0.0 Ok: queued as "), s.buf
        assert s.cmd("QUIT").startswith("221")
        support.wait_for(lambda: not e.edges[1]._sessions, what="the first session to end")
        s2 = _start_data(e)
        for _ in range(4):   # 240 s: still within the deadline
            e.thread.loop.advance_threadsafe(60.0)
            _send_data(e, s2, b"y" * 98 + b"\r\n")
        assert not s2.buf
        e.thread.loop.advance_threadsafe(11.0)   # 251 s: past it, however fast it sent
        assert s2.closed(timeout=10) and s2.buf.startswith(b"421 4.4.2"), s2.buf
        assert len(e.queued()) == 1
    finally:
        e.stop()


def test_sender_header_must_be_owned_too(clean):
    s = clean.session("alice")
    r = send_message(s, "alice@example.org", ["b@example.test"],
                     b"From: alice@example.org\r\nSender: carol@example.org\r\n\r\nhi\r\n")
    assert r.startswith("553 5.7.1") and "Sender address <carol@example.org>" in r, r
    r = send_message(s, "alice@example.org", ["b@example.test"],
                     b"From: alice@example.org\r\nSender: <\r\n\r\nhi\r\n")
    assert r.startswith("553 5.7.1 Sender header cannot be parsed"), r
    assert clean.queued() == []
    r = send_message(s, "alice@example.org", ["b@example.test"],
                     b"From: x@alice.test\r\nSender: alice@example.org\r\n\r\nhi\r\n")
    assert r.startswith("250"), r


@pytest.mark.parametrize("authzid,ok", [(b"", True), (b"alice", True), (b"bob", False),
                                        (b"admin", False)])
@pytest.mark.parametrize("challenge", [False, True])
def test_auth_plain_authorization_identity(clean, authzid, ok, challenge):
    """RFC 4616: an authorization identity other than the user asks to act
    as someone else, which msa does not offer: it fails like a bad password
    (aiosmtpd dropped it, so "bob\\0alice\\0alice-pw" logged in as alice)."""
    import base64
    c = RawClient(clean.tls_port, ca=clean.ca, implicit=True)
    c.cmd("EHLO client.test")
    token = base64.b64encode(authzid + b"\0alice\0alice-pw").decode()
    if challenge:
        assert c.cmd("AUTH PLAIN").startswith("334")
        r = c.cmd(token)
    else:
        r = c.cmd(f"AUTH PLAIN {token}")
    assert r.startswith("235 2.7.0") if ok else r.startswith("535 5.7.8"), r
    c.close()


def test_smtp_submission_keeps_header_addresses_as_sent(clean):
    """Bare local parts are qualified for local mail only (sendmail, as
    Postfix's myorigin); what a client submits is relayed as it sent it."""
    s = clean.session()
    body = b"From: alice@example.org\r\nTo: root\r\nCc: bob\r\n\r\nhi\r\n"
    assert send_message(s, "alice@example.org", ["b@example.test"], body).startswith("250")
    _, message = read_queued(clean.queued()[0])
    assert message == body


def test_too_many_recipients(clean):
    s = clean.session()
    assert s.cmd("MAIL FROM:<alice@example.org>").startswith("250")
    for i in range(3):
        assert s.cmd(f"RCPT TO:<r{i}@example.test>").startswith("250")
    assert s.cmd("RCPT TO:<r3@example.test>").startswith("452 4.5.3")
    assert s.cmd("DATA").startswith("354")
    s.send(MSG + b".\r\n")
    assert s.reply().startswith("250")
    env, _ = read_queued(clean.queued()[0])
    assert len(env.recipients) == 3


def test_recipients_over_the_limit_do_not_spend_the_error_budget(clean):
    """20 pipelined RCPTs against max_recipients 3 and max_errors 8: 3
    accepted, 17 x 452 4.5.3, and the session goes on (the client sends the
    rest in another transaction, as RFC 5321 §4.5.3.1.10 and msa.toml(5)
    say); it was cut off with 421 after the eighth 452."""
    s = clean.session()
    s.send(b"MAIL FROM:<alice@example.org>\r\n"
           + b"".join(f"RCPT TO:<r{i}@example.test>\r\n".encode() for i in range(20)))
    replies = [s.reply() for _ in range(21)]
    assert replies[0].startswith("250")
    assert [r[:9] for r in replies[1:]] == ["250 2.1.5"] * 3 + ["452 4.5.3"] * 17
    assert s.cmd("DATA").startswith("354")
    s.send(MSG + b".\r\n")
    assert s.reply().startswith("250")
    for first in range(3, 20, 3):  # the rest, three at a time
        rcpts = [f"r{i}@example.test" for i in range(first, min(first + 3, 20))]
        assert send_message(s, "alice@example.org", rcpts, MSG).startswith("250")
    queued = [read_queued(p)[0] for p in clean.queued()]
    assert sorted(r.address for env in queued for r in env.recipients) == sorted(
        f"r{i}@example.test" for i in range(20))


def test_line_too_long(clean):
    s = clean.session()
    assert s.cmd(b"NOOP " + b"x" * 600).startswith("500 5.5.2")
    assert s.cmd(b"NOOP " + b"x" * 20000).startswith("500 5.5.2")
    assert s.cmd("NOOP") == "250 2.0.0 OK"
    long_line = b"From: alice@example.org\r\n\r\n" + b"y" * 999 + b"\r\n"
    r = send_message(s, "alice@example.org", ["b@example.test"], long_line)
    assert r.startswith("500 5.5.2"), r
    ok = b"From: alice@example.org\r\n\r\n" + b"y" * 998 + b"\r\n"
    assert send_message(s, "alice@example.org", ["b@example.test"], ok).startswith("250")


def test_bare_lf_command_refused(clean):
    s = clean.session()
    s.send(b"NOOP\n")
    s.send(b"NOOP\r\n")
    assert s.reply().startswith("500 5.5.2")
    assert s.reply() == "250 2.0.0 OK"


def test_max_errors_closes(clean):
    c = clean.client()
    for _ in range(7):
        assert c.cmd("BOGUS").startswith("500 5.5.1")
    assert c.cmd("BOGUS").startswith("500 5.5.1")
    assert c.reply().startswith("421 4.7.0")
    assert c.closed()


def test_auth_failures_close(tmp_path, ca):
    e = Edges(tmp_path, ca, "max_auth_failures = 2\n")
    try:
        c = e.client(implicit=True)
        c.cmd("EHLO client.test")
        assert c.login("alice", "bad").startswith("535 5.7.8")
        assert c.login("alice", "bad").startswith("535 5.7.8")
        assert c.reply().startswith("421 4.7.0")
        assert c.closed()
    finally:
        e.stop()


def test_auth_login_and_bad_base64(clean):
    c = clean.client(implicit=True)
    c.cmd("EHLO client.test")
    import base64
    assert c.cmd("AUTH LOGIN").startswith("334 ")
    assert c.cmd(base64.b64encode(b"alice").decode()).startswith("334 ")
    assert c.cmd(base64.b64encode(b"alice-pw").decode()).startswith("235 2.7.0")
    assert c.login("alice", "alice-pw").startswith("503 5.5.1")
    d = clean.client(implicit=True)
    d.cmd("EHLO client.test")
    assert d.cmd("AUTH PLAIN !!!").startswith("501 5.5.2")
    assert d.cmd("AUTH CRAM-MD5").startswith("504 5.5.4")
    assert d.cmd("AUTH PLAIN").startswith("334")
    assert d.cmd("*").startswith("501")


def test_envelope_fields(clean):
    s = clean.session(implicit=True)
    assert s.cmd("MAIL FROM:<alice@example.org> BODY=8BITMIME SMTPUTF8 RET=HDRS "
                 "ENVID=abc+2Bdef SIZE=100").startswith("250")
    assert s.cmd("RCPT TO:<j\u00f6rg@example.test> NOTIFY=SUCCESS,FAILURE "
                 "ORCPT=rfc822;jorg@example.test").startswith("250")
    assert s.cmd("RCPT TO:<x@example.test> NOTIFY=NEVER").startswith("250")
    assert s.cmd("RCPT TO:<y@example.test> NOTIFY=BOGUS").startswith("501 5.5.4")
    assert s.cmd("RCPT TO:<y@example.test> FOO=1").startswith("555 5.5.4")
    assert s.cmd("DATA").startswith("354")
    body = "From: alice@example.org\r\nSubject: gr\u00fc\u00dfe\r\n\r\n\u00e9t\u00e9\r\n".encode()
    s.send(body + b".\r\n")
    r = s.reply()
    qid = r.rsplit(" ", 1)[1]
    env, got = read_queued(clean.spool / "incoming" / qid)
    assert got == body
    assert env.queue_id == qid and env.origin == "smtp" and env.auth_user == "alice"
    assert env.client_address == "127.0.0.1" and env.helo == "client.test"
    assert env.client_name == ""   # no confirmed reverse DNS here: never the HELO
    assert env.tls.startswith("TLSv1.") and len(env.tls.split()) == 2
    assert (env.body, env.smtputf8, env.ret, env.envid) == ("8BITMIME", "yes", "HDRS", "abc+2Bdef")
    assert env.size == str(len(body)) and env.sender == "alice@example.org"
    r0, r1 = env.recipients
    assert (r0.address, r0.notify, r0.orcpt) == ("j\u00f6rg@example.test", "SUCCESS,FAILURE",
                                                 "rfc822;jorg@example.test")
    assert (r1.address, r1.notify) == ("x@example.test", "NEVER")


def test_non_ascii_needs_smtputf8_and_syntax(clean):
    s = clean.session()
    assert s.cmd("MAIL FROM:<\u00e9@alice.test>").startswith("553 5.6.7")
    assert s.cmd("MAIL FROM:<alice@example.org>").startswith("250")
    assert s.cmd("RCPT TO:<\u00e9@example.test>").startswith("553 5.6.7")
    assert s.cmd("RCPT TO:<no-domain>").startswith("553 5.1.3")
    assert s.cmd("RCPT TO:<a b@example.test>").startswith("553 5.1.3")
    assert s.cmd("RCPT TO:<>").startswith("501")
    assert s.cmd("MAIL FROM:<alice@example.org>").startswith("503 5.5.1")
    assert s.cmd("RSET") == "250 2.0.0 OK"
    assert s.cmd("DATA").startswith("503 5.5.1")


def test_queue_write_error_is_451(clean):
    incoming = clean.spool / "incoming"
    incoming.rename(clean.spool / "incoming.away")
    incoming.write_text("not a directory")
    try:
        s = clean.session()
        r = send_message(s, "alice@example.org", ["b@example.test"], MSG)
        assert r.startswith("451 4.3.0"), r
        assert list((clean.spool / "tmp").iterdir()) == []
    finally:
        incoming.unlink()
        (clean.spool / "incoming.away").rename(incoming)


def test_timeouts(tmp_path, ca):
    """An idle client gets 421 4.4.2 at the command timeout, one that stops
    in the middle of DATA at the data timeout, and nothing is queued. The
    loop's clock is moved past each timeout (SkewedLoop): a slow machine
    cannot make a client that is answering look idle."""
    e = Edges(tmp_path, ca, "command_timeout = 100.0\ndata_timeout = 200.0\n",
              loop_factory=support.SkewedLoop)
    loop = e.thread.loop
    try:
        c = e.client()
        loop.advance_threadsafe(100.5)
        assert c.closed(timeout=10)
        assert c.buf.startswith(b"421 4.4.2"), c.buf
        s = e.session(implicit=True)
        assert s.cmd("MAIL FROM:<alice@example.org>").startswith("250")
        assert s.cmd("RCPT TO:<b@example.test>").startswith("250")
        assert s.cmd("DATA").startswith("354")
        s.send(b"From: alice@example.org\r\n\r\npartial")
        closed = False
        for _ in range(2):  # a second jump only if the edge read the body after the first
            loop.advance_threadsafe(200.5)
            if s.closed(timeout=5):
                closed = True
                break
        assert closed
        assert s.buf.startswith(b"421 4.4.2"), s.buf
        # The queue file created while the body arrived is removed (the
        # session's end may follow the close by a moment).
        support.wait_for(lambda: not list((e.spool / "tmp").iterdir()), timeout=10,
                         what="tmp/ empty")
        assert e.queued() == []
    finally:
        e.stop()


def test_ipv6_loopback(tmp_path, ca):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    e = Edges(tmp_path, ca, host="::1")
    try:
        for implicit in (False, True):
            s = e.session(implicit=implicit)
            assert send_message(s, "alice@example.org", ["b@example.test"], MSG).startswith("250")
        envs = [read_queued(p)[0] for p in e.queued()]
        assert [x.client_address for x in envs] == ["::1", "::1"]
    finally:
        e.stop()


def test_full_spool_is_452_and_leaves_nothing(tmp_path, ca):
    import subprocess
    spool = tmp_path / "spool"
    spool.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(spool)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        e = Edges(tmp_path, ca)
        try:
            s = e.session(implicit=True)
            line = b"z" * 98 + b"\r\n"
            for size in (200 * 1024, 400 * 1024):   # held in memory / spilled to tmp/
                body = b"From: alice@example.org\r\n\r\n" + line * (size // 100)
                r = send_message(s, "alice@example.org", ["b@example.test"], body)
                assert r.startswith("452 4.3.1"), r
                assert e.queued() == [] and list((spool / "tmp").iterdir()) == []
            assert send_message(s, "alice@example.org", ["b@example.test"], MSG).startswith("250")
        finally:
            e.stop()
    finally:
        subprocess.run(["umount", str(spool)], check=False)


def test_disconnect_during_data_leaves_nothing(clean):
    s = clean.session()
    assert s.cmd("MAIL FROM:<alice@example.org>").startswith("250")
    assert s.cmd("RCPT TO:<b@example.test>").startswith("250")
    assert s.cmd("DATA").startswith("354")
    s.send(b"From: alice@example.org\r\n\r\n" + (b"x" * 98 + b"\r\n") * 5000)
    s.close()
    c = clean.session()               # the edge still serves
    assert c.cmd("NOOP") == "250 2.0.0 OK"
    assert clean.queued() == [] and list((clean.spool / "tmp").iterdir()) == []

"""Real mail clients submit to the edge: swaks, msmtp, curl and Python's
smtplib, each over STARTTLS + AUTH and over implicit TLS, verifying the
test CA. The message must land in incoming/ with the right envelope and
its body intact."""

from __future__ import annotations

import smtplib
import subprocess

import pytest

from tests import support
from tests.edge_support import Edges, client_context, read_queued

BODY = (b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.test>\r\n"
        b"Subject: hello from {client}\r\n\r\nline one\r\n.leading dot\r\n\r\nbye\r\n")


@pytest.fixture(scope="module")
def edges(tmp_path_factory, ca):
    e = Edges(tmp_path_factory.mktemp("clients"), ca)
    yield e
    e.stop()


def body_for(client: str) -> bytes:
    return BODY.replace(b"{client}", client.encode())


def only_new(edges, before: set) -> tuple:
    new = [p for p in edges.queued() if p.name not in before]
    assert len(new) == 1, new
    return read_queued(new[0])


def check(edges, before, client, implicit, exact=True):
    """``exact=False``: msmtp adds a Date header and swaks a final empty
    line; the rest must be byte for byte what was sent."""
    env, body = only_new(edges, before)
    if exact:
        assert body == body_for(client)
    else:
        assert body.rstrip(b"\r\n").endswith(body_for(client).rstrip(b"\r\n")), body
        assert b".leading dot" in body and b"\n..leading" not in body
    assert env.sender == "alice@example.org"
    assert [r.address for r in env.recipients] == ["bob@example.test"]
    assert env.origin == "smtp" and env.auth_user == "alice"
    assert env.client_address == "127.0.0.1" and env.tls.startswith("TLSv1.")
    assert env.size == str(len(body))
    return env


def run(argv, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60)


def msmtp(edges, port: int, implicit: bool, password: str, stdin: bytes):
    return run(["msmtp", "--host=127.0.0.1", f"--port={port}", "--tls=on",
                f"--tls-starttls={'off' if implicit else 'on'}",
                f"--tls-trust-file={edges.ca.ca_pem}", "--auth=plain", "--user=alice",
                f"--passwordeval=echo {password}", "--from=alice@example.org",
                "--domain=msmtp.test", "bob@example.test"], stdin=stdin)


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_swaks(edges, tmp_path, implicit):
    if not support.have("swaks"):
        pytest.skip("swaks not installed")
    msg = tmp_path / "msg.eml"
    msg.write_bytes(body_for("swaks"))
    before = {p.name for p in edges.queued()}
    port = edges.tls_port if implicit else edges.port
    tls = ["--tls-on-connect"] if implicit else ["--tls"]
    p = run(["swaks", "--server", "127.0.0.1", "--port", str(port), *tls, "--auth", "PLAIN",
             "--auth-user", "alice", "--auth-password", "alice-pw", "--from",
             "alice@example.org", "--to", "bob@example.test", "--tls-verify", "--tls-ca-path",
             str(edges.ca.ca_pem), "--helo", "swaks.test", "--data", f"@{msg}"])
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    assert check(edges, before, "swaks", implicit, exact=False).helo == "swaks.test"


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_msmtp(edges, implicit):
    if not support.have("msmtp"):
        pytest.skip("msmtp not installed")
    before = {p.name for p in edges.queued()}
    port = edges.tls_port if implicit else edges.port
    p = msmtp(edges, port, implicit, "alice-pw", body_for("msmtp").replace(b"\r\n", b"\n"))
    assert p.returncode == 0, p.stderr.decode()
    assert check(edges, before, "msmtp", implicit, exact=False).helo == "msmtp.test"


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_curl(edges, tmp_path, implicit):
    if not support.have("curl"):
        pytest.skip("curl not installed")
    msg = tmp_path / "msg.eml"
    msg.write_bytes(body_for("curl"))
    before = {p.name for p in edges.queued()}
    scheme, port = ("smtps", edges.tls_port) if implicit else ("smtp", edges.port)
    p = run(["curl", "-sS", "--url", f"{scheme}://127.0.0.1:{port}/curl.test", "--ssl-reqd",
             "--cacert", str(edges.ca.ca_pem), "-u", "alice:alice-pw", "--login-options",
             "AUTH=PLAIN", "--mail-from", "alice@example.org", "--mail-rcpt",
             "bob@example.test", "-T", str(msg)])
    assert p.returncode == 0, p.stderr.decode()
    assert check(edges, before, "curl", implicit).helo == "curl.test"


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_smtplib(edges, implicit):
    before = {p.name for p in edges.queued()}
    ctx = client_context(edges.ca)
    if implicit:
        s = smtplib.SMTP_SSL("127.0.0.1", edges.tls_port, local_hostname="py.test",
                             context=ctx, timeout=30)
    else:
        s = smtplib.SMTP("127.0.0.1", edges.port, local_hostname="py.test", timeout=30)
        s.starttls(context=ctx)
    with s:
        s.login("alice", "alice-pw")
        refused = s.sendmail("alice@example.org", ["bob@example.test"], body_for("smtplib"))
        assert refused == {}
    assert check(edges, before, "smtplib", implicit).helo == "py.test"


def test_clients_see_refusals(edges, tmp_path):
    """Real clients get the refusals, not only our raw socket tests."""
    before = {p.name for p in edges.queued()}
    ctx = client_context(edges.ca)
    with smtplib.SMTP("127.0.0.1", edges.port, timeout=30) as s:
        s.starttls(context=ctx)
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            s.login("alice", "wrong")
        assert info.value.smtp_code == 535
        s.login("alice", "alice-pw")
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            s.sendmail("carol@example.org", ["bob@example.test"], body_for("x"))
        assert info.value.smtp_code == 553
    with smtplib.SMTP("127.0.0.1", edges.port, timeout=30) as s:
        s.ehlo()
        assert "auth" not in s.esmtp_features
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            s.sendmail("alice@example.org", ["bob@example.test"], body_for("x"))
        assert info.value.smtp_code == 530
    if support.have("msmtp"):
        p = msmtp(edges, edges.port, False, "wrong", b"Subject: x\n\nx\n")
        assert p.returncode == 77, p.stderr.decode()      # EX_NOPERM: auth failed
    assert {p.name for p in edges.queued()} == before

"""Password file, argon2 verification, sender policy and ``msa user``."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from msa.admin import usercmd
from msa.submission.auth import (
    CredentialsInvalidError,
    PasswdEntry,
    PasswdFile,
    PasswdFileAuth,
    SenderPolicy,
    parse_passwd,
    valid_username,
)
from tests import support
from tests.edge_support import FAST_HASHER, add_user


def test_passwd_file_round_trip_and_mode(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("# users\nalice:HASH1\n\nbob:HASH2:bob@x.org,@y.org\n")
    pf = PasswdFile(path)
    assert [e.name for e in pf.entries()] == ["alice", "bob"]
    assert pf.get("bob").senders == ["bob@x.org", "@y.org"]
    pf.set(PasswdEntry("carol", "HASH3"))
    assert pf.remove("alice") and not pf.remove("nobody")
    pf.save()
    assert path.read_text() == "# users\n\nbob:HASH2:bob@x.org,@y.org\ncarol:HASH3\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]      # no temp left


def test_save_keeps_owner(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("alice:H\n")
    os.chown(path, 65534, 65534)
    PasswdFile(path).save()
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)


def test_parse_reports_bad_lines():
    lines, problems = parse_passwd("ok:H\nno-hash\n:H\nsp ace:H\na:b:c:d\n")
    assert [x.name for x in lines if isinstance(x, PasswdEntry)] == ["ok"]
    assert len(problems) == 4
    assert valid_username("alice@example.org") and not valid_username("a b")
    assert not valid_username("a:b") and not valid_username("")


def test_verify_and_refresh(tmp_path):
    path = tmp_path / "passwd"
    add_user(path, "alice", "s3cret", ["alice@x.org"])
    auth = PasswdFileAuth(path)
    assert auth.verify_secret("alice", "s3cret") == "alice"
    for user, pw in (("alice", "wrong"), ("nobody", "s3cret"), ("alice", "")):
        with pytest.raises(CredentialsInvalidError):
            auth.verify_secret(user, pw)
    with pytest.raises(CredentialsInvalidError):
        auth.verify_secret("alice", "s3cret", identity="bob")
    assert auth.senders_for("alice") == ["alice@x.org"]
    add_user(path, "bob", "pw2")
    assert auth.verify_secret("bob", "pw2") == "bob"          # reread on change
    path.write_text("garbage line\n")
    with pytest.raises(CredentialsInvalidError):
        auth.verify_secret("bob", "pw2")
    os.unlink(path)
    with pytest.raises(CredentialsInvalidError):
        auth.verify_secret("alice", "s3cret")
    assert CredentialsInvalidError().reply() == "535 5.7.8"


def test_sender_policy():
    p = SenderPolicy({"alice": ["alice@example.org", "@alice.test"]}, domain="example.net")
    assert p.allowed("alice", "alice@example.org")
    assert p.allowed("alice", "ALICE@EXAMPLE.ORG")
    assert p.allowed("alice", "x@alice.test")
    assert p.allowed("alice", "alice@example.net")            # login@domain
    assert not p.allowed("alice", "x@sub.alice.test")
    assert not p.allowed("alice", "bob@example.org")
    assert not p.allowed("alice", "alice")
    assert p.allowed("bob@example.com", "bob@example.com")    # login is an address
    assert p.allowed("bob", "bob@z.org", extra=["bob@z.org"])
    strict = SenderPolicy({}, domain="example.net", allow_login_address=False)
    assert not strict.allowed("bob@example.com", "bob@example.com")
    assert not strict.allowed("alice", "alice@example.net")


def run_user(config, *args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "msa.cli", "user", *args], input=stdin,
                          capture_output=True, env=support.msa_env(config), timeout=60,
                          cwd=str(support.ROOT))


def test_msa_user_commands(tmp_path, ca):
    cfg = support.write_config(tmp_path, ca, extra='senders = { alice = ["@a.test"] }\n')
    passwd = tmp_path / "passwd"
    p = run_user(cfg, "add", "alice", "--password-stdin", "--sender", "alice@x.org",
                 stdin=b"pw one\n")
    assert p.returncode == 0, p.stderr
    assert stat.S_IMODE(passwd.stat().st_mode) == 0o600
    assert PasswdFileAuth(passwd).verify_secret("alice", "pw one") == "alice"
    assert run_user(cfg, "add", "alice", "--password-stdin", stdin=b"x\n").returncode == 67
    assert run_user(cfg, "add", "bad name", "--password-stdin", stdin=b"x\n").returncode == 64
    assert run_user(cfg, "add", "bob", "--password-stdin", stdin=b"").returncode == 65
    assert run_user(cfg, "add", "bob", stdin=b"x\n").returncode == 65       # no terminal
    assert run_user(cfg, "passwd", "alice", "--password-stdin", stdin=b"pw two\n").returncode == 0
    auth = PasswdFileAuth(passwd)
    assert auth.verify_secret("alice", "pw two") == "alice"
    assert auth.senders_for("alice") == ["alice@x.org"]
    assert run_user(cfg, "passwd", "nobody", "--password-stdin", stdin=b"x\n").returncode == 67
    p = run_user(cfg, "list")
    assert p.returncode == 0 and p.stdout.decode() == "alice\talice@x.org,@a.test\n"
    assert run_user(cfg, "remove", "alice").returncode == 0
    assert run_user(cfg, "remove", "alice").returncode == 67
    assert run_user(cfg, "list").stdout == b""
    assert run_user(cfg, "frobnicate").returncode == 64


def test_usercmd_main_in_process(tmp_path, ca, monkeypatch):
    import io
    cfg = support.write_config(tmp_path, ca)
    monkeypatch.setattr("sys.stdin", io.StringIO("secret\n"))
    assert usercmd.main(["--config", str(cfg), "add", "carol", "--password-stdin"]) == 0
    assert usercmd.main(["remove", "carol", "--config", str(cfg)]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("secret\n"))
    assert usercmd.main(["add", "carol", "--config", str(cfg), "--password-stdin"]) == 0
    entry = PasswdFile(tmp_path / "passwd").get("carol")
    assert entry.hash.startswith("$argon2id$")
    assert FAST_HASHER.verify(entry.hash, "secret")

"""maildrop/ is untrusted: a refused file is kept in corrupt/ as a file of
the spool's owner (anything else planted is removed), the owner is the
submitter, the watcher survives everything and goes on."""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import stat
import subprocess
import threading

import pytest

from msa.cleanup import maildrop
from msa.cleanup.maildrop import LineEndings, Refused, check_address, sanitise
from msa.cleanup.watcher import Watcher
from msa.message.queuefile import Envelope
from msa.store import open_spool
from tests import support
from tests.daemon_support import MESSAGE, load_all, make_cfg, queue_file

NOBODY = pwd.getpwnam("nobody")


@pytest.mark.parametrize("address,expected", [
    ("root", "root@example.org"),
    ("bob@example.test", "bob@example.test"),
    ("Bob.Smith+tag@Example.TEST", "Bob.Smith+tag@Example.TEST"),
])
def test_good_addresses(address, expected):
    assert check_address(address, "example.org") == expected


@pytest.mark.parametrize("address", [
    "a@b@c", "bob@", "@example.org", "a\r\n@x", "a\x00@x", "a b@x", "<a@x>", "",
    "x" * 65 + "@example.org", "a@" + "d" * 260, "a@x..y", "a@.x",
])
def test_bad_addresses(address):
    with pytest.raises(Refused):
        check_address(address, "example.org")


def test_null_sender_only_where_allowed():
    assert check_address("", "example.org", allow_null=True) == ""


def test_sanitise_takes_identity_from_owner_and_drops_privileged_fields():
    raw = Envelope(sender="root", origin="smtp", local_user="root", local_uid="0",
                   auth_user="admin", client_address="10.0.0.1", tls="TLSv1.3 X",
                   policies="received,date,message-id,remove-bcc", bounce_of="X",
                   attempts="9", size="10", ret="FULL", body="8BITMIME", envid="e1")
    raw.add_recipient("bob", state="sent", reply="250 ok", notify="failure,delay")
    raw.extra.append(("X-Evil", "1"))
    env = sanitise(raw, NOBODY, "example.org")
    assert (env.origin, env.local_user, env.local_uid) == ("local", "nobody", str(NOBODY.pw_uid))
    assert env.sender == "root@example.org"
    assert [(r.address, r.state, r.reply, r.notify) for r in env.recipients] == [
        ("bob@example.org", "pending", "", "DELAY,FAILURE")]
    for attr in ("auth_user", "client_address", "tls", "policies", "bounce_of", "attempts"):
        assert getattr(env, attr) == "", attr
    assert env.extra == [] and (env.ret, env.body, env.envid) == ("FULL", "8BITMIME", "e1")
    assert sanitise(raw, NOBODY, "example.org", sender_given=False).sender == "nobody@example.org"


@pytest.mark.parametrize("chunks,ok", [
    ([b"a\r\nb\r\n"], True),
    ([b"a\r", b"\nb\r\n"], True),
    ([b"a\n"], False),
    ([b"a\r", b"b"], False),
    ([b"a\rb\r\n"], False),
    ([b"\n"], False),
    ([b"a\r\n", b"\n"], False),
    ([b"a\r"], False),
])
def test_line_endings(chunks, ok):
    check = LineEndings()
    try:
        for c in chunks:
            check.feed(c)
        check.finish()
    except Refused:
        assert not ok
    else:
        assert ok


class _Running:
    def __init__(self, cfg, sp):
        self.watcher = Watcher(cfg, sp, workers=2)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete,
                                       args=(self.watcher.run(),))
        self.thread.start()

    def stop(self):
        self.loop.call_soon_threadsafe(self.watcher.stop)
        self.thread.join(20)
        self.loop.close()
        assert not self.thread.is_alive()


def _plant(sp, name, data: bytes, uid=NOBODY.pw_uid):
    """Write a file into maildrop/ as a user would: tmp/ then rename."""
    tmp = sp.root / "tmp" / f"{name}.plant"
    tmp.write_bytes(data)
    os.chown(tmp, uid, -1)
    os.rename(tmp, sp.path("maildrop", name))


def test_planted_files_are_refused_and_the_watcher_goes_on(tmp_path, caplog):
    cfg = make_cfg(tmp_path)
    sp = open_spool(cfg)
    secret = tmp_path / "secret"
    secret.write_bytes(queue_file(["mallory@evil.test"], b"secret\r\n"))
    os.symlink(secret, sp.path("maildrop", "symlink"))
    os.link(secret, sp.path("maildrop", "hardlink"))
    good_file = queue_file(["bob@example.test"], MESSAGE)
    planted_files = {
        "truncated": good_file[:-5],
        "notmessage": b"hello, this is not a queue file\r\n",
        "bareLF": queue_file(["b@x.test"], b"Subject: x\n\nbody\n.\nMAIL FROM:<x>\n"),
        "norcpt": queue_file([], MESSAGE),
        "badrcpt": queue_file(["a@b@c"], MESSAGE),
        "bad.name": good_file,
    }
    for name, data in planted_files.items():
        _plant(sp, name, data)
    directory = sp.path("maildrop", "directory")
    os.mkdir(directory)
    os.symlink(secret, os.path.join(directory, "inside"))
    os.chown(directory, NOBODY.pw_uid, -1)
    os.mkfifo(sp.path("maildrop", "fifo"))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sp.path("maildrop", "socket")))
    with caplog.at_level("INFO"):
        running = _Running(cfg, sp)
        try:
            support.wait_for(lambda: list(sp.names("maildrop")) == [],
                             what="every planted entry handled")
            # The watcher is still alive and takes a good message after them.
            _plant(sp, "good", good_file)
            active = support.wait_for(lambda: list(sp.names("active")), what="good message")
        finally:
            running.stop()
            sock.close()
    assert list(sp.names("incoming")) == []
    # Regular files are kept in corrupt/ as the spool owner's, mode 0600,
    # byte for byte; a name sendmail never makes gets a fresh one.
    kept = {name: (sp.root / "corrupt" / name) for name in sp.names("corrupt")}
    assert len(kept) == len(planted_files)
    contents = sorted(path.read_bytes() for path in kept.values())
    assert contents == sorted(planted_files.values())
    assert set(planted_files) - {"bad.name"} < set(kept) and "bad.name" not in kept
    for path in kept.values():
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    # Links, the FIFO, the socket and the directory are gone, not moved:
    # nothing the user made (and could still change) is in corrupt/. The
    # targets are untouched.
    assert secret.read_bytes().endswith(b"secret\r\n") and os.stat(secret).st_nlink == 1
    env, message = load_all(sp, "active")[active[0]]
    assert env.local_user == "nobody" and env.origin == "local"
    assert message.startswith(f"Received: by msa.test (msa, from userid {NOBODY.pw_uid})".encode())
    for reason in ("a symbolic link", "has 2 hard links", "not a regular file",
                   "bare LF in message", "no recipients", "bad address",
                   "maildrop/socket refused: cannot open: No such device or address; removed",
                   "maildrop/directory refused: not a regular file"):
        assert reason in caplog.text, reason
    # Each handled once.
    assert caplog.text.count("maildrop/socket refused") == 1


def test_an_entry_that_cannot_be_removed_is_reported_once(tmp_path, caplog):
    """A directory the watcher may not empty (here: its user made it
    immutable) stays in maildrop/; it is reported at the first pass only."""
    cfg = make_cfg(tmp_path)
    sp = open_spool(cfg)
    directory = sp.path("maildrop", "stuck")
    os.mkdir(directory)
    (directory / "x").write_bytes(b"x")
    if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode:
        pytest.skip("chattr +i is not possible on this filesystem")
    try:
        w = Watcher(cfg, sp)
        with caplog.at_level("INFO"):
            for _ in range(3):
                w.drain()
        assert caplog.text.count("maildrop/stuck refused") == 1, caplog.text
        assert "left in place, not reported again" in caplog.text
        assert list(sp.names("corrupt")) == []
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=False)


def test_identity_comes_from_the_owner_not_the_file(tmp_path):
    cfg = make_cfg(tmp_path)
    sp = open_spool(cfg)
    forged = queue_file(["root", "carol@example.org"], MESSAGE, sender="",
                        local_user="root", local_uid="0", auth_user="admin",
                        policies="received,date,message-id,remove-bcc")
    forged = forged.replace(b"Sender: <>\n", b"")  # no Sender line at all
    _plant(sp, "forged", forged)
    Watcher(cfg, sp).drain()
    [(env, message)] = load_all(sp, "active").values()
    assert (env.local_user, env.local_uid, env.auth_user) == ("nobody", str(NOBODY.pw_uid), "")
    assert env.sender == "nobody@example.org"
    assert [r.address for r in env.recipients] == ["root@example.org", "carol@example.org"]
    assert message.count(b"Received:") == 1 and b"Bcc:" not in message
    assert env.queue_id != "forged"  # a fresh id


def test_unknown_owner_is_refused(tmp_path):
    cfg = make_cfg(tmp_path)
    sp = open_spool(cfg)
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
            uid += 1
        except KeyError:
            break
    _plant(sp, "ghost", queue_file(["b@x.test"], MESSAGE), uid=uid)
    Watcher(cfg, sp).drain()
    assert list(sp.names("corrupt")) == ["ghost"]


def test_real_sendmail_file_goes_through(tmp_path):
    """What msa's own sendmail writes is accepted as is."""
    path = support.write_config(tmp_path)
    from msa import config
    cfg = config.load(str(path))
    sp = open_spool(cfg)
    proc = support.run_sendmail(["-i", "-FCron Daemon", "root", "bob@example.org"],
                                b"Subject: cron\nBcc: hidden@example.org\n\nout\n", path)
    assert proc.returncode == 0, proc.stderr
    assert len(list(sp.names("maildrop"))) == 1
    Watcher(cfg, sp).drain()
    [(env, message)] = load_all(sp, "active").values()
    assert env.origin == "local" and env.local_uid == str(os.getuid())
    assert [r.address for r in env.recipients] == ["root@example.org", "bob@example.org"]
    assert message.startswith(f"Received: by msa.test (msa, from userid {os.getuid()})".encode())
    assert b"hidden@" not in message and message.endswith(b"\r\n\r\nout\r\n")
    assert list(sp.names("corrupt")) == []


def test_owner_lookup_is_cached_for_a_short_time(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    os.chown(path, NOBODY.pw_uid, -1)
    st = os.stat(path)
    first = maildrop.owner(st)
    assert first.pw_name == "nobody" and maildrop.owner(st) is first
    monkeypatch.setattr(maildrop, "OWNER_TTL", -1.0)  # expired: looked up again
    again = maildrop.owner(st)
    assert again == first and again is not first

"""sendmail: command line, input handling, headers, envelope, exit codes.

The pure modules are tested directly; everything else runs the real
``bin/sendmail`` and reads what it left in ``maildrop/``.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from msa.message.headers import (
    HeaderTooLarge,
    drop_fields,
    extract_recipients,
    normalize_address,
    read_header_section,
)
from msa.protocol.errors import AddressError
from msa.submission.sendmail_args import UsageError, parse_args
from msa.submission.sendmail_input import MessageInput
from tests import sendmail_support as ss
from tests import support


@pytest.fixture
def cfg(tmp_path):
    return ss.make_config(tmp_path)


@pytest.fixture
def public_tmp():
    """A directory other uids can enter (pytest's tmp_path is 0700)."""
    import shutil
    d = ss.public_dir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- command line (pure) ---------------------------------------------------------

def test_args_as_real_callers_pass_them():
    cron = parse_args(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"])
    assert (cron.full_name, cron.ignore_dots, cron.body, cron.error_mode,
            cron.recipients) == ("CronDaemon", True, "8BITMIME", "m", ["root"])
    mutt = parse_args(["-oem", "-oi", "-N", "failure,delay", "-R", "hdrs", "-f", "a@x.test",
                       "--", "-odd@x.test", "b@y.test"])
    assert mutt.ignore_dots and mutt.notify == "FAILURE,DELAY" and mutt.ret == "HDRS"
    assert mutt.sender == "a@x.test" and mutt.recipients == ["-odd@x.test", "b@y.test"]
    mailx = parse_args(["-i", "-t", "-r", "me@x.test"])
    assert mailx.extract and mailx.ignore_dots and mailx.sender == "me@x.test"
    git = parse_args(["-i", "r1@x.test", "r2@x.test", "-fenv@x.test"])
    assert git.recipients == ["r1@x.test", "r2@x.test"] and git.sender == "env@x.test"
    grouped = parse_args(["-tiv", "-oQ/var/spool", "-odb", "-V", "env1", "-B", "7bit"])
    assert grouped.extract and grouped.ignore_dots and grouped.verbose == 1
    assert grouped.envid == "env1" and grouped.body == "7BIT"
    assert parse_args(["-bs"]).mode == "smtp" and parse_args(["-bp"]).mode == "list"
    assert parse_args(["-q"]).mode == "flush" and parse_args(["-q30m"]).mode == "flush"
    assert parse_args(["-C", "/x.toml"]).config == "/x.toml"
    assert parse_args(["--config=/y.toml"]).config == "/y.toml"
    assert parse_args(["-f", "<>", "x"]).sender == "<>"
    assert parse_args(["-Nnever", "x"]).notify == "NEVER"


@pytest.mark.parametrize("argv", [["-Z"], ["-B", "BINARYMIME"], ["-Nsometimes"], ["-Rall"],
                                  ["-f"], ["-bd"], ["--frobnicate"], ["-V", "a b"]])
def test_bad_args_are_usage_errors(argv):
    with pytest.raises(UsageError) as info:
        parse_args(argv)
    assert info.value.code == 64


# -- input (pure) ------------------------------------------------------------------

def _run(pieces, **kw):
    m = MessageInput(pieces, **kw)
    return b"".join(m), m.terminated


def test_lone_dot_ends_input_unless_ignored():
    src = [b"Subject: x\n", b"\n", b"a\n", b".\n", b"lost\n"]
    assert _run(src) == (b"Subject: x\r\n\r\na\r\n", True)
    assert _run(src, dots="ignore") == (b"Subject: x\r\n\r\na\r\n.\r\nlost\r\n", False)
    # Outside SMTP a leading dot is kept (no unstuffing), and ".." is not an end.
    assert _run([b"..x\n", b"..\n"]) == (b"..x\r\n..\r\n", False)
    assert _run([b"x\n", b"."]) == (b"x\r\n", True)          # lone dot at EOF
    assert _run([b"x\n", b".", b"y\n"]) == (b"x\r\n.y\r\n", False)


def test_smtp_mode_unstuffs_and_needs_the_dot():
    assert _run([b"..a\r\n", b".\r\n"], dots="smtp") == (b".a\r\n", True)
    assert _run([b"a\r\n"], dots="smtp") == (b"a\r\n", False)


def test_from_line_stripped_and_line_endings_normalised():
    out, _ = _run([b"From alice Sun Nov 29 10:00:00 2026\n", b"A: 1\r\n", b"\n", b"x\r\n", b"y"])
    assert out == b"A: 1\r\n\r\nx\r\ny\r\n"
    # A long From_ line in pieces is dropped whole; a long body line keeps its bytes.
    out, _ = _run([b"From " + b"a" * 10, b"b" * 10 + b"\n", b"c" * 5, b"d" * 5 + b"\r", b"\n"])
    assert out == b"c" * 5 + b"d" * 5 + b"\r\n"
    assert _run([b"From x\n"], strip_from=False)[0] == b"From x\r\n"


def test_pieces_never_end_in_crlf_unless_a_line_ends():
    pieces = list(MessageInput([b"abc\r", b"\n", b"def\r", b"gh\n", b"i\rj", b"k\r", b"l"]))
    assert b"".join(pieces) == b"abc\r\ndef\r\ngh\r\ni\r\njk\r\nl\r\n"
    assert [p.endswith(b"\r\n") for p in pieces] == [False, True, False, True,
                                                      False, False, False, True]
    # No bare CR or LF survives, whatever the input.
    out = b"".join(MessageInput([b"a\rb\r\r\n", b"\r\n", b"\n", b"\r"]))
    assert out.replace(b"\r\n", b"").count(b"\r") == 0 and out.count(b"\n") == out.count(b"\r\n")


# -- headers (pure) ----------------------------------------------------------------

def _fields(text: bytes):
    return read_header_section(iter(MessageInput([line + b"\n" for line in text.split(b"\n")])))


def test_extract_recipients_to_cc_bcc_and_resent_rule():
    sec = _fields(b"To: a@x.test, Bob <b@x.test>\nCc: undisclosed-recipients:;\n"
                  b"Bcc: c@x.test,\n d@x.test\nSubject: s\n\nbody")
    assert extract_recipients(sec.fields) == ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]
    resent = _fields(b"To: old@x.test\nResent-To: new@x.test\nResent-Bcc: hid@x.test\n\nb")
    assert extract_recipients(resent.fields) == ["new@x.test", "hid@x.test"]


def test_always_dropped_fields_include_folded_continuations():
    sec = _fields(b"Return-Path: <x@y>\nBcc: a@x.test,\n\tb@x.test\nSubject: s\n"
                  b"Content-Length: 12\nResent-Bcc: q@x\nX: 1\n\nbody")
    assert b"".join(drop_fields(sec.fields)) == b"Subject: s\r\nX: 1\r\n"


def test_header_section_without_separator_and_size_cap():
    sec = _fields(b"Subject: s\nthis is body\nmore")
    assert sec.to_bytes() == b"Subject: s\r\n\r\nthis is body\r\n"
    with pytest.raises(HeaderTooLarge):
        read_header_section(iter([b"X-Big: " + b"a" * 2000 + b"\r\n"] * 10), limit=10000)


def test_normalize_address():
    assert normalize_address("root", "example.org") == "root@example.org"
    assert normalize_address("Bob <b@x.test>", "e") == "b@x.test"
    assert normalize_address("<>", "e", allow_null=True) == ""
    assert normalize_address("jörg@bücher.test", "e") == "jörg@bücher.test"
    for bad in ("a b@x.test", "a@x..test", "<>", "a@", "x\r\n@y", "a,b@x.test", "a@b@c"):
        with pytest.raises(AddressError):
            normalize_address(bad, "example.org")


# -- the command -----------------------------------------------------------------

def test_t_to_cc_bcc_are_recipients_and_bcc_is_removed(cfg):
    msg = (b"From: Alice <alice@example.org>\nTo: to@x.test\nCc: Carol <cc@x.test>\n"
           b"Bcc: hidden@x.test,\n other-hidden@x.test\nSubject: -t test\n\nHello.\n")
    r = ss.sendmail(["-t", "-i", "cmdline@x.test"], msg, cfg)
    assert r.returncode == 0, r.stderr
    q = ss.only_message(cfg)
    assert q.recipients() == ["cmdline@x.test", "to@x.test", "cc@x.test", "hidden@x.test",
                              "other-hidden@x.test"]
    assert b"Bcc" not in q.message and b"hidden" not in q.message
    assert q.header_block() == (b"From: Alice <alice@example.org>\r\nTo: to@x.test\r\n"
                                b"Cc: Carol <cc@x.test>\r\nSubject: -t test\r\n")
    assert q.body() == b"Hello.\r\n"
    assert q.env.origin == "local" and q.env.local_user == "root" and q.env.local_uid == "0"
    assert q.env.sender == "root@example.org"
    assert int(q.env.size) == len(q.message)
    assert stat.S_IMODE(q.path.stat().st_mode) == 0o640


def test_bcc_and_friends_dropped_without_t(cfg):
    msg = (b"Return-Path: <evil@x>\nBcc: b@x.test\nContent-Length: 3\nFrom: a@x.test\n"
           b"Subject: s\n\nbody\n")
    r = ss.sendmail(["-i", "r@x.test"], msg, cfg)
    assert r.returncode == 0, r.stderr
    q = ss.only_message(cfg)
    assert q.recipients() == ["r@x.test"]
    assert q.message == b"From: a@x.test\r\nSubject: s\r\n\r\nbody\r\n"


def test_resent_headers_select_resent_recipients(cfg):
    msg = b"To: orig@x.test\nResent-To: again@x.test\nResent-Bcc: rb@x.test\n\nb\n"
    assert ss.sendmail(["-t"], msg, cfg).returncode == 0
    q = ss.only_message(cfg)
    assert q.recipients() == ["again@x.test", "rb@x.test"]
    assert b"Resent-Bcc" not in q.message and b"Resent-To: again" in q.message


def test_lone_dot_with_and_without_i(cfg):
    msg = b"Subject: dots\n\nline 1\n.\nline 3\n"
    assert ss.sendmail(["r@x.test"], msg, cfg).returncode == 0
    assert ss.only_message(cfg).body() == b"line 1\r\n"
    os.unlink(ss.only_message(cfg).path)
    assert ss.sendmail(["-oi", "r@x.test"], msg, cfg).returncode == 0
    assert ss.only_message(cfg).body() == b"line 1\r\n.\r\nline 3\r\n"


def test_from_line_stripped_and_bare_lf_made_crlf(cfg):
    msg = b"From alice@x.test Sun Nov 29 10:59:15 2026\nFrom: a@x.test\nSubject: lf\n\na\nb\r\nc"
    assert ss.sendmail(["-i", "r@x.test"], msg, cfg).returncode == 0
    assert ss.only_message(cfg).message == b"From: a@x.test\r\nSubject: lf\r\n\r\na\r\nb\r\nc\r\n"


def test_envelope_options(cfg):
    r = ss.sendmail(["-f", "Bounce <bounces@lists.test>", "-F", "Robot", "-N", "delay,failure",
                     "-R", "full", "-V", "ENV42", "-B", "8BITMIME", "root", "Bob@x.test"],
                    b"Subject: o\n\nx\n", cfg)
    assert r.returncode == 0, r.stderr
    env = ss.only_message(cfg).env
    assert env.sender == "bounces@lists.test" and env.full_name == "Robot"
    assert (env.ret, env.envid, env.body) == ("FULL", "ENV42", "8BITMIME")
    assert [(x.address, x.notify) for x in env.recipients] == [
        ("root@example.org", "FAILURE,DELAY"), ("Bob@x.test", "FAILURE,DELAY")]


def test_null_sender_and_unqualified_sender(cfg):
    assert ss.sendmail(["-f", "<>", "r@x.test"], b"x\n", cfg).returncode == 0
    assert ss.only_message(cfg).env.sender == ""
    os.unlink(ss.only_message(cfg).path)
    assert ss.sendmail(["-fdaemon", "r@x.test"], b"x\n", cfg).returncode == 0
    assert ss.only_message(cfg).env.sender == "daemon@example.org"


def test_verbose_prints_queue_id(cfg):
    r = ss.sendmail(["-v", "r@x.test"], b"x\n", cfg)
    assert r.returncode == 0
    assert r.stderr.decode().strip() == f"sendmail: queued as {ss.only_message(cfg).path.name}"


def test_config_option_overrides_environment(tmp_path, cfg):
    other = tmp_path / "other"
    other.mkdir()
    other_cfg = ss.make_config(other)
    r = ss.sendmail(["-C", str(other_cfg), "r@x.test"], b"x\n", cfg)
    assert r.returncode == 0
    assert ss.maildrop(cfg) == [] and len(ss.maildrop(other_cfg)) == 1


# -- exit codes ------------------------------------------------------------------

@pytest.mark.parametrize("args,code,text", [
    (["-Z", "r@x.test"], 64, "unknown option -Z"),
    ([], 64, "no recipients"),
    (["-t"], 64, "no recipients found"),
    (["-B", "bogus", "r@x.test"], 64, "bad -B value"),
    (["bad address@x.test"], 67, "bad address"),
    (["-f", "a b@x", "r@x.test"], 67, "bad address"),
])
def test_exit_codes(cfg, args, code, text):
    r = ss.sendmail(args, b"Subject: x\n\nbody\n", cfg)
    assert r.returncode == code, r.stderr
    err = r.stderr.decode()
    assert err.startswith("sendmail: ") and text in err
    assert ss.maildrop(cfg) == []


def test_unreadable_input_exits_65(cfg):
    rfd, wfd = os.pipe()  # the write end as stdin: read() fails with EBADF
    try:
        r = subprocess.run([sys.executable, ss.SENDMAIL, "r@x.test"], stdin=wfd,
                           capture_output=True, env=support.msa_env(cfg), timeout=60)
    finally:
        os.close(rfd)
        os.close(wfd)
    assert r.returncode == 65, r.stderr
    assert b"sendmail: cannot read the message" in r.stderr
    assert ss.maildrop(cfg) == [] and os.listdir(ss.spool_root(cfg) / "tmp") == []


def test_config_error_exits_78(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[spool]\nroot = 3\n")
    r = ss.sendmail(["r@x.test"], b"x\n", bad)
    assert r.returncode == 78 and r.stderr.startswith(b"sendmail: ")


def test_spool_unavailable_exits_69(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    path = support.write_config(tmp_path, None)
    path.write_text(path.read_text().replace(str(tmp_path / "spool"), str(tmp_path / "file")))
    r = ss.sendmail(["r@x.test"], b"x\n", path)
    assert r.returncode == 69, r.stderr
    assert r.stderr.startswith(b"sendmail: ")


def _run_as(uid: int, args: list[str], stdin: bytes, cfg_path) -> subprocess.CompletedProcess:
    return ss.run_as(uid, [ss.SENDMAIL, *args], stdin, cfg_path)


def test_uid_without_login_name_exits_71(public_tmp):
    import pwd
    uid = 54321
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    cfg_path = ss.make_config(public_tmp)
    os.chmod(cfg_path, 0o644)
    root = ss.spool_root(cfg_path)
    assert stat.S_IMODE((root / "maildrop").stat().st_mode) == 0o3733
    # The same uid may write into maildrop/: only the missing name stops it.
    r = _run_as(uid, ["-f", "someone@x.test", "r@x.test"], b"x\n", cfg_path)
    assert r.returncode == 71, r.stderr
    assert b"sendmail: no login name for uid 54321" in r.stderr
    assert os.listdir(root / "maildrop") == [] and os.listdir(root / "tmp") == []


def test_unprivileged_user_deposits_into_maildrop(public_tmp):
    """An ordinary user (nobody) can queue through the 3733 directories; the
    file is theirs and says who they are."""
    import pwd
    nobody = pwd.getpwnam("nobody")
    cfg_path = ss.make_config(public_tmp)
    os.chmod(cfg_path, 0o644)
    r = _run_as(nobody.pw_uid, ["r@x.test"], b"Subject: u\n\nx\n", cfg_path)
    assert r.returncode == 0, r.stderr
    q = ss.only_message(cfg_path)
    assert q.path.stat().st_uid == nobody.pw_uid
    assert (q.env.local_user, q.env.local_uid) == ("nobody", str(nobody.pw_uid))
    assert q.env.sender == "nobody@example.org"
    # The same user may not list maildrop/ (mode 3733): mailq says so, exit 77.
    r = _run_as(nobody.pw_uid, ["-bp"], b"", cfg_path)
    assert r.returncode == 77, r.stderr
    assert b"sendmail: cannot list maildrop/: Permission denied" in r.stderr


# -- size and memory -------------------------------------------------------------

def test_50mb_message_streams_with_bounded_memory(cfg, tmp_path):
    """A 50 MB message goes through with a peak RSS far below its size."""
    line = b"x" * 75 + b"\n"
    count = 50 * 1024 * 1024 // len(line)
    big = tmp_path / "big.eml"
    with open(big, "wb") as f:
        f.write(b"From: a@x.test\nSubject: big\n\n")
        for _ in range(count // 1000):
            f.write(line * 1000)
    with open(big, "rb") as stdin:
        code, err, peak_mb = ss.run_measured([sys.executable, ss.SENDMAIL, "-i", "r@x.test"],
                                             cfg, stdin=stdin)
    assert code == 0, err
    big.unlink()
    q_path = next((ss.spool_root(cfg) / "maildrop").iterdir())
    with open(q_path, "rb") as f:
        from msa.message import queuefile
        env, offset = queuefile.read_envelope(f)
        queuefile.check_size(f, env, offset)
    assert int(env.size) == len(b"From: a@x.test\r\nSubject: big\r\n\r\n") + (count // 1000) * 1000 * 77
    print(f"sendmail 50 MB message: peak RSS {peak_mb:.1f} MB")
    assert peak_mb < 60, f"peak RSS {peak_mb:.1f} MB: the message is being held in memory"


def test_message_over_size_limit_exits_65(tmp_path):
    cfg_path = ss.make_config(tmp_path, "")
    text = cfg_path.read_text().replace("[edge]\n", "[edge]\nmax_message_size = 1000\n")
    cfg_path.write_text(text)
    r = ss.sendmail(["r@x.test"], b"Subject: x\n\n" + b"y" * 2000 + b"\n", cfg_path)
    assert r.returncode == 65 and b"larger than 1000 bytes" in r.stderr
    assert ss.maildrop(cfg_path) == [] and os.listdir(ss.spool_root(cfg_path) / "tmp") == []


# -- -q (flush) -----------------------------------------------------------------

def test_q_makes_deferred_due_and_tells_the_daemon(cfg):
    root = ss.spool_root(cfg)
    later = time.time() + 3600
    path = ss.write_queue_file(root, "deferred/2", "6616852260E270034DD000",
                               ss.envelope("a@x.test", "b@y.test"), b"x\r\n", mtime=later)
    sock_path = root / "control"
    got = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(1)
    srv.settimeout(30)

    def serve():
        conn, _ = srv.accept()
        with conn:
            got.append(conn.recv(100))
            conn.sendall(b"ok flushing\n")
    t = threading.Thread(target=serve)
    t.start()
    try:
        r = ss.sendmail(["-q", "-v"], b"", cfg)
    finally:
        t.join(30)
        srv.close()
    assert r.returncode == 0, r.stderr
    assert got == [b"flush\n"]
    assert path.stat().st_mtime <= time.time()
    assert b"daemon notified" in r.stderr
    # No daemon: still fine.
    os.utime(path, (later, later))
    r = ss.sendmail(["-q"], b"", cfg)
    assert r.returncode == 0 and r.stderr == b""
    assert path.stat().st_mtime <= time.time()


def test_every_file_passes_the_watchers_maildrop_check(cfg):
    """What sendmail writes is what the watcher accepts from maildrop/
    (msa.cleanup.maildrop): awkward input must not end up quarantined."""
    import pwd

    from msa.cleanup import maildrop
    inputs = [
        (["-t", "-i"], b"To: a@x.test\nBcc: b\nSubject: cr\rin subject\n\nold mac\rline\r\n."),
        (["-f", "<>", "-N", "never", "-V", "id1", "r@x.test"], b"no headers at all"),
        (["-FCron", "-i", "-B8BITMIME", "root"], "Subject: ünï\n\n\x00nul ✓\n\r\n".encode()),
    ]
    root = pwd.getpwuid(0)
    for args, msg in inputs:
        assert ss.sendmail(args, msg, cfg).returncode == 0
        q = ss.only_message(cfg)
        f, _ = maildrop.open_untrusted(q.path)
        with f:
            env, offset = maildrop.read_untrusted(f, root, "example.org")
            check = maildrop.LineEndings()
            f.seek(offset)
            check.feed(f.read())
            check.finish()
        assert [r.address for r in env.recipients] == q.recipients()
        os.unlink(q.path)


def test_q_by_an_ordinary_user_without_daemon_is_77(public_tmp):
    import pwd
    nobody = pwd.getpwnam("nobody")
    cfg_path = ss.make_config(public_tmp)
    os.chmod(cfg_path, 0o644)
    root = ss.spool_root(cfg_path)
    ss.write_queue_file(root, "deferred/1", "66168A0F24AC0000001000",
                        ss.envelope("a@x.test", "b@y.test"), b"x\r\n", mtime=time.time() + 999)
    os.chmod(root / "deferred", 0o700)
    r = ss.run_as(nobody.pw_uid, [ss.SENDMAIL, "-q"], b"", cfg_path)
    assert r.returncode == 77, r.stderr
    assert r.stderr.startswith(b"sendmail: not permitted")


def test_maildrop_files_take_the_daemon_group(tmp_path):
    """With [daemon] group set, a file an ordinary user drops is readable by
    that group, so the daemon can read it after dropping root."""
    import grp

    from msa import config as msa_config
    from msa.store import open_spool
    group = grp.getgrnam("nogroup")
    cfg = msa_config.from_dict({"spool": {"root": str(tmp_path / "spool")},
                                "daemon": {"group": "nogroup"}})
    sp = open_spool(cfg)
    for name in ("tmp", "maildrop"):
        st = (sp.root / name).stat()
        assert st.st_gid == group.gr_gid
        assert stat.S_IMODE(st.st_mode) == 0o3733
    qid = sp.deposit("maildrop", b"x")
    assert sp.path("maildrop", qid).stat().st_gid == group.gr_gid


def test_local_mail_without_from_gets_one(tmp_path, ca):
    """Like Postfix's cleanup: a message from sendmail with no From: header
    gets one naming the envelope sender and the -F full name."""
    from tests.support import run_sendmail, write_config
    cfg = write_config(tmp_path, ca)
    r = run_sendmail(["-i", "-F", "Cron Daemon", "-f", "cron@example.org", "bob@example.net"],
                     b"Subject: no from\n\nbody\n", cfg)
    assert r.returncode == 0, r.stderr
    r2 = run_sendmail(["-i", "-f", "alice@example.org", "bob@example.net"],
                      b"From: Someone <alice@example.org>\nSubject: has from\n\nbody\n", cfg)
    assert r2.returncode == 0, r2.stderr
    files = sorted((tmp_path / "spool" / "maildrop").iterdir())
    assert len(files) == 2
    first, second = (f.read_bytes().split(b"\n\n", 1)[1] for f in files)
    assert first.startswith(b"From: Cron Daemon <cron@example.org>\r\n")
    assert second.count(b"From:") == 1 and b"From: Someone <alice@example.org>" in second


def test_a_plain_sendmail_imports_only_what_it_needs():
    """Issue 10 point 5: the deposit path does not load asyncio (filelock
    and spool.group would pull it in: 20 ms), -bs's SMTP code, the queue
    listing or the flush."""
    code = ("import sys, msa.submission.sendmail as s; "
            "print(sorted(m for m in ('asyncio', 'filelock', 'msa.submission.bsmtp', "
            "'msa.admin.mailq', 'msa.admin.queuecmd', 'msa.protocol.smtpcmd') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=support.msa_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"

"""Real mail programs call msa's sendmail (by absolute path, never
/usr/sbin/sendmail, which is Postfix's here) and leave a correct message in
``maildrop/``: bsd-mailx ``mail``, mutt, git send-email, and cron's call."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests import sendmail_support as ss
from tests import support


@pytest.fixture
def cfg(tmp_path):
    return ss.make_config(tmp_path)


def _env(cfg, home):
    return support.msa_env(cfg, HOME=str(home), LANG="C.UTF-8", LC_ALL="C.UTF-8")


@pytest.mark.skipif(shutil.which("mail") is None, reason="bsd-mailx not installed")
def test_bsd_mailx(cfg, tmp_path):
    # bsd-mailx reads $MAILRC; its "sendmail" variable names the program,
    # which it runs as "sendmail -i -t": recipients come from To, Cc and Bcc.
    rc = tmp_path / "mailrc"
    rc.write_text(f"set sendmail={ss.SENDMAIL}\n")
    env = _env(cfg, tmp_path)
    env["MAILRC"] = str(rc)
    r = subprocess.run(["mail", "-s", "mailx subject", "-c", "cc@x.test", "-b", "bcc@x.test",
                        "rcpt@y.test"], input=b"hello from mailx\n.\nafter a lone dot\n",
                       capture_output=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    q = ss.only_message(cfg)
    assert q.env.sender == "root@example.org" and q.env.local_user == "root"
    assert q.recipients() == ["rcpt@y.test", "cc@x.test", "bcc@x.test"]
    head = q.header_block()
    assert b"Subject: mailx subject\r\n" in head and b"To: rcpt@y.test\r\n" in head
    assert b"Bcc" not in q.message
    # mailx passes -i: the lone dot is text, not the end.
    assert q.body() == b"hello from mailx\r\n.\r\nafter a lone dot\r\n"


@pytest.mark.skipif(shutil.which("mutt") is None, reason="mutt not installed")
def test_mutt(cfg, tmp_path):
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(
        f'set sendmail="{ss.SENDMAIL}"\n'
        'set from="Mutt User <mutt@x.test>"\nset use_from=yes\nset envelope_from=yes\n'
        'set use_8bitmime=yes\nset dsn_notify="failure,delay"\nset dsn_return=hdrs\n'
        'set record=""\nset copy=no\nset charset="utf-8"\nset send_charset="utf-8"\n')
    r = subprocess.run(["mutt", "-n", "-F", str(muttrc), "-s", "mutt subject",
                        "-c", "cc@x.test", "-b", "bcc@x.test", "--", "rcpt@y.test"],
                       input="hello from mutt\nünïcode\n.leading dot\n".encode(),
                       capture_output=True, env=_env(cfg, tmp_path), timeout=60)
    assert r.returncode == 0, r.stderr
    q = ss.only_message(cfg)
    env = q.env
    assert env.sender == "mutt@x.test"
    assert q.recipients() == ["rcpt@y.test", "cc@x.test", "bcc@x.test"]
    assert [x.notify for x in env.recipients] == ["FAILURE,DELAY"] * 3
    assert (env.body, env.ret) == ("8BITMIME", "HDRS")
    head = q.header_block()
    assert b"From: Mutt User <mutt@x.test>\r\n" in head and b"Subject: mutt subject\r\n" in head
    assert b"Bcc" not in q.message
    assert q.body() == "hello from mutt\r\nünïcode\r\n.leading dot\r\n".encode()


@pytest.mark.skipif(subprocess.run(["git", "send-email", "--help"], capture_output=True)
                    .returncode != 0, reason="git send-email not installed")
def test_git_send_email(cfg, tmp_path):
    repo = tmp_path / "repo"
    env = _env(cfg, tmp_path)
    env.update(GIT_AUTHOR_NAME="Git User", GIT_AUTHOR_EMAIL="git@x.test",
               GIT_COMMITTER_NAME="Git User", GIT_COMMITTER_EMAIL="git@x.test",
               GIT_CONFIG_NOSYSTEM="1")

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True,
                              timeout=60, check=True)
    repo.mkdir()
    git("init", "-q")
    (repo / "f.txt").write_text("hello\n.\n")
    git("add", "f.txt")
    git("commit", "-q", "-m", "Add f.txt")
    git("format-patch", "-q", "-1", "-o", "out")
    patch = next((repo / "out").iterdir())
    git("send-email", f"--smtp-server={ss.SENDMAIL}", "--confirm=never",
        "--to=list@y.test", "--cc=reviewer@y.test", "--from=Git User <git@x.test>",
        "--envelope-sender=bounces@x.test", "--suppress-cc=self", "--no-chain-reply-to",
        str(patch))
    q = ss.only_message(cfg)
    assert q.env.sender == "bounces@x.test"
    assert q.recipients() == ["list@y.test", "reviewer@y.test"]
    head = q.header_block()
    assert b"Subject: [PATCH] Add f.txt\r\n" in head and b"From: Git User <git@x.test>\r\n" in head
    assert b"X-Mailer: git-send-email" in head
    # git send-email passes -i: the patch's lone "." line is kept.
    assert b"\r\n+.\r\n" in q.body() and b"\r\n+hello\r\n" in q.body()


def test_cron_call(cfg):
    """cron runs: sendmail -FCronDaemon -i -B8BITMIME -oem root"""
    msg = ("From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> backup.sh\n"
           "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
           "Content-Transfer-Encoding: 8bit\nX-Cron-Env: <SHELL=/bin/sh>\n\n"
           "backup done: 3 files\n.\nsummary: ok ✓\n").encode()
    r = ss.sendmail(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"], msg, cfg)
    assert r.returncode == 0, r.stderr
    q = ss.only_message(cfg)
    env = q.env
    assert env.sender == "root@example.org" and env.full_name == "CronDaemon"
    assert q.recipients() == ["root@example.org"] and env.body == "8BITMIME"
    # Qualified, as Postfix's myorigin does: a strict receiver refuses "To: root".
    assert q.header_block().startswith(
        b"From: Cron Daemon <root@example.org>\r\nTo: root@example.org\r\n")
    assert q.body() == "backup done: 3 files\r\n.\r\nsummary: ok ✓\r\n".encode()

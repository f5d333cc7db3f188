"""Aliases end to end: ``newaliases`` compiles /etc/aliases-style files
(and refuses a bad one, naming each line), cron's mail to ``root`` through
the real ``bin/sendmail`` and the watcher reaches the alias targets,
``[server] admin`` catches root and postmaster with no file at all,
``sendmail -bv`` / ``msa route`` say where mail would go, and the daemon
takes a recompiled table on SIGHUP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from msa import config
from msa.cleanup.watcher import Watcher
from msa.store import open_spool
from tests import sendmail_support as ss
from tests import support
from tests.daemon_support import load_all, start_daemon, write_daemon_config


def _run(tool: str, *args, cfg) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(support.BIN / tool), *args], capture_output=True,
                          text=True, timeout=60, env=support.msa_env(cfg))


def _with_aliases(tmp_path, text: str, admin: str = ""):
    aliases = tmp_path / "aliases"
    aliases.write_text(text)
    path = ss.make_config(tmp_path, f'[policies]\naliases = "{aliases}"\n')
    if admin:
        path.write_text(path.read_text().replace('domain = "example.org"\n',
                                                 f'domain = "example.org"\nadmin = "{admin}"\n'))
    return path, aliases


def test_newaliases_then_cron_mail_to_root_reaches_the_targets(tmp_path):
    path, aliases = _with_aliases(tmp_path, "postmaster: root\nroot: alice@example.net, bob\n")
    r = _run("newaliases", cfg=path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"newaliases: {aliases}.json: 2 aliases\n"
    r = _run("sendmail", "-bi", cfg=path)                    # the same, as sendmail
    assert r.returncode == 0, r.stderr
    r = ss.sendmail(["-i", "-FCron Daemon", "root"], b"Subject: cron\n\nout\n", path)
    assert r.returncode == 0, r.stderr
    cfg = config.load(str(path))
    sp = open_spool(cfg)
    Watcher(cfg, sp).drain()
    # The split stage makes one message per domain.
    got = sorted((r.address, r.orcpt) for env, _ in load_all(sp, "active").values()
                 for r in env.recipients)
    assert got == [("alice@example.net", "rfc822;root@example.org"),
                   ("bob@example.org", "rfc822;root@example.org")]


def test_a_bad_file_is_refused_line_by_line_and_nothing_is_written(tmp_path):
    path, aliases = _with_aliases(tmp_path, "root: alice\nbroken line\nx: |/bin/sh\n")
    r = _run("newaliases", cfg=path)
    assert r.returncode == 65
    assert f"newaliases: {aliases}:2: not 'name: address, ...'" in r.stderr
    assert f"newaliases: {aliases}:3: x: '|/bin/sh': programs and files" in r.stderr
    assert not os.path.exists(f"{aliases}.json")
    (tmp_path / "bare").mkdir()
    bare = ss.make_config(tmp_path / "bare")
    r = _run("newaliases", cfg=bare)
    assert r.returncode == 78 and "set [policies] aliases" in r.stderr


def test_admin_catches_root_and_postmaster_without_a_file(tmp_path):
    path = ss.make_config(tmp_path)
    path.write_text(path.read_text().replace('domain = "example.org"\n',
                                             'domain = "example.org"\nadmin = "ops@x.test"\n'))
    r = _run("msa", "route", "root", "postmaster@example.org", "carol", "-C", str(path), cfg=path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "root -> ops@x.test",
        "    ops@x.test: MX of x.test (port 25), tls=opportunistic",
        "postmaster@example.org -> ops@x.test",
        "    ops@x.test: MX of x.test (port 25), tls=opportunistic",
        "carol -> carol@example.org",
        "    carol@example.org: MX of example.org (port 25), tls=opportunistic"]


def test_sendmail_bv_shows_aliases_rules_and_route(tmp_path):
    path, _ = _with_aliases(tmp_path, "root: alice@example.net, bob\n")
    text = path.read_text().replace(
        "[policies]\n", '[policies]\nforward = [["^bob@example.org$", "robert@mail.test"]]\n')
    path.write_text(text + '\n[relay]\nforce_mx = { "mail.test" = "127.0.0.1:2525" }\n'
                    'tls_required_domains = ["mail.test"]\n')
    assert _run("newaliases", cfg=path).returncode == 0
    r = _run("sendmail", "-bv", "root", cfg=path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "root -> alice@example.net, robert@mail.test",
        "    alice@example.net: MX of example.net (port 25), tls=opportunistic",
        "    robert@mail.test: host 127.0.0.1:2525 (force_mx), tls=required"]
    assert ss.maildrop(path) == []                          # nothing was sent


def test_the_daemon_takes_a_recompiled_table_on_sighup(tmp_path, ca):
    ports = support.free_port(), support.free_port()
    aliases = tmp_path / "aliases"
    aliases.write_text("root: first@example.test\n")
    path = write_daemon_config(tmp_path, ca, *ports, extra="processes = false\n")
    path.write_text(path.read_text().replace(
        "[auth]", f'[policies]\naliases = "{aliases}"\n\n[auth]', 1))
    (tmp_path / "passwd").write_text("")
    assert _run("newaliases", cfg=path).returncode == 0
    cfg = config.load(str(path))
    sp = open_spool(cfg)
    proc = start_daemon(path)

    def rcpts():
        out = set()
        for stage in ["active", *sp.deferred_stages()]:
            for env, _ in load_all(sp, stage).values():
                out |= {r.address for r in env.recipients}
        return out
    try:
        support.wait_port(ports[0])
        assert ss.sendmail(["-i", "root"], b"Subject: 1\n\n1\n", path).returncode == 0
        support.wait_for(lambda: "first@example.test" in rcpts(), what="the first alias")
        aliases.write_text("root: second@example.test\n")
        assert _run("newaliases", cfg=path).returncode == 0
        os.kill(proc.p.pid, signal.SIGHUP)
        support.wait_for(lambda: b"reloaded" in support.read_so_far(proc), what="the reload")
        assert ss.sendmail(["-i", "root"], b"Subject: 2\n\n2\n", path).returncode == 0
        support.wait_for(lambda: "second@example.test" in rcpts(), what="the new alias")
    finally:
        proc.stop()


def test_route_refuses_what_is_not_an_address(tmp_path):
    path = ss.make_config(tmp_path)
    r = _run("msa", "route", "a b@x.test", "-C", str(path), cfg=path)
    assert r.returncode == 64 and "bad address" in r.stderr
    r = _run("sendmail", "-bv", "<>", cfg=path)
    assert r.returncode == 64 and "empty address" in r.stderr, r.stderr

"""``msa check``, ``msa config [-n]`` and ``msa --version`` against real
configuration files (the demo's, and broken copies of it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from msa import config, sysexits
from tests import support


def msa(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(support.BIN / "msa"), *args], text=True,
                          capture_output=True, env=support.msa_env(), timeout=120, **kw)


@pytest.fixture
def demo(tmp_path):
    p = msa("demo", "--var", str(tmp_path / "var"), "--setup-only")
    assert p.returncode == 0, p.stderr
    path = tmp_path / "var" / "msa.toml"
    # the spool as the daemon makes it
    from msa.store import open_spool
    open_spool(config.load(str(path)))
    return path


def set_key(path, section: str, key: str, value: str) -> None:
    """Set ``key = value`` (TOML text) in ``[section]`` of the file."""
    lines, out, here, done = path.read_text().splitlines(), [], "", False
    for line in lines:
        if line.startswith("["):
            if here == section and not done:
                out.append(f"{key} = {value}")
                done = True
            here = line.strip("[]")
        elif here == section and line.split("=")[0].strip() == key:
            line, done = f"{key} = {value}", True
        out.append(line)
    if not done:
        out += [f"[{section}]"] * (here != section) + [f"{key} = {value}"]
    path.write_text("\n".join(out) + "\n")


def test_the_demo_config_is_ok(demo):
    p = msa("check", "-C", str(demo))
    assert p.returncode == 0 and p.stdout.strip().endswith(": ok"), (p.stdout, p.stderr)


def test_check_names_the_commit_protocol(demo):
    p = msa("check", "-C", str(demo))
    assert p.returncode == 0 and ": commit protocol " in p.stdout, p.stdout
    set_key(demo, "spool", "sync", '"strict"')
    p = msa("check", "-C", str(demo))
    assert p.returncode == 0 and ": commit protocol strict (" in p.stdout, p.stdout
    set_key(demo, "spool", "sync", '"fast"')
    p = msa("check", "-C", str(demo))
    assert p.returncode == 78 and 'spool.sync: expected "auto" or "strict"' in p.stderr, p.stderr


def test_every_problem_is_listed_and_the_daemon_refuses_too(demo):
    set_key(demo, "relay", "tls", '"sometimes"')
    set_key(demo, "relay", "smarthost", '"relay.test:99999"')
    set_key(demo, "edge", "max_recipients", "0")
    os.chmod(demo.parent / "passwd", 0o644)
    p = msa("check", "-C", str(demo))
    assert p.returncode == sysexits.EX_CONFIG, p.stderr
    lines = p.stderr.splitlines()
    for want in ("relay.tls: 'sometimes' is not one of", "relay.smarthost: bad port",
                 "edge.max_recipients: 0 must be more than 0",
                 "auth.passwd_file", "mode 0644"):
        assert any(want in line for line in lines), (want, lines)
    assert "Traceback" not in p.stderr
    # The daemon checks the same values before it starts anything (it used
    # to die in a child with a traceback and exit 1).
    d = msa("daemon", "--config", str(demo), "--foreground")
    assert d.returncode == sysexits.EX_CONFIG and "relay.tls" in d.stderr, d.stderr
    assert "Traceback" not in d.stderr


def test_a_key_that_does_not_match_the_certificate(demo, tmp_path):
    ca = support.make_ca(tmp_path)
    set_key(demo, "edge", "keyfile", f'"{ca.key_pem}"')
    p = msa("check", "-C", str(demo))
    assert p.returncode == sysexits.EX_CONFIG and "edge.certfile/keyfile" in p.stderr, p.stderr


def test_config_prints_what_loads_back_the_same(demo, tmp_path):
    full = msa("config", "-C", str(demo))
    assert full.returncode == 0, full.stderr
    (tmp_path / "full.toml").write_text(full.stdout)
    a, b = config.load(str(demo)), config.load(str(tmp_path / "full.toml"))
    b.path = a.path
    assert a == b
    changed = msa("config", "-n", "-C", str(demo))
    assert changed.returncode == 0
    assert "[edge]" in changed.stdout and "submission = [" in changed.stdout
    assert "[daemon]" not in changed.stdout   # the demo changes nothing there
    assert len(changed.stdout) < len(full.stdout)


def test_version():
    p = msa("--version")
    assert p.returncode == 0 and p.stdout.startswith("msa "), p.stdout


def test_postmaster_and_admin_must_be_addresses(demo):
    set_key(demo, "server", "postmaster", '"post master@x"')
    set_key(demo, "server", "admin", '"ops@@x.test"')
    p = msa("check", "-C", str(demo))
    assert p.returncode == sysexits.EX_CONFIG
    assert "server.postmaster: bad address" in p.stdout + p.stderr
    assert "server.admin: bad address" in p.stdout + p.stderr

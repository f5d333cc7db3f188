"""With no configuration file anywhere, every command refuses (exit 78,
EX_CONFIG), names the three places it looked, and creates nothing: a
spool made under the caller's directory would take mail that no daemon
ever reads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from msa import config, sysexits
from tests import support

COMMANDS = [
    (["sendmail", "-i", "x@example.test"], b"Subject: t\n\nhi\n"),
    (["sendmail", "-t"], b"To: x@example.test\n\nhi\n"),
    (["sendmail", "-bs"], b"HELO x\r\nQUIT\r\n"),
    (["sendmail", "-bp"], b""),
    (["sendmail", "-q"], b""),
    (["mailq"], b""),
    (["msa", "queue", "list"], b""),
    (["msa", "queue", "flush"], b""),
    (["msa", "user", "list"], b""),
    (["msa", "daemon"], b""),
    (["msa", "edge"], b""),
    (["msa", "watch"], b""),
    (["msa", "deliver"], b""),
]


@pytest.fixture
def empty_dir(tmp_path):
    if os.path.exists(config.DEFAULT_PATH):
        pytest.skip(f"{config.DEFAULT_PATH} exists on this machine")
    d = tmp_path / "cwd"
    d.mkdir()
    return d


@pytest.mark.parametrize("argv,stdin", COMMANDS, ids=[" ".join(a) for a, _ in COMMANDS])
def test_refuses_without_a_config_and_creates_nothing(empty_dir, argv, stdin):
    env = support.msa_env()
    env.pop("MSA_CONFIG", None)
    env["HOME"] = str(empty_dir)
    p = subprocess.run([sys.executable, str(support.BIN / argv[0]), *argv[1:]], input=stdin,
                       cwd=empty_dir, env=env, capture_output=True, timeout=60)
    assert p.returncode == sysexits.EX_CONFIG, (p.returncode, p.stderr)
    err = p.stderr.decode()
    for place in ("--config", "$MSA_CONFIG", config.DEFAULT_PATH):
        assert place in err, err
    assert list(empty_dir.iterdir()) == []


def test_load_names_the_three_places(monkeypatch):
    if os.path.exists(config.DEFAULT_PATH):
        pytest.skip(f"{config.DEFAULT_PATH} exists on this machine")
    monkeypatch.delenv("MSA_CONFIG", raising=False)
    with pytest.raises(config.ConfigError, match=r"--config.*\$MSA_CONFIG.*/etc/msa/msa\.toml"):
        config.load(None)


def test_an_explicit_empty_file_is_a_config(tmp_path):
    """An empty file is all defaults, with its spool beside the file."""
    path = tmp_path / "msa.toml"
    path.write_text("")
    cfg = config.load(str(path))
    assert cfg.spool.root == str(tmp_path / "var" / "spool")

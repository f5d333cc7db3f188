"""Hostile command-line values for every sendmail option that becomes
header or envelope text: each either exits non-zero with nothing spooled,
or gives a message that the watcher takes into active/ with no field
injected. Never an acknowledged message that ends in corrupt/."""

from __future__ import annotations

import io
import os
import sys
from email.header import decode_header, make_header

import pytest

from msa import config, sysexits
from msa.cleanup.watcher import Watcher
from msa.message.headers import field_name
from msa.store import open_spool
from msa.submission import sendmail
from tests import support
from tests.daemon_support import load_all
from tests.sendmail_support import make_config

HOSTILE = {
    "LF": "Eve\nBcc: y@example.test",
    "CRLF": "Eve\r\nX-Injected: yes",
    "CR": "Eve\rX-Injected: yes",
    "NUL": "Eve\x00X-Injected: yes",
    "ESC": "Eve\x1b[31m",
    "C1": "Eve\x85X-Injected: yes",
    "8bit": "Ève Éléonore 鳥",
    "not-utf8": os.fsdecode(b"Eve\xff\xfe"),
    "10KB": "E" * 10240,
}

# Where each value goes on the command line.
PLACES = {
    "-F": lambda v: ["-F", v, "x@example.test"],
    "-f": lambda v: ["-f", v, "x@example.test"],
    "-r": lambda v: ["-r", v, "x@example.test"],
    "-f@": lambda v: ["-f", f"{v}@example.org", "x@example.test"],
    "rcpt": lambda v: [v],
    "rcpt@": lambda v: [f"{v}@example.test"],
    "-N": lambda v: ["-N", v, "x@example.test"],
    "-R": lambda v: ["-R", v, "x@example.test"],
    "-V": lambda v: ["-V", v, "x@example.test"],
    "-B": lambda v: ["-B", v, "x@example.test"],
}

MESSAGE = b"Subject: t\n\nhi\n"


@pytest.fixture
def spool_cfg(tmp_path, monkeypatch):
    path = support.write_config(tmp_path)
    monkeypatch.setenv("MSA_CONFIG", str(path))
    cfg = config.load(str(path))
    return cfg, open_spool(cfg)


def run_sendmail(argv: list[str], stdin: bytes, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = sendmail.main(["-i", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_value_is_refused_or_delivered_whole(spool_cfg, monkeypatch, capsys, place, kind):
    cfg, sp = spool_cfg
    code, err = run_sendmail(PLACES[place](HOSTILE[kind]), MESSAGE, monkeypatch, capsys)
    if code != sysexits.EX_OK:
        assert code in (sysexits.EX_USAGE, sysexits.EX_NOUSER), (code, err)
        assert err.startswith("sendmail: ") and "Traceback" not in err, err
        assert list(sp.names("maildrop")) == [] and os.listdir(sp.root / "tmp") == []
        return
    assert len(list(sp.names("maildrop"))) == 1
    Watcher(cfg, sp).drain()
    assert list(sp.names("corrupt")) == [], "an acknowledged message went to corrupt/"
    [(env, message)] = load_all(sp, "active").values()
    header = message.split(b"\r\n\r\n", 1)[0]
    names = [field_name(line) for line in header.split(b"\r\n") if line[:1] not in (b" ", b"\t")]
    assert "x-injected" not in names and "bcc" not in names, header
    assert names.count("from") == 1, header
    for c in b"\x00\r\x1b":
        assert c not in header.replace(b"\r\n", b""), header


def test_the_issue_examples(spool_cfg, monkeypatch, capsys):
    """-F with LF or CRLF: exit 64, nothing spooled (was: exit 0, then
    corrupt/ or an injected field)."""
    _, sp = spool_cfg
    for name in ("Eve\nBcc: y@example.test", "Eve\r\nX-Injected: yes"):
        code, err = run_sendmail(["-F", name, "x@example.test"], MESSAGE, monkeypatch, capsys)
        assert code == sysexits.EX_USAGE and "bad -F value: control character" in err, err
    assert list(sp.names("maildrop")) == []


def test_8bit_full_name_becomes_an_encoded_word(spool_cfg, monkeypatch, capsys):
    cfg, sp = spool_cfg
    code, err = run_sendmail(["-F", "Ève Dupont", "-f", "eve@example.org", "x@example.test"],
                             MESSAGE, monkeypatch, capsys)
    assert code == 0, err
    Watcher(cfg, sp).drain()
    [(_, message)] = load_all(sp, "active").values()
    [field] = [f for f in message.split(b"\r\n") if f.startswith(b"From: ")]
    assert field.isascii() and field.endswith(b"?= <eve@example.org>"), field
    assert str(make_header(decode_header(field[6:].decode()))) == "Ève Dupont <eve@example.org>"


def test_real_command_with_a_line_break_in_F(tmp_path):
    """The issue's own command line, through bin/sendmail."""
    path = make_config(tmp_path)
    p = support.run_sendmail(["-i", "-F", "Eve\nBcc: y@example.test", "x@example.test"],
                             MESSAGE, path)
    assert p.returncode == sysexits.EX_USAGE, p.stderr
    assert b"bad -F value" in p.stderr
    assert os.listdir(tmp_path / "spool" / "maildrop") == []


def test_gecos_name_is_made_safe():
    from msa.message.headers import from_field, safe_display_name
    assert safe_display_name("Eve\r\nBcc: y,room 1") == "EveBcc: y,room 1"
    assert from_field("e@x", safe_display_name("Eve\nX: y")) == b'From: "EveX: y" <e@x>\r\n'

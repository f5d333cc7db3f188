"""Nothing a client or a local user sends can forge a log line: the running
daemon's log file, fed an AUTH user name and a maildrop file name with line
breaks and an escape sequence, has each of them on one line, escaped."""

from __future__ import annotations

import base64
import re
import os
import pwd

from msa import config
from msa.store import open_spool
from tests import support
from tests.daemon_support import add_user, start_daemon, write_daemon_config
from tests.edge_support import RawClient

FORGED = "Dec 02 18:00:00 vm msa/edge[1]: FORGED LINE"


def test_forged_lines_come_out_escaped(tmp_path, ca):
    ports = support.free_port(), support.free_port()
    path = write_daemon_config(tmp_path, ca, *ports)
    add_user(tmp_path / "passwd", "alice", "alice-pw", ["alice@example.org"])
    log = tmp_path / "msa.log"
    sp = open_spool(config.load(str(path)))
    proc = start_daemon(path, "daemon", "--log", str(log))
    try:
        support.wait_port(ports[1])    # the port it talks to (bound after ports[0])
        c = RawClient(ports[1], ca=ca, implicit=True)
        c.cmd("EHLO client.test")
        user = f"foo\n{FORGED}\r\n\x1b[2J"
        token = base64.b64encode(f"\0{user}\0wrong".encode()).decode()
        assert c.cmd(f"AUTH PLAIN {token}").startswith("535")
        c.close()
        # A local user's file in maildrop/ whose name holds a line break.
        name = f"x\n{FORGED.replace('/', '-')}"
        planted = sp.root / "tmp" / "plant"
        planted.write_bytes(b"not a queue file\n")
        os.chown(planted, pwd.getpwnam("nobody").pw_uid, -1)
        os.rename(planted, sp.path("maildrop", name))
        support.wait_for(lambda: log.exists() and "authentication failed" in log.read_text()
                         and "kept as corrupt/" in log.read_text(), timeout=30,
                         what="both log lines")
    finally:
        proc.stop()
    lines = log.read_text().splitlines()
    assert not any(line.startswith(FORGED) or line.startswith("\x1b") for line in lines), lines
    [auth] = [line for line in lines if "authentication failed" in line]
    assert f"foo\\n{FORGED}\\r\\n\\x1b[2J" in auth, auth
    [moved] = [line for line in lines if "kept as corrupt/" in line]
    assert f"x\\n{FORGED.replace('/', '-')}" in moved, moved
    assert "\x1b" not in log.read_text()


BAD = "\x1b[31mX\u0085Y\u2028Z\x7f\u00e9"      # ESC, C1 NEL, U+2028, DEL, 8-bit
SHOWN = "\\x1b[31mX\\x85Y\\u2028Z\\x7f\u00e9"
LINE = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ msa/\w+\[\d+\]: ")


def test_every_client_field_comes_out_escaped(tmp_path, ca):
    """HELO, MAIL and RCPT addresses, the AUTH user, the Message-ID, a
    maildrop file name and sendmail -F, each carrying ESC, a C1 control,
    U+2028, DEL and an 8-bit letter (and CR LF where the field can hold
    them): every line of the log stays one Postfix-shaped line, no raw
    control reaches the file, and the fields that are logged show escaped."""
    ports = support.free_port(), support.free_port()
    log = tmp_path / "msa.log"
    path = write_daemon_config(tmp_path, ca, *ports,
                               extra=f'log = "{log}"\nprocesses = false\n')
    add_user(tmp_path / "passwd", "alice", "alice-pw", ["alice@example.org"])
    sp = open_spool(config.load(str(path)))
    proc = start_daemon(path)
    try:
        support.wait_port(ports[1])    # the port it talks to (bound after ports[0])
        c = RawClient(ports[1], ca=ca, implicit=True)
        c.cmd(f"EHLO helo{BAD}".encode())
        c.cmd("EHLO client.test")
        c.cmd(f"MAIL FROM:<m{BAD}@example.org> SMTPUTF8".encode())
        token = base64.b64encode(f"\0u{BAD}\r\nx\0wrong".encode()).decode()
        assert c.cmd(f"AUTH PLAIN {token}").startswith("535")
        token = base64.b64encode(b"\0alice\0alice-pw").decode()
        assert c.cmd(f"AUTH PLAIN {token}").startswith("235")
        assert c.cmd("MAIL FROM:<alice@example.org> SMTPUTF8").startswith("250")
        c.cmd(f"RCPT TO:<r{BAD}@example.test>".encode())
        assert c.cmd("RCPT TO:<bob@example.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        c.send(f"From: alice@example.org\r\nMessage-ID: <id{BAD}@example.org>\r\n"
               f"Subject: x\r\n\r\nbody\r\n.\r\n".encode())
        assert c.reply().startswith("250")
        c.close()
        r = support.run_sendmail(["-F", f"Name{BAD}", "bob@example.test"], b"Subject: s\n\nb\n",
                                 path)
        assert r.returncode == 64          # refused before anything is spooled
        name = f"n{BAD}\r\nx"
        planted = sp.root / "tmp" / "plant2"
        planted.write_bytes(b"not a queue file\n")
        os.rename(planted, sp.path("maildrop", name))
        support.wait_for(lambda: log.exists() and "message-id=" in log.read_text()
                         and "kept as corrupt/" in log.read_text()
                         and "authentication failed" in log.read_text(), timeout=30,
                         what="the lines")
    finally:
        proc.stop()
    raw = log.read_bytes().decode("utf-8")
    for bad in ("\x1b", "\x85", "\u2028", "\x7f", "\r"):
        assert bad not in raw, repr(bad)
    lines = raw.split("\n")[:-1]
    assert all(LINE.match(line) for line in lines), [x for x in lines if not LINE.match(x)]
    text = "\n".join(lines)
    assert f"user=u{SHOWN}\\r\\nx" in text                        # the AUTH user
    # The Message-ID (HeaderBlock's reader takes U+0085 and U+2028 for
    # white space, as str.split does: they come out as spaces).
    assert "message-id=<id\\x1b[31mX Y Z\\x7f\u00e9@example.org>" in text
    assert f"maildrop/n{SHOWN}\\r\\nx refused" in text            # the file name

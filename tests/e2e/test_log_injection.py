"""Nothing a client or a local user sends can forge a log line: the running
daemon's log file, fed an AUTH user name and a maildrop file name with line
breaks and an escape sequence, has each of them on one line, escaped."""

from __future__ import annotations

import base64
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
        support.wait_port(ports[0])
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

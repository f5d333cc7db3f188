"""systemd: contrib/systemd/msa.service passes the real ``systemd-analyze
verify`` (with msa's own man pages for its Documentation=) and asks for
the hardening msa(8) promises; ``msa daemon`` speaks sd_notify(3) over a
real ``$NOTIFY_SOCKET``: READY=1 once it listens, RELOADING=1 and READY=1
around a reload, STOPPING=1 at the end, and only the main process
speaks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests import support
from tests.daemon_support import write_daemon_config

UNIT = support.ROOT / "contrib" / "systemd" / "msa.service"


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / "msa.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/msa", str(support.BIN / "msa")))
    man = tmp_path / "man"
    for page, section in (("msa.8", "man8"), ("msa.toml.5", "man5")):
        (man / section).mkdir(parents=True, exist_ok=True)
        shutil.copy(support.ROOT / "man" / page, man / section / page)
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "MANPATH": str(man)})
    assert r.returncode == 0 and not r.stderr.strip(), r.stdout + r.stderr
    # A typo in a directive is reported: the check can fail.
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=stricter"))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "MANPATH": str(man)})
    assert "stricter" in r.stderr, r.stderr


def test_unit_asks_for_what_msa8_promises():
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["ExecStart"] == ["/usr/local/bin/msa daemon --foreground"]
    assert d["ProtectSystem"] == ["strict"] and d["ReadWritePaths"] == ["/var/spool/msa"]
    assert d["NoNewPrivileges"] == ["yes"] and d["PrivateTmp"] == ["yes"]
    assert d["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert d["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]


def _states(sock: socket.socket, until: str) -> list[str]:
    out = []
    while not any(until in s for s in out):
        out.append(sock.recv(4096).decode())
    return out


@pytest.mark.parametrize("mode", ["processes", "single"])
def test_daemon_speaks_sd_notify(tmp_path, ca, mode):
    notify = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(60)
    ports = support.free_port(), support.free_port()
    extra = "edge_workers = 2\n" if mode == "processes" else "processes = false\n"
    path = write_daemon_config(tmp_path, ca, *ports, extra=extra)
    (tmp_path / "passwd").write_text("")
    proc = support.Proc([sys.executable, str(support.BIN / "msa"), "daemon", "--foreground",
                         "--config", str(path)],
                        env=support.msa_env(NOTIFY_SOCKET=str(notify)))
    try:
        ready = _states(sock, "READY=1")
        # Listening by the time it says so (no wait: connect at once).
        socket.create_connection(("127.0.0.1", ports[0]), timeout=10).close()
        socket.create_connection(("127.0.0.1", ports[1]), timeout=10).close()
        os.kill(proc.p.pid, signal.SIGHUP)
        reload = _states(sock, "READY=1")
        proc.p.send_signal(signal.SIGTERM)
        stopping = _states(sock, "STOPPING=1")
        assert proc.p.wait(60) == 0
    finally:
        proc.stop()
        sock.close()
    assert len(ready) == 1 and ready[0].startswith("READY=1"), ready
    assert reload[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and reload[-1] == "READY=1"
    assert stopping == ["STOPPING=1"]


def test_sd_notify_without_systemd_does_nothing(monkeypatch):
    from msa.system import sd_notify
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert sd_notify("READY=1") is False

"""Helpers for the SMTP edge tests: users, an edge in a background event
loop thread, an edge in a child process (for kill -9 and RSS), and small
SMTP clients that speak raw bytes."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import argon2

from msa.message import queuefile
from msa.submission.auth import PasswdEntry, PasswdFile
from tests import support

# Cheap argon2 parameters: the tests verify many logins (the edge reads the
# parameters from each hash, so this only makes the tests fast).
FAST_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


def add_user(passwd: Path, name: str, password: str, senders=(), hasher=FAST_HASHER) -> None:
    pf = PasswdFile(passwd)
    pf.set(PasswdEntry(name, hasher.hash(password), list(senders)))
    pf.save()


class EdgeThread:
    """SmtpEdge objects running in an event loop in a background thread."""

    def __init__(self, loop_factory=asyncio.new_event_loop):
        self.loop = loop_factory()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.edges = []

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, factory):
        """``factory()`` runs in the loop and returns an edge or a list."""
        async def go():
            made = factory()
            made = made if isinstance(made, list) else [made]
            for edge in made:
                await edge.start()
            return made
        made = self.call(go())
        self.edges += made
        return made

    def stop(self, grace: float = 2.0):
        async def go():
            for edge in self.edges:
                await edge.stop(grace)
        try:
            self.call(go(), timeout=grace + 20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


RUNNER = r"""
import asyncio, logging, os, signal, sys
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from msa import config, store
from msa.submission.edge import edges_from_config
cfg = config.load({config!r})
async def main():
    spool = store.open_spool(cfg)
    edges = edges_from_config(cfg, spool)
    for e in edges:
        await e.start()
    print("ready", os.getpid(), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for e in edges:
        await e.stop(5)
asyncio.run(main())
"""


OPEN_RUNNER = r"""
import asyncio, sys
sys.path.insert(0, {root!r})
from spool import Spool
from msa.submission.edge import SmtpEdge
async def main():
    edge = SmtpEdge(("127.0.0.1", {port}), Spool({spool!r}, ["incoming"], sync={sync!r}),
                    require_auth=False, hostname="msa.test")
    await edge.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def edge_process(config: Path | None = None, prefix=(), open_port: int = 0,
                 spool: Path | None = None, sync: str = "auto") -> support.Proc:
    """``python -c`` running the config's edges, or with ``open_port`` a
    plaintext edge without AUTH on ``spool`` (the tutorial's first edge);
    ``prefix`` goes before python (strace); ``sync``: that spool's
    ``[spool] sync``. Returns when listening."""
    if config is not None:
        code = RUNNER.format(root=str(support.ROOT), config=str(config))
    else:
        code = OPEN_RUNNER.format(root=str(support.ROOT), port=open_port, spool=str(spool),
                                  sync=sync)
    log = tempfile.TemporaryFile()        # a pipe nobody reads would fill up
    proc = support.Proc([*prefix, sys.executable, "-c", code], stdout=subprocess.PIPE,
                        stderr=log)
    proc.log = log
    line = proc.p.stdout.readline().decode()
    if not line.startswith("ready"):
        proc.stop()
        log.seek(0)
        raise RuntimeError(f"edge process did not start: {line!r} "
                           f"{log.read().decode(errors='replace')[-3000:]}")
    return proc


def edge_config(tmp_path: Path, ca, submission=(), submissions=(), extra_edge: str = "",
                extra: str = "") -> Path:
    """A config whose [edge] lists the given listen addresses."""
    path = support.write_config(tmp_path, ca, extra=extra)
    text = path.read_text()
    sub = ", ".join(f'"{a}"' for a in submission)
    subs = ", ".join(f'"{a}"' for a in submissions)
    text = text.replace("submission = []\nsubmissions = []\n",
                        f"submission = [{sub}]\nsubmissions = [{subs}]\n{extra_edge}")
    path.write_text(text)
    return path


def client_context(ca) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.ca_pem))


class RawClient:
    """A line-oriented SMTP client over a plain or TLS socket, for sending
    exactly the bytes a test wants (pipelining, smuggling, bad lines)."""

    def __init__(self, port: int, host: str = "127.0.0.1", ca=None, implicit: bool = False,
                 timeout: float = 15.0):
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.ctx = client_context(ca) if ca else None
        if implicit:
            self.sock = self.ctx.wrap_socket(self.sock, server_hostname="localhost")
        self.buf = b""
        self.banner = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by server; have %r" % self.buf)
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> str:
        """One whole (possibly multi-line) reply, lines joined by \\n."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return "\n".join(x.decode() for x in lines)

    def cmd(self, text: str | bytes) -> str:
        self.send((text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.reply()

    def starttls(self) -> str:
        r = self.cmd("STARTTLS")
        assert r.startswith("220"), r
        self.sock = self.ctx.wrap_socket(self.sock, server_hostname="localhost")
        return r

    def login(self, user: str, password: str) -> str:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.cmd(f"AUTH PLAIN {token}")

    def closed(self, timeout: float = 10.0) -> bool:
        """True when the server has closed the connection (after any
        pending lines, which are kept in the buffer)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except socket.timeout:  # an OSError too: before the clause below
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def session(port: int, ca, user: str, password: str, implicit: bool = False,
            host: str = "127.0.0.1") -> RawClient:
    """A client that is past EHLO, TLS and AUTH."""
    c = RawClient(port, host=host, ca=ca, implicit=implicit)
    c.cmd("EHLO client.test")
    if not implicit:
        c.starttls()
        c.cmd("EHLO client.test")
    r = c.login(user, password)
    assert r.startswith("235"), r
    return c


def queued(spool: Path, stage: str = "incoming") -> list[Path]:
    d = spool / stage
    return sorted(d.iterdir()) if d.is_dir() else []


def read_queued(path: Path) -> tuple[queuefile.Envelope, bytes]:
    with open(path, "rb") as f:
        env, offset = queuefile.read_envelope(f)
        queuefile.check_size(f, env, offset)
        f.seek(offset)
        return env, f.read()


def vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_hwm(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0, clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def wait_until(pred, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    return pred()




class Edges:
    """The config's edges (one STARTTLS, one implicit TLS listener, or the
    addresses given) running in a background loop; users alice and bob.
    They write messages as received (``apply_policies = false``) unless
    ``edge_opts`` sets ``apply_policies``."""

    PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}

    def __init__(self, tmp_path: Path, ca, edge_opts: str = "", host: str = "127.0.0.1",
                 loop_factory=asyncio.new_event_loop):
        from msa import config, store
        from msa.submission.edge import edges_from_config
        self.ca, self.host = ca, host
        self.port = support.free_port(host)
        self.tls_port = support.free_port(host)
        h = f"[{host}]" if ":" in host else host
        opts = "auth_failure_delay = 0.05\n" + edge_opts
        if "apply_policies" not in opts:
            # These edges are for checking what the edge receives, byte for
            # byte; tests/test_edge_stamp.py checks the policies it applies.
            opts += "apply_policies = false\n"
        self.config_path = edge_config(
            tmp_path, ca, [f"{h}:{self.port}"], [f"{h}:{self.tls_port}"], extra_edge=opts,
            extra='senders = { alice = ["alice@example.org", "@alice.test"] }\n')
        self.passwd = tmp_path / "passwd"
        add_user(self.passwd, "alice", self.PASSWORDS["alice"])
        add_user(self.passwd, "bob", self.PASSWORDS["bob"], ["bob@example.net"])
        self.cfg = config.load(str(self.config_path))
        self.spool = Path(self.cfg.spool.root)
        self.thread = EdgeThread(loop_factory)
        spool = store.open_spool(self.cfg)
        self.edges = self.thread.start(lambda: edges_from_config(self.cfg, spool))

    def session(self, user: str = "alice", implicit: bool = False) -> RawClient:
        port = self.tls_port if implicit else self.port
        return session(port, self.ca, user, self.PASSWORDS[user], implicit, self.host)

    def client(self, implicit: bool = False) -> RawClient:
        port = self.tls_port if implicit else self.port
        return RawClient(port, host=self.host, ca=self.ca, implicit=implicit)

    def queued(self) -> list[Path]:
        return queued(self.spool)

    def stop(self, grace: float = 2.0) -> None:
        self.thread.stop(grace)


def send_message(c: RawClient, sender: str, rcpts, body: bytes) -> str:
    """MAIL, RCPT..., DATA, body (must end in CRLF, already dot-stuffed);
    returns the final reply."""
    r = c.cmd(f"MAIL FROM:<{sender}>")
    assert r.startswith("250"), r
    for rcpt in rcpts:
        r = c.cmd(f"RCPT TO:<{rcpt}>")
        assert r.startswith("250"), r
    r = c.cmd("DATA")
    assert r.startswith("354"), r
    c.send(body + b".\r\n")
    return c.reply()

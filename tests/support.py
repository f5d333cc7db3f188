"""Helpers for tests that drive real programs on loopback.

Everything binds 127.0.0.0/8 or ::1, waits in bounded loops, and stops what
it starts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin"


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def wait_for(pred, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def read_lines(stream, n: int, timeout: float = 30.0) -> list[str]:
    """The first ``n`` lines a child writes to ``stream`` (a pipe), waiting
    for them up to ``timeout`` seconds in all: for killing a child once it
    has said something, not after a guessed time."""
    import select
    lines: list[str] = []
    buf = b""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    while len(lines) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"{len(lines)} of {n} lines after {timeout}s")
        data = os.read(fd, 4096)
        if not data:
            raise EOFError(f"the child ended after {len(lines)} of {n} lines")
        buf += data
        *done, buf = buf.split(b"\n")
        lines += [x.decode() for x in done]
    if buf:  # a partial line: the caller reads the rest from the stream
        raise AssertionError("read_lines needs a child that writes whole lines")
    return lines


class SkewedLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock a test moves on. ``loop.time()`` is the
    public clock that ``call_at``, ``call_later`` and asyncio's timeouts
    read, so timers fire when the test says, not after real waits: a test
    of a 100 s timeout takes no 100 s and cannot be beaten by a slow
    machine."""

    def __init__(self) -> None:
        super().__init__()
        self.skew = 0.0

    def time(self) -> float:
        return super().time() + self.skew

    def advance(self, seconds: float) -> None:
        """Move the clock on (code running in the loop)."""
        self.skew += seconds

    def advance_threadsafe(self, seconds: float) -> None:
        """Move the clock on, from another thread: in the loop, once what
        is ready to run there has run (a server that has just answered
        still arms its timer for the next command: that belongs before
        the jump, as it would come before a real wait). Returns when the
        clock has moved."""
        async def jump():
            for _ in range(5):
                await asyncio.sleep(0)
            self.skew += seconds
        asyncio.run_coroutine_threadsafe(jump(), self).result(30)


class FakeClock:
    """A wall clock (``time.time`` stand-in) that moves only when told."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class CA:
    dir: Path
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_ca(directory: Path) -> CA:
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
    ca_pem = directory / "ca.pem"
    cert_pem = directory / "server.pem"
    key_pem = directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    for extra in cert.cert_chain_pems[1:]:
        with open(cert_pem, "ab") as f:
            f.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(key_pem))
    return CA(directory, ca_pem, cert_pem, key_pem)


def write_config(directory: Path, ca: CA | None = None, extra: str = "") -> Path:
    """A config with a spool under ``directory`` and the test certificate."""
    path = directory / "msa.toml"
    tls = ""
    if ca is not None:
        tls = f'certfile = "{ca.cert_pem}"\nkeyfile = "{ca.key_pem}"\n'
    path.write_text(
        f'[spool]\nroot = "{directory / "spool"}"\n\n'
        f'[server]\nhostname = "msa.test"\ndomain = "example.org"\n\n'
        f'[edge]\nsubmission = []\nsubmissions = []\nclient_dns = false\n{tls}\n'
        f'[auth]\npasswd_file = "{directory / "passwd"}"\n\n' + extra)
    return path


def msa_env(config: Path | None = None, **extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(BIN) + os.pathsep + env["PATH"]
    if config is not None:
        env["MSA_CONFIG"] = str(config)
    env.update(extra)
    return env


def run_sendmail(args: list[str], stdin: bytes, config: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BIN / "sendmail"), *args], input=stdin,
                          capture_output=True, env=msa_env(config), timeout=60, **kw)


class Proc:
    """A background process that is killed when the test ends."""

    def __init__(self, argv: list[str], **kw):
        self.argv = argv
        self.p = subprocess.Popen(argv, stdout=kw.pop("stdout", subprocess.PIPE),
                                  stderr=kw.pop("stderr", subprocess.STDOUT),
                                  start_new_session=True, **kw)

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout)
        return self.p.returncode

    def output(self) -> str:
        if self.p.stdout is None:
            return ""
        self.stop()
        return self.p.stdout.read().decode(errors="replace")


def have(program: str) -> bool:
    return shutil.which(program) is not None or os.path.exists(program)


_seen: dict[int, bytes] = {}


def read_so_far(proc: "Proc") -> bytes:
    """What a :class:`Proc` has written to its stdout pipe so far, read
    without blocking (kept across calls)."""
    fd = proc.p.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        while chunk := os.read(fd, 1 << 16):
            _seen[fd] = _seen.get(fd, b"") + chunk
    except BlockingIOError:
        pass
    return _seen.get(fd, b"")

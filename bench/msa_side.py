"""msa configured for the benchmark's job: accept plain SMTP from loopback
on one port, relay everything to the sink.

The spool keeps msa's full durability (fsync of file and directory before
250); nothing here turns it off. smtp-source cannot AUTH, so the listener
must accept unauthenticated mail from 127.0.0.1 the way Postfix's
``mynetworks`` does: :func:`missing_features` says which config keys this
needs and whether the checked-out msa has them.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .procs import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
MSA = ROOT / "bin" / "msa"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# TOML appended to every generated msa.toml (``run.py --msa-toml``), for
# experiments; the run's notes show it.
EXTRA_TOML = ""
# ``run.py --edge-workers``: ``[daemon] edge_workers`` (None: msa's default).
EDGE_WORKERS: int | None = None

# (section, key) the benchmark config needs; value shown in reports.
TRUSTED_KEY = ("edge", "trusted_networks")
SMARTHOST_KEYS = (("relay", "smarthost"), ("relay", "smarthost_tls"))


def config_keys() -> set[tuple[str, str]]:
    """Every (section, key) the checked-out msa's config accepts."""
    from msa import config
    cfg = config.Config()
    out = set()
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            out |= {(f.name, g.name) for g in dataclasses.fields(sub)}
    return out


def missing_features() -> list[str]:
    """What the benchmark needs from msa that is not there at all."""
    missing = []
    if not (ROOT / "msa" / "process" / "daemon.py").exists():
        missing.append("msa/process/daemon.py (`msa daemon`, `msa deliver`)")
    keys = config_keys()
    for key in (TRUSTED_KEY, *SMARTHOST_KEYS):
        if key not in keys:
            missing.append(f"config [{key[0]}] {key[1]}")
    return missing


def config_text(base: Path, port: int, sink_port: int, certfile: Path, keyfile: Path,
                edge_workers: int | None = None) -> str:
    """The msa.toml for the benchmark (pure): one plain listener on
    127.0.0.1 that takes mail without AUTH from 127.0.0.1 (what Postfix's
    ``mynetworks`` grants the reference). Other loopback addresses are
    clients like any (the idle phase's, counted per client: 100 each)."""
    workers = "" if edge_workers is None else f"edge_workers = {edge_workers}\n"
    return f"""\
# msa for the benchmark (bench/msa_side.py). Generated.
[spool]
root = "{base}/spool"

[server]
hostname = "msa.bench.test"
domain = "bench.test"

[edge]
submission = ["127.0.0.1:{port}"]
trusted_networks = ["127.0.0.1/32"]
max_connections_per_client = 200
submissions = []
certfile = "{certfile}"
keyfile = "{keyfile}"

[auth]
passwd_file = "{base}/passwd"

[relay]
smarthost = "127.0.0.1:{sink_port}"
smarthost_tls = "none"
tls = "none"

[daemon]
log = "stderr"
log_level = "info"
{workers}"""


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for the listener's STARTTLS (unused by
    smtp-source, but the edge may insist on having one)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"],
                       check=True, capture_output=True, timeout=60)
    return cert, key


class MsaInstance:
    """One msa process (``msa daemon`` or ``msa deliver``) on its own spool."""

    def __init__(self, base: Path, port: int, sink_port: int, command: str = "daemon"):
        self.base, self.port, self.sink_port = Path(base), port, sink_port
        self.command = command
        self.config = self.base / "msa.toml"
        self.logfile = self.base / f"msa-{command}.log"
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        cert, key = self_signed(self.base)
        (self.base / "passwd").touch()
        self.config.write_text(config_text(self.base, self.port, self.sink_port, cert, key,
                                           EDGE_WORKERS) + EXTRA_TOML)

    @property
    def spool(self) -> Path:
        return self.base / "spool"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait_listen: bool = True, timeout: float = 30.0) -> None:
        if not self.config.exists():
            self.write_config()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        argv = self.argv()
        self._log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=self.base, start_new_session=True,
                                     preexec_fn=die_with_parent)
        if wait_listen:
            self._wait_port(timeout)

    def argv(self) -> list[str]:
        return [sys.executable, str(MSA), self.command, "--config", str(self.config),
                "--foreground"]

    def _wait_port(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"msa {self.command} exited {self.proc.returncode}:"
                                   f"\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.recv(512)
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"msa {self.command} not listening on {self.port}:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def spool_count(self) -> int:
        """Messages anywhere in the spool's stages (0 once all delivered)."""
        n = 0
        skip = {"tmp", "claims", "corrupt", "hold"}
        if not self.spool.exists():
            return 0
        for entry in os.scandir(self.spool):
            if entry.is_dir() and entry.name not in skip:
                for _root, _dirs, files in os.walk(entry.path):
                    n += len(files)
        return n

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def write_backlog(active: Path, count: int, size: int = 2048,
                  sender: str = "s@x", rcpt: str = "r@y") -> None:
    """Write ``count`` ready-to-deliver queue files straight into
    ``active/`` (msa/message/queuefile.py format). Not fsynced: this is a fixture
    for the runner's start-up, not an acceptance path."""
    from msa.message.queuefile import Envelope, utc_iso
    active.mkdir(parents=True, exist_ok=True)
    now = time.time()
    usec0 = int(now * 1_000_000)
    pid = os.getpid() & 0xFFFFFF
    body = _message(size)
    arrival = utc_iso(now)
    for i in range(count):
        qid = f"{usec0 + i:013X}{pid:06X}{i & 0xFFF:03X}"
        env = Envelope(sender=sender, queue_id=qid, arrival=arrival, origin="smtp",
                       client_address="127.0.0.1", size=str(len(body)))
        env.add_recipient(rcpt)
        with open(active / qid, "wb") as f:
            f.write(env.to_bytes())
            f.write(body)


def _message(size: int) -> bytes:
    head = (b"From: s@x\r\nTo: r@y\r\nSubject: backlog\r\n"
            b"Message-ID: <backlog@bench.test>\r\nDate: Sun, 29 Nov 2026 11:00:00 +0000\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, size // len(line))

"""Helpers for the watcher, policy, maildrop, daemon and demo tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from msa import config, queuefile
from msa.queuefile import Envelope
from tests import support


def make_cfg(tmp_path: Path, **policies) -> config.Config:
    cfg = config.from_dict({
        "spool": {"root": str(tmp_path / "spool")},
        "server": {"hostname": "msa.test", "domain": "example.org"},
        "policies": policies,
    })
    return cfg


def queue_file(recipients, message: bytes, sender: str = "alice@example.org",
               qid: str = "", **fields) -> bytes:
    env = Envelope(sender=sender, queue_id=qid, arrival=queuefile.utc_iso(1_800_000_000),
                   size=str(len(message)), **fields)
    for r in recipients:
        env.add_recipient(r)
    return env.to_bytes() + message


def smtp_file(recipients, message: bytes, **fields) -> bytes:
    """A queue file as the SMTP edge writes it into incoming/."""
    defaults = dict(origin="smtp", client_address="127.0.0.1", client_name="localhost",
                    helo="client.example", tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
                    auth_user="alice")
    defaults.update(fields)
    return queue_file(recipients, message, **defaults)


MESSAGE = (b"From: alice@example.org\r\nTo: bob@example.test\r\n"
           b"Bcc: secret@example.net\r\nSubject: hi\r\n\r\nHello.\r\n")


def deposit(spool, stage: str, data: bytes, qid: str | None = None) -> str:
    """Deposit with the Queue-ID line matching the file name."""
    qid = qid or spool_new_id()
    data = data.replace(b"\nSender:", f"\nQueue-ID: {qid}\nSender:".encode(), 1) \
        if b"Queue-ID:" not in data else data
    return spool.deposit(stage, data, qid=qid)


def spool_new_id() -> str:
    from spool import new_id
    return new_id()


def load_all(spool, stage: str) -> dict[str, tuple[Envelope, bytes]]:
    out = {}
    for name in spool.names(stage):
        path = spool.path(stage, name)
        env, offset = queuefile.load(path)
        out[name] = (env, path.read_bytes()[offset:])
    return out


def wait_files(spool, stage: str, n: int, timeout: float = 20.0) -> list[str]:
    return support.wait_for(lambda: (names := sorted(spool.names(stage))) and len(names) >= n
                            and names, timeout=timeout, what=f"{n} files in {stage}/")


def run_python(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=support.msa_env(**(env or {})), timeout=timeout)

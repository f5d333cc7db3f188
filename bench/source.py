"""The load: Postfix's ``smtp-source`` (plain SMTP, no AUTH, no TLS, one
message per session, no pipelining)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from .procs import die_with_parent

SMTP_SOURCE = "/usr/sbin/smtp-source"


@dataclass
class SourceResult:
    seconds: float
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def argv(port: int, concurrency: int, count: int, size: int) -> list[str]:
    return [SMTP_SOURCE, "-s", str(concurrency), "-m", str(count), "-l", str(size),
            "-f", "s@x", "-t", "r@y", f"127.0.0.1:{port}"]


def run(port: int, concurrency: int, count: int, size: int,
        timeout: float = 600.0) -> SourceResult:
    """Send ``count`` messages of ``size`` payload bytes with
    ``concurrency`` parallel sessions; returns when smtp-source exits (every
    message got its final reply)."""
    start = time.monotonic()
    try:
        p = subprocess.run(argv(port, concurrency, count, size), capture_output=True,
                           text=True, timeout=timeout, preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired as exc:
        return SourceResult(time.monotonic() - start, -1,
                            f"timeout after {timeout}s {exc.stderr or ''}")
    return SourceResult(time.monotonic() - start, p.returncode, (p.stdout + p.stderr).strip())

"""The disk's raw speed at what a durable queue does: create a small file
and fsync it, one thread, no concurrency. Printed as context, since every
acceptance in msa and in Postfix costs at least one of these."""

from __future__ import annotations

import os
import time
from pathlib import Path


def fsynced_creates_per_s(directory: Path, count: int = 500, size: int = 2048) -> float:
    """open(O_CREAT|O_EXCL), write ``size`` bytes, fsync, close: files/s."""
    directory.mkdir(parents=True, exist_ok=True)
    data = b"x" * size
    start = time.monotonic()
    for i in range(count):
        _create_synced(directory / f"f{i}", data)
    rate = count / (time.monotonic() - start)
    _clean(directory)
    return rate


def durable_commits_per_s(directory: Path, count: int = 500, size: int = 2048) -> float:
    """The spool's commit: write + fsync in tmp/, rename into a stage,
    fsync the stage directory: files/s."""
    tmp, stage = directory / "tmp", directory / "stage"
    tmp.mkdir(parents=True, exist_ok=True)
    stage.mkdir(parents=True, exist_ok=True)
    data = b"x" * size
    start = time.monotonic()
    for i in range(count):
        _create_synced(tmp / f"f{i}", data)
        os.rename(tmp / f"f{i}", stage / f"f{i}")
        dfd = os.open(stage, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
    rate = count / (time.monotonic() - start)
    _clean(tmp)
    _clean(stage)
    return rate


def _create_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean(directory: Path) -> None:
    for name in os.listdir(directory):
        os.unlink(directory / name)

"""The disk's raw speed at what a durable queue does: create a small file
and fsync it, one thread, no concurrency. Printed as context, since every
acceptance in msa and in Postfix costs at least one of these."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
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


def journal_commits_per_s(directory: Path, threads: int = 1, count: int = 500,
                          size: int = 2048) -> float:
    """The journal protocol's commit (spool.durable): write in tmp/, rename
    into a stage, fsync the file, by ``threads`` writers at once (what the
    journal's group commit can carry): files/s over all of them."""
    tmp, stage = directory / "tmp", directory / "stage"
    tmp.mkdir(parents=True, exist_ok=True)
    stage.mkdir(parents=True, exist_ok=True)
    data = b"x" * size
    per = max(1, count // threads)

    def writer(k: int) -> None:
        for i in range(per):
            src, dest = f"{tmp}/{k}_{i}", f"{stage}/{k}_{i}"
            fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.rename(src, dest)
                os.fsync(fd)
            finally:
                os.close(fd)
    workers = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    start = time.monotonic()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    rate = per * threads / (time.monotonic() - start)
    _clean(tmp)
    _clean(stage)
    return rate


def ceilings(directory: Path, count: int) -> dict:
    """What the disk under ``directory`` can do per commit protocol: one
    writer (the latency path) and 10 and 50 at once (group commit)."""
    out = {"creates_per_s": fsynced_creates_per_s(directory, count),
           "commits_per_s": durable_commits_per_s(directory, count)}
    for threads in (1, 10, 50):
        out[f"journal_c{threads}_per_s"] = journal_commits_per_s(directory, threads, count)
    return out


# How each file system is made in an image file (the image's path last).
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"],
        "ext4-nojournal": ["mkfs.ext4", "-q", "-F", "-O", "^has_journal"],
        "xfs": ["mkfs.xfs", "-q", "-f"]}


@contextlib.contextmanager
def loop_filesystem(parent: Path, fstype: str, size_mb: int = 4096, name: str = ""):
    """A ``fstype`` file system (a key of :data:`MKFS`) in an image file
    under ``parent`` (so on the disk that holds it), loop-mounted on
    ``parent/name`` (default ``msa-bench-<fstype>``); yields the mount
    point; unmounts and removes the image after. Root; a failed mkfs or
    mount raises CalledProcessError."""
    name = name or f"msa-bench-{fstype}"
    image, point = parent / f"{name}.img", parent / name
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    try:
        subprocess.run([*MKFS[fstype], str(image)], check=True, capture_output=True,
                       timeout=300)
        point.mkdir(exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True,
                       capture_output=True, timeout=60)
        try:
            yield point
        finally:
            subprocess.run(["umount", str(point)], capture_output=True, timeout=120)
            with contextlib.suppress(OSError):
                point.rmdir()
    finally:
        image.unlink()


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

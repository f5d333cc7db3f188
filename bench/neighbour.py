#!/usr/bin/env python3
"""What a busy neighbour does to msa's commit latency: the time of one
Spool.deposit (the spool's own protocol, chosen for the filesystem) alone,
while another process writes a big file without fsync on the same
filesystem, and while it writes on another filesystem.

    python3 bench/neighbour.py SPOOL_DIR OTHER_FS_DIR [--n 300]

A journal commit (ext4's jbd2, xfs's log) carries the data of every file
with newly allocated blocks in the transaction, in ordered mode, so a
neighbour's write-back can sit in front of msa's fsync."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spool import Spool  # noqa: E402

WRITER = """
import os, sys
data = b"n" * (1 << 20)
path = sys.argv[1]
while True:
    with open(path, "wb") as f:
        for _ in range(512):          # 512 MB, then again from the start
            f.write(data)
"""


def latencies(spool: Spool, n: int) -> list[float]:
    out = []
    body = b"x" * 2048
    for _ in range(n):
        start = time.perf_counter()
        qid = spool.deposit("incoming", body)
        out.append(time.perf_counter() - start)
        os.unlink(spool.fspath("incoming", qid))
    return out


def summary(name: str, xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return (f"{name:<34} median {1000 * statistics.median(xs):7.2f} ms   "
            f"p99 {1000 * p99:8.2f} ms   max {1000 * xs[-1]:8.2f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spool_dir")
    p.add_argument("other_dir")
    p.add_argument("--n", type=int, default=300)
    a = p.parse_args(argv)
    spool = Spool(Path(a.spool_dir) / "neighbour-spool", ["incoming"])
    print(f"spool on {a.spool_dir}: {spool.protocol.describe()}")
    print(summary("alone", latencies(spool, a.n)))
    for where, label in ((a.spool_dir, "writer on the same filesystem"),
                         (a.other_dir, "writer on another filesystem")):
        big = Path(where) / "neighbour.big"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(big)])
        try:
            time.sleep(3)           # let its dirty pages build up to write-back
            print(summary(label, latencies(spool, a.n)))
        finally:
            writer.kill()
            writer.wait()
            big.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

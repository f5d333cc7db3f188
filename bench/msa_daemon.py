#!/usr/bin/env python3
"""``msa daemon`` for the benchmark while msa has no config key for an
unauthenticated loopback listener (``[edge] trusted_networks``).

smtp-source cannot AUTH. This runs msa's own :class:`msa.daemon.Daemon`
(the same edge, watcher, runner, spool and logging as ``msa daemon``) with
one extra :class:`msa.edge.SmtpEdge` built with ``require_auth=False``,
bound to 127.0.0.1 only, so only loopback clients reach it: what Postfix's
``mynetworks = 127.0.0.0/8`` grants the reference. Nothing else differs;
durability (fsync before 250) is untouched.

    bench/msa_daemon.py --config FILE --listen 127.0.0.1:PORT [--only edge|split]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from msa import config, daemon  # noqa: E402
from msa.edge import SmtpEdge, _limits, parse_listen  # noqa: E402
from msa.store import open_spool  # noqa: E402


class BenchDaemon(daemon.Daemon):
    def __init__(self, cfg, spool, listen: tuple[str, int], command: str = "daemon"):
        super().__init__(cfg, spool, daemon.COMPONENTS[command])
        self.listen = listen

    def build(self) -> None:
        super().build()
        self.edges.append(SmtpEdge(self.listen, self.spool, hostname=self.cfg.server.hostname,
                                   require_auth=False, **_limits(self.cfg.edge)))


def split(opts: argparse.Namespace) -> int:
    """The three components as three processes on one spool (``msa
    edge``/``watch``/``deliver`` as msa(8) allows), under this one so the
    harness measures them as one tree. SIGTERM is passed on."""
    here, msa = os.path.abspath(__file__), os.path.join(ROOT, "bin", "msa")
    children = [
        subprocess.Popen([sys.executable, here, "--config", opts.config, "--listen",
                          f"127.0.0.1:{opts.listen[1]}", "--only", "edge"]),
        subprocess.Popen([sys.executable, msa, "watch", "--config", opts.config]),
        subprocess.Popen([sys.executable, msa, "deliver", "--config", opts.config])]

    def forward(signum, frame):
        for child in children:
            child.send_signal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--listen", required=True, type=parse_listen)
    p.add_argument("--only", default="daemon", choices=["daemon", "edge", "split"],
                   help="edge: the listener alone (to measure acceptance by itself); "
                        "split: edge, watcher and runner as three processes")
    opts = p.parse_args()
    if opts.listen[0] != "127.0.0.1":
        p.error("--listen must be on 127.0.0.1 (the listener takes mail without AUTH)")
    if opts.only == "split":
        return split(opts)
    cfg = config.load(opts.config)
    daemon.setup_logging(cfg.daemon.log, cfg.daemon.log_level)
    return asyncio.run(BenchDaemon(cfg, open_spool(cfg), opts.listen, opts.only).serve())


if __name__ == "__main__":
    sys.exit(main())

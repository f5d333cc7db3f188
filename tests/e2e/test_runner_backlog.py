"""A large backlog: the runner streams names and keeps a bounded number of
messages in flight (DESIGN: memory bounded by configuration, not by queue
length). The relay is a hand-written fake so the test measures the runner,
not SMTP."""

from __future__ import annotations

import asyncio
import os
import tracemalloc

from msa.delivery.relay import RcptResult
from msa.message.queuefile import Envelope, utc_iso
from spool import new_id
from tests.relay_support import RunnerHarness, load_config, relay_config

N = 2000
MSG = b"Subject: backlog\r\n\r\nx\r\n"


class CountingRelay:
    """Accepts everything after a short pause; records concurrency."""

    def __init__(self, runner_ref):
        self.in_flight = self.max_in_flight = self.done = 0
        self.max_pending = 0
        self.runner_ref = runner_ref

    async def attempt(self, env, message, rcpts):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        runner = self.runner_ref()
        if runner is not None:
            self.max_pending = max(self.max_pending, len(runner.pending))
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        self.done += 1
        return [RcptResult(r.address, "sent", "250 2.0.0 ok", "2.0.0") for r in rcpts]

    async def close(self):
        pass


def fill_active(root, n: int) -> None:
    """n queue files written directly (no fsync: this is test setup)."""
    active = root / "active"
    now = utc_iso(1_800_000_000)
    for _ in range(n):
        qid = new_id()
        env = Envelope(sender="a@example.org", queue_id=qid, arrival=now, size=str(len(MSG)))
        env.add_recipient("b@x.test")
        with open(active / qid, "wb") as f:
            f.write(env.to_bytes() + MSG)


def test_backlog_is_processed_with_bounded_work_in_flight(tmp_path):
    cfg = load_config(relay_config(tmp_path, relay={"max_deliveries": 20}))
    holder = {}
    relay = CountingRelay(lambda: holder.get("runner"))

    async def go():
        h = RunnerHarness(cfg, relay=relay)
        fill_active(h.spool.root, N)
        tracemalloc.start()
        async with h:
            holder["runner"] = h.runner
            await h.until(lambda: relay.done >= N and not h.names("active"), timeout=120,
                          what="backlog drained")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak
    peak = asyncio.run(go())
    assert relay.done == N
    assert relay.max_in_flight <= 20
    assert relay.max_pending <= 2 * 20 + 2
    assert not os.listdir(tmp_path / "spool" / "active")
    # Everything the runner holds is per message in flight; 5000 queued
    # names would already be ~1 MB of Python objects with their envelopes.
    assert peak < 8 * 1024 * 1024, peak

"""The edge's group commit of incoming/ directory fsyncs (DirSyncer):
every future is resolved only after a directory fsync that began after it
was handed in; a lone message's store thread fsyncs itself."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from msa.submission.writer import DirSyncer


def _resolve_all(loop, futures, timeout=20.0):
    return loop.run_until_complete(asyncio.wait_for(
        asyncio.gather(*futures, return_exceptions=True), timeout))


def test_one_at_a_time_the_caller_fsyncs_itself(tmp_path):
    loop = asyncio.new_event_loop()
    try:
        syncer = DirSyncer(str(tmp_path))
        for i in range(5):
            f = loop.create_future()
            syncer.add(loop, f, f"q{i}")
            assert _resolve_all(loop, [f]) == [f"q{i}"]
        assert syncer.inline == 5 and syncer.fsyncs == 0
    finally:
        loop.close()


def test_concurrent_callers_are_all_resolved_after_an_fsync(tmp_path):
    loop = asyncio.new_event_loop()
    try:
        syncer = DirSyncer(str(tmp_path))
        n = 40
        futures = [loop.create_future() for _ in range(n)]
        start = threading.Barrier(n)

        def store(i):
            start.wait()
            syncer.add(loop, futures[i], i)
        threads = [threading.Thread(target=store, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert _resolve_all(loop, futures) == list(range(n))
        assert 1 <= syncer.inline + syncer.fsyncs <= n
    finally:
        loop.close()


@pytest.mark.parametrize("concurrent", [False, True])
def test_a_failed_fsync_fails_the_stores_it_covers(tmp_path, concurrent):
    loop = asyncio.new_event_loop()
    try:
        syncer = DirSyncer(str(tmp_path / "gone"))
        futures = [loop.create_future() for _ in range(3)]
        if concurrent:
            syncer._syncing = True        # as if another store were fsyncing
        for i, f in enumerate(futures):
            syncer.add(loop, f, i)
        syncer._syncing = False
        results = _resolve_all(loop, futures)
        assert all(isinstance(r, OSError) for r in results), results
        assert not os.path.exists(tmp_path / "gone")
    finally:
        loop.close()

"""The power-cut harness's disk (bench/nbdcache.py): what survives a cut is
what was flushed, or written with FUA, plus at most the unflushed writes;
and qemu's own NBD client (qemu-io) reads, writes and flushes through it."""

from __future__ import annotations

import random
import subprocess

import pytest

from bench.nbdcache import BLOCK, CachedDisk, NbdServer
from tests import support


def test_cut_keeps_flushed_and_fua_and_only_unflushed_otherwise():
    disk = CachedDisk(bytes(16 * BLOCK))
    disk.write(0, b"a" * BLOCK, fua=False)
    disk.flush()
    disk.write(BLOCK, b"b" * BLOCK, fua=True)
    disk.write(2 * BLOCK, b"c" * 2 * BLOCK, fua=False)       # never flushed
    assert disk.read(2 * BLOCK, 3) == b"ccc"                  # reads see it
    seen = set()
    for seed in range(40):
        image, pieces, kept = disk.power_cut(random.Random(seed))
        assert image[:BLOCK] == b"a" * BLOCK
        assert image[BLOCK:2 * BLOCK] == b"b" * BLOCK
        assert pieces == 2
        for i in (2, 3):        # each unflushed block: new or old, whole
            block = image[i * BLOCK:(i + 1) * BLOCK]
            assert block in (b"c" * BLOCK, bytes(BLOCK))
        seen.add(kept)
    assert seen == {0, 1, 2}    # some cuts keep none, some part, some all


def test_lying_disk_keeps_nothing_after_the_start():
    disk = CachedDisk(bytes(4 * BLOCK), lying=True)
    disk.write(0, b"a" * BLOCK, fua=True)
    disk.flush()
    image, _, kept = disk.power_cut(random.Random(1))
    assert image[:BLOCK] == (b"a" * BLOCK if kept else bytes(BLOCK))


def test_qemu_nbd_client_reads_writes_and_flushes(tmp_path):
    if not support.have("qemu-io"):
        pytest.skip("qemu-io (qemu-utils) not installed")
    disk = CachedDisk(bytes(1024 * 1024))
    server = NbdServer(disk)
    try:
        url = f"nbd://127.0.0.1:{server.port}"
        done = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 8192 4096",
                               "-c", "read -P 0x5a 8192 4096", url],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, \
            done.stdout + done.stderr
        assert disk.read(8192, 4096) == b"\x5a" * 4096
        assert disk.flushes >= 1         # qemu-io flushes when it closes the image
        assert disk.durable[8192:8192 + 4096] == b"\x5a" * 4096
    finally:
        server.close()


def test_armed_disk_dies_among_writes():
    disk = CachedDisk(bytes(8 * BLOCK))
    disk.write(0, b"a" * BLOCK, fua=False)
    disk.arm(2)
    disk.write(BLOCK, b"b" * BLOCK, fua=False)
    disk.write(2 * BLOCK, b"c" * BLOCK, fua=False)
    assert not disk.dead.is_set()
    disk.write(3 * BLOCK, b"d" * BLOCK, fua=True)     # the third: no power
    disk.flush()
    assert disk.dead.is_set()
    image, pieces, _ = disk.power_cut(random.Random(0))
    assert pieces == 3                                  # a, b, c: never flushed
    assert image[3 * BLOCK:4 * BLOCK] == bytes(BLOCK)


def test_disk_armed_at_a_flush_dies_with_its_writes_in_the_cache():
    disk = CachedDisk(bytes(8 * BLOCK))
    disk.arm_flush(2)
    disk.write(0, b"a" * BLOCK, fua=False)
    disk.flush()                                        # the first: carried out
    disk.write(BLOCK, b"b" * BLOCK, fua=False)
    disk.flush()                                        # the second: no power
    assert disk.dead.is_set()
    disk.write(2 * BLOCK, b"c" * BLOCK, fua=False)      # nothing lands after
    image, pieces, _ = disk.power_cut(random.Random(0))
    assert image[:BLOCK] == b"a" * BLOCK
    assert pieces == 1                                   # b: in the cache only
    assert image[2 * BLOCK:3 * BLOCK] == bytes(BLOCK)

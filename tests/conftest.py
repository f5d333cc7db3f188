"""Shared fixtures: a spool in a temp dir, a test CA, free loopback ports.

Fixtures that start real programs (dnsmasq, smtp-sink, the daemon) live in
``tests/support.py`` so test modules can import the helpers directly.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from spool import durable  # noqa: E402
from tests import support  # noqa: E402


@pytest.fixture
def spool_root(tmp_path):
    return tmp_path / "spool"


@pytest.fixture(scope="session")
def ca(tmp_path_factory):
    """A test CA and a server certificate for localhost/127.0.0.1/::1."""
    return support.make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def config_file(tmp_path, ca):
    """A minimal msa.toml in tmp_path; returns its path. Tests append to it."""
    return support.write_config(tmp_path, ca)


@pytest.fixture
def tmpfs_path(tmp_path):
    """A fresh directory on tmpfs (``/dev/shm``), removed after the test:
    where ``[spool] sync = auto`` picks the journal protocol on any
    machine (the protocol chosen on ``tmp_path`` depends on the machine's
    disk: ext4 with or without a journal, xfs, ...)."""
    if not os.path.isdir("/dev/shm") or durable.choose("/dev/shm").fstype != "tmpfs":
        pytest.skip("/dev/shm is not tmpfs here")
    path = tempfile.mkdtemp(prefix="msa-test-", dir="/dev/shm")
    try:
        yield pathlib.Path(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)

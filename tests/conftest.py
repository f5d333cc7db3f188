"""Shared fixtures: a spool in a temp dir, a test CA, free loopback ports.

Fixtures that start real programs (dnsmasq, smtp-sink, the daemon) live in
``tests/support.py`` so test modules can import the helpers directly.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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

"""msa.toml(5) documents every [relay] and [retry] key, with the defaults
the code has."""

from __future__ import annotations

import dataclasses
import re

import pytest

from msa import config
from tests import support

MAN5 = (support.ROOT / "man" / "msa.toml.5").read_text()


def section(name: str) -> str:
    return MAN5.split(f'.SH "[{name}]"', 1)[1].split("\n.SH", 1)[0]


@pytest.mark.parametrize("name,cls", [("relay", config.RelayConfig),
                                      ("retry", config.RetryConfig)])
def test_every_key_is_documented(name, cls):
    text = section(name)
    documented = set(re.findall(r"^\.TP\n\.B (\w+)$", text, re.M))
    assert documented == {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("key", ["min_delay", "max_delay", "lifetime", "bounce_lifetime",
                                 "scan_interval", "dsn_original_limit"])
def test_retry_defaults_match_the_code(key):
    value = getattr(config.RetryConfig(), key)
    entry = section("retry").split(f".TP\n.B {key}\n", 1)[1].split(".TP", 1)[0]
    assert f"default {int(value)}" in entry, (key, value)

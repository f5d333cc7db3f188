"""The man pages say what the code does: the EXAMPLE config loads, every
[policies] and [daemon] key is documented."""

from __future__ import annotations

import dataclasses
import re
import tomllib

from msa import config
from tests import support

MAN5 = (support.ROOT / "man" / "msa.toml.5").read_text()


def _example() -> str:
    section = MAN5.split(".SH EXAMPLE", 1)[1]
    body = section.split(".nf\n", 1)[1].split("\n.fi", 1)[0]
    return body.replace("\\e", "\\")


def test_example_config_is_valid():
    cfg = config.from_dict(tomllib.loads(_example()), base="/etc/msa")
    assert cfg.policies.forward and cfg.daemon.user == "msa"
    from msa.cleanup import policies
    assert [s for s, _ in policies.pipeline(cfg)] == [
        "policy-headers", "policy-forward", "policy-split"]


def test_every_key_of_my_sections_is_documented():
    for section, cls in (("policies", config.PoliciesConfig), ("daemon", config.DaemonConfig)):
        text = MAN5.split(f'.SH "[{section}]"', 1)[1].split(".SH", 1)[0]
        documented = set(re.findall(r"^\.BR? (\w+)", text, re.M))
        documented |= {w for line in re.findall(r"^\.BR (.*)$", text, re.M)
                       for w in re.findall(r"\w+", line)}
        for f in dataclasses.fields(cls):
            assert f.name in documented, f"{section}.{f.name} not in msa.toml(5)"


def test_msa8_names_every_daemon_option():
    man8 = (support.ROOT / "man" / "msa.8").read_text().replace("\\-", "-")
    from msa.process.daemon import parse_args
    actions = parse_args(["daemon"])  # noqa: F841 (parses with defaults)
    for option in ("--config", "--foreground", "--detach", "--pidfile", "--user", "--group",
                   "--log", "--log-level"):
        assert option in man8, option

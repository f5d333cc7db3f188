"""msa.toml(5) documents every [edge] and [auth] key."""

from __future__ import annotations

import dataclasses
import re

from msa import config
from tests import support

MAN5 = (support.ROOT / "man" / "msa.toml.5").read_text()


def test_every_edge_and_auth_key_is_documented():
    for section, cls in (("edge", config.EdgeConfig), ("auth", config.AuthConfig)):
        text = MAN5.split(f'.SH "[{section}]"', 1)[1].split(".SH", 1)[0]
        documented = {w for line in re.findall(r"^\.BR? (.*)$", text, re.M)
                      for w in re.findall(r"\w+", line)}
        for f in dataclasses.fields(cls):
            assert f.name in documented, f"{section}.{f.name} not in msa.toml(5)"

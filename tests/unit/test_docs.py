"""The man pages say what the code does: every config key is documented in
msa.toml(5) and every documented key exists, section by section; the
EXAMPLE config loads; documented defaults are the code's; msa(8) names
every option the daemon commands take."""

from __future__ import annotations

import dataclasses
import re
import shlex
import tomllib

import pytest

from msa import config
from msa.process.daemon import parse_args
from tests import support

MAN5 = (support.ROOT / "man" / "msa.toml.5").read_text()
SECTIONS = {f.name: f.type for f in dataclasses.fields(config.Config) if f.name != "path"}


def section(name: str) -> str:
    return MAN5.split(f'.SH "[{name}]"', 1)[1].split("\n.SH", 1)[0]


def documented_keys(text: str) -> set[str]:
    """The keys of a section: each entry is ``.TP`` then ``.B key``, or
    ``.BR key1 ", " key2`` for keys described together (the bold words of
    a .BR line are its odd arguments)."""
    keys = set(re.findall(r"^\.TP\n\.B (\w+)$", text, re.M))
    for line in re.findall(r"^\.TP\n\.BR (.+)$", text, re.M):
        keys |= {w for w in shlex.split(line)[::2] if re.fullmatch(r"\w+", w)}
    return keys


def test_the_man_page_has_a_section_for_each_and_no_other():
    in_man = set(re.findall(r'^\.SH "\[(\w+)\]"$', MAN5, re.M))
    assert in_man == set(SECTIONS)


@pytest.mark.parametrize("name", SECTIONS)
def test_keys_and_man_page_agree_both_ways(name):
    fields = {f.name for f in dataclasses.fields(getattr(config.Config(), name))}
    documented = documented_keys(section(name))
    assert fields - documented == set(), f"[{name}] keys missing from msa.toml(5)"
    assert documented - fields == set(), f"msa.toml(5) documents [{name}] keys that do not exist"


def test_the_checker_sees_a_missing_entry():
    text = section("retry").replace(".TP\n.B lifetime\n", ".TP\n.I lifetime\n")
    assert "lifetime" not in documented_keys(text)
    assert "lifetime" in documented_keys(section("retry"))
    assert documented_keys('.TP\n.BR user ", " group\nWhen started') == {"user", "group"}


@pytest.mark.parametrize("key", ["min_delay", "max_delay", "lifetime", "bounce_lifetime",
                                 "scan_interval", "dsn_original_limit"])
def test_retry_defaults_match_the_code(key):
    value = getattr(config.RetryConfig(), key)
    entry = section("retry").split(f".TP\n.B {key}\n", 1)[1].split(".TP", 1)[0]
    assert f"default {int(value)}" in entry, (key, value)


def _example() -> str:
    part = MAN5.split(".SH EXAMPLE", 1)[1]
    body = part.split(".nf\n", 1)[1].split("\n.fi", 1)[0]
    return body.replace("\\e", "\\")


def test_example_config_is_valid():
    cfg = config.from_dict(tomllib.loads(_example()), base="/etc/msa")
    assert cfg.policies.forward and cfg.daemon.user == "msa"
    from msa.cleanup import policies
    assert [s for s, _ in policies.pipeline(cfg)] == [
        "policy-headers", "policy-forward", "policy-split"]


@pytest.mark.parametrize("command", ["daemon", "edge", "watch", "deliver"])
def test_msa8_names_every_daemon_option(command, capsys):
    with pytest.raises(SystemExit):
        parse_args([command, "--help"])
    options = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", capsys.readouterr().out)) - {"--help"}
    assert options, "no options found in --help"
    man8 = (support.ROOT / "man" / "msa.8").read_text().replace("\\-", "-")
    missing = {o for o in options if not re.search(rf"{re.escape(o)}(?![\w-])", man8)}
    assert not missing, f"msa(8) does not document {sorted(missing)}"


def test_every_command_and_queue_action_has_its_man_page():
    from msa.admin.queuecmd import _parser
    from msa.cli import COMMANDS
    msa8 = (support.ROOT / "man" / "msa.8").read_text()
    synopsis = msa8.replace("\\-", "-").split(".SH DESCRIPTION")[0]
    for name in COMMANDS:
        own = support.ROOT / "man" / f"msa-{name}.8"
        assert own.exists() or re.search(rf'(msa |\| ){re.escape(name)}\b', synopsis), name
    queue8 = (support.ROOT / "man" / "msa-queue.8").read_text().replace("\\-", "-")
    actions = re.search(r"\{([\w,-]+)\}", _parser().format_usage()).group(1).split(",")
    assert "requeue" in actions and "purge-corrupt" in actions
    for action in actions:
        assert re.search(rf"^\.(?:BI?|BR) {re.escape(action)}\b", queue8, re.M), action

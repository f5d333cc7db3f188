"""``msa check`` and ``msa config``: the configuration as the daemon would
take it, before the daemon takes it (Postfix's ``postfix check`` and
``postconf -n``).

``msa check`` loads the file, then checks every value the way the daemon
will use it, by building what the daemon builds (the listeners' addresses
and TLS context, the policy pipeline, the relay) and by the rules below, and
looks at the files: the certificate and key load and match, the spool and
its stages exist with the modes the daemon makes, the password file is
readable by nobody else. It lists every problem, one a line, and exits 0 or
78 (EX_CONFIG). ``msa config`` prints the effective configuration as TOML;
``-n`` only what differs from the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import ssl
import stat
import sys
from typing import Any

from msa import config, sysexits
from msa.admin.common import args_and_config
from msa.message.headers import normalize_address
from msa.protocol.errors import AddressError


def _enums() -> dict[tuple[str, str], tuple[str, ...]]:
    """The keys that take one of a few words, and the words (the modules
    that act on them own the lists)."""
    from msa.delivery.backoff import STRATEGIES
    from msa.delivery.relay import TLS_MODES
    from msa.process.daemon import EVENT_LOOPS
    return {("relay", "tls"): TLS_MODES, ("relay", "smarthost_tls"): TLS_MODES,
            ("retry", "strategy"): STRATEGIES,
            ("daemon", "log_level"): ("debug", "info", "warning", "error"),
            ("daemon", "event_loop"): EVENT_LOOPS}

# Numbers that must be more than 0 (timeouts, sizes, counts); the others
# may be 0 (0 turns them off, as msa.toml(5) says).
POSITIVE = {
    "edge": ("max_message_size", "max_recipients", "command_timeout", "data_timeout",
             "max_errors", "max_auth_failures", "max_connections", "rate_window",
             "auth_failure_window", "client_dns_timeout"),
    "policies": ("max_header_bytes", "workers", "rescan_interval"),
    "relay": ("dns_timeout", "port", "connect_timeout", "command_timeout", "data_timeout",
              "idle_timeout", "max_connections", "max_connections_per_domain",
              "max_messages_per_connection", "max_deliveries"),
    "retry": ("min_delay", "max_delay", "factor", "lifetime", "bounce_lifetime",
              "scan_interval", "dsn_original_limit"),
    "daemon": ("grace",),
}


def value_problems(cfg: config.Config) -> list[str]:
    """What is wrong with the values themselves (no files looked at)."""
    out: list[str] = []
    for (section, key), allowed in _enums().items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            out.append(f"{section}.{key}: {value!r} is not one of {', '.join(allowed)}")
    for section, keys in POSITIVE.items():
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            if not value > 0:
                out.append(f"{section}.{key}: {value!r} must be more than 0")
    for section in ("spool", "edge", "retry", "daemon"):
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                out.append(f"{section}.{f.name}: {value!r} must not be negative")
    if cfg.relay.port > 65535:
        out.append(f"relay.port: {cfg.relay.port} is not a port (1 to 65535)")
    if cfg.retry.min_delay > cfg.retry.max_delay:
        out.append("retry.min_delay is larger than retry.max_delay")
    if cfg.retry.jitter < 0 or cfg.retry.jitter > 1:
        out.append(f"retry.jitter: {cfg.retry.jitter!r} must be from 0 to 1")
    out += _hostports(cfg)
    for net in cfg.edge.trusted_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError as exc:
            out.append(f"edge.trusted_networks: {exc}")
    for key in ("postmaster", "admin"):
        value = getattr(cfg.server, key).strip()
        if value:
            try:
                normalize_address(value, cfg.domain)
            except AddressError as exc:
                out.append(f"server.{key}: {exc}")
    for name in ("user", "group"):
        value = getattr(cfg.daemon, name)
        if value and not _exists(name, value):
            out.append(f"daemon.{name}: no {name} {value!r} on this system")
    out += _built(cfg, skip_relay=any(p.startswith("relay.") for p in out))
    return out


def _hostports(cfg: config.Config) -> list[str]:
    from msa.delivery.mx import parse_hostport
    from msa.submission.edge import parse_listen
    out = []
    rc = cfg.relay
    targets = [("relay.smarthost", rc.smarthost, rc.port)] if rc.smarthost else []
    targets += [(f"relay.force_mx.{d}", v, rc.port) for d, v in rc.force_mx.items()]
    targets += [("relay.resolver", v, 53) for v in rc.resolver]
    for where, text, port in targets:
        try:
            parse_hostport(text, port)
        except ValueError as exc:
            out.append(f"{where}: {exc}")
    for key in ("submission", "submissions"):
        for text in getattr(cfg.edge, key):
            try:
                parse_listen(text)
            except config.ConfigError as exc:
                out.append(f"edge.{key}: {exc}")
    return out


def _built(cfg: config.Config, skip_relay: bool = False) -> list[str]:
    """Build what the daemon builds from the values, without I/O (the
    relay only when its values passed: it would repeat their problem)."""
    from msa.cleanup import policies
    from msa.delivery.relay import relay_from_config
    out = []
    try:
        policies.pipeline(cfg)
    except config.ConfigError as exc:
        out.append(str(exc))
    if not skip_relay:
        try:
            relay_from_config(cfg)
        except (ValueError, config.ConfigError) as exc:
            out.append(f"relay: {exc}")
    return out


def _exists(kind: str, name: str) -> bool:
    import grp
    import pwd
    try:
        (pwd.getpwnam if kind == "user" else grp.getgrnam)(name)
    except KeyError:
        return False
    return True


def file_problems(cfg: config.Config) -> list[str]:
    """The files the daemon needs, as it will need them."""
    out: list[str] = []
    e = cfg.edge
    if e.submission or e.submissions:
        if not e.certfile:
            out.append("edge.certfile: needed (AUTH is only offered under TLS)")
        else:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    e.certfile, e.keyfile or None)
            except (OSError, ssl.SSLError) as exc:
                out.append(f"edge.certfile/keyfile: {e.certfile}, {e.keyfile or '-'}: {exc}")
        out += _passwd_problems(cfg.auth.passwd_file)
    out += _spool_problems(cfg)
    if cfg.relay.cafile and not os.access(cfg.relay.cafile, os.R_OK):
        out.append(f"relay.cafile: {cfg.relay.cafile}: not readable")
    if cfg.relay.smarthost_password_file and not os.access(cfg.relay.smarthost_password_file,
                                                           os.R_OK):
        out.append(f"relay.smarthost_password_file: {cfg.relay.smarthost_password_file}: "
                   "not readable")
    return out


def _passwd_problems(path: str) -> list[str]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return [f"auth.passwd_file: {path}: does not exist (msa user add NAME makes it)"]
    except OSError as exc:
        return [f"auth.passwd_file: {path}: {exc.strerror}"]
    if st.st_mode & 0o077:
        return [f"auth.passwd_file: {path}: mode {stat.S_IMODE(st.st_mode):04o}: others may "
                "read the password hashes (chmod 600)"]
    return []


def _spool_problems(cfg: config.Config) -> list[str]:
    from msa.store import MODES
    root = cfg.spool.root
    if not os.path.isdir(root):
        return [f"spool.root: {root}: not a directory (the daemon makes it at its first start)"]
    out = []
    for stage in [*cfg.stages(), "tmp", "deferred", "hold", "corrupt"]:
        path = os.path.join(root, stage)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            out.append(f"spool: {path}: missing (the daemon makes it at its start)")
            continue
        want = MODES.get(stage)
        if want is not None and stat.S_IMODE(st.st_mode) != want:
            out.append(f"spool: {path}: mode {stat.S_IMODE(st.st_mode):04o}, "
                       f"the daemon makes it {want:04o}")
    return out


# -- msa config ---------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                                for k, v in value.items()) + " }"
    raise TypeError(type(value))


def render(cfg: config.Config, only_changed: bool = False) -> str:
    """The configuration as TOML that loads back to the same values."""
    base = os.path.dirname(cfg.path) if cfg.path else os.getcwd()
    defaults = config.from_dict({}, base=base)
    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        if f.name == "path":
            continue
        section, default = getattr(cfg, f.name), getattr(defaults, f.name)
        entries = [(g.name, getattr(section, g.name)) for g in dataclasses.fields(section)
                   if not only_changed or getattr(section, g.name) != getattr(default, g.name)]
        if not entries:
            continue
        lines.append(f"[{f.name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in entries]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog=f"msa {command}", description=__doc__.split("\n\n")[0])
    p.add_argument("-C", "--config", help="the configuration file (see msa.toml(5))")
    if command == "config":
        p.add_argument("-n", action="store_true", help="only what differs from the defaults")
    loaded = args_and_config(p, rest, f"msa {command}")
    if isinstance(loaded, int):
        return loaded
    args, cfg = loaded
    if command == "config":
        sys.stdout.write(render(cfg, only_changed=args.n))
        return sysexits.EX_OK
    found = value_problems(cfg) + file_problems(cfg)
    for problem in found:
        print(f"msa check: {cfg.path}: {problem}", file=sys.stderr)
    if found:
        return sysexits.EX_CONFIG
    print(f"msa check: spool {cfg.spool.root}: {_protocol(cfg)}")
    print(f"msa check: {cfg.path}: ok")
    return sysexits.EX_OK


def _protocol(cfg: config.Config) -> str:
    """The commit protocol the daemon will choose for the spool (on the
    filesystem of its nearest existing directory, if it is not made yet)."""
    from spool import durable
    path = os.path.abspath(cfg.spool.root)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return durable.choose(path, cfg.spool.sync).describe()

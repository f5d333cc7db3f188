"""Configuration: one TOML file, loaded once by a command, passed down as
plain values (dataclasses). Nothing else in msa reads the file.

Where the file is: ``--config PATH`` on any command, else ``$MSA_CONFIG``,
else ``/etc/msa/msa.toml``. With none of the three, :func:`load` raises
:class:`ConfigError` naming all three, and every command exits 78
(EX_CONFIG) having created nothing: built-in defaults would put a spool
under whatever directory the command was started in (cron's is ``$HOME``,
PHP's the web root), where no daemon ever reads it. Relative paths in the
file are relative to the file's directory. Every section and key is
documented in ``man/msa.toml.5``. Python callers that want the defaults
build a :class:`Config` themselves.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any

from spool import durable

DEFAULT_PATH = "/etc/msa/msa.toml"

# The spool's fixed stages, in the order a message moves through them.
# Policy stages (one directory per configured policy) sit between the
# inputs and ``active``.
INPUT_STAGES = ("maildrop", "incoming")
ACTIVE = "active"


class ConfigError(Exception):
    """The config file is missing, unreadable or has a bad value."""


@dataclass
class SpoolConfig:
    root: str = "var/spool"
    # Days a quarantined file stays in corrupt/ before `msa queue
    # purge-corrupt` removes it; 0: until removed by hand.
    corrupt_max_age: float = 30.0
    # The commit protocol (spool.durable, msa-spool(5)): "auto" takes one
    # flush per message where the filesystem commits a rename with the
    # file's fsync (ext4 with a journal, xfs), "strict" (fsync, rename,
    # fsync of the directory) elsewhere; "strict" forces it everywhere.
    sync: str = "auto"


@dataclass
class ServerConfig:
    hostname: str = field(default_factory=socket.getfqdn)
    # Domain appended to bare recipients ("root" from cron) and to local
    # senders without a domain.
    domain: str = ""
    # Who hears of a bounce that could not be delivered (Postfix's
    # 2bounce_notice_recipient); a bare name gets `domain`; "" : nobody.
    postmaster: str = "postmaster"
    # Where mail to root and postmaster goes when the aliases file does
    # not say (so they work with no aliases file at all); "" : nowhere else.
    admin: str = ""


@dataclass
class EdgeConfig:
    submission: list[str] = field(default_factory=lambda: ["127.0.0.1:587", "[::1]:587"])
    submissions: list[str] = field(default_factory=lambda: ["127.0.0.1:465", "[::1]:465"])
    certfile: str = ""
    keyfile: str = ""
    max_message_size: int = 50 * 1024 * 1024 + 1024 * 1024
    max_recipients: int = 1000
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    # The whole DATA phase: at most data_deadline seconds, and never slower
    # than min_data_rate bytes/s after data_timeout (Postfix 3.7's
    # smtpd_min_data_rate), so trickling bytes cannot hold a session.
    data_deadline: float = 3600.0
    min_data_rate: int = 500
    max_errors: int = 10
    max_auth_failures: int = 3
    auth_failure_delay: float = 1.0
    max_connections: int = 2000
    # Per client (an IPv4 address, an IPv6 /64), counted over every edge
    # process (msa.submission.anvil); trusted_networks are exempt; 0 = no
    # limit. Postfix's anvil allows 50 connections at once by default.
    max_connections_per_client: int = 50
    max_connection_rate_per_client: int = 300   # connections per rate_window
    rate_window: float = 60.0
    # Failed AUTH per client in auth_failure_window; past it AUTH answers
    # 454 4.7.0 without checking the password (no argon2 work).
    max_auth_failures_per_client: int = 10
    auth_failure_window: float = 600.0
    # The client's name in logs and Received: its forward-confirmed reverse
    # DNS through [relay] resolver, looked up before the greeting for at
    # most client_dns_timeout seconds; else (and with client_dns off)
    # "unknown".
    client_dns: bool = True
    client_dns_timeout: float = 5.0
    # CIDRs whose clients may send without AUTH and as any sender
    # (Postfix's permit_mynetworks). Empty: everyone must AUTH.
    trusted_networks: list[str] = field(default_factory=list)
    # Apply [policies] (headers, forward) to a message held in memory
    # before writing it to incoming/, as Postfix's cleanup does, so the
    # watcher only renames it into active/. Off, or with a split stage,
    # the watcher applies them.
    apply_policies: bool = True


@dataclass
class AuthConfig:
    passwd_file: str = "passwd"
    # user -> list of addresses or "@domain" patterns they may send as.
    senders: dict[str, list[str]] = field(default_factory=dict)
    # A user may always send as user@<server.domain> and their login name
    # when it is an address.
    allow_login_address: bool = True


@dataclass
class PoliciesConfig:
    # Ordered; each name is a policy stage (a directory under the spool).
    stages: list[str] = field(default_factory=lambda: ["headers", "forward", "split"])
    add_date: bool = True
    add_message_id: bool = True
    add_received: bool = True
    # Received: of an authenticated user's message without the client's
    # address, name, HELO and TLS details (msa.cleanup.policies).
    private_submission: bool = False
    remove_bcc: bool = True
    # The aliases file (traditional /etc/aliases format), compiled by
    # newaliases; applied in the forward stage. "" : none.
    aliases: str = ""
    # Forward: list of [regex, replacement] applied to each recipient.
    forward: list[list[str]] = field(default_factory=list)
    # A header section larger than this sends the message to corrupt/.
    max_header_bytes: int = 1024 * 1024
    # Watcher: threads doing file work, and a full rescan of the stages
    # this often (seconds) to pick up files whose event was missed.
    workers: int = 4
    rescan_interval: float = 60.0


@dataclass
class RelayConfig:
    resolver: list[str] = field(default_factory=list)  # "127.0.0.1:15353"; empty: system
    dns_timeout: float = 10.0
    port: int = 25
    ehlo_name: str = ""
    connect_timeout: float = 20.0
    command_timeout: float = 10.0
    data_timeout: float = 20.0
    idle_timeout: float = 30.0
    tls: str = "opportunistic"  # "opportunistic", "required", "none"
    tls_required_domains: list[str] = field(default_factory=list)
    cafile: str = ""
    force_mx: dict[str, str] = field(default_factory=dict)  # domain -> host[:port]
    smarthost: str = ""
    smarthost_user: str = ""
    smarthost_password: str = ""
    smarthost_password_file: str = ""
    smarthost_tls: str = "required"
    max_connections: int = 50
    max_connections_per_domain: int = 10
    max_messages_per_connection: int = 100
    # Runner: messages being delivered at once (bounds memory and fds).
    max_deliveries: int = 100


@dataclass
class RetryConfig:
    min_delay: float = 300.0
    max_delay: float = 4000.0
    factor: float = 2.0
    jitter: float = 0.1
    lifetime: float = 5 * 86400.0
    bounce_lifetime: float = 5 * 86400.0
    delay_warning: float = 0.0  # 0: no delay warnings
    scan_interval: float = 300.0
    strategy: str = "exponential"  # or "age" (Postfix: clamp(age, min, max))
    # A DSN quotes the whole original up to this size, else its headers.
    dsn_original_limit: int = 1024 * 1024


@dataclass
class DaemonConfig:
    pidfile: str = ""
    user: str = ""
    group: str = ""
    log: str = "stderr"  # "stderr" or "syslog"
    log_level: str = "info"
    control_socket: str = ""  # default: <spool>/control
    # SIGTERM: seconds that work in flight may take to finish.
    grace: float = 30.0
    # msa daemon: edge, watcher and runner as supervised child processes
    # (one GIL each); false runs them all in one process.
    processes: bool = True
    # Edge processes sharing the listening addresses (SO_REUSEPORT); 0:
    # one per CPU, at most 8 (msa.process.supervisor.edge_workers).
    edge_workers: int = 0
    # "uvloop" (libuv: about a fifth less CPU per message in the edge and
    # the runner, bench/run.py) or "asyncio" (the standard library's).
    event_loop: str = "uvloop"
    # nice(2) increment of the supervised watcher and runner: accepting,
    # where a client waits, goes first; 0: all at the same priority.
    background_nice: int = 10


@dataclass
class Config:
    path: str = ""
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    policies: PoliciesConfig = field(default_factory=PoliciesConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)

    @property
    def domain(self) -> str:
        return self.server.domain or self.server.hostname

    def stages(self) -> list[str]:
        """Every stage directory of the spool, in the order mail moves."""
        return [*INPUT_STAGES, *(f"policy-{n}" for n in self.policies.stages), ACTIVE]

    def control_socket(self) -> str:
        return self.daemon.control_socket or os.path.join(self.spool.root, "control")


_PATH_KEYS = {("spool", "root"), ("edge", "certfile"), ("edge", "keyfile"),
              ("policies", "aliases"),
              ("auth", "passwd_file"), ("relay", "cafile"),
              ("relay", "smarthost_password_file"), ("daemon", "pidfile"),
              ("daemon", "control_socket")}


def find_path(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("MSA_CONFIG"):
        return os.environ["MSA_CONFIG"]
    if os.path.exists(DEFAULT_PATH):
        return DEFAULT_PATH
    return None


def load(explicit: str | None = None) -> Config:
    """Load the config file (see module docstring for where it is)."""
    path = find_path(explicit)
    if path is None:
        raise ConfigError(f"no configuration file: no --config option, $MSA_CONFIG is not set, "
                          f"and {DEFAULT_PATH} does not exist")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg = from_dict(data, base=os.path.dirname(os.path.abspath(path)))
    cfg.path = os.path.abspath(path)
    return cfg


def from_dict(data: dict[str, Any], base: str = ".") -> Config:
    """Build a Config from parsed TOML; unknown sections or keys are errors."""
    cfg = Config()
    for section, values in data.items():
        sub = getattr(cfg, section, None)
        if not dataclasses.is_dataclass(sub) or not isinstance(values, dict):
            raise ConfigError(f"unknown section [{section}]")
        names = {f.name: f for f in dataclasses.fields(sub)}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(f"unknown key {section}.{key}")
            default = getattr(sub, key)
            if isinstance(default, bool) != isinstance(value, bool) or (
                    isinstance(default, (int, float)) and not isinstance(value, (int, float))) or (
                    isinstance(default, (str, list, dict)) and not isinstance(value, type(default))):
                raise ConfigError(f"{section}.{key}: expected {type(default).__name__}, "
                                  f"got {type(value).__name__}")
            setattr(sub, key, value)
    if cfg.spool.sync not in durable.MODES:
        words = " or ".join(f'"{m}"' for m in durable.MODES)
        raise ConfigError(f"spool.sync: expected {words}, got {cfg.spool.sync!r}")
    for section, key in _PATH_KEYS:
        sub = getattr(cfg, section)
        value = getattr(sub, key)
        if value and not os.path.isabs(value):
            setattr(sub, key, os.path.normpath(os.path.join(base, value)))
    return cfg

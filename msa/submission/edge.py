"""The SMTP submission edge: listeners on 587 (STARTTLS) and 465 (implicit
TLS, RFC 8314) that put accepted mail into the spool's ``incoming/``.

From the tutorial::

    edge = SmtpEdge(('', 587), queue, tls={'keyfile': ..., 'certfile': ...},
                    auth_class=MyAuth, validator_class=MyValidators)
    ssl_edge = SmtpEdge(('', 465), queue, tls=tls_args, tls_immediately=True,
                        auth_class=MyAuth, validator_class=MyValidators)
    await edge.start(); await ssl_edge.start()

and from the config: ``edges_from_config(cfg, spool)``.

Decisions (the session rules are in :mod:`msa.submission.session`):

- ``queue`` is a :class:`spool.Spool` or anything with a ``.spool``.
- AUTH is required before MAIL unless ``require_auth=False`` is passed
  explicitly: the tutorial's first, auth-less edge would be an open relay,
  so here it must be asked for by name. ``trusted_networks`` (CIDRs) lets
  clients from those networks send without AUTH, as any sender (Postfix's
  ``permit_mynetworks``); they may still AUTH, and are then checked like
  any authenticated user.
- ``auth_class`` may be an :class:`msa.submission.auth.Auth` subclass (the tutorial
  passes the class: it is made once per session, with the session as
  slimta does, or without arguments) or an instance (shared).
- Whom a user may send as (:class:`msa.submission.auth.SenderPolicy`): ``senders``,
  their login when it is an address, and ``login@sender_domain``, where
  ``sender_domain`` defaults to the edge's hostname, as ``[server] domain``
  does. So the tutorial's ``testuser`` may send as
  ``testuser@<hostname>`` with no extra argument; validators may refuse
  more, never allow what the policy refused.
- Settings are a snapshot taken when a connection is accepted:
  :meth:`SmtpEdge.reload` changes limits, the password file and the sender
  map for new connections only, and loads a new certificate into the live
  TLS context (:func:`msa.submission.tls.reload_into`) without touching
  established sessions.
- :meth:`SmtpEdge.stop` stops accepting, closes idle sessions with
  ``421 4.3.2`` at once, lets sessions inside a mail transaction finish
  it (up to ``shutdown_grace`` seconds), then closes the rest.
- Memory per session is bounded: a message is held in memory up to
  ``memory_limit`` bytes (256 KiB), beyond that in an unnamed file in the
  spool's ``tmp/``; the header section kept for the From check is bounded
  by ``max_header_size``. argon2 verification runs in a pool of
  :data:`AUTH_WORKERS` threads (each verification takes 64 MiB).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import logging
import ssl
from dataclasses import dataclass
from typing import Any

from msa.cleanup import policies
from msa.config import Config, ConfigError, EdgeConfig
from msa.submission import tls as tlsconf
from msa.submission.anvil import LocalAnvil
from msa.submission.clientname import ClientNames
from msa.submission.auth import PasswdFileAuth, SenderPolicy, TrustedNetworks
from msa.submission.session import ABORT_AFTER, SmtpSession
from msa.submission.writer import DirSyncer, dir_syncer_for
from spool import Spool

log = logging.getLogger("msa.edge")

AUTH_WORKERS = 2
_DEFAULTS = EdgeConfig()
_auth_pool: concurrent.futures.ThreadPoolExecutor | None = None


def auth_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _auth_pool
    if _auth_pool is None:
        _auth_pool = concurrent.futures.ThreadPoolExecutor(
            AUTH_WORKERS, thread_name_prefix="msa-auth")
    return _auth_pool


@dataclass
class EdgeSettings:
    """What a session needs; a new connection takes the current one."""

    spool: Spool
    stage: str
    hostname: str
    implicit_tls: bool
    tls_context: ssl.SSLContext | None
    auth: Any
    validator_class: Any
    senders: SenderPolicy
    require_auth: bool
    trusted: TrustedNetworks
    max_message_size: int
    max_recipients: int
    command_timeout: float
    data_timeout: float
    max_errors: int
    max_auth_failures: int
    auth_failure_delay: float
    max_connections: int
    memory_limit: int
    max_header_size: int
    # Policy lists applied before writing, or None: the watcher does.
    stages: list | None = None
    max_policy_header: int = 1024 * 1024
    data_deadline: float = _DEFAULTS.data_deadline
    min_data_rate: int = _DEFAULTS.min_data_rate
    max_connections_per_client: int = _DEFAULTS.max_connections_per_client
    max_connection_rate_per_client: int = _DEFAULTS.max_connection_rate_per_client
    rate_window: float = _DEFAULTS.rate_window
    max_auth_failures_per_client: int = _DEFAULTS.max_auth_failures_per_client
    auth_failure_window: float = _DEFAULTS.auth_failure_window


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:587"``, ``"[::1]:587"``, ``":587"``/``"*:587"`` (all)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"[edge] bad listen address {text!r} (want host:port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"[edge] write IPv6 addresses in brackets: {text!r}")
    return ("" if host in ("", "*") else host), int(port)


class SmtpEdge:
    """One listening address. See the module docstring."""

    def __init__(self, address: tuple[str, int], queue: Any, tls: Any = None,
                 tls_immediately: bool = False, auth_class: Any = None,
                 validator_class: Any = None, hostname: str | None = None, *,
                 max_message_size: int = _DEFAULTS.max_message_size,
                 max_recipients: int = _DEFAULTS.max_recipients,
                 command_timeout: float = _DEFAULTS.command_timeout,
                 data_timeout: float = _DEFAULTS.data_timeout,
                 data_deadline: float = _DEFAULTS.data_deadline,
                 min_data_rate: int = _DEFAULTS.min_data_rate,
                 max_errors: int = _DEFAULTS.max_errors,
                 max_auth_failures: int = _DEFAULTS.max_auth_failures,
                 auth_failure_delay: float = _DEFAULTS.auth_failure_delay,
                 max_connections: int = _DEFAULTS.max_connections,
                 max_connections_per_client: int = _DEFAULTS.max_connections_per_client,
                 max_connection_rate_per_client: int =
                 _DEFAULTS.max_connection_rate_per_client,
                 rate_window: float = _DEFAULTS.rate_window,
                 max_auth_failures_per_client: int = _DEFAULTS.max_auth_failures_per_client,
                 auth_failure_window: float = _DEFAULTS.auth_failure_window,
                 anvil: Any = None, client_names: Any = None,
                 senders: dict[str, list[str]] | SenderPolicy | None = None,
                 sender_domain: str = "", allow_login_address: bool = True,
                 require_auth: bool = True, shutdown_grace: float = 30.0,
                 stage: str = "incoming", memory_limit: int = 256 * 1024,
                 max_header_size: int = 256 * 1024,
                 trusted_networks: Any = (), reuse_port: bool = False,
                 policies: list | None = None, max_policy_header: int = 1024 * 1024):
        spool = queue if isinstance(queue, Spool) else getattr(queue, "spool", None)
        if not isinstance(spool, Spool):
            raise TypeError("queue must be a spool.Spool or have a .spool")
        ctx = tlsconf.context_from(tls)
        if tls_immediately and ctx is None:
            raise ValueError("tls_immediately needs tls")
        hostname = hostname or _fqdn()
        if not isinstance(senders, SenderPolicy):
            senders = SenderPolicy(senders, sender_domain or hostname, allow_login_address)
        trusted = (trusted_networks if isinstance(trusted_networks, TrustedNetworks)
                   else TrustedNetworks(trusted_networks))
        if require_auth and (auth_class is None or ctx is None) and not trusted:
            log.warning("edge on %s: AUTH required but %s: every MAIL will be refused",
                        address, "no auth_class" if auth_class is None else "no TLS")
        self.address = (address[0] or "", int(address[1]))
        self.shutdown_grace = shutdown_grace
        self.reuse_port = reuse_port
        self.settings = EdgeSettings(
            spool=spool, stage=stage, hostname=hostname,
            implicit_tls=tls_immediately, tls_context=ctx, auth=auth_class,
            validator_class=validator_class, senders=senders, require_auth=require_auth,
            trusted=trusted,
            max_message_size=max_message_size, max_recipients=max_recipients,
            command_timeout=command_timeout, data_timeout=data_timeout,
            max_errors=max_errors, max_auth_failures=max_auth_failures,
            auth_failure_delay=auth_failure_delay, max_connections=max_connections,
            memory_limit=memory_limit, max_header_size=max_header_size,
            stages=_edge_stages(policies), max_policy_header=max_policy_header,
            data_deadline=data_deadline, min_data_rate=min_data_rate,
            max_connections_per_client=max_connections_per_client,
            max_connection_rate_per_client=max_connection_rate_per_client,
            rate_window=rate_window, max_auth_failures_per_client=max_auth_failures_per_client,
            auth_failure_window=auth_failure_window)
        # Per-client counters: shared by the edges of a process (and, given
        # an AnvilClient, by every edge process).
        self.anvil = anvil if anvil is not None else LocalAnvil()
        # Forward-confirmed reverse DNS of clients (msa.submission.clientname),
        # or None: every client is "unknown".
        self.client_names = client_names
        self.policies_from_config = False
        self.dir_syncer: DirSyncer | None = None   # made by start()
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[SmtpSession] = set()
        self._drained: asyncio.Event | None = None
        self._trusted_of: TrustedNetworks | None = None
        self._trusted_cache: dict[str, bool] = {}

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        # The journal protocol leaves each file durable at its commit: no
        # directory fsync to share (spool.durable).
        self.dir_syncer = (None if s.spool.commits_durable
                           else dir_syncer_for(s.spool, s.stage))
        self.stopping = False
        self._drained = asyncio.Event()
        self._drained.set()
        implicit = s.implicit_tls
        self._server = await loop.create_server(
            lambda: SmtpSession(self, self.settings), host=self.address[0] or None,
            port=self.address[1], reuse_address=True, reuse_port=self.reuse_port or None,
            backlog=listen_backlog(s.max_connections),
            ssl=s.tls_context if implicit else None,
            ssl_handshake_timeout=s.command_timeout if implicit else None)
        log.info("listening on %s (%s)", self.describe(),
                 "implicit TLS" if implicit else "STARTTLS" if s.tls_context else "no TLS")

    async def stop(self, grace: float | None = None) -> None:
        grace = self.shutdown_grace if grace is None else grace
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            session.shutdown()
        if self._drained is not None:
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("%d sessions still open after %.0fs; closing them",
                            len(self._sessions), grace)
                for session in list(self._sessions):
                    session._close_now(f"421 4.3.2 {session.hostname} Service shutting down")
                try:
                    await asyncio.wait_for(self._drained.wait(), ABORT_AFTER + 2.0)
                except asyncio.TimeoutError:
                    log.error("%d sessions did not close", len(self._sessions))
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def reload(self, cfg: Config) -> None:
        """New limits, password file, sender map and certificate for new
        connections (see module docstring). A bad certificate raises
        :class:`ConfigError` and changes nothing."""
        e, old = cfg.edge, self.settings
        trusted = trusted_networks(e)
        auth = old.auth
        if isinstance(auth, PasswdFileAuth):
            auth = (auth if auth.path == cfg.auth.passwd_file
                    else PasswdFileAuth(cfg.auth.passwd_file))
            auth.refresh()
        if old.tls_context is not None and e.certfile:
            try:
                tlsconf.reload_into(old.tls_context, e.certfile, e.keyfile)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"[edge] cannot load {e.certfile}: {exc}") from None
        more = {}
        if self.policies_from_config:
            more = dict(stages=_edge_stages(config_policies(cfg)),
                        max_policy_header=cfg.policies.max_header_bytes)
        self.settings = dataclasses.replace(
            old, hostname=cfg.server.hostname, auth=auth, senders=_sender_policy(cfg),
            trusted=trusted, **_limits(e), **more)
        log.info("reloaded settings for %s", self.describe())

    # -- what sessions call -------------------------------------------------

    def is_trusted(self, ip: str) -> bool:
        """``settings.trusted.contains(ip)``, remembered per address (a
        client reconnects for every message; reload forgets)."""
        trusted = self.settings.trusted
        if self._trusted_of is not trusted or len(self._trusted_cache) > 4096:
            self._trusted_of, self._trusted_cache = trusted, {}
        known = self._trusted_cache.get(ip)
        if known is None:
            known = self._trusted_cache[ip] = trusted.contains(ip)
        return known

    def _register(self, session: SmtpSession) -> bool:
        if len(self._sessions) >= session.settings.max_connections:
            return False
        self._sessions.add(session)
        if self._drained is not None:
            self._drained.clear()
        return True

    def _unregister(self, session: SmtpSession) -> None:
        self._sessions.discard(session)
        if not self._sessions and self._drained is not None:
            self._drained.set()

    async def verify(self, backend: Any, login: str, password: str) -> str:
        """``backend.verify_secret`` (see :func:`msa.submission.auth.auth_backend`), off the
        event loop (in the process's :data:`AUTH_WORKERS` threads) unless
        it is a coroutine function."""
        if inspect.iscoroutinefunction(backend.verify_secret):
            return await backend.verify_secret(login, password, None)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(auth_pool(), backend.verify_secret,
                                          login, password, None)

    @staticmethod
    def senders_for(backend: Any, user: str) -> list[str]:
        senders_for = getattr(backend, "senders_for", None)
        return list(senders_for(user)) if callable(senders_for) else []

    # -- information ----------------------------------------------------------

    @property
    def sockets(self) -> list:
        return list(self._server.sockets) if self._server else []

    @property
    def port(self) -> int:
        return self.sockets[0].getsockname()[1] if self.sockets else self.address[1]

    def describe(self) -> str:
        host = self.address[0] or "*"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def listen_backlog(max_connections: int) -> int:
    """The listen(2) backlog: room for every allowed session to connect at
    once (a burst of clients is greeted, not left to SYN retries), capped
    at 4096 (the kernel caps it again at net.core.somaxconn)."""
    return max(100, min(max_connections, 4096))


def trusted_networks(e: EdgeConfig) -> TrustedNetworks:
    try:
        return TrustedNetworks(e.trusted_networks)
    except ValueError as exc:
        raise ConfigError(f"[edge] trusted_networks: {exc}") from None


def _fqdn() -> str:
    import socket
    return socket.getfqdn()


def _limits(e: EdgeConfig) -> dict[str, Any]:
    return dict(max_message_size=e.max_message_size, max_recipients=e.max_recipients,
                command_timeout=e.command_timeout, data_timeout=e.data_timeout,
                data_deadline=e.data_deadline, min_data_rate=e.min_data_rate,
                max_errors=e.max_errors, max_auth_failures=e.max_auth_failures,
                auth_failure_delay=e.auth_failure_delay, max_connections=e.max_connections,
                max_connections_per_client=e.max_connections_per_client,
                max_connection_rate_per_client=e.max_connection_rate_per_client,
                rate_window=e.rate_window,
                max_auth_failures_per_client=e.max_auth_failures_per_client,
                auth_failure_window=e.auth_failure_window)


def config_policies(cfg: Config) -> list | None:
    """The policy lists of ``[policies].stages`` for the edge to apply, or
    None when ``[edge] apply_policies`` is off."""
    if not cfg.edge.apply_policies:
        return None
    return [pols for _, pols in policies.pipeline(cfg)]


def _edge_stages(stages: list | None) -> list | None:
    """What the edge applies itself: None when no stage has a policy."""
    return stages if stages and any(stages) else None


def client_names_from_config(cfg: Config) -> ClientNames | None:
    """The clients' names looked up through ``[relay] resolver``
    (``[edge] client_dns``), shared by the edges of one process."""
    e = cfg.edge
    if not e.client_dns:
        return None
    from msa.delivery.mx import make_resolver
    return ClientNames(make_resolver(cfg.relay.resolver, e.client_dns_timeout),
                       e.client_dns_timeout)


def _sender_policy(cfg: Config) -> SenderPolicy:
    return SenderPolicy(cfg.auth.senders, cfg.domain, cfg.auth.allow_login_address)


def edges_from_config(cfg: Config, spool: Spool, reuse_port: bool = False,
                      anvil: Any = None) -> list[SmtpEdge]:
    """The submission (STARTTLS) and submissions (implicit TLS) listeners
    of ``[edge]``, one :class:`SmtpEdge` per address; they share the TLS
    context, the password file and (per process) the incoming/ group
    commit of directory fsyncs. With
    ``reuse_port`` several processes may each run these edges on the same
    addresses (SO_REUSEPORT: the kernel spreads connections over them),
    and should then share an ``anvil`` (:class:`msa.submission.anvil.AnvilClient`);
    without one the edges of this call share a :class:`LocalAnvil`."""
    e = cfg.edge
    if not (e.submission or e.submissions):
        return []
    if not e.certfile:
        raise ConfigError("[edge] certfile is needed: AUTH is only offered under TLS")
    try:
        ctx = tlsconf.server_context(e.certfile, e.keyfile or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[edge] cannot load {e.certfile}: {exc}") from None
    common = dict(tls=ctx, auth_class=PasswdFileAuth(cfg.auth.passwd_file),
                  hostname=cfg.server.hostname, senders=_sender_policy(cfg),
                  trusted_networks=trusted_networks(e), reuse_port=reuse_port,
                  policies=config_policies(cfg), anvil=anvil or LocalAnvil(),
                  client_names=client_names_from_config(cfg),
                  max_policy_header=cfg.policies.max_header_bytes, **_limits(e))
    edges = [SmtpEdge(parse_listen(a), spool, **common) for a in e.submission]
    edges += [SmtpEdge(parse_listen(a), spool, tls_immediately=True, **common)
              for a in e.submissions]
    for edge in edges:
        edge.policies_from_config = True
    return edges

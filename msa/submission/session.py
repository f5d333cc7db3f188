"""One SMTP submission session: aiosmtpd's protocol with our commands.

aiosmtpd gives the connection plumbing we keep: the STARTTLS upgrade
(which drops plaintext pipelined after STARTTLS, RFC 3207 §4.2 and §6),
the AUTH LOGIN exchange (its ``auth_LOGIN``, used here only to decode
credentials; PLAIN is ours, to keep the authorization identity), and
QUIT/NOOP/RSET/HELP/VRFY. We replace what must behave differently:

- the command loop: per-command limits (:mod:`msa.protocol.smtpcmd`), CRLF-only
  command lines, a counted error budget (``421 4.7.0`` when spent), the
  command timeout answered with ``421 4.4.2`` before closing, and a clean
  ``421 4.3.2`` when the edge stops;
- EHLO (the extensions we offer; AUTH only under TLS, whether implicit or
  after STARTTLS: aiosmtpd's ``auth_require_tls`` does not see implicit
  TLS), AUTH (argon2 in a thread, failure delay and limit), MAIL, RCPT;
- DATA, which aiosmtpd would buffer whole in memory: we read the stream in
  chunks through :class:`msa.protocol.smtpdata.DataReader` into a
  :class:`msa.submission.writer.BodySink` (memory up to a bound, then an unnamed
  file in the spool's ``tmp/``).

CPU per message (the edge is CPU bound): aiosmtpd's ``SMTP.__init__``
runs ``inspect.getmembers`` over the protocol and the handler for every
connection; :meth:`SmtpSession._init_protocol` sets the same attributes
(checked against aiosmtpd's own in the tests) from tables made once per
class. The command timeout is one timer per session moved lazily (a
deadline; the timer re-arms itself when it fires early), not a timer
cancelled and made again twice per command. Validator hooks' arities are
cached per class and the base class's no-op hooks are not called. The log
has one line per message (``queued``); connect and disconnect lines are
DEBUG unless the session queued nothing or had errors.

Durability (docs/ARCHITECTURE.md, "The spool"): ``250`` is sent only after the queue file
was written in ``tmp/``, fsynced and renamed into ``incoming/`` in a
store thread (:func:`msa.submission.writer.write_message`), and a directory fsync
that began after the rename has completed (the stage's
:class:`msa.submission.writer.DirSyncer`, shared by the sessions storing at the
same time, resolves the session's future only then). The edge's only
client's message (held in memory) is stored the same way by the event
loop itself: no thread hand-off in its wait. With 2 to 4 sessions the
queue file is created while the body arrives.
Nothing is acknowledged on any error: a refused DATA leaves no file.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import logging
import time
from typing import Any, NamedTuple

# private: aiosmtpd's AUTH table holds _AuthMechAttr entries and has no public
# constructor for them; goes when msa owns the SMTP server (issue 11).
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    TLSSetupException,
    _AuthMechAttr,  # private: see above
)
from aiosmtpd.smtp import Envelope as _AioEnvelope
from aiosmtpd.smtp import Session as _AioSession

from msa.fastlog import InfoWriter
from msa.message import queuefile
from msa.message.headerblock import HeaderCollector
from msa.message.headers import header_addresses
from msa.protocol import smtpcmd, smtpdata
from msa.protocol.errors import MsaError
from msa.submission import tls as tlsconf
from msa.submission.anvil import client_key, hash_gate
from msa.submission.auth import CredentialsInvalidError, auth_backend
from msa.submission.clientname import UNKNOWN
from msa.submission.validators import Reply, SmtpValidators, enhance
from msa.submission.writer import (
    BodySink,
    discard_writer,
    open_writer,
    spool_reply,
    store_pool,
    write_message,
)
from spool import SpoolError, new_id

log = logging.getLogger("msa.edge")
# aiosmtpd logs every connection and command at INFO under "mail.log"; our
# own one-line-per-event log replaces it.
logging.getLogger("mail.log").setLevel(logging.WARNING)

READ_CHUNK = 65536
FOREVER = 10 ** 9
ABORT_AFTER = 2.0


class EdgeSession(_AioSession):
    """What validators see as ``self.session``."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.auth_result: str | None = None     # the user name after AUTH
        self.client_name = UNKNOWN              # forward-confirmed reverse DNS
        self.auth_method = ""
        self.tls = ""                            # "TLSv1.3 TLS_AES_..." or ""
        self.senders: list[str] = []             # extra owned addresses
        self.trusted = False                     # client in [edge] trusted_networks

    @property
    def address(self) -> tuple:
        return self.peer

    @property
    def client_ip(self) -> str:
        return str(self.peer[0]) if self.peer else ""

    @property
    def helo(self) -> str | None:
        return self.host_name


class Transaction(_AioEnvelope):
    """The envelope of the mail transaction in progress."""

    def __init__(self) -> None:
        super().__init__()
        self.params = smtpcmd.MailParams()
        self.recipients: list[queuefile.Recipient] = []


def _capture(server, session, envelope, mechanism, auth_data) -> AuthResult:
    """aiosmtpd authenticator that only hands the decoded credentials back:
    verifying them is ours (in a thread, with delays and limits)."""
    return AuthResult(success=True, auth_data=auth_data)


class _NoHooks:
    """aiosmtpd wants a handler; every command it would hand over is ours."""


_NO_HOOKS = _NoHooks()
# What aiosmtpd's SMTP.__init__ sets to the same value for every msa session.
_PROTOCOL_CONSTANTS: dict[str, Any] = dict(
    __ident__="ESMTP msa", event_handler=_NO_HOOKS, enable_SMTPUTF8=True, _decode_data=False,
    _timeout_handle=None, _tls_handshake_okay=True, _tls_protocol=None,
    _original_transport=None, session=None, envelope=None, transport=None,
    _handler_coroutine=None, _auth_require_tls=True, _proxy_timeout=None,
    _authenticator=_capture, _auth_callback=None, _ehlo_hook_ver=None,
    _enforce_call_limit=False)
_NO_HOOK = -1
# (validator class, hook name) -> positional arguments after the reply it
# takes, or _NO_HOOK (absent, or SmtpValidators' own no-op).
_hook_arity: dict[tuple[type, str], int] = {}


def hook_arity(validators: Any, attr: str) -> int:
    """How many positional arguments ``validators.<attr>`` takes (the
    reply included), cached per class; :data:`_NO_HOOK` when there is no
    such hook or it is :class:`SmtpValidators`' no-op. A hook set on the
    instance itself is looked at every time."""
    cls = type(validators)
    per_instance = attr in getattr(validators, "__dict__", ())
    n = None if per_instance else _hook_arity.get((cls, attr))
    if n is None:
        n = _arity(validators, attr)
        if not per_instance:
            _hook_arity[(cls, attr)] = n
    return n


def _arity(validators: Any, attr: str) -> int:
    fn = getattr(validators, attr, None)
    if fn is None:
        return _NO_HOOK
    base = getattr(SmtpValidators, attr, None)
    if base is not None and getattr(fn, "__func__", None) is base:
        return _NO_HOOK
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return FOREVER
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return FOREVER
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])


HOOKS = ("banner", "ehlo", "auth", "mail", "rcpt", "data", "have_data", "queued")
_NO_TABLE: dict[str, int] = {}
_hook_tables: dict[type, dict[str, int]] = {}


def hook_table(validators: Any) -> dict[str, int]:
    """``{"mail": 2, ...}``: the hooks ``validators`` has (see
    :func:`hook_arity`), once per class; a missing name means the edge
    need not make a :class:`Reply` for that command at all. Hooks set on
    the instance itself are looked at per instance."""
    cls = type(validators)
    table = _hook_tables.get(cls)
    if table is None:
        table = {}
        for name in HOOKS:
            if "handle_" + name not in getattr(validators, "__dict__", ()):
                n = hook_arity(validators, "handle_" + name)
                if n != _NO_HOOK:
                    table[name] = n
        _hook_tables[cls] = table
    own = getattr(validators, "__dict__", None)
    if own and any(k.startswith("handle_") for k in own):
        table = {name: n for name in HOOKS
                 if (n := hook_arity(validators, "handle_" + name)) != _NO_HOOK}
    return table


TALLY_ORDER = ("helo", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "bdat", "rset",
               "noop", "vrfy", "etrn", "quit", "unknown")


def command_tally(tally: dict[str, list[int]]) -> str:
    """Postfix's disconnect summary (pure): ``ehlo=2 starttls=1 auth=0/1
    quit=1 commands=4/5``: per command how many succeeded, ``/sent`` when
    some failed (fail2ban's ddos mode reads ``auth=0/N``)."""
    order = [v for v in TALLY_ORDER if v in tally] + sorted(set(tally) - set(TALLY_ORDER))
    parts = []
    ok = sent = 0
    for verb in order:
        good, total = tally[verb]
        ok, sent = ok + good, sent + total
        parts.append(f"{verb}={good}" if good == total else f"{verb}={good}/{total}")
    parts.append(f"commands={ok}" if ok == sent else f"commands={ok}/{sent}")
    return " ".join(parts)


def _refusal_kind(command: str, status: str) -> str | None:
    """How a 4xx/5xx reply is logged (pure): ``reject`` for a refusal of
    policy (Postfix's ``NOQUEUE: reject:``, which pflogsumm counts and
    fail2ban reads), ``protocol error`` for a syntax or sequence error
    (x.5.x but x.5.3, too many recipients: Postfix logs no reject for
    those), None for a failed password (its SASL warning is the line)."""
    if command == "AUTH" and status.startswith("535"):
        return None
    enhanced = status[4:].split(" ", 1)[0]
    if enhanced[1:4] == ".5." and enhanced[4:] != "3":
        return "protocol error"
    return "reject"


@functools.lru_cache(maxsize=512)
def _enhanced(line: str) -> str:
    """:func:`msa.submission.validators.enhance`, remembered: most replies are the
    same few lines."""
    return enhance(line)


_info = InfoWriter(log, __file__)  # the per-message line


class PlainCredentials(NamedTuple):
    login: bytes
    password: bytes
    authzid: bytes = b""


class SmtpSession(SMTP):
    """aiosmtpd's SMTP protocol with msa's submission rules."""

    def __init__(self, edge: Any, settings: Any):
        self.edge, self.settings = edge, settings
        self._errors = 0
        self._failed_logins = 0
        self._implicit_tls = False
        self._refused = False
        self._idle = False
        self._registered = False
        self._anvil_key: str | None = None
        self._client_name = UNKNOWN
        self._tally: dict[str, list[int]] = {}   # verb -> [succeeded, sent]
        self._refusals = 0                       # 4xx/5xx replies sent
        self._anvil_reply: asyncio.Future | None = None
        self.validators: SmtpValidators | None = None
        self._hooks = _NO_TABLE
        self._deadline = 0.0
        self._timer_at = 0.0
        self._messages = 0
        self._command_table = _commands(type(self))
        self._init_protocol(settings, asyncio.get_running_loop())

    @staticmethod
    def aiosmtpd_options(settings: Any, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        """What ``SMTP.__init__`` would be given (the tests build a session
        that way and compare it with :meth:`_init_protocol`'s)."""
        return dict(data_size_limit=settings.max_message_size, enable_SMTPUTF8=True,
                    decode_data=False, hostname=settings.hostname, ident="ESMTP msa",
                    tls_context=None if settings.implicit_tls else settings.tls_context,
                    timeout=settings.command_timeout, auth_required=settings.require_auth,
                    auth_require_tls=True, authenticator=_capture, loop=loop)

    def _init_protocol(self, settings: Any, loop: asyncio.AbstractEventLoop) -> None:
        """``SMTP.__init__(_NO_HOOKS, **aiosmtpd_options(...))`` of aiosmtpd
        1.4 without its per-connection ``inspect.getmembers``/``dir``: the
        command and AUTH tables come from the class (:meth:`__getattr__`)."""
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        tls_context = None if settings.implicit_tls else settings.tls_context
        self.__dict__.update(_PROTOCOL_CONSTANTS)
        self.loop = loop
        self.data_size_limit = settings.max_message_size
        self.command_size_limits.clear()
        self.hostname = settings.hostname
        self.tls_context = tls_context
        self.require_starttls = tls_context and False
        self._timeout_duration = settings.command_timeout
        self._auth_required = settings.require_auth
        self._handle_hooks = {}

    # aiosmtpd's per-instance tables of bound methods, made on first use
    # (HELP, AUTH), not per connection. cached_property, not __getattr__:
    # a class with __getattr__ pays for it on every attribute read.
    @functools.cached_property
    def _smtp_methods(self) -> dict[str, Any]:
        return {n: getattr(self, "smtp_" + n) for n in _commands(type(self))}

    @functools.cached_property
    def _auth_methods(self) -> dict[str, Any]:
        return {m: _AuthMechAttr(getattr(self, "auth_" + m), True) for m in ("PLAIN", "LOGIN")}

    # -- connection ---------------------------------------------------------

    def _create_session(self) -> EdgeSession:
        return EdgeSession(self.loop)

    def _create_envelope(self) -> Transaction:
        return Transaction()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self._implicit_tls = self.settings.implicit_tls
        if self._tls_active():
            self.session.tls = tlsconf.describe(self.transport.get_extra_info("ssl_object"))
        self.session.trusted = self.edge.is_trusted(self.session.client_ip)
        # STARTTLS makes a new session object: the name carries over.
        self.session.client_name = self._client_name
        if first:
            self._refused = not self.edge._register(self)
            self._registered = not self._refused
            if self._registered and not self.session.trusted:
                # Counted before the greeting, by every edge process's
                # anvil (msa.submission.anvil); trusted clients are not.
                self._anvil_key = client_key(self.session.client_ip)
                self._anvil_reply = self.edge.anvil.connect(self._anvil_key,
                                                            self.settings.rate_window)
        cls = self.settings.validator_class
        if cls is not None and cls is not SmtpValidators:
            # The base class's hooks all accept: nothing to make or call.
            self.validators = cls(self.session)
            self._hooks = hook_table(self.validators)

    def connection_lost(self, error: Exception | None) -> None:
        if self.session is not None:
            quiet = self._messages and not self._errors
            level = logging.DEBUG if quiet else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "disconnect from %s %s", self._client(),
                        command_tally(self._tally))
        if self._registered:
            self._registered = False
            self.edge._unregister(self)
        if self._anvil_key is not None:
            self.edge.anvil.disconnect(self._anvil_key)
            self._anvil_key = None
        super().connection_lost(error)

    def eof_received(self) -> bool:
        """The client closed its side. aiosmtpd cancels the command loop
        here; a loop cancelled before its first step (uvloop reports the
        EOF of a connect-and-close before the loop runs) would never close
        the connection, so close it here: nothing more can be read."""
        super().eof_received()
        self._close_transport()
        return False

    def _tls_active(self) -> bool:
        return self._implicit_tls or self._tls_protocol is not None

    def _arm(self, seconds: float) -> None:
        """The session's one timer: a new deadline moves it only when it
        is earlier than the timer; a timer that fires early re-arms. Per
        command this is a clock read and a compare."""
        self._deadline = deadline = self.loop.time() + seconds
        if deadline < self._timer_at:
            self._timeout_handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._timer_fired)
            self._timer_at = deadline
        elif self._timeout_handle is None:
            self._timeout_handle = self.loop.call_at(deadline, self._timer_fired)
            self._timer_at = deadline

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd calls this (connection_made, STARTTLS).
        self._arm(duration or self._timeout_duration)

    def _timer_fired(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
            self._timer_at = self._deadline
            return
        self._timer_at = 0.0
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        log.info("timeout after %s from %s", self._phase(), self._client())
        self._close_now(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    def _close_now(self, line: str) -> None:
        """Say ``line`` and close, without waiting for the client."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(line.encode() + b"\r\n")
            self._close_transport()

    def _close_transport(self) -> None:
        """Close; abort if still open :data:`ABORT_AFTER` seconds later (a
        TLS close waits for the peer's close_notify, a plain one for the
        peer to read what is left: neither may hold a session slot)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            self._abort_later(transport)

    def _abort_later(self, transport: asyncio.BaseTransport) -> None:
        """The abort timer of :meth:`_close_transport`, unless the close
        is already complete: a plain TCP transport with nothing left to
        write closes at once (no timer per connection)."""
        if self._tls_active() or transport.get_write_buffer_size():
            self.loop.call_later(ABORT_AFTER, self._abort, transport)

    def _abort(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()
        if self._original_transport is not None:
            self._original_transport.abort()

    def _service(self) -> str:
        return "submissions" if self.settings.implicit_tls else "submission"

    def _client(self) -> str:
        """``name[ip]`` as Postfix logs a client. The name is its
        forward-confirmed reverse DNS or ``unknown``, never the HELO, which
        the client chooses (fail2ban reads the address in the brackets)."""
        return f"{self.session.client_name}[{self.session.client_ip}]"

    def _phase(self) -> str:
        return "DATA" if self._in_data else "command"

    _in_data = False

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def shutdown(self) -> None:
        """The edge stops: close now if between transactions and waiting
        for a command, else after the transaction (see the loop)."""
        if self._idle:
            self._close_now(f"421 4.3.2 {self.hostname} Service shutting down")

    # -- replies ------------------------------------------------------------

    async def push(self, status: str | bytes, error: bool = True) -> None:
        """Send a reply; a 4xx/5xx one spends the error budget unless
        ``error`` is false (a refusal the client did nothing wrong for)."""
        if isinstance(status, bytes):
            status = status.decode("utf-8", "replace")
        status = _enhanced(status)
        if status[:1] in ("4", "5"):
            self._errors += error
            self._refusals += 1
            kind = _refusal_kind(self._command, status)
            if kind:
                log.info("NOQUEUE: %s: %s from %s: %s; %s", kind, self._command,
                         self._client(), status, self._reject_context())
        await self._send(status)

    async def _push_raw(self, line: str) -> None:
        await self._send(line)

    async def _send(self, text: str) -> None:
        """aiosmtpd's ``push`` (UTF-8: SMTPUTF8 is on) without a drain
        coroutine per reply: the writer is awaited only when
        ``StreamWriter.drain`` would do more than return (writing paused
        by flow control, connection lost or closing, a reader error)."""
        writer = self._writer
        writer.write(text.encode() + b"\r\n")
        if (self._paused or self._connection_lost or writer.transport.is_closing()
                or self._reader.exception() is not None):
            await writer.drain()

    _command = ""
    _command_arg = ""

    def _reject_context(self) -> str:
        """Postfix's ``from=<s> to=<r> proto=ESMTP helo=<h>`` after a reject."""
        env = self.envelope
        parts = []
        if env is not None and env.mail_from is not None:
            parts.append(f"from=<{env.mail_from}>")
        if self._command == "RCPT":
            parts.append(f"to=<{self._command_arg.partition(':')[2].strip().strip('<>')}>")
        s = self.session
        parts.append(f"proto={'ESMTP' if s.extended_smtp else 'SMTP'}")
        if s.host_name:
            parts.append(f"helo=<{s.host_name}>")
        return " ".join(parts)
    data_read = 0   # bytes read in the current (or last) DATA phase

    async def _hook(self, name: str, reply: Reply, *args: Any) -> Reply:
        nargs = self._hooks.get(name)
        if nargs is None:
            return reply
        result = getattr(self.validators, "handle_" + name)(reply, *args[:max(0, nargs - 1)])
        if inspect.isawaitable(result):
            await result
        return reply

    def _client_limit(self, counts: tuple[int, int] | None) -> str | None:
        """What is wrong with this client's (open, opened this window)
        connection counts, if anything (None: the anvil did not answer)."""
        if counts is None:
            return None
        n_open, rate = counts
        s = self.settings
        if s.max_connections_per_client and n_open > s.max_connections_per_client:
            # Postfix's anvil text (smtpd_client_connection_count_limit).
            log.warning("Connection concurrency limit exceeded: %d from %s for service %s",
                        n_open, self._client(), self._service())
            return "too many connections from your address"
        if s.max_connection_rate_per_client and rate > s.max_connection_rate_per_client:
            log.warning("Connection rate limit exceeded: %d from %s for service %s",
                        rate, self._client(), self._service())
            return "too many connections from your address; try again later"
        return None

    async def _close_with(self, line: str) -> None:
        await self._push_raw(line)
        self._close_transport()

    # -- the command loop ---------------------------------------------------

    async def _handle_client(self) -> None:
        if self._refused:
            await self._close_with(f"421 4.7.0 {self.hostname} Error: too many connections")
            return
        if self._anvil_reply is not None:
            over = self._client_limit(await self._anvil_reply)
            if over:
                await self._close_with(f"421 4.7.0 {self.hostname} Error: {over}")
                return
        if self.edge.client_names is not None:
            # Before the greeting, as Postfix's smtpd (bounded; cached).
            self._client_name = await self.edge.client_names.lookup(self.session.client_ip)
            self.session.client_name = self._client_name
        if log.isEnabledFor(logging.DEBUG):
            log.debug("connect from %s", self._client())
        if "banner" in self._hooks:
            reply = Reply("220", f"{self.hostname} ESMTP msa")
            await self._hook("banner", reply, self.session.peer)
            await self._push_raw(f"{reply.code} {reply.message}")
            if not reply.positive():
                self._close_transport()
                return
        else:
            await self._send(f"220 {self.hostname} ESMTP msa")
        while self.transport is not None and not self.transport.is_closing():
            if self.edge.stopping and not self.in_transaction:
                await self._close_with(f"421 4.3.2 {self.hostname} Service shutting down")
                return
            try:
                await self._one_command()
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except (ConnectionError, asyncio.IncompleteReadError):
                self._writer.close()
                return
            except TLSSetupException:
                log.info("TLS handshake failed from %s", self._client())
                self._close_transport()
                return
            except Exception:
                log.exception("internal error in session with %s", self._client())
                await self.push("451 4.3.0 Internal error")
            if self._errors >= self.settings.max_errors and self.transport is not None:
                log.warning("too many errors after %s from %s", self._command or "CONNECT",
                            self._client())
                await self._close_with(f"421 4.7.0 {self.hostname} Error: too many errors")
                return

    async def _one_command(self) -> None:
        timeout = self._timeout_duration
        self._idle = self.envelope is None or self.envelope.mail_from is None
        self._arm(timeout)
        line = await self._read_line(smtpcmd.MAX_LINE_READ)
        self._idle = False
        self._arm(timeout)
        if line is None:
            self._command = "line"
            self._count("unknown", False)
            await self.push("500 5.5.2 Line too long")
            return
        try:
            verb, arg = smtpcmd.split_command(line)
        except MsaError as exc:
            self._command = "line"
            self._count("unknown", False)
            await self.push(exc.reply())
            return
        self._command, self._command_arg = verb, arg or ""
        method = self._command_table.get(verb)
        if method is None:
            self._count("unknown", False)
            await self.push("500 5.5.1 Error: command not recognized")
            return
        refusals = self._refusals
        try:
            await method(self, arg or None)
        except MsaError as exc:          # a parse error carries its reply
            await self.push(exc.reply())
        self._count(verb.lower(), self._refusals == refusals)

    def _count(self, verb: str, ok: bool) -> None:
        counts = self._tally.get(verb)
        if counts is None:
            counts = self._tally[verb] = [0, 0]
        counts[0] += ok
        counts[1] += 1

    async def _read_line(self, limit: int) -> bytes | None:
        """One line through LF; None (after reading to its end) if longer
        than ``limit``. The stream buffer itself never holds more than
        aiosmtpd's line limit plus one read."""
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            return await self._read_long_line(limit, await self._reader.read(exc.consumed))
        return line if len(line) <= limit else None

    async def _read_long_line(self, limit: int, first: bytes) -> bytes | None:
        """The rest of a line longer than the stream's limit."""
        buf, too_long = bytearray(first), len(first) > limit
        if too_long:
            buf = bytearray()
        while True:
            try:
                part = await self._reader.readuntil(b"\n")
                done = True
            except asyncio.LimitOverrunError as exc:
                part = await self._reader.read(exc.consumed)
                done = False
            if not too_long:
                buf += part
                if len(buf) > limit:
                    too_long, buf = True, bytearray()
            if done:
                return None if too_long else bytes(buf)

    # -- commands -----------------------------------------------------------

    async def _need_helo(self) -> bool:
        if not self.session.host_name:
            await self.push("503 5.5.1 Error: send HELO/EHLO first")
            return True
        return False

    async def _need_auth(self) -> bool:
        s = self.session
        if self.settings.require_auth and not (s.auth_result or s.trusted):
            await self.push("530 5.7.0 Authentication required")
            return True
        return False

    async def smtp_HELO(self, arg: str | None) -> None:
        await self._greet(arg, extended=False)

    async def smtp_EHLO(self, arg: str | None) -> None:
        await self._greet(arg, extended=True)

    async def _greet(self, name: str | None, extended: bool) -> None:
        verb = "EHLO" if extended else "HELO"
        if not name or " " in name or len(name) > 255:
            await self.push(f"501 5.5.4 Syntax: {verb} hostname")
            return
        self._set_rset_state()
        greeting = self.hostname
        if "ehlo" in self._hooks:
            reply = Reply("250", greeting)
            await self._hook("ehlo", reply, name)
            if not reply.positive():
                await self.push(reply.line())
                return
            greeting = reply.message
        self.session.host_name = name
        self.session.extended_smtp = extended
        if not extended:
            await self._push_raw(f"250 {greeting}")
            return
        lines = [greeting, f"SIZE {self.settings.max_message_size}", "PIPELINING",
                 "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and not self._tls_active():
            lines.append("STARTTLS")
        if self._tls_active() and self.settings.auth is not None:
            lines.append("AUTH PLAIN LOGIN")
        # One write for the whole reply (RFC 5321 §4.2.1 multiline).
        await self._push_raw("\r\n".join([*(f"250-{line}" for line in lines[:-1]),
                                           f"250 {lines[-1]}"]))

    async def smtp_QUIT(self, arg: str | None) -> None:
        """aiosmtpd's QUIT (``221 Bye``, then close), without cancelling
        the command loop: it ends because the transport is closing."""
        if arg:
            await self.push("501 Syntax: QUIT")
            return
        await self._send("221 2.0.0 Bye")
        self._close_transport()

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self._tls_active():
            await self.push("503 5.5.1 Error: TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str | None) -> None:
        s = self.session
        if await self._need_helo():
            return
        if not s.extended_smtp or self.settings.auth is None:
            await self.push("502 5.5.1 Error: AUTH not available")
            return
        if not self._tls_active():
            # RFC 4954 §4 and §6: AUTH PLAIN/LOGIN only under TLS.
            await self.push("538 5.7.11 Encryption required for requested "
                            "authentication mechanism")
            return
        if s.auth_result:
            await self.push("503 5.5.1 Error: already authenticated")
            return
        if self.in_transaction:
            await self.push("503 5.5.1 Error: AUTH not permitted during a mail transaction")
            return
        args = (arg or "").split()
        if not args or len(args) > 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = args[0].upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        try:
            # aiosmtpd's auth_PLAIN/auth_LOGIN(self, server, args)
            method = getattr(self, "auth_" + mechanism)
            result = await method(self, [mechanism, *args[1:]])
        except ValueError:          # a challenge response over the line limit
            await self.push("500 5.5.2 Line too long")
            return
        if not result.success:
            return                  # already answered 501 (bad base64, '*')
        data = result.auth_data
        await self._verify(mechanism, data.login, data.password, getattr(data, "authzid", b""))

    async def auth_PLAIN(self, _, args: list[str]) -> AuthResult:
        """RFC 4616: ``authzid NUL authcid NUL passwd``, in the command or
        after an empty challenge. aiosmtpd's drops the authorization
        identity; msa keeps it so that one other than the user (acting as
        someone else, which msa does not offer) fails like a bad password."""
        if len(args) == 1:
            data = await self.challenge_auth("")
            if data is MISSING:
                return AuthResult(success=False)
        else:
            try:
                data = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        parts = data.split(b"\0")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        authzid, login, password = parts
        return AuthResult(success=True, auth_data=PlainCredentials(login, password, authzid))

    async def _verify(self, mechanism: str, login: bytes, password: bytes,
                      authzid: bytes = b"") -> None:
        s = self.session
        self._arm(FOREVER)
        # One check at a time per client in this process (HashGate): the
        # budget is read and a failure counted inside the turn.
        async with hash_gate.turn(self._anvil_key):
            if await self._auth_blocked():
                # As slow as a failure (a sleep costs nothing here), so a
                # blocked guesser cannot spin on cheap refusals.
                await asyncio.sleep(self.settings.auth_failure_delay)
                self._arm(self.settings.command_timeout)
                # Logged as "NOQUEUE: reject: AUTH from unknown[ip]: 454 4.7.0
                # Client host rejected: ...", which fail2ban's stock postfix
                # filter matches (contrib/fail2ban).
                await self.push("454 4.7.0 Client host rejected: too many failed logins; "
                                "try again later")
                return
            try:
                backend = auth_backend(self.settings.auth, s)
                if authzid and authzid != login:
                    raise CredentialsInvalidError("authorization identity is not the user")
                user = await self.edge.verify(backend, login.decode("utf-8"),
                                              password.decode("utf-8"))
            except (CredentialsInvalidError, UnicodeDecodeError):
                user = None
            except Exception:
                log.exception("authentication backend failed for %s", self._client())
                self._arm(self.settings.command_timeout)
                await self.push("454 4.7.0 Temporary authentication failure")
                return
            if user is None:
                await self._count_auth_failure()
        if user is None:
            self._failed_logins += 1
            log.warning("%s: SASL %s authentication failed: user=%s", self._client(),
                        mechanism, login.decode("utf-8", "replace")[:64])
            await asyncio.sleep(self.settings.auth_failure_delay)
            self._arm(self.settings.command_timeout)
            await self.push("535 5.7.8 Authentication credentials invalid")
            if self._failed_logins >= self.settings.max_auth_failures:
                await self._close_with(f"421 4.7.0 {self.hostname} Error: too many "
                                       "authentication failures")
            return
        self._arm(self.settings.command_timeout)
        reply = Reply("235", "2.7.0 Authentication successful")
        await self._hook("auth", reply, user)
        if reply.code.startswith("2"):
            s.auth_result, s.auth_method, s.authenticated = user, mechanism, True
            s.senders = self.edge.senders_for(backend, user)
            log.info("%s: sasl_method=%s, sasl_username=%s", self._client(), mechanism, user)
        await self.push(reply.line())

    async def _auth_blocked(self) -> bool:
        """This client spent its failed-AUTH budget in the current window
        (every edge process counts; trusted clients have none)."""
        s = self.settings
        if self._anvil_key is None or not s.max_auth_failures_per_client:
            return False
        failures = await self.edge.anvil.auth_failures(self._anvil_key,
                                                       s.auth_failure_window)
        return failures is not None and failures >= s.max_auth_failures_per_client

    async def _count_auth_failure(self) -> None:
        s = self.settings
        if self._anvil_key is None or not s.max_auth_failures_per_client:
            return
        failures = await self.edge.anvil.auth_failed(self._anvil_key, s.auth_failure_window)
        if failures == s.max_auth_failures_per_client:
            # Exactly once per window, whichever process counted it.
            log.warning("%s: SASL authentication blocked: %d failed logins from %s; "
                        "AUTH refused for up to %gs", self._client(), failures,
                        self._anvil_key, s.auth_failure_window)

    def _owns(self, address: str) -> bool:
        user = self.session.auth_result
        return bool(user) and self.settings.senders.allowed(user, address, self.session.senders)

    async def _ready(self, need_mail: bool) -> bool:
        """HELO/EHLO, AUTH and (for RCPT and DATA) MAIL came first."""
        if await self._need_helo() or await self._need_auth():
            return False
        if need_mail and not self.in_transaction:
            await self.push("503 5.5.1 Error: need MAIL command")
            return False
        return True

    def _path_arg(self, arg: str | None, keyword: str, null_ok: bool = False) -> tuple[str, str]:
        """``FROM:<path> params`` -> (address, params text), or raise."""
        if not arg or arg[:len(keyword)].upper() != keyword:
            verb = "MAIL" if keyword == "FROM:" else "RCPT"
            raise smtpcmd.error(501, "5.5.4", f"Syntax: {verb} {keyword}<address>")
        address, rest = smtpcmd.parse_path(arg[len(keyword):], null_ok=null_ok)
        if rest and not self.session.extended_smtp:
            raise smtpcmd.error(501, "5.5.4", "Parameters need EHLO")
        return address, rest

    async def smtp_MAIL(self, arg: str | None) -> None:
        if not await self._ready(need_mail=False):
            return
        if self.in_transaction:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        address, rest = self._path_arg(arg, "FROM:", null_ok=True)
        params = smtpcmd.parse_mail_params(rest)
        if params.size is not None and params.size > self.settings.max_message_size:
            await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        if not address.isascii() and not params.smtputf8:
            await self.push("553 5.6.7 Non-ASCII address requires SMTPUTF8")
            return
        if address and "@" not in address:
            await self.push("553 5.1.7 Sender address must be fully qualified")
            return
        # The null sender is allowed to an authenticated user, as Postfix's
        # reject_sender_login_mismatch does (MDNs and DSNs use it); the
        # From header is still checked after DATA.
        if self.session.auth_result and address and not self._owns(address):
            await self.push(f"553 5.7.1 <{address}>: Sender address rejected: "
                            f"not owned by user {self.session.auth_result}")
            return
        line = await self._address_reply("mail", "2.1.0 Sender <{0}> ok", address, rest)
        if line is None:
            return
        self.envelope.mail_from = address
        self.envelope.params = params
        self.envelope.smtp_utf8 = params.smtputf8
        await self._send(line)          # 2xx with its enhanced code already

    async def _address_reply(self, hook: str, message: str, address: str,
                             rest: str) -> str | None:
        """The ``250`` line for MAIL or RCPT after the ``hook`` (if the
        validators have one); None when the hook refused (already said)."""
        if hook not in self._hooks:
            return "250 " + message.replace("{0}", address)
        reply = Reply("250", message)
        await self._hook(hook, reply, address, smtpcmd.parse_params(rest))
        if not reply.code.startswith("2"):
            await self.push(reply.line(address))
            return None
        return reply.line(address)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if not await self._ready(need_mail=True):
            return
        address, rest = self._path_arg(arg, "TO:")
        params = smtpcmd.parse_rcpt_params(rest, utf8=self.envelope.params.smtputf8)
        if not address.isascii() and not self.envelope.params.smtputf8:
            await self.push("553 5.6.7 Non-ASCII address requires SMTPUTF8")
            return
        if len(self.envelope.recipients) >= self.settings.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452, the client sends the rest later
            # (in another transaction): not an error of the client's.
            await self.push("452 4.5.3 Error: too many recipients", error=False)
            return
        line = await self._address_reply("rcpt", "2.1.5 Recipient <{0}> ok", address, rest)
        if line is None:
            return
        self.envelope.recipients.append(queuefile.Recipient(
            address, notify=params.notify, orcpt=params.orcpt))
        self.envelope.rcpt_tos.append(address)
        await self._send(line)

    async def smtp_DATA(self, arg: str | None) -> None:
        if not await self._ready(need_mail=True):
            return
        if not self.envelope.recipients:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if "data" in self._hooks:
            reply = Reply("354", "End data with <CR><LF>.<CR><LF>")
            await self._hook("data", reply)
            if reply.code != "354":
                await self.push(reply.line())
                return
            await self._push_raw(f"354 {reply.message}")
        else:
            await self._send("354 End data with <CR><LF>.<CR><LF>")
        sink = BodySink(self.settings.spool.root_s + "/tmp", self.settings.memory_limit)
        # The queue id is given now (Postfix gives it at MAIL) and, while
        # few sessions compete, its file is created while the body arrives.
        now = time.time()
        qid = new_id(now)
        opening = None
        if 1 < len(self.edge._sessions) <= PRECREATE_MAX_SESSIONS:
            s = self.settings
            opening = store_pool().run(self.loop, open_writer, s.spool, s.stage, qid)
        try:
            line = await self._data_reply(sink, qid, now, opening)
        finally:
            sink.close()
            if opening is not None and not self._writer_used:
                discard_writer(opening)
            self._writer_used = False
            self._set_post_data_state()
        try:
            if line[:1] == "2":
                await self._send(line)  # queued: a 250 with its enhanced code
            else:
                await self.push(line)
        finally:
            # A queued message is logged after its reply (the log write is
            # not in the client's wait), and also when that reply fails.
            if self._queued_log:
                text, self._queued_log = self._queued_log, ""
                _info(text)

    _writer_used = False
    _queued_log = ""

    async def _data_reply(self, sink: BodySink, qid: str, now: float,
                          opening: asyncio.Future | None) -> str:
        """Read the message, check it, queue it; the reply line to send."""
        # The header section is kept only for the From check of an
        # authenticated user (AUTH is refused inside a transaction).
        headers = (HeaderCollector(self.settings.max_header_size)
                   if self.session.auth_result else None)
        end = await self._read_data(sink, headers)
        if end.error is not None:
            return end.error.reply()
        if sink.error is not None:
            log.warning("%s: cannot spill message to disk: %s", self._client(), sink.error)
            return spool_reply(sink.error)
        if headers is not None:
            headers.finish()
            refusal = self._check_from(headers)
            if refusal:
                return refusal
        env = self._queue_envelope(sink.size, qid, now)
        hooks = self._hooks
        reply = None
        if hooks:
            reply = Reply("250", "2.0.0 Ok: queued as {0}")
            await self._hook("have_data", reply, env)
            if not reply.code.startswith("2"):
                return reply.line()
        nrcpt = len(env.recipients)  # as the client gave them (policies may rewrite)
        try:
            qid = await self._store(env, sink, opening)
        except (SpoolError, OSError, queuefile.QueueFileError) as exc:
            log.warning("%s: queue file write error: %s", self._client(), exc)
            return spool_reply(exc)
        s = self.session
        self._messages += 1
        if log.isEnabledFor(logging.INFO):
            sasl = (f", sasl_method={s.auth_method}, sasl_username={s.auth_result}"
                    if s.auth_result else "")
            # Postfix's smtpd line first (pflogsumm counts it as received),
            # then what it does not parse.
            self._queued_log = (f"{qid}: client={self._client()}{sasl}, from=<{env.sender}>, "
                                f"size={sink.size}, nrcpt={nrcpt}, tls={s.tls or 'none'}")
        if reply is None:
            return f"250 2.0.0 Ok: queued as {qid}"
        await self._hook("queued", reply, qid)
        if not reply.code.startswith("2"):
            log.error("%s: handle_queued changed a 250 after queueing; sending 250", qid)
            reply.code = "250"
        return reply.line(qid)

    async def _read_data(self, sink: BodySink,
                         headers: HeaderCollector | None) -> smtpdata.EndOfData:
        reader = smtpdata.DataReader(self.settings.max_message_size)
        self._in_data = True
        s = self.settings
        # The phase's end: data_timeout plus 1/min_data_rate seconds for
        # every byte received (a client at the minimum rate is never cut
        # off), at most data_deadline from the start.
        start = self.loop.time()
        cap = start + s.data_deadline if s.data_deadline > 0 else float("inf")
        self.data_read = 0
        try:
            while True:
                end = cap
                if s.min_data_rate > 0:
                    end = min(end, start + s.data_timeout + self.data_read / s.min_data_rate)
                self._arm(max(0.0, min(s.data_timeout, end - self.loop.time())))
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    raise ConnectionResetError("connection closed during DATA")
                self.data_read += len(chunk)
                for event in reader.feed(chunk):
                    if isinstance(event, smtpdata.Data):
                        if headers is not None:
                            headers.feed(event.data)
                        sink.write(event.data)
                    else:
                        self._unread(reader.trailing)
                        return event
        finally:
            self._in_data = False
            self._arm(self.settings.command_timeout)

    def _unread(self, data: bytes) -> None:
        """Give bytes read past the end of DATA back to the command reader
        (pipelined commands, RFC 2920 §3.1). aiosmtpd's StreamReader has
        no unread; its buffer is a bytearray we may prepend to, as aiosmtpd
        itself clears it after STARTTLS."""
        if data:
            self._reader._buffer[0:0] = data

    def _check_from(self, headers: HeaderCollector) -> str | None:
        """An authenticated user's From (and Sender) addresses must be
        theirs too."""
        user = self.session.auth_result
        if not user:
            return None
        if headers.overflow:
            return "552 5.3.4 Message header section too large"
        for name in ("From", "Sender"):   # RFC 5322 §3.6.2: who wrote it, who sent it
            addresses = header_addresses(headers.headers, name)
            if addresses is None:
                return f"553 5.7.1 {name} header cannot be parsed"
            for address in addresses:
                if not self._owns(address):
                    return f"553 5.7.1 {name} address <{address}> not owned by user {user}"
        return None

    def _queue_envelope(self, size: int, qid: str, now: float) -> queuefile.Envelope:
        s, t = self.session, self.envelope
        return queuefile.Envelope(
            sender=t.mail_from, recipients=list(t.recipients), queue_id=qid,
            arrival=queuefile.utc_iso(now), origin="smtp", client_address=s.client_ip,
            client_name="" if s.client_name == UNKNOWN else s.client_name,
            helo=s.host_name or "", tls=s.tls,
            auth_user=s.auth_result or "", size=str(size), body=t.params.body,
            smtputf8="yes" if t.params.smtputf8 else "", ret=t.params.ret,
            envid=t.params.envid)

    def _store_here(self, env: queuefile.Envelope, sink: BodySink) -> str:
        """The store of the edge's only client, by the event loop itself:
        with nobody else to serve, handing the write to a thread and the
        reply back would only add two thread wake-ups to the client's wait
        (a new client meanwhile waits in the listen queue at most one
        write; a message over the memory limit always goes to a thread).
        Same steps and order: file fsync, rename, fsync of the stage
        directory begun after the rename."""
        settings = self.settings
        qid = _write_detached(settings.spool, settings.stage, env, sink.detach(),
                              settings.stages, settings.max_policy_header)
        if self.edge.dir_syncer is not None:
            self.edge.dir_syncer.sync_now()
        return qid

    async def _store(self, env: queuefile.Envelope, sink: BodySink,
                     opening: asyncio.Future | None) -> str:
        self._arm(FOREVER)
        try:
            settings = self.settings
            writer = None
            if opening is not None:
                try:
                    writer = await opening  # its failure (a full disk) is the store's
                finally:
                    self._writer_used = True
                    if writer is None:      # failed, or this session was cancelled
                        discard_writer(opening)
            if writer is None and sink.file is None and len(self.edge._sessions) == 1:
                return self._store_here(env, sink)
            return await store_pool().run(
                self.loop, _write_detached, settings.spool, settings.stage, env,
                sink.detach(), settings.stages, settings.max_policy_header, writer,
                then=self.edge.dir_syncer)
        finally:
            self._arm(self.settings.command_timeout)


def _write_detached(spool: Any, stage: str, env: queuefile.Envelope, body: BodySink,
                    *args: Any) -> str:
    """:func:`write_message` of a detached body, closed after (in the
    store thread: a spilled body's file is closed there)."""
    try:
        return write_message(spool, stage, env, body, *args)
    finally:
        body.close()


# With 2 up to this many sessions, a message's queue file is created while
# its body arrives (latency counts most when few clients wait); beyond,
# the store threads are busy anyway and a second hand-off would only cost
# CPU. A lone session's message is stored by the loop itself.
PRECREATE_MAX_SESSIONS = 4

_command_tables: dict[type, dict[str, Any]] = {}


def _commands(cls: type) -> dict[str, Any]:
    """``{"MAIL": cls.smtp_MAIL, ...}``: the protocol's commands, once per
    class (aiosmtpd makes this table with ``dir()`` per connection)."""
    table = _command_tables.get(cls)
    if table is None:
        table = {name[5:]: getattr(cls, name) for name in dir(cls) if name.startswith("smtp_")}
        _command_tables[cls] = table
    return table

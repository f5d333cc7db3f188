"""The SMTP client side: relay one message to the MX hosts of its recipients
(:class:`MxSmtpRelay`) or to one smarthost (:class:`SmarthostRelay`).

Interface (python-slimta's ``Relay.attempt``): ``await relay.attempt(envelope,
message)`` tries every pending recipient once and returns one
:class:`RcptResult` per recipient: ``sent``, ``failed`` (permanent) or
``deferred`` (transient). It never raises for a delivery problem; the caller
(the runner) records the results, retries and bounces.

Decisions:

- Hosts are tried in MX order (:mod:`msa.delivery.mx`). The next host is tried when
  a host cannot be reached or fails before any recipient was given to it:
  connection refused or timed out, a 4xx/5xx greeting (Postfix
  ``smtp_skip_5xx_greeting``), EHLO/HELO refused, required TLS missing or
  failing, AUTH failing, 4xx to MAIL, connection lost before DATA. A reply
  to RCPT or to the end of DATA is the recipient's answer for this attempt.
  If no host could be used the recipients are deferred (never bounced).
- TLS (RFC 3207): ``opportunistic`` uses STARTTLS when offered with an
  unverified context (an unverified certificate still beats plain text),
  and if no TLS can be negotiated at all connects again in plain text;
  ``required`` (per domain with ``tls_required_domains``, and for a
  smarthost by default) verifies the chain and the host name and defers
  when STARTTLS is missing or the certificate does not verify; ``none``
  never starts TLS. After STARTTLS, EHLO is sent again (RFC 3207 §4.2).
- SIZE (RFC 1870): a message larger than the server's declared SIZE is a
  permanent ``552 5.3.4``, without sending it. 8BITMIME (RFC 6152):
  ``BODY=8BITMIME`` when the envelope says so and the server offers it.
  SMTPUTF8 (RFC 6531): sent when the envelope or an address needs it; a
  server without it gets nothing and the recipients fail ``553 5.6.7``.
  DSN (RFC 3461): NOTIFY/ORCPT/RET/ENVID are passed on when offered.
- DATA is streamed from the spool file chunk by chunk through
  :class:`msa.protocol.dotstuff.DotStuffer` (CRLF line ends, dot-stuffing), writing
  with the transport's flow control, so a 50 MB message never sits in
  memory. aiosmtplib's own ``data()`` takes the whole message as one
  ``bytes``; only its ``DATA`` command, ``write`` and ``read_response``
  are used here.
- PIPELINING (RFC 2920): when the server offers it, MAIL, every RCPT and
  DATA go out in one write and the replies are read in order (DATA last in
  the group, §3.1). Every reply is checked: no accepted recipient, or a
  rejected MAIL, with a 354 to DATA anyway gets a lone ``.`` (§3.1). The
  results per recipient are those of the command-by-command dialogue,
  which is used when PIPELINING is not offered.
- Connections are reused (nullmailer#68): after a transaction the
  connection goes back to a pool keyed by address, port, TLS mode and
  AUTH user; the next message to that server goes out on it instead of
  connecting again. RSET is sent first only after an aborted transaction
  (a completed DATA ends the transaction, RFC 5321 §4.1.1.4). A reused
  connection the server closed or answers 421 before it replied to MAIL
  is replaced by a fresh one (it may have timed out while idle); that is
  not a failure of the host. A pooled connection is
  closed with QUIT after ``idle_timeout`` seconds unused or after
  ``max_messages_per_connection`` messages. At most ``max_connections``
  connections are open in total (idle ones are closed to make room) and at
  most ``max_connections_per_domain`` deliveries run to one destination.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

import aiosmtplib
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_LINE_LENGTH,
    MAX_RESPONSE_LENGTH,
    SMTPProtocol,
)
from aiosmtplib.response import SMTPResponse

from msa.delivery.mx import MxHost, MxResolver, combine_host_errors, parse_hostport
from msa.message.queuefile import Envelope, Recipient, one_line
from msa.protocol.dotstuff import DotStuffer
from msa.protocol.errors import MsaError, PermanentError, TransientError
from msa.protocol.replies import status_of as enhanced_status

log = logging.getLogger("msa.relay")

CHUNK = 65536
MAX_ADDRESSES_PER_ATTEMPT = 10
TLS_MODES = ("opportunistic", "required", "none")


# ---------------------------------------------------------------- results


@dataclass
class RcptResult:
    """What one attempt did for one recipient."""

    address: str
    state: str                 # "sent", "failed" or "deferred"
    reply: str                 # "250 2.0.0 Ok: queued as X", one line
    status: str                # enhanced status code "2.0.0"
    host: str = ""             # the MX host name that answered, if any
    addr: str = ""
    port: int = 0
    tls: str = ""              # "TLSv1.3" when the session used TLS
    # Seconds from the start of the attempt for this destination until a
    # connection was ready to send (DNS, connect, greeting, EHLO, TLS,
    # AUTH): Postfix's third delays= figure; the whole attempt when none.
    setup: float = 0.0

    @property
    def relay(self) -> str:
        return f"{self.host}[{self.addr}]:{self.port}" if self.host else "none"


def state_of(code: int) -> str:
    if 200 <= code < 300:
        return "sent"
    if 500 <= code < 600:
        return "failed"
    return "deferred"


def reply_text(code: int, message: str) -> str:
    return one_line(f"{code} {message}")


def status_of(code: int, text: str) -> str:
    """The enhanced status code of a reply, or the class default."""
    return enhanced_status(text, {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0"))


def result_for(address: str, code: int, message: str, where=None) -> RcptResult:
    text = reply_text(code, message)
    r = RcptResult(address, state_of(code), text, status_of(code, text))
    if where is not None:
        r.host, r.addr, r.port, r.tls = where.host, where.addr, where.port, where.tls
    return r


def result_from_error(address: str, err: MsaError, where=None) -> RcptResult:
    return result_for(address, err.code, f"{err.status} {err.message}", where)


# ---------------------------------------------------------------- message sources


class MessageSource(Protocol):
    size: int

    def chunks(self) -> Iterator[bytes]: ...


class BytesMessage:
    """A message held in memory (the tutorial API)."""

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def chunks(self) -> Iterator[bytes]:
        for i in range(0, len(self.data), CHUNK):
            yield self.data[i:i + CHUNK]


class FileMessage:
    """``size`` bytes at ``offset`` of an open file, read with ``pread`` so
    several hosts in one attempt can each read it from the start."""

    def __init__(self, fileobj, offset: int, size: int):
        self.fd, self.offset, self.size = fileobj.fileno(), offset, size

    def chunks(self) -> Iterator[bytes]:
        pos, end = self.offset, self.offset + self.size
        while pos < end:
            data = os.pread(self.fd, min(CHUNK, end - pos), pos)
            if not data:
                raise OSError("queue file shorter than its Size")
            pos += len(data)
            yield data

    def head(self, n: int) -> bytes:
        return os.pread(self.fd, min(n, self.size), self.offset)


# ---------------------------------------------------------------- destinations


class HostFailure(Exception):
    """This host could not be used; try the next one."""

    def __init__(self, error: MsaError):
        super().__init__(error.message)
        self.error = error


@dataclass
class Destination:
    """Where a group of recipients goes and how."""

    key: str                      # concurrency key: a domain or the smarthost
    hosts: list[MxHost] | None    # None: look up MX for ``domain``
    domain: str
    tls: str                      # one of TLS_MODES
    auth: tuple[str, str] | None = None


@dataclass
class Where:
    host: str
    addr: str
    port: int
    tls: str = ""


class PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol, keeping the replies to a pipelined group.

    aiosmtplib parses one reply per waiter and drops what arrives while a
    parsed reply waits to be picked up (it expects one command at a time).
    While ``owed`` replies are outstanding, arriving data is kept in the
    buffer instead and :meth:`read_response` parses the next reply from it.
    """

    owed = 0

    def _read_response_from_buffer(self):
        """The parent's parser, with a shortcut for the usual reply: one
        line ``ddd text`` within the line limit (what the parent makes of
        it, without its loop and copies); anything else goes to the parent."""
        buf = self._buffer
        end = buf.find(b"\n")
        if 3 < end < MAX_LINE_LENGTH and buf[3] == 32 and buf[:3].isdigit():
            response = SMTPResponse(int(buf[:3]), bytes(buf[4:end + 1].strip(b" \t\r\n"))
                                    .decode("utf-8", "surrogateescape"))
            del buf[:end + 1]
            return response
        return super()._read_response_from_buffer()

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if self.owed and waiter is not None and (waiter.done() or not self._response_pending):
            self._buffer.extend(data)
            if len(self._buffer) > MAX_RESPONSE_LENGTH + self.owed * MAX_LINE_LENGTH:
                self.transport.close()  # runaway server: the next read fails
            return
        super().data_received(data)

    async def read_response(self, timeout: float | None = None):
        waiter = self._response_waiter
        if self.owed and self._buffer and waiter is not None and not waiter.done():
            try:
                response = self._read_response_from_buffer()
            except Exception as exc:  # noqa: BLE001 - what data_received does
                self._set_response_exception(waiter, exc)
            else:
                if response is not None:
                    waiter.set_result(response)
        if waiter is not None and waiter.done():
            # Already here (the usual case inside a pipelined group): what
            # the parent does after its wait, without wait_for's timer and
            # futures (Python 3.11's wait_for has no shortcut for a done
            # future).
            self._response_pending = False
            self._response_waiter = None if self.transport is None \
                else self._loop.create_future()
            return waiter.result()
        if waiter is None or timeout is None or timeout <= 0:
            return await super().read_response(timeout)
        # What the parent does, with one timer instead of wait_for's
        # extra future, timer and callbacks (two replies awaited per
        # message). Cancelling the caller cancels the waiter, as there.
        self._response_pending = True
        timer = self._loop.call_later(timeout, _time_out, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._response_pending = False
            self._response_waiter = None if self.transport is None \
                else self._loop.create_future()


def _time_out(waiter: asyncio.Future) -> None:
    """The read timer of :meth:`PipeliningProtocol.read_response`: the
    error aiosmtplib raises when its ``wait_for`` times out."""
    if not waiter.done():
        waiter.set_exception(aiosmtplib.SMTPReadTimeoutError(
            "Timed out waiting for server response"))


class StaleConnection(Exception):
    """A reused connection was closed by the server before it answered
    MAIL: open a fresh one."""


class Connection:
    """One open SMTP session and what the server said it supports."""

    def __init__(self, smtp: aiosmtplib.SMTP, key: tuple, where: Where):
        self.smtp, self.key, self.where = smtp, key, where
        self.messages = 0
        self.idle_handle: asyncio.TimerHandle | None = None
        self.dropped = False  # its slot in the pool was given back
        self.reused = False   # taken from the pool for this transaction
        self.last_used = 0.0  # loop time it went back to the pool
        self.dirty = False    # a transaction was aborted: RSET before the next

    def supports(self, ext: str) -> bool:
        return self.smtp.supports_extension(ext)

    @property
    def pipelining(self) -> bool:
        """PIPELINING offered, and the protocol can keep pipelined replies."""
        return isinstance(self.smtp.protocol, PipeliningProtocol) and \
            self.smtp.supports_extension("pipelining")

    @property
    def max_size(self) -> int:
        value = self.smtp.esmtp_extensions.get("size", "")
        return int(value) if value.strip().isdigit() else 0

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected


# ---------------------------------------------------------------- pool


class ConnectionPool:
    """Idle connections by key, and the limit on open connections."""

    def __init__(self, max_total: int, idle_timeout: float, quit_timeout: float = 5.0):
        self.max_total = max(1, max_total)
        self.idle_timeout = idle_timeout
        self.quit_timeout = quit_timeout
        self.idle: dict[tuple, list[Connection]] = {}
        self.open = 0
        self.opened = 0           # connections ever opened (for tests, stats)
        self.peak = 0             # most open at once
        self._waiters: list[asyncio.Future] = []
        self._closing: set[asyncio.Task] = set()

    def take(self, key: tuple) -> Connection | None:
        conns = self.idle.get(key)
        while conns:
            conn = conns.pop()
            if not conns:
                del self.idle[key]
            # Its idle timer stays armed: _expire ignores a connection in use.
            if conn.alive:
                return conn
            self._cancel_idle(conn)
            self._drop(conn)
        return None

    async def reserve(self) -> None:
        """Wait for room for one more open connection, closing an idle one
        if that makes room."""
        while self.open >= self.max_total:
            if self._evict_oldest():
                continue
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.open += 1
        self.opened += 1
        self.peak = max(self.peak, self.open)

    def unreserve(self) -> None:
        self.open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break

    def put(self, conn: Connection) -> None:
        self.idle.setdefault(conn.key, []).append(conn)
        loop = asyncio.get_running_loop()
        conn.last_used = loop.time()
        if conn.idle_handle is None:
            conn.idle_handle = loop.call_at(conn.last_used + self.idle_timeout,
                                            self._expire, conn)
        # Someone waits for room: an idle connection can be closed for it.
        self._wake_one()

    def discard(self, conn: Connection) -> None:
        """Close with QUIT in the background and free its slot."""
        self._cancel_idle(conn)
        if conn.alive:
            task = asyncio.ensure_future(self._quit(conn))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        else:
            self._drop(conn)

    async def close_all(self) -> None:
        for conns in list(self.idle.values()):
            for conn in list(conns):
                conns.remove(conn)
                self.discard(conn)
        self.idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _expire(self, conn: Connection) -> None:
        """The idle timer: close ``conn`` if unused for ``idle_timeout``.
        One timer per connection, re-armed here for the time left rather
        than cancelled and armed again by every transaction; a connection
        in use is left alone (put() arms the timer again)."""
        conn.idle_handle = None
        conns = self.idle.get(conn.key, [])
        if conn in conns:
            loop = asyncio.get_running_loop()
            due = conn.last_used + self.idle_timeout
            if due > loop.time():
                conn.idle_handle = loop.call_at(due, self._expire, conn)
                return
            conns.remove(conn)
            if not conns:
                del self.idle[conn.key]
            self.discard(conn)

    def _evict_oldest(self) -> bool:
        for key, conns in self.idle.items():
            if conns:
                conn = conns.pop(0)
                if not conns:
                    del self.idle[key]
                self._cancel_idle(conn)
                conn.smtp.close()
                self._drop(conn)
                return True
        return False

    async def _quit(self, conn: Connection) -> None:
        try:
            await conn.smtp.quit(timeout=self.quit_timeout)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            pass
        finally:
            conn.smtp.close()
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        if not conn.dropped:
            conn.dropped = True
            self.unreserve()

    @staticmethod
    def _cancel_idle(conn: Connection) -> None:
        if conn.idle_handle is not None:
            conn.idle_handle.cancel()
            conn.idle_handle = None


class DestinationLimits:
    """At most ``limit`` concurrent deliveries per destination key; the
    table holds only keys in use, so it does not grow with the domains
    ever seen."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self._sems: dict[str, list] = {}

    def slot(self, key: str) -> "_DestinationSlot":
        """``async with limits.slot(key):`` one delivery to ``key``."""
        return _DestinationSlot(self, key)


class _DestinationSlot:
    def __init__(self, limits: DestinationLimits, key: str):
        self.limits, self.key = limits, key

    async def __aenter__(self):
        entry = self.limits._sems.get(self.key)
        if entry is None:  # not setdefault: no Semaphore made per delivery
            entry = self.limits._sems[self.key] = [asyncio.Semaphore(self.limits.limit), 0]
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._forget(entry)
            raise
        return self

    async def __aexit__(self, *exc):
        entry = self.limits._sems[self.key]
        entry[0].release()
        self._forget(entry)

    def _forget(self, entry) -> None:
        entry[1] -= 1
        if entry[1] == 0:
            del self.limits._sems[self.key]


# ---------------------------------------------------------------- TLS


def _client_contexts(tls, cafile: str | None) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(opportunistic, verifying) client contexts; ``tls`` may be the
    tutorial's dict with a client ``certfile``/``keyfile``."""
    loose = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    loose.check_hostname = False
    loose.verify_mode = ssl.CERT_NONE
    strict = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile or None)
    if isinstance(tls, dict) and tls.get("certfile"):
        for ctx in (loose, strict):
            ctx.load_cert_chain(tls["certfile"], tls.get("keyfile"))
    return loose, strict


def _tls_mode(tls) -> str:
    if tls is None or isinstance(tls, dict):
        return "opportunistic"
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
    return tls


def needs_smtputf8(env: Envelope, rcpts: Iterable[Recipient]) -> bool:
    return bool(env.smtputf8) or not env.sender.isascii() or any(
        not r.address.isascii() for r in rcpts)


# ---------------------------------------------------------------- the relay


class SmtpRelay:
    """Common SMTP delivery; subclasses say where each domain goes."""

    def __init__(self, tls=None, connect_timeout: float = 20.0,
                 command_timeout: float = 10.0, data_timeout: float = 20.0,
                 idle_timeout: float = 30.0, ehlo_as: str | None = None, *,
                 resolver=None, cafile: str | None = None,
                 max_connections: int = 50, max_connections_per_domain: int = 10,
                 max_messages_per_connection: int = 100,
                 client_factory: Callable[..., aiosmtplib.SMTP] | None = None,
                 resolver_nameservers: Iterable[str] = (), dns_timeout: float = 10.0):
        self.tls_mode = _tls_mode(tls)
        self.loose_tls, self.strict_tls = _client_contexts(tls, cafile)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.ehlo_as = ehlo_as or None
        self.resolver = resolver or MxResolver(resolver_nameservers, dns_timeout)
        self.max_messages_per_connection = max(1, max_messages_per_connection)
        self.pool = ConnectionPool(max_connections, idle_timeout)
        self.limits = DestinationLimits(max_connections_per_domain)
        self.client_factory = client_factory or aiosmtplib.SMTP

    # -- what subclasses decide --------------------------------------------

    def destination(self, domain: str) -> Destination:
        raise NotImplementedError

    async def hosts(self, dest: Destination) -> list[MxHost]:
        if dest.hosts is not None:
            return dest.hosts
        return await self.resolver.mx(dest.domain, self.port)

    # -- the interface -------------------------------------------------------

    async def attempt(self, envelope: Envelope, message: MessageSource,
                      recipients: list[Recipient] | None = None) -> list[RcptResult]:
        """Try each of ``recipients`` (default: the pending ones) once; the
        results are in the same order."""
        rcpts = envelope.pending() if recipients is None else recipients
        # One transaction per destination: per domain for MX, all of them
        # for a smarthost.
        groups: dict[str, tuple[Destination, list[int]]] = {}
        results: list[RcptResult | None] = [None] * len(rcpts)
        for i, r in enumerate(rcpts):
            local, at, domain = r.address.rpartition("@")
            if not at or not local or not domain:
                results[i] = result_from_error(r.address, PermanentError(
                    f"Bad recipient address <{r.address}>", 553, "5.1.3"))
                continue
            dest = self.destination(domain.lower())
            groups.setdefault(dest.key, (dest, []))[1].append(i)
        if len(groups) == 1:  # the usual case: no task for a gather of one
            ((dest, idx),) = groups.values()
            done = [await self._deliver_to(envelope, message, dest, [rcpts[i] for i in idx])]
        else:
            done = await asyncio.gather(*(
                self._deliver_to(envelope, message, dest, [rcpts[i] for i in idx])
                for dest, idx in groups.values()))
        for (_, idx), part in zip(groups.values(), done):
            for i, res in zip(idx, part):
                results[i] = res
        return results

    async def close(self) -> None:
        await self.pool.close_all()

    # -- one destination ----------------------------------------------------------

    async def _deliver_to(self, env: Envelope, message: MessageSource, dest: Destination,
                          rcpts: list[Recipient]) -> list[RcptResult]:
        started = time.monotonic()
        results = await self._try_hosts(env, message, dest, rcpts, started)
        for res in results:
            if not res.setup:
                res.setup = time.monotonic() - started
        return results

    async def _try_hosts(self, env: Envelope, message: MessageSource, dest: Destination,
                         rcpts: list[Recipient], started: float) -> list[RcptResult]:
        try:
            hosts = await self.hosts(dest)
        except MsaError as err:
            return [result_from_error(r.address, err) for r in rcpts]
        errors: list[MsaError] = []
        wheres: dict[int, Where] = {}
        tried = 0
        async with self.limits.slot(dest.key):
            for host in hosts:
                try:
                    addrs = await self.resolver.addresses(host)
                except MsaError as err:
                    log.info("%s: %s: %s", env.queue_id, host.name, err.message)
                    errors.append(err)
                    continue
                for addr in addrs[:MAX_ADDRESSES_PER_ATTEMPT - tried]:
                    tried += 1
                    where = Where(host.name, addr, host.port)
                    try:
                        return await self._deliver_host(env, message, dest, where, rcpts,
                                                        started)
                    except HostFailure as hf:
                        log.info("%s: %s[%s]:%d: %s", env.queue_id, host.name, addr,
                                 host.port, hf.error.reply())
                        errors.append(hf.error)
                        wheres[id(hf.error)] = where
        err = combine_host_errors(errors, dest.domain)
        return [result_from_error(r.address, err, wheres.get(id(err))) for r in rcpts]

    # -- one host --------------------------------------------------------------

    async def _deliver_host(self, env, message, dest, where, rcpts,
                            started: float) -> list[RcptResult]:
        while True:
            conn = await self._connection(dest, where)
            setup = max(time.monotonic() - started, 1e-6)
            reusable = False
            try:
                results, reusable = await self._transaction(conn, env, message, rcpts)
                for res in results:
                    res.setup = setup
                return results
            except StaleConnection:
                continue  # only a pooled connection raises it: bounded
            finally:
                conn.messages += 1
                if reusable and conn.alive and conn.messages < self.max_messages_per_connection:
                    self.pool.put(conn)
                else:
                    self.pool.discard(conn)

    async def _connection(self, dest: Destination, where: Where) -> Connection:
        key = (where.addr, where.port, dest.tls, dest.auth[0] if dest.auth else "",
               where.host)
        while True:
            conn = self.pool.take(key)
            if conn is None:
                break
            conn.reused = True
            if not conn.dirty:
                return conn
            try:
                resp = await conn.smtp.execute_command(b"RSET", timeout=self.command_timeout)
                if resp.code == 250:
                    conn.dirty = False
                    return conn
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                pass
            self.pool.discard(conn)
        try:
            return await self._new_connection(key, dest, where, starttls=True)
        except HostFailure as hf:
            if not (dest.tls == "opportunistic" and hf.error.status == "4.7.5"):
                raise
            # Opportunistic TLS that cannot be negotiated at all: plain
            # text rather than no delivery (Postfix "may" does the same).
            log.info("%s[%s]:%d: %s; trying again without TLS", where.host, where.addr,
                     where.port, hf.error.message)
            return await self._new_connection(key, dest, Where(where.host, where.addr,
                                                               where.port), starttls=False)

    async def _new_connection(self, key: tuple, dest: Destination, where: Where,
                              starttls: bool) -> Connection:
        await self.pool.reserve()
        smtp = self.client_factory(hostname=where.addr, port=where.port,
                                   timeout=self.command_timeout,
                                   local_hostname=self.ehlo_as, start_tls=False,
                                   use_tls=False)
        conn = Connection(smtp, key, where)
        try:
            await self._open(conn, dest, starttls)
        except BaseException:
            smtp.close()
            self.pool.unreserve()
            raise
        return conn

    async def _open(self, conn: Connection, dest: Destination, starttls: bool = True) -> None:
        smtp, where = conn.smtp, conn.where
        try:
            await smtp.connect(timeout=self.connect_timeout)
            if type(smtp.protocol) is SMTPProtocol:
                smtp.protocol.__class__ = PipeliningProtocol  # same layout, one more behaviour
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise HostFailure(TransientError(
                f"host {where.host} refused to talk to me: {one_line(exc.message)}",
                exc.code if 400 <= exc.code < 500 else 451, "4.4.0")) from None
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            raise HostFailure(TransientError(
                f"connect to {where.host}[{where.addr}]:{where.port}: {_why(exc)}",
                451, "4.4.1")) from None
        try:
            await self._hello(smtp)
            if starttls and dest.tls != "none" and (smtp.supports_extension("starttls")
                                                    or dest.tls == "required"):
                await self._starttls(conn, dest)
            if dest.auth:
                await self._login(smtp, dest, where)
        except HostFailure:
            smtp.close()
            raise
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            smtp.close()
            raise HostFailure(_session_error(exc, where)) from None

    async def _hello(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            if not smtp.is_connected:
                raise
            try:
                await smtp.helo()
            except aiosmtplib.SMTPHeloError as exc2:
                raise HostFailure(TransientError(
                    f"HELO refused: {exc2.code} {one_line(exc2.message)}",
                    451, "4.4.0")) from None

    async def _starttls(self, conn: Connection, dest: Destination) -> None:
        smtp, where = conn.smtp, conn.where
        if not smtp.supports_extension("starttls"):
            raise HostFailure(TransientError(
                f"TLS is required, but was not offered by host {where.host}[{where.addr}]",
                451, "4.7.4"))
        required = dest.tls == "required"
        try:
            await smtp.starttls(tls_context=self.strict_tls if required else self.loose_tls,
                                server_hostname=where.host if required else None,
                                timeout=self.command_timeout)
        except ssl.SSLError as exc:
            raise HostFailure(TransientError(
                f"TLS handshake with {where.host}[{where.addr}] failed: {exc.reason or exc}",
                451, "4.7.5")) from None
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                ConnectionError) as exc:
            # The server gave up on the handshake (it dislikes our offer).
            raise HostFailure(TransientError(
                f"TLS handshake with {where.host}[{where.addr}] failed: {_why(exc)}",
                451, "4.7.5")) from None
        except aiosmtplib.SMTPResponseException as exc:
            if required:
                raise HostFailure(TransientError(
                    f"STARTTLS refused: {exc.code} {one_line(exc.message)}",
                    451, "4.7.4")) from None
            await self._hello(smtp)  # still usable in plain text
            return
        obj = smtp.get_transport_info("ssl_object")
        where.tls = obj.version() if obj is not None else "TLS"
        await self._hello(smtp)

    async def _login(self, smtp, dest: Destination, where: Where) -> None:
        user, password = dest.auth
        offered = smtp.server_auth_methods
        method = next((m for m in ("plain", "login", "cram-md5") if m in offered), None)
        if method is None:
            raise HostFailure(TransientError(
                f"{where.host} offers no AUTH mechanism I know ({' '.join(offered) or 'none'})",
                451, "4.7.0"))
        # One mechanism only: trying the next after a 535 (what
        # aiosmtplib's login() does) risks a lockout and desynchronises
        # servers that reject the follow-up.
        try:
            await getattr(smtp, "auth_" + method.replace("-", ""))(user, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise HostFailure(TransientError(
                f"AUTH as {user} at {where.host} failed: {exc.code} {one_line(exc.message)}",
                451, "4.7.8")) from None
        except aiosmtplib.SMTPException as exc:
            raise HostFailure(TransientError(
                f"AUTH at {where.host} impossible: {one_line(str(exc))}", 451, "4.7.0")) from None

    # -- one transaction -----------------------------------------------------------

    async def _transaction(self, conn: Connection, env: Envelope, message: MessageSource,
                           rcpts: list[Recipient]) -> tuple[list[RcptResult], bool]:
        """(results, connection reusable). Raises HostFailure before any
        recipient has an answer, StaleConnection when a reused connection
        turns out closed before MAIL was answered."""
        where = conn.where
        utf8 = needs_smtputf8(env, rcpts)
        if conn.max_size and message.size > conn.max_size:
            err = PermanentError(f"Message size {message.size} exceeds fixed limit "
                                 f"{conn.max_size} of {where.host}", 552, "5.3.4")
            return [result_from_error(r.address, err, where) for r in rcpts], True
        if utf8 and not conn.supports("smtputf8"):
            err = PermanentError(f"{where.host} does not support SMTPUTF8, needed "
                                 "for this message", 553, "5.6.7")
            return [result_from_error(r.address, err, where) for r in rcpts], True
        enc = "utf-8" if utf8 else "ascii"
        mail = b" ".join((b"MAIL FROM:<" + env.sender.encode(enc) + b">",
                          *self._mail_options(conn, env, message, utf8)))
        rcpt_cmds = [b" ".join((b"RCPT TO:<" + r.address.encode(enc) + b">",
                                *self._rcpt_options(conn, r))) for r in rcpts]
        pipelined = conn.pipelining
        conn.dirty = True  # until a DATA completes
        lost = None  # what ended a pipelined group early
        try:
            if pipelined:
                replies, lost = await self._group(conn, [mail, *rcpt_cmds, b"DATA"])
            else:
                replies = [await self._command(conn, mail)]
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ValueError) as exc:
            conn.smtp.close()
            if conn.reused and isinstance(exc, (aiosmtplib.SMTPServerDisconnected,
                                                ConnectionError)):
                raise StaleConnection() from None
            raise HostFailure(_session_error(exc, where)) from None
        resp = replies[0]
        if resp.code == 421 and conn.reused:
            conn.smtp.close()
            raise StaleConnection()
        if resp.code < 200 or resp.code >= 400:
            if pipelined and len(replies) == len(rcpts) + 2 and replies[-1].code == 354:
                await self._empty_data(conn)
            if resp.code < 500:
                raise HostFailure(TransientError(
                    f"{where.host} said after MAIL FROM: {one_line(resp.message)}",
                    resp.code, status_of(resp.code, reply_text(resp.code, resp.message))))
            return [result_for(r.address, resp.code, resp.message, where)
                    for r in rcpts], conn.alive
        if pipelined and len(replies) <= len(rcpts):
            # Lost before every RCPT was answered: as unpipelined, the host failed.
            conn.smtp.close()
            raise HostFailure(_session_error(lost, where))
        results: dict[str, RcptResult] = {}
        accepted: list[Recipient] = []
        try:
            for i, r in enumerate(rcpts):
                resp = replies[i + 1] if pipelined else await self._command(conn, rcpt_cmds[i])
                if 200 <= resp.code < 300:
                    accepted.append(r)  # its result is the reply to the data
                else:
                    results[r.address] = result_for(r.address, resp.code, resp.message, where)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError, ValueError) as exc:
            conn.smtp.close()
            raise HostFailure(_session_error(exc, where)) from None
        # DATA's pipelined reply, or what kept it from coming; None: not sent yet.
        data_resp = (replies[-1] if len(replies) == len(rcpts) + 2 else lost) \
            if pipelined else None
        if not accepted:
            if isinstance(data_resp, aiosmtplib.SMTPResponse) and data_resp.code == 354:
                await self._empty_data(conn)
            return [results[r.address] for r in rcpts], conn.alive
        code, text, reusable = await self._data(conn, message, data_resp)
        for r in accepted:
            results[r.address] = result_for(r.address, code, text, where)
        return [results[r.address] for r in rcpts], reusable

    async def _group(self, conn: Connection, commands: list[bytes]) -> tuple[list, Exception | None]:
        """RFC 2920: write ``commands`` at once, read their replies in
        order: (replies, None), or (the replies read, the error that ended
        the group early: the connection is then closed). Raises when not
        even the first reply could be read. After a 421 (the server
        closes) the rest are not read."""
        for command in commands:
            if COMMAND_INJECTION_REGEX.search(command):
                raise ValueError("Command arg contains a prohibited control character")
        protocol = conn.smtp.protocol
        if protocol is None or protocol._command_lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        replies: list = []
        async with protocol._command_lock:
            protocol.owed = len(commands)
            try:
                protocol._response_pending = True
                protocol.write(b"\r\n".join(commands) + b"\r\n")
                for _ in commands:
                    try:
                        resp = await protocol.read_response(timeout=self.command_timeout)
                    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
                        if not replies:
                            raise
                        conn.smtp.close()
                        return replies, exc
                    protocol.owed -= 1
                    replies.append(resp)
                    if resp.code == 421 and protocol.owed:
                        conn.smtp.close()
                        return replies, aiosmtplib.SMTPServerDisconnected(
                            f"{resp.code} {resp.message}")
            finally:
                protocol.owed = 0
        return replies, None

    async def _empty_data(self, conn: Connection) -> None:
        """354 although no recipient was accepted: RFC 2920 §3.1 says send
        a lone dot (an empty message the server then rejects)."""
        protocol = conn.smtp.protocol
        if protocol is None:
            return
        try:
            protocol._response_pending = True
            protocol.write(b".\r\n")
            await protocol.read_response(timeout=self.data_timeout)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            conn.smtp.close()

    async def _command(self, conn: Connection, *args: bytes):
        return await conn.smtp.execute_command(*args, timeout=self.command_timeout)

    def _mail_options(self, conn, env, message, utf8) -> list[bytes]:
        opts = []
        if conn.supports("size"):
            opts.append(b"SIZE=%d" % message.size)
        if env.body.upper() == "8BITMIME" and conn.supports("8bitmime"):
            opts.append(b"BODY=8BITMIME")
        if utf8:
            opts.append(b"SMTPUTF8")
        if conn.supports("dsn"):
            if env.ret:
                opts.append(b"RET=" + env.ret.upper().encode("ascii"))
            if env.envid:
                opts.append(b"ENVID=" + env.envid.encode("ascii", "replace"))
        return opts

    def _rcpt_options(self, conn, r: Recipient) -> list[bytes]:
        if not conn.supports("dsn"):
            return []
        opts = []
        if r.notify:
            opts.append(b"NOTIFY=" + r.notify.encode("ascii", "replace"))
        if r.orcpt:
            opts.append(b"ORCPT=" + r.orcpt.encode("ascii", "replace"))
        return opts

    async def _data(self, conn: Connection, message: MessageSource,
                    resp=None) -> tuple[int, str, bool]:
        """Send DATA (unless ``resp`` is its pipelined reply, or the error
        reading it) and stream the message; (code, reply text, reusable)."""
        smtp, where = conn.smtp, conn.where
        try:
            if resp is None:
                resp = await self._command(conn, b"DATA")
            elif isinstance(resp, BaseException):
                raise resp
            if resp.code != 354:
                return resp.code, resp.message, conn.alive
            protocol = smtp.protocol
            # A reply that comes early (a server giving up mid-message) must
            # be kept for read_response, not dropped as unsolicited.
            protocol._response_pending = True
            stuffer = DotStuffer()
            # Each chunk is written when the next one is known, and the
            # last goes out with the end of data: a message of one chunk
            # is one write (one send(2)) after the 354, not two.
            held = b""
            for chunk in message.chunks():
                if held:
                    protocol.write(held)
                    if protocol._paused or protocol._connection_lost:
                        # Above the high-water mark (or gone): wait, bounded.
                        # Otherwise _drain_helper would return at once, and
                        # wait_for would still cost a task per chunk.
                        await asyncio.wait_for(protocol._drain_helper(), self.data_timeout)
                held = stuffer.feed(chunk)
            protocol._response_pending = True
            protocol.write(held + stuffer.finish())
            resp = await protocol.read_response(timeout=self.data_timeout)
            conn.dirty = False  # RFC 5321 §4.1.1.4: the transaction is over
            return resp.code, resp.message, conn.alive
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            smtp.close()
            err = _session_error(exc, where, "while sending message data")
            return err.code, f"{err.status} {err.message}", False


def _why(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, aiosmtplib.SMTPTimeoutError)):
        return "Connection timed out"
    for e in (exc.__cause__, exc):
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno)
    return one_line(str(exc)) or type(exc).__name__


def _session_error(exc: BaseException, where: Where, during: str = "") -> TransientError:
    during = f" {during}" if during else ""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return TransientError(f"{where.host} said{during}: {exc.code} {one_line(exc.message)}",
                              451, "4.4.2")
    if isinstance(exc, (asyncio.TimeoutError, aiosmtplib.SMTPTimeoutError)):
        return TransientError(f"conversation with {where.host}[{where.addr}] timed out{during}",
                              451, "4.4.2")
    return TransientError(f"lost connection with {where.host}[{where.addr}]{during}: "
                          f"{_why(exc)}", 451, "4.4.2")


class MxSmtpRelay(SmtpRelay):
    """Relay each recipient domain to its MX hosts (the tutorial's relay).

    ``force_mx`` maps a domain to ``host[:port]`` to use instead of its MX
    records; ``tls_required_domains`` get verified TLS or nothing; ``port``
    is the port of MX hosts (25; tests override it).
    """

    def __init__(self, tls=None, connect_timeout: float = 20.0,
                 command_timeout: float = 10.0, data_timeout: float = 20.0,
                 idle_timeout: float = 30.0, ehlo_as: str | None = None, *,
                 port: int = 25, force_mx: dict[str, str] | None = None,
                 tls_required_domains: Iterable[str] = (), **kw):
        super().__init__(tls, connect_timeout, command_timeout, data_timeout,
                         idle_timeout, ehlo_as, **kw)
        self.port = port
        self.force_mx = {d.lower(): v for d, v in (force_mx or {}).items()}
        self.tls_required = {d.lower() for d in tls_required_domains}

    def destination(self, domain: str) -> Destination:
        tls = "required" if domain in self.tls_required else self.tls_mode
        forced = self.force_mx.get(domain)
        hosts = None
        if forced:
            name, port = parse_hostport(forced, self.port)
            hosts = [MxHost(name, port, configured=True)]
        return Destination(domain, hosts, domain, tls)


class SmarthostRelay(SmtpRelay):
    """Relay everything to one host, with optional AUTH; TLS required by
    default. A DNS failure of the smarthost defers (dma#30)."""

    def __init__(self, smarthost: str, tls="required", connect_timeout: float = 20.0,
                 command_timeout: float = 10.0, data_timeout: float = 20.0,
                 idle_timeout: float = 30.0, ehlo_as: str | None = None, *,
                 auth: tuple[str, str] | None = None, port: int = 25, **kw):
        super().__init__(tls, connect_timeout, command_timeout, data_timeout,
                         idle_timeout, ehlo_as, **kw)
        name, p = parse_hostport(smarthost, port)
        self.port = p
        self.smarthost = MxHost(name, p, configured=True)
        self.auth = auth
        self._last: Destination | None = None

    def destination(self, domain: str) -> Destination:
        last = self._last  # the same domain as the last message's: reused (read only)
        if last is not None and last.domain == domain and last.tls == self.tls_mode \
                and last.auth == self.auth:
            return last
        self._last = Destination(f"smarthost:{self.smarthost.name}", [self.smarthost],
                                 domain, self.tls_mode, self.auth)
        return self._last


def _smarthost_auth(rc) -> tuple[str, str] | None:
    if not rc.smarthost_user:
        return None
    password = rc.smarthost_password
    if rc.smarthost_password_file:
        with open(rc.smarthost_password_file, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    return rc.smarthost_user, password


def relay_from_config(cfg, resolver=None, client_factory=None) -> SmtpRelay:
    """The relay ``[relay]`` describes: smarthost if set, else MX."""
    rc = cfg.relay
    common = dict(connect_timeout=rc.connect_timeout, command_timeout=rc.command_timeout,
                  data_timeout=rc.data_timeout, idle_timeout=rc.idle_timeout,
                  ehlo_as=rc.ehlo_name or cfg.server.hostname, resolver=resolver,
                  cafile=rc.cafile or None, max_connections=rc.max_connections,
                  max_connections_per_domain=rc.max_connections_per_domain,
                  max_messages_per_connection=rc.max_messages_per_connection,
                  client_factory=client_factory, resolver_nameservers=rc.resolver,
                  dns_timeout=rc.dns_timeout)
    if rc.smarthost:
        return SmarthostRelay(rc.smarthost, tls=rc.smarthost_tls, auth=_smarthost_auth(rc),
                              port=rc.port, **common)
    return MxSmtpRelay(tls=rc.tls, port=rc.port, force_mx=rc.force_mx,
                       tls_required_domains=rc.tls_required_domains, **common)

"""Per-client counters shared by every edge process of a machine: how many
connections a client has open, how many it opened in the current rate
window, how many AUTH attempts failed in the current AUTH window (the
job of Postfix's ``anvil``).

Why one counter for all processes: ``msa daemon`` runs several edge
processes on one address (``SO_REUSEPORT``); a limit each process kept
for itself would let a client have ``edge_workers`` times as much. So the
supervisor holds one :class:`Anvil` and serves it over a socket pair to
each edge child it starts (``--anvil FD``); a lone ``msa edge`` or
``msa daemon --single-process`` uses one in the process
(:class:`LocalAnvil`). Both have the same interface.

Decisions:

- A client is its IP address; an IPv6 client is its /64 (one host is
  given a /64, and can take any address in it), an IPv4-mapped IPv6
  address its IPv4 address (:func:`client_key`).
- The anvil counts; the edge compares with its own (reloadable) limits.
  A request names the window it counts in, so the anvil has no config.
- Windows are fixed, as Postfix's ``anvil_rate_time_unit``: the first
  event of a client starts one, which ends ``window`` seconds later; the
  next event after that starts a new one. A client over a limit stays
  over it for the rest of the window at most.
- Connections of an edge process that dies are forgotten with it: the
  supervisor's side sees the socket close and subtracts what that process
  still had open (a killed process never says "disconnect").
- When the anvil cannot be reached (the supervisor's side closed), the
  edge logs it once and counts in its own process from then on: limits
  per process are weaker, never absent, and a client is never refused
  because of the anvil itself (Postfix's smtpd does the same without
  anvil).

Wire protocol (one socket pair per edge process, requests answered in
order): ``C key window`` (a connection opens; answer ``open rate``),
``D key`` (it closed; no answer), ``A key window`` (AUTH failures in the
window so far; answer ``n``), ``F key window`` (one more; answer ``n``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import re
import socket
import time
from typing import Callable

log = logging.getLogger("msa.edge")

MAX_KEY = 64
SWEEP_EVERY = 4096      # requests between sweeps of idle clients
_UNSAFE = re.compile(r"[^0-9A-Za-z.:/_-]")


def client_key(ip: str) -> str:
    """What a client is counted as (see the module docstring)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:      # not from a TCP peer: one word of safe characters
        return _UNSAFE.sub("_", ip[:MAX_KEY]) or "unknown"
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class _Window:
    """Events in a fixed window (see the module docstring)."""

    __slots__ = ("start", "count")

    def __init__(self) -> None:
        self.start, self.count = 0.0, 0

    def current(self, now: float, window: float) -> int:
        if self.count and now - self.start >= window:
            self.count = 0
        return self.count

    def add(self, now: float, window: float) -> int:
        if not self.current(now, window):
            self.start = now
        self.count += 1
        return self.count


class _Client:
    __slots__ = ("open", "rate", "auth", "seen", "rate_window", "auth_window")

    def __init__(self) -> None:
        self.open = 0
        self.rate, self.auth = _Window(), _Window()
        self.seen = 0.0
        self.rate_window = self.auth_window = 0.0

    def idle(self, now: float) -> bool:
        return (self.open <= 0 and now - self.seen >= max(self.rate_window, self.auth_window))


class Anvil:
    """The counters, with an injectable clock. ``owner`` is who opened a
    connection (an edge process's socket), so that :meth:`forget` can
    close what a dead owner left open."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.clients: dict[str, _Client] = {}
        self.owned: dict[object, collections.Counter] = {}
        self._requests = 0

    def _client(self, key: str) -> _Client:
        self._requests += 1
        if self._requests >= SWEEP_EVERY:
            self.sweep()
        client = self.clients.get(key)
        if client is None:
            client = self.clients[key] = _Client()
        client.seen = self.clock()
        return client

    def connect(self, key: str, window: float, owner: object = None) -> tuple[int, int]:
        """A connection opened: (connections open, connections opened in
        this window), both counting this one."""
        client = self._client(key)
        client.open += 1
        client.rate_window = max(client.rate_window, window)
        self.owned.setdefault(owner, collections.Counter())[key] += 1
        return client.open, client.rate.add(client.seen, window)

    def disconnect(self, key: str, owner: object = None) -> None:
        mine = self.owned.get(owner)
        if not mine or mine[key] <= 0:
            return          # not one this owner opened (or already forgotten)
        mine[key] -= 1
        if not mine[key]:
            del mine[key]
        client = self.clients.get(key)
        if client is not None:
            client.open -= 1

    def auth_failures(self, key: str, window: float) -> int:
        client = self._client(key)
        client.auth_window = max(client.auth_window, window)
        return client.auth.current(client.seen, window)

    def auth_failed(self, key: str, window: float) -> int:
        client = self._client(key)
        client.auth_window = max(client.auth_window, window)
        return client.auth.add(client.seen, window)

    def forget(self, owner: object) -> int:
        """``owner`` is gone: its open connections are closed. Returns how
        many there were."""
        mine = self.owned.pop(owner, None) or {}
        for key, n in mine.items():
            client = self.clients.get(key)
            if client is not None:
                client.open -= n
        return sum(mine.values())

    def sweep(self) -> None:
        """Drop clients with nothing open and no window still running."""
        self._requests = 0
        now = self.clock()
        for key in [k for k, c in self.clients.items() if c.idle(now)]:
            del self.clients[key]


# -- what an edge process uses ----------------------------------------------------

def _done(value) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class LocalAnvil:
    """An :class:`Anvil` in this process, behind the interface of
    :class:`AnvilClient` (futures, so that callers need not know which)."""

    def __init__(self, anvil: Anvil | None = None):
        self.anvil = anvil or Anvil()

    def connect(self, key: str, window: float) -> asyncio.Future:
        return _done(self.anvil.connect(key, window))

    def disconnect(self, key: str) -> None:
        self.anvil.disconnect(key)

    def auth_failures(self, key: str, window: float) -> asyncio.Future:
        return _done(self.anvil.auth_failures(key, window))

    def auth_failed(self, key: str, window: float) -> asyncio.Future:
        return _done(self.anvil.auth_failed(key, window))


class AnvilClient:
    """The supervisor's anvil, over a connected stream socket. Requests
    are written at once (so a ``D`` after a ``C`` arrives after it) and
    answered in order; once the socket fails every request goes to a
    :class:`LocalAnvil` (module docstring)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.local: LocalAnvil | None = None
        self.pending: collections.deque[tuple[asyncio.Future, Callable]] = collections.deque()
        self.writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None

    async def start(self) -> None:
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        self._reader_task = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                future, parse = self.pending.popleft()
                if not future.done():
                    future.set_result(parse(line.split()))
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError) as exc:
            log.debug("anvil: %s", exc)
        except asyncio.CancelledError:
            self._lost(quiet=True)
            raise
        self._lost()

    def _lost(self, quiet: bool = False) -> None:
        if self.local is None:
            self.local = LocalAnvil()
            if not quiet:
                log.warning("anvil: lost the supervisor's per-client counters; "
                            "counting in this process only")
        if self.writer is not None:
            self.writer.close()
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_result(None)   # the caller counts it as allowed

    def _ask(self, line: str, parse: Callable) -> asyncio.Future | None:
        if self.local is not None or self.writer is None:
            return None
        future = asyncio.get_running_loop().create_future()
        self.pending.append((future, parse))
        try:
            self.writer.write(line.encode() + b"\n")
        except (OSError, RuntimeError):
            self._lost()
        return future

    def connect(self, key: str, window: float) -> asyncio.Future:
        future = self._ask(f"C {key} {window:g}", lambda f: (int(f[0]), int(f[1])))
        return future if future is not None else self._fallback().connect(key, window)

    def disconnect(self, key: str) -> None:
        if self.local is not None or self.writer is None:
            self._fallback().disconnect(key)
            return
        try:
            self.writer.write(f"D {key}\n".encode())
        except (OSError, RuntimeError):
            self._lost()

    def auth_failures(self, key: str, window: float) -> asyncio.Future:
        future = self._ask(f"A {key} {window:g}", lambda f: int(f[0]))
        return future if future is not None else self._fallback().auth_failures(key, window)

    def auth_failed(self, key: str, window: float) -> asyncio.Future:
        future = self._ask(f"F {key} {window:g}", lambda f: int(f[0]))
        return future if future is not None else self._fallback().auth_failed(key, window)

    def _fallback(self) -> LocalAnvil:
        if self.local is None:
            self.local = LocalAnvil()
        return self.local

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                pass
        if self.writer is not None:
            self.writer.close()


class AnvilServer:
    """The supervisor's side: one :class:`Anvil`, served on the socket of
    each edge process (:meth:`serve`). A malformed request closes that
    process's socket (its connections are then forgotten)."""

    def __init__(self, anvil: Anvil | None = None):
        self.anvil = anvil or Anvil()
        self.tasks: set[asyncio.Task] = set()

    def pair(self) -> socket.socket:
        """A new socket pair: this side is served, the other is returned
        to be handed to a child (inheritable, for ``pass_fds``)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.set_inheritable(True)
        task = asyncio.ensure_future(self.serve(ours))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return theirs

    async def serve(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        owner = object()
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                answer = self.answer(line, owner)
                if answer is not None:
                    writer.write(answer)
        except (OSError, ValueError) as exc:
            log.warning("anvil: closing an edge's socket: %s", exc)
        finally:
            left = self.anvil.forget(owner)
            if left:
                log.debug("anvil: an edge closed with %d connections open", left)
            writer.close()

    def answer(self, line: bytes, owner: object) -> bytes | None:
        """One request → its answer (None for ``D``); ValueError on a bad one."""
        fields = line.decode("ascii").split()
        if len(fields) not in (2, 3) or len(fields[1]) > MAX_KEY:
            raise ValueError(f"bad request {line[:80]!r}")
        verb, key = fields[0], fields[1]
        if verb == "D" and len(fields) == 2:
            self.anvil.disconnect(key, owner)
            return None
        if len(fields) != 3:
            raise ValueError(f"bad request {line[:80]!r}")
        window = float(fields[2])
        if verb == "C":
            n_open, rate = self.anvil.connect(key, window, owner)
            return b"%d %d\n" % (n_open, rate)
        if verb == "A":
            return b"%d\n" % self.anvil.auth_failures(key, window)
        if verb == "F":
            return b"%d\n" % self.anvil.auth_failed(key, window)
        raise ValueError(f"bad request {line[:80]!r}")

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


class HashGate:
    """At most one password verification in flight per client in this
    process; the client's others wait their turn. The thread pool bounds
    the argon2 work of the whole process (``msa.submission.edge.AUTH_WORKERS``);
    the gate keeps one client with many connections from taking all of
    it, so a login from elsewhere waits behind at most one verification
    per client ahead of it (the per-client failure budget then stops the
    guessing: msa.submission.anvil; the session checks that budget and
    counts a failure inside its turn, so the client's next check sees it)."""

    def __init__(self) -> None:
        self.locks: dict[str, list] = {}     # client -> [lock, users]

    @contextlib.asynccontextmanager
    async def turn(self, client: str | None):
        if client is None:
            yield
            return
        entry = self.locks.get(client)
        if entry is None:
            entry = self.locks[client] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self.locks[client]


hash_gate = HashGate()

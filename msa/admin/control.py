"""The control socket: one line in, one line out, over a unix stream socket.

Protocol (used by ``sendmail -q``, ``msa queue flush`` and ``msa(8)``
administrators): the client connects to ``cfg.control_socket()``, sends one
command line (``flush``, ``reload``, ``status``) ended by ``\\n``, and the
server answers one line that starts with ``ok`` or ``error`` and closes.

Invariants:

- A client never blocks for long and never fails because no daemon runs:
  :func:`send_control` returns None when nothing answers (no socket, refused,
  timeout), so ``sendmail -q`` works with the daemon down.
- Requests are bounded: a line longer than :data:`MAX_LINE` is refused,
  a client that sends nothing is dropped after :data:`READ_TIMEOUT`.
- ``flush``, ``status`` and ``mailq`` may be asked by any local user
  (like Postfix's ``authorized_flush_users`` and ``authorized_mailq_users``,
  both ``static:anyone``); ``reload`` only by root or the daemon's own uid
  (checked with ``SO_PEERCRED``).
- ``mailq`` and ``mailq-json`` answer ``ok``, a line break and the whole
  listing (:func:`fetch` reads it), made by the daemon with its rights.
- Unix socket paths are limited to ~107 bytes (``sun_path``); a longer path
  is reached through ``/proc/self/fd/<dirfd>/<name>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import stat
import struct
from typing import Awaitable, Callable, Iterator, Union

log = logging.getLogger("msa.control")

MAX_LINE = 256
READ_TIMEOUT = 5.0
SUN_PATH_MAX = 100
PRIVILEGED = frozenset({"reload"})

Handler = Callable[[], Union[str, Awaitable[str]]]


@contextlib.contextmanager
def _short_path(path: str) -> Iterator[str]:
    """A path usable in ``sockaddr_un`` that names ``path``."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    directory, name = os.path.split(os.path.abspath(path))
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)


def send_control(cfg, line: str, timeout: float = 5.0) -> str | None:
    """Send one command to the daemon; its one-line answer, or None when
    no daemon answers (no socket, connection refused, timeout)."""
    return send_to(cfg.control_socket(), line, timeout)


def send_to(path: str, line: str, timeout: float = 5.0) -> str | None:
    if not os.path.exists(path):
        return None
    try:
        with _short_path(path) as addr, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(addr)
            sock.sendall(line.strip().encode("ascii", "replace") + b"\n")
            buf = b""
            while b"\n" not in buf and len(buf) <= MAX_LINE * 4:
                data = sock.recv(4096)
                if not data:
                    break
                buf += data
    except OSError:
        return None
    if not buf:
        return None
    return buf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def fetch(cfg, command: str, timeout: float = 60.0, limit: int = 256 << 20) -> str | None:
    """A command whose answer is ``ok`` and then text up to the end of
    the connection (``mailq``): the text, or None when no daemon answers
    or it refused."""
    path = cfg.control_socket()
    if not os.path.exists(path):
        return None
    chunks, size = [], 0
    try:
        with _short_path(path) as addr, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(addr)
            sock.sendall(command.encode("ascii") + b"\n")
            while size <= limit:
                data = sock.recv(1 << 16)
                if not data:
                    break
                chunks.append(data)
                size += len(data)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\n")
    if head.strip() != b"ok":
        return None
    return body.decode("utf-8", "replace")


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def permitted(command: str, peer_uid: int | None, own_uid: int) -> bool:
    """Whether a peer may run ``command`` (pure)."""
    if command not in PRIVILEGED:
        return True
    return peer_uid is not None and peer_uid in (0, own_uid)


class ControlServer:
    """Serves the control socket; ``handlers`` map a command to a function
    (plain or async) returning the text after ``ok``."""

    def __init__(self, path: str, handlers: dict[str, Handler], mode: int = 0o666,
                 owner_uid: int | None = None):
        self.path = path
        self.handlers = dict(handlers)
        self.mode = mode
        # Whose requests are privileged besides root: by default this
        # process's uid; a supervisor that keeps root names the daemon user.
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short_path(self.path) as addr:
                sock.bind(addr)
            os.chmod(self.path, self.mode)
            sock.listen(16)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        log.info("control socket listening on %s", self.path)

    def _remove_stale(self) -> None:
        """Remove a socket left by a dead daemon; refuse to remove a live
        one or anything that is not a socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{self.path} exists and is not a socket")
        if send_to(self.path, "status", timeout=1.0) is not None:
            raise OSError(f"{self.path}: another daemon answers there")
        os.unlink(self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            try:
                raw = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            except (asyncio.TimeoutError, ValueError, ConnectionError):
                return
            answer = await self.answer(raw, _peer_uid(writer))
            writer.write(answer.encode("utf-8", "replace") + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def answer(self, raw: bytes, peer_uid: int | None) -> str:
        if len(raw) > MAX_LINE or not raw.endswith(b"\n"):
            return "error line too long or not terminated"
        command = raw.decode("ascii", "replace").strip().lower()
        handler = self.handlers.get(command)
        if handler is None:
            return f"error unknown command {command[:40]!r}"
        if not permitted(command, peer_uid, self.owner_uid):
            return "error not permitted"
        try:
            result = handler()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # the daemon must survive a bad request
            log.exception("control: %s failed", command)
            return f"error {command}: {exc}"
        log.info("control: %s (uid %s)", command, peer_uid)
        return f"ok {result}".rstrip()

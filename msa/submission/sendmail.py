"""``sendmail`` and ``mailq``: the local submission commands (thin I/O
edge around :mod:`msa.submission.sendmail_args`, :mod:`msa.submission.sendmail_input`,
:mod:`msa.message.headers`, :mod:`msa.submission.bsmtp` and :mod:`msa.admin.mailq`).

``sendmail`` writes one queue file into ``maildrop/`` and needs no daemon:
it runs with the caller's uid, and ``maildrop/`` and ``tmp/`` are mode
3733. Invariants:

- Exit 0 only after the file is in ``maildrop/`` and durable
  (:meth:`spool.Writer.commit`: fsync, rename, fsync of the directory).
  On any failure nothing is left in ``maildrop/``, and ``tmp/`` holds
  nothing of ours (the Writer removes its file; the message buffer is an
  unnamed temporary file).
- Memory is bounded whatever the message size: input is read in pieces of
  at most :data:`PIECE` bytes, the header section is capped
  (:data:`msa.message.headers.MAX_HEADER_BYTES`), and the message is buffered in
  an unnamed file in the spool's ``tmp/`` (in memory up to
  :data:`MEMORY_BUFFER`) until its size, which the envelope states before
  the message, is known; then it is copied into the queue file.
- The envelope says who submitted: ``Origin: local``, ``Local-User`` and
  ``Local-UID`` of the real uid (the watcher checks them against the file
  owner, because maildrop files are untrusted input).
- Exit codes (sysexits, as Postfix's sendmail): 64 usage or no recipients,
  65 unreadable or bad input, 67 bad address, 69 spool unavailable, 71 no
  login name, 73 cannot create the queue file, 75 out of space (try
  again), 77 not permitted, 78 config error. Messages on stderr start with
  ``sendmail: ``.
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import pwd
import sys
import time
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator

from msa import config, sysexits
from msa.message import queuefile
from msa.message.headers import (
    HeaderTooLarge,
    extract_recipients,
    field_name,
    from_field,
    normalize_address,
    qualify_fields,
    read_header_section,
    safe_display_name,
)
from msa.message.queuefile import Envelope
from msa.protocol.errors import AddressError
from msa.store import open_spool
from msa.submission.sendmail_args import USAGE, Options, UsageError, parse_args
from msa.submission.sendmail_input import MessageInput
from spool import Spool, SpoolError, SpoolFull, SpoolUnavailable

if TYPE_CHECKING:     # annotations only: -bs imports them when it runs
    from msa.submission.bsmtp import LocalSmtp, Reply

PIECE = 65536
MEMORY_BUFFER = 1024 * 1024
STAGE = "maildrop"
FILE_MODE = 0o640


class Failure(Exception):
    """Ends the command with ``code`` and a message on stderr."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class InputError(Exception):
    """Reading standard input failed."""


class TooLarge(Exception):
    """The message is larger than ``[edge] max_message_size``."""


# -- reading -----------------------------------------------------------------

def read_pieces(f: BinaryIO, size: int = PIECE) -> Iterator[bytes]:
    """Lines of ``f``, a long line in pieces of at most ``size`` bytes."""
    while True:
        try:
            piece = f.readline(size)
        except OSError as exc:
            raise InputError(f"cannot read the message: {exc.strerror}") from None
        if not piece:
            return
        yield piece


# -- writing -----------------------------------------------------------------

def _os_failure(exc: OSError) -> Failure:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
        return Failure(f"cannot write queue file: {os.strerror(exc.errno)}; "
                       "try again later", sysexits.EX_TEMPFAIL)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return Failure(f"cannot write queue file: {os.strerror(exc.errno)}",
                       sysexits.EX_NOPERM)
    return Failure(f"cannot write queue file: {exc}", sysexits.EX_CANTCREAT)


def spool_failure(exc: SpoolError) -> Failure:
    """Map a spool error to an exit status (its OSError cause decides)."""
    if isinstance(exc, SpoolFull):
        return Failure(f"{exc}; try again later", sysexits.EX_TEMPFAIL)
    if isinstance(exc, SpoolUnavailable):
        return Failure(str(exc), sysexits.EX_UNAVAILABLE)
    if isinstance(exc.__cause__, OSError):
        return _os_failure(exc.__cause__)
    return Failure(str(exc), sysexits.EX_CANTCREAT)


class _SpillBuffer:
    """The message as read, in memory up to :data:`MEMORY_BUFFER` bytes,
    then in an unnamed file in the spool's ``tmp/`` (``O_TMPFILE``: gone
    with the process). What tempfile.SpooledTemporaryFile does, without
    importing tempfile (random, shutil, hashlib: 10 ms of every call)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.buf: BinaryIO = io.BytesIO()
        self.spilled = False

    def write(self, data: bytes) -> None:
        if not self.spilled and self.buf.tell() + len(data) > MEMORY_BUFFER:
            spill = self._spill_file()
            spill.write(self.buf.getvalue())
            self.buf, self.spilled = spill, True
        self.buf.write(data)

    def _spill_file(self) -> BinaryIO:
        try:
            fd = os.open(self.directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            import tempfile
            return tempfile.TemporaryFile(dir=self.directory)
        return os.fdopen(fd, "w+b")

    def seek(self, offset: int) -> None:
        self.buf.seek(offset)

    def read(self, n: int) -> bytes:
        return self.buf.read(n)

    def __enter__(self) -> "_SpillBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.buf.close()


def deposit(spool: Spool, env: Envelope, chunks: Iterable[bytes], max_size: int,
            complete: Callable[[], bool] = lambda: True) -> str:
    """Write ``env`` + message durably into ``maildrop/``; returns the id.

    ``complete`` is asked once the input is read: False (``-bs`` input that
    ended before its ".") queues nothing. Raises InputError, TooLarge,
    SpoolError or OSError; on every error nothing of this message stays in
    ``maildrop/`` or ``tmp/``.
    """
    with _SpillBuffer(f"{spool.root_s}/tmp") as buf:
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > max_size:
                raise TooLarge(f"message is larger than {max_size} bytes")
            buf.write(chunk)
        if not complete():
            raise InputError("input ended before the end of the message")
        buf.seek(0)
        env.size = str(size)
        with spool.writer(STAGE, mode=FILE_MODE) as w:
            env.queue_id = w.qid
            env.arrival = queuefile.utc_iso(time.time())
            w.write(env.to_bytes())
            while True:
                data = buf.read(PIECE)
                if not data:
                    break
                w.write(data)
            return w.commit()


def open_local_spool(cfg: config.Config) -> Spool:
    """The spool, created only when root runs us and it does not exist."""
    try:
        return open_spool(cfg, create=False)
    except SpoolUnavailable:
        if os.geteuid() != 0:
            raise
    try:
        return open_spool(cfg, create=True)
    except OSError as exc:
        raise SpoolUnavailable(f"{cfg.spool.root}: {exc.strerror}") from exc


# -- the envelope --------------------------------------------------------------

def login_user() -> pwd.struct_passwd:
    """The real uid's passwd entry (Postfix: ``getpwuid(getuid())``)."""
    try:
        return pwd.getpwuid(os.getuid())
    except KeyError:
        raise Failure(f"no login name for uid {os.getuid()}", sysexits.EX_OSERR) from None


def gecos_name(user: pwd.struct_passwd) -> str:
    """The full name from the passwd GECOS field (its first comma part),
    with anything that cannot go into a header taken out."""
    return safe_display_name(user.pw_gecos.split(",", 1)[0].strip())


def qualify_all(addresses: Iterable[str], domain: str) -> list[str]:
    """Normalised, without duplicates, in order; AddressError on a bad one."""
    seen, out = set(), []
    for text in addresses:
        addr = normalize_address(text, domain)
        if addr not in seen:
            seen.add(addr)
            out.append(addr)
    return out


def new_envelope(user: pwd.struct_passwd, sender: str,
                 full_name: str | None = None) -> Envelope:
    env = Envelope(sender=sender, origin="local", local_user=user.pw_name,
                   local_uid=str(user.pw_uid))
    if full_name:
        env.full_name = full_name
    return env


def add_recipients(env: Envelope, recipients: list[str], notify: str = "",
                   orcpt: str = "") -> None:
    for addr in recipients:
        env.add_recipient(addr, notify=notify, orcpt=orcpt)
    if any(not a.isascii() for a in [env.sender, *recipients]):
        env.smtputf8 = "yes"


# -- sendmail (-bm) ------------------------------------------------------------

def submit(cfg: config.Config, opts: Options, user: pwd.struct_passwd,
           stdin: BinaryIO) -> str:
    """Read one message from ``stdin`` and queue it; returns the queue id."""
    try:
        if opts.sender is None:
            sender = normalize_address(user.pw_name, cfg.domain)
        else:
            sender = normalize_address(opts.sender, cfg.domain, allow_null=True)
        recipients = qualify_all(opts.recipients, cfg.domain)
    except AddressError as exc:
        raise Failure(str(exc), sysexits.EX_NOUSER) from None
    if not recipients and not opts.extract:
        raise Failure("no recipients specified", sysexits.EX_USAGE)
    spool = open_local_spool(cfg)
    dots = "ignore" if opts.ignore_dots else "end"
    pieces = iter(MessageInput(read_pieces(stdin), dots=dots, strip_from=True))
    try:
        section = read_header_section(pieces)
    except HeaderTooLarge as exc:
        raise Failure(str(exc), sysexits.EX_DATAERR) from None
    if opts.extract:
        try:
            recipients = qualify_all([*recipients, *extract_recipients(section.fields)],
                                     cfg.domain)
        except AddressError as exc:
            raise Failure(str(exc), sysexits.EX_NOUSER) from None
        if not recipients:
            raise Failure("no recipients found in the message headers", sysexits.EX_USAGE)
    env = new_envelope(user, sender, opts.full_name)
    section.fields = qualify_fields(section.fields, cfg.domain)
    if sender and not any(field_name(f) == "from" for f in section.fields):
        name = opts.full_name if opts.full_name is not None else gecos_name(user)
        section.fields.insert(0, from_field(sender, name))
    env.body, env.ret, env.envid = opts.body, opts.ret, opts.envid
    add_recipients(env, recipients, notify=opts.notify)
    return deposit(spool, env, itertools.chain([section.to_bytes()], pieces),
                   cfg.edge.max_message_size)


def guarded(func, *args):
    """Run a deposit step; translate every failure into :class:`Failure`."""
    try:
        return func(*args)
    except InputError as exc:
        raise Failure(str(exc), sysexits.EX_DATAERR) from None
    except TooLarge as exc:
        raise Failure(str(exc), sysexits.EX_DATAERR) from None
    except SpoolError as exc:
        raise spool_failure(exc) from None
    except OSError as exc:
        raise _os_failure(exc) from None


# -- sendmail -bs --------------------------------------------------------------

def run_smtp(cfg: config.Config, user: pwd.struct_passwd, stdin: BinaryIO,
             stdout: BinaryIO) -> int:
    """An SMTP session on stdin/stdout (RFC 5321); each message is queued
    like a ``sendmail`` one. Returns the exit status."""
    from msa.submission.bsmtp import MAX_COMMAND_LINE, LocalSmtp, Reply
    session = LocalSmtp(cfg.server.hostname, cfg.domain, cfg.edge.max_message_size,
                        cfg.edge.max_recipients)
    try:
        spool = open_local_spool(cfg)
    except SpoolError as exc:
        _reply(stdout, Reply(421, f"4.3.0 {cfg.server.hostname} {exc}"))
        raise spool_failure(exc) from None
    _reply(stdout, session.greeting())
    for piece in read_pieces(stdin, MAX_COMMAND_LINE):
        if not piece.endswith(b"\n"):
            _discard_line(stdin)
            _reply(stdout, Reply(500, "5.5.2 Error: line too long"))
            continue
        reply = session.command(piece.decode("utf-8", "replace").rstrip("\r\n"))
        _reply(stdout, reply)
        if reply.action == "quit":
            return sysexits.EX_OK
        if reply.action == "data":
            reply = _smtp_data(cfg, spool, session, user, stdin)
            if reply is None:
                return sysexits.EX_DATAERR  # end of input inside DATA: nothing queued
            _reply(stdout, reply)
    return sysexits.EX_OK


def _smtp_data(cfg: config.Config, spool: Spool, session: LocalSmtp,
               user: pwd.struct_passwd, stdin: BinaryIO) -> Reply | None:
    """Read and queue the message after 354; the reply, or None when the
    input ended before the final "." (nothing is queued then)."""
    from msa.submission.bsmtp import Reply
    txn = session.txn
    message = MessageInput(read_pieces(stdin), dots="smtp", strip_from=False)
    pieces = iter(message)
    env = new_envelope(user, txn.sender)
    env.body = txn.params.get("BODY", "")
    env.ret = txn.params.get("RET", "")
    env.envid = txn.params.get("ENVID", "")
    env.smtputf8 = txn.params.get("SMTPUTF8", "")
    for addr, params in txn.recipients:
        add_recipients(env, [addr], notify=params.get("NOTIFY", ""),
                       orcpt=params.get("ORCPT", ""))
    try:
        section = guarded(read_header_section, pieces)
        chunks = itertools.chain([section.to_bytes()], pieces)
        qid = guarded(deposit, spool, env, chunks, cfg.edge.max_message_size,
                      lambda: message.terminated)
    except HeaderTooLarge:
        _drain(pieces)
        return session.message_failed(Reply(552, "5.3.4 Error: header section too large"))
    except Failure as exc:
        _drain(pieces)
        if not message.terminated:
            return None
        if exc.code == sysexits.EX_DATAERR:
            return session.message_failed(Reply(552, "5.3.4 Error: message file too big"))
        if exc.code == sysexits.EX_TEMPFAIL:
            return session.message_failed(Reply(452, "4.3.1 Insufficient system storage"))
        return session.message_failed(Reply(451, f"4.3.0 Error: {exc}"))
    return session.message_queued(qid)


def _drain(pieces: Iterator[bytes]) -> None:
    try:
        for _ in pieces:
            pass
    except InputError:
        pass


def _discard_line(stdin: BinaryIO) -> None:
    from msa.submission.bsmtp import MAX_COMMAND_LINE
    for piece in read_pieces(stdin, MAX_COMMAND_LINE):
        if piece.endswith(b"\n"):
            return


def _reply(stdout: BinaryIO, reply: Reply) -> None:
    stdout.write(reply.to_bytes())
    stdout.flush()


# -- entry points --------------------------------------------------------------

_prog = "sendmail"


def _error(message: str) -> None:
    print(f"{_prog}: {message}", file=sys.stderr)


def run(opts: Options, stdin: BinaryIO, stdout: BinaryIO) -> int:
    try:
        cfg = config.load(opts.config)
    except config.ConfigError as exc:
        raise Failure(str(exc), sysexits.EX_CONFIG) from None
    # Each mode imports what only it needs: a plain sendmail call (cron,
    # PHP) pays for none of the queue listing, the flush or -bs.
    if opts.mode == "list":
        from msa.admin.mailq import show_queue
        try:
            problems = show_queue(cfg, open_spool(cfg, create=False), sys.stdout,
                                  as_json=opts.json)
        except SpoolError as exc:
            raise spool_failure(exc) from None
        for problem in problems:
            _error(problem)
        return sysexits.EX_NOPERM if problems else sysexits.EX_OK
    if opts.mode == "flush":
        from msa.admin.queuecmd import flush_command
        return flush_command(cfg, bool(opts.verbose), _prog)
    if opts.mode == "newaliases":
        from msa.cleanup.aliases import newaliases_main
        return newaliases_main(cfg, _prog)
    if opts.mode == "verify":
        if not opts.recipients:
            raise Failure("-bv needs at least one address", sysexits.EX_USAGE)
        from msa.admin.route import describe
        try:
            describe(cfg, opts.recipients, sys.stdout)
        except AddressError as exc:
            raise Failure(str(exc), sysexits.EX_USAGE) from None
        return sysexits.EX_OK
    user = login_user()
    if opts.mode == "smtp":
        try:
            return run_smtp(cfg, user, stdin, stdout)
        except SpoolError as exc:
            raise spool_failure(exc) from None
    qid = guarded(submit, cfg, opts, user, stdin)
    if opts.verbose:
        _error(f"queued as {qid}")
    return sysexits.EX_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        _error(str(exc))
        print(USAGE, file=sys.stderr)
        return exc.code
    try:
        return run(opts, sys.stdin.buffer, sys.stdout.buffer)
    except Failure as exc:
        _error(str(exc))
        return exc.code
    except BrokenPipeError:
        return sysexits.EX_IOERR
    except KeyboardInterrupt:
        _error("interrupted; nothing queued")
        return sysexits.EX_TEMPFAIL


def newaliases_main(argv: list[str] | None = None) -> int:
    """``newaliases`` is ``sendmail -bi`` (options: ``-C``)."""
    global _prog
    argv = sys.argv[1:] if argv is None else argv
    _prog = "newaliases"
    return main(["-bi", *argv])


def mailq_main(argv: list[str] | None = None) -> int:
    """``mailq`` is ``sendmail -bp`` (options: ``-C``, ``--config``, ``--json``)."""
    global _prog
    argv = sys.argv[1:] if argv is None else argv
    _prog = "mailq"
    return main(["-bp", *argv])

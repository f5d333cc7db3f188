"""Where the daemon's log lines go, and their shape (docs/ARCHITECTURE.md,
"Logs are an interface"; the line format is in msa(8)).

- Every destination gets Postfix's line: ``Mon DD HH:MM:SS host
  msa/smtpd[pid]: text`` (syslog adds the time and host itself), under
  Postfix's daemon names (:data:`DAEMON_NAMES`: the edge is ``smtpd``, the
  watcher ``cleanup``, the runner ``qmgr``, the relay ``smtp``...), with
  ``warning:``/``error:``/``fatal:`` before the text of those levels as
  Postfix writes them, so pflogsumm and fail2ban read the lines unchanged.
  The text is escaped (:func:`msa.logsafe.escape`) in the one formatter.
- ``log = "/path"``: a :class:`logging.handlers.WatchedFileHandler`, which
  reopens the file when it was moved or removed (logrotate without
  ``copytruncate``); SIGHUP reopens it too (:func:`reopen`).
- ``log = "syslog"``: ``/dev/log``, facility mail (``"syslog:/path"``:
  another socket, e.g. a chroot's). When nothing listens
  there (containers, minimal hosts) msa says so once on stderr and logs
  to stderr instead; a syslog that goes away later gets the same single
  notice and the lines go to stderr, never a traceback per line.
- ``log = "stderr"`` (the default): under systemd, whose journal is
  stderr (``$JOURNAL_STREAM`` names stderr's device and inode, see
  systemd.exec(5)), each line starts with its syslog priority, ``<4>``
  for a warning (sd-daemon(3)), so journald keeps the levels; the time
  stamp and host are left to the journal.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys

from msa.logsafe import escape

# Logger name -> Postfix's name for the daemon doing that work.
DAEMON_NAMES = {
    "msa.edge": "smtpd", "msa.auth": "smtpd", "msa.pickup": "pickup",
    "msa.watcher": "cleanup", "msa.cleanup": "cleanup", "spool": "cleanup",
    "msa.runner": "qmgr", "msa.qmgr": "qmgr",
    "msa.relay": "smtp", "msa.smtp": "smtp", "msa.bounce": "bounce",
    "msa.daemon": "master", "msa.control": "master", "msa.queue": "postqueue",
}
# Postfix's text prefixes (msg_warn, msg_error, msg_fatal).
LEVEL_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ",
                logging.CRITICAL: "fatal: "}
# sd-daemon(3) / syslog(3) priorities.
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
            logging.CRITICAL: 2}
SYSLOG_PATH = "/dev/log"


def daemon_name(logger: str) -> str:
    name = DAEMON_NAMES.get(logger)
    if name is None:
        name = logger.split(".", 1)[1] if logger.startswith("msa.") else logger
    return "msa/" + name


class Format(logging.Formatter):
    """Postfix's line (module docstring). The time stamp has whole
    seconds, so it is formatted once a second, not once a line."""

    _second: int = -1
    _stamp: str = ""

    def __init__(self, fmt: str, priority: bool = False):
        super().__init__(fmt, "%b %d %H:%M:%S")
        self.priority = priority

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = super().formatTime(record, datefmt)
            self._second = second
        return self._stamp

    def format(self, record: logging.LogRecord) -> str:
        record.component = daemon_name(record.name)
        record.host = HOST
        line = super().format(record)
        if self.priority:
            # One prefix per line: journald reads each line on its own.
            level = PRIORITY.get(record.levelno, 6)
            line = "\n".join(f"<{level}>{part}" for part in line.split("\n"))
        return line

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The one place every line's text is escaped (msa.logsafe): a
        # traceback appended after it is ours and keeps its lines.
        record.message = LEVEL_PREFIX.get(record.levelno, "") + escape(record.message)
        return super().formatMessage(record)


HOST = socket.gethostname().split(".", 1)[0] or "localhost"
LINE = "%(asctime)s %(host)s %(component)s[%(process)d]: %(message)s"
SYSLOG_LINE = "%(component)s[%(process)d]: %(message)s"
JOURNAL_LINE = SYSLOG_LINE       # the journal, too, adds the time and host


def under_journal(stream=None) -> bool:
    """stderr is systemd's journal stream (``$JOURNAL_STREAM`` is its
    ``device:inode``, systemd.exec(5))."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def is_syslog(where: str) -> bool:
    return where == "syslog" or where.startswith("syslog:")


def syslog_path(where: str) -> str:
    """The socket of ``log = "syslog"`` or ``"syslog:/path"``."""
    return where.partition(":")[2] or SYSLOG_PATH


def syslog_problem(path: str = SYSLOG_PATH) -> str | None:
    """Why nothing can be logged to syslog at ``path`` (None: it can)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.connect(path)
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    finally:
        s.close()
    return None


class SyslogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler that, when syslog stops taking lines, says so once
    on stderr and sends the lines there (instead of a traceback a line)."""

    def __init__(self, path: str = SYSLOG_PATH):
        super().__init__(address=path, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        self.fallback: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.fallback is None:
            super().emit(record)
        else:
            self.fallback.handle(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.fallback is None:
            exc = sys.exc_info()[1]
            print(f"msa: syslog stopped taking lines ({exc}); logging to stderr",
                  file=sys.stderr, flush=True)
            self.fallback = stderr_handler()
        self.fallback.handle(record)


def stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    journal = under_journal()
    handler.setFormatter(Format(JOURNAL_LINE if journal else LINE, priority=journal))
    return handler


def make_handler(where: str) -> logging.Handler:
    """The handler for ``[daemon] log`` (module docstring)."""
    if is_syslog(where):
        path = syslog_path(where)
        problem = syslog_problem(path)
        if problem is None:
            try:
                handler: logging.Handler = SyslogHandler(path)
            except OSError as exc:
                problem = f"{path}: {exc.strerror or exc}"
            else:
                handler.setFormatter(Format(SYSLOG_LINE))
                return handler
        print(f"msa: cannot log to syslog ({problem}); logging to stderr",
              file=sys.stderr, flush=True)
        return stderr_handler()
    if where in ("", "stderr"):
        return stderr_handler()
    handler = logging.handlers.WatchedFileHandler(where)
    handler.setFormatter(Format(LINE))
    return handler


def setup(where: str, level: str) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(make_handler(where))
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def reopen() -> None:
    """SIGHUP: reopen a log file that was moved or removed."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.WatchedFileHandler):
            handler.reopenIfNeeded()

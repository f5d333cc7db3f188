"""One INFO line a message, cheaply: the per-message log lines of the edge
and the runner (where logging is a tenth of the CPU a message costs).

:class:`InfoWriter` skips what ``Logger.info`` does per call that these
lines do not need: the caller lookup (a stack walk), %-formatting of
arguments, and ``LogRecord.__init__``'s work. Its record is a copy of one
made once by ``makeRecord`` in the same thread (the same fields: level,
file, thread and process names), with the message and the times set. A
custom record factory, another thread, or a Python whose records differ
from task to task (3.12's ``taskName``) gets ``makeRecord`` every time.
The caller checks ``log.isEnabledFor(logging.INFO)`` first and passes the
line formatted.
"""

from __future__ import annotations

import logging
import re
import threading
import time

# When logging started, as LogRecord.relativeCreated counts from it (read
# off a record: the logging module keeps it in a private name).
_probe = logging.makeLogRecord({})
_LOG_START = _probe.created - _probe.relativeCreated / 1000
del _probe
_new_record = object.__new__


class InfoWriter:
    __slots__ = ("log", "path", "template", "thread")

    def __init__(self, log: logging.Logger, path: str):
        self.log, self.path = log, path
        self.template: dict | None = None       # the fields of an INFO record ...
        self.thread: threading.Thread | None = None   # ... made in this thread

    def __call__(self, text: str) -> None:
        template = self.template
        if (template is None or threading.current_thread() is not self.thread
                or logging.getLogRecordFactory() is not logging.LogRecord):
            record = self.log.makeRecord(self.log.name, logging.INFO, self.path, 0, text,
                                         None, None)
            if (logging.getLogRecordFactory() is logging.LogRecord
                    and "taskName" not in record.__dict__):
                self.template, self.thread = dict(record.__dict__), threading.current_thread()
            self.log.handle(record)
            return
        record = _new_record(logging.LogRecord)
        fields = record.__dict__
        fields.update(template)
        fields["msg"] = text
        fields["created"] = now = time.time()
        fields["msecs"] = int((now - int(now)) * 1000) + 0.0
        fields["relativeCreated"] = (now - _LOG_START) * 1000
        self.log.handle(record)


def log_message_id(log: logging.Logger, qid: str, value: str | None) -> None:
    """Postfix's cleanup line ``QID: message-id=<...>``, once the policies
    of a message were applied (``value``: its Message-ID field, folding
    undone; the formatter escapes what the sender wrote)."""
    if log.isEnabledFor(logging.INFO):
        log.info("%s: message-id=%s", qid, _FOLDING.sub(" ", value or "").strip()[:998])


_FOLDING = re.compile(r"[ \t]*\r?\n[ \t]*")   # unfolding (RFC 5322 2.2.3): CRLF WSP

"""Queue listing: ``mailq``, ``sendmail -bp`` and ``msa queue list``.

Two output forms:

- Postfix's ``mailq`` text (``postqueue -p``), byte for byte in layout:
  the header ``-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------``,
  per message ``%-11s %7d %20.20s %s`` (queue id with ``*`` when in
  ``active/``, ``!`` when in ``hold/``; the message size; ``asctime`` of the
  arrival; the sender, ``MAILER-DAEMON`` for the null sender), each
  deferral reason right-aligned in parentheses (``%*s(%s)`` with padding
  ``76 - len``) above the recipients it applies to, each waiting
  recipient indented by 41 columns, an empty line between messages, and
  ``-- N Kbytes in M Requests.`` (file sizes summed) or
  ``Mail queue is empty``.
- ``--json``: one object per line like ``postqueue -j`` (``queue_name``,
  ``queue_id``, ``arrival_time``, ``message_size``, ``forced_expire``,
  ``sender``, ``recipients`` with ``address`` and ``delay_reason``), plus
  ``attempts``, ``history`` and ``next_attempt`` (the file mtime of a
  deferred message; null elsewhere).

Invariants (docs/ARCHITECTURE.md, "Memory"):

- Entries are streamed: one stage's *names* are held and sorted at a time
  (100,000 names of 22 characters are about 8 MB of Python strings), and
  one envelope at a time; nothing else accumulates.
- Only the envelope of each file is read (:func:`msa.message.queuefile.read_envelope`
  stops at the empty line); the message is never read.
- Listing changes nothing: a file that cannot be parsed is shown with the
  reason and left where it is (the watcher or runner quarantines it).
- Only recipients still waiting (``pending`` or ``deferred``) are shown, as
  Postfix shows only undelivered ones.
"""

from __future__ import annotations

import json
import os
import stat as stat_mod
import time
from dataclasses import dataclass
from typing import IO, Iterable, Iterator

from msa.config import Config
from msa.message import queuefile
from msa.message.queuefile import Envelope
from spool import Spool, id_time, valid_name

HEADER_FORMAT = "%-11s %7s %-20s %s\n"
DATA_FORMAT = "%-11s %7d %20.20s %s\n"
EMPTY_SENDER = "MAILER-DAEMON"
READ_BUFFER = 8192


@dataclass
class Entry:
    stage: str           # directory under the spool: "active", "deferred/3", ...
    qid: str
    file_size: int
    mtime: float
    uid: int
    env: Envelope | None
    error: str = ""

    @property
    def queue_name(self) -> str:
        return "deferred" if self.stage.startswith("deferred/") else self.stage

    @property
    def arrival(self) -> float:
        if self.env is not None and self.env.arrival:
            try:
                return queuefile.parse_iso(self.env.arrival)
            except ValueError:
                pass
        try:
            return id_time(self.qid)
        except ValueError:
            return self.mtime

    @property
    def message_size(self) -> int:
        if self.env is not None and self.env.size.isdigit():
            return int(self.env.size)
        return self.file_size


def listing_stages(cfg: Config, spool: Spool) -> list[str]:
    """Stages in the order mail moves, then deferred/<N> by N, then hold."""
    return [*cfg.stages(), *spool.deferred_stages(), "hold"]


def read_entry(spool: Spool, stage: str, qid: str, dir_fd: int | None = None) -> Entry | None:
    """Stat a queue file and read its envelope; None when it has gone.
    With ``dir_fd`` (the stage directory, open) ``qid`` is opened relative
    to it, which saves building a path per file."""
    path = qid if dir_fd is not None else str(spool.path(stage, qid))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        try:
            st = os.lstat(path, dir_fd=dir_fd)
        except OSError:
            return None
        return Entry(stage, qid, st.st_size, st.st_mtime, st.st_uid, None,
                     f"cannot read: {exc.strerror}")
    with os.fdopen(fd, "rb", buffering=READ_BUFFER) as f:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            return Entry(stage, qid, st.st_size, st.st_mtime, st.st_uid, None,
                         "not a regular file")
        try:
            env, _ = queuefile.read_envelope(f)
        except (queuefile.QueueFileError, OSError) as exc:
            return Entry(stage, qid, st.st_size, st.st_mtime, st.st_uid, None, str(exc))
        return Entry(stage, qid, st.st_size, st.st_mtime, st.st_uid, env)


def scan(spool: Spool, stages: Iterable[str],
         problems: list[str] | None = None) -> Iterator[Entry]:
    """Every queue file of ``stages``, sorted by id within a stage. A stage
    that cannot be listed is skipped and named in ``problems``."""
    for stage in stages:
        try:
            names = sorted(n for n in spool.names(stage) if valid_name(n))
            dir_fd = os.open(spool.root / stage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if problems is not None:
                problems.append(f"cannot list {stage}/: {exc.strerror}")
            continue
        try:
            for qid in names:
                entry = read_entry(spool, stage, qid, dir_fd)
                if entry is not None:
                    yield entry
        finally:
            os.close(dir_fd)
        del names


# -- Postfix text -----------------------------------------------------------

def status_char(stage: str) -> str:
    return {"active": "*", "hold": "!"}.get(stage, " ")


def text_block(entry: Entry) -> str:
    """One message in ``mailq`` form (without the separating empty line)."""
    arrival = time.asctime(time.localtime(entry.arrival))
    head = entry.qid + status_char(entry.stage)
    if entry.env is None:
        return DATA_FORMAT % (head, entry.file_size, arrival,
                              f"(unreadable queue file, owner UID {entry.uid}: {entry.error})")
    env = entry.env
    out = [DATA_FORMAT % (head, entry.message_size, arrival, env.sender or EMPTY_SENDER)]
    last_reason = ""
    if entry.queue_name == "deferred" and env.last_error and not any(
            r.state == "deferred" and r.reply for r in env.recipients):
        out.append(reason_line(env.last_error))
    for rcpt in env.pending():
        reason = rcpt.reply if rcpt.state == "deferred" else ""
        if reason and reason != last_reason:
            out.append(reason_line(reason))
            last_reason = reason
        out.append(HEADER_FORMAT % ("", "", "", rcpt.address))
    return "".join(out)


def reason_line(reason: str) -> str:
    return "%*s(%s)\n" % (max(0, 76 - len(reason)), "", reason)


def write_text(entries: Iterable[Entry], out: IO[str]) -> int:
    """Write Postfix ``mailq`` output; returns the number of messages."""
    count = total = 0
    for entry in entries:
        if count == 0:
            out.write(HEADER_FORMAT % ("-Queue ID-", "--Size--", "----Arrival Time----",
                                       "-Sender/Recipient-------"))
        else:
            out.write("\n")
        out.write(text_block(entry))
        count += 1
        total += entry.file_size
    if count == 0:
        out.write("Mail queue is empty\n")
    else:
        out.write("\n-- %d Kbytes in %d Request%s.\n"
                  % (total // 1024, count, "" if count == 1 else "s"))
    return count


# -- JSON -------------------------------------------------------------------

def json_record(entry: Entry) -> dict:
    rec: dict = {"queue_name": entry.queue_name, "queue_id": entry.qid,
                 "arrival_time": int(entry.arrival),
                 "message_size": entry.message_size, "forced_expire": False}
    if entry.env is None:
        rec.update(sender=None, recipients=[], error=entry.error, attempts=0,
                   history=[], next_attempt=None)
        return rec
    env = entry.env
    recipients = []
    for rcpt in env.pending():
        item = {"address": rcpt.address}
        if rcpt.state == "deferred" and rcpt.reply:
            item["delay_reason"] = rcpt.reply
        elif entry.queue_name == "deferred" and env.last_error:
            item["delay_reason"] = env.last_error
        recipients.append(item)
    rec.update(sender=env.sender, recipients=recipients,
               attempts=env.attempt_count, history=list(env.history),
               next_attempt=int(entry.mtime) if entry.queue_name == "deferred" else None)
    return rec


def write_json(entries: Iterable[Entry], out: IO[str]) -> int:
    count = 0
    for entry in entries:
        out.write(json.dumps(json_record(entry), ensure_ascii=False) + "\n")
        count += 1
    return count


NOT_OURS = ("the queue files are the mail system's: senders and recipients are shown "
            "to root and the spool's owner, or by a running daemon")


def show_queue(cfg: Config, spool: Spool, out: IO[str], as_json: bool = False) -> list[str]:
    """:func:`list_queue`, or, for a user who does not own the spool (the
    queue files are 0640, the daemon's), the daemon's own listing over the
    control socket, made with its rights: what Postfix's ``mailq`` gets
    from its ``showq`` service (any local user may list the queue, as
    Postfix's ``authorized_mailq_users = static:anyone``). With no daemon
    answering, the local listing and a problem that says why the senders
    are missing."""
    if os.geteuid() == 0 or _owns(spool):
        return list_queue(cfg, spool, out, as_json)
    from msa.admin.control import fetch
    text = fetch(cfg, "mailq-json" if as_json else "mailq")
    if text is not None:
        out.write(text)
        return []
    return [*list_queue(cfg, spool, out, as_json), NOT_OURS]


def _owns(spool: Spool) -> bool:
    try:
        return os.stat(spool.root).st_uid == os.geteuid()
    except OSError:
        return False


def listing_text(cfg: Config, spool: Spool, as_json: bool) -> str:
    """The whole listing as one string (the control socket's ``mailq``)."""
    import io
    buf = io.StringIO()
    list_queue(cfg, spool, buf, as_json)
    return buf.getvalue()


def queue_listing(cfg: Config, spool: Spool) -> dict:
    """The control socket's handlers ``mailq`` and ``mailq-json``: the
    queue listed in a thread with the daemon's rights (:func:`show_queue`)."""
    import asyncio

    async def listing(as_json: bool) -> str:
        return "\n" + await asyncio.to_thread(listing_text, cfg, spool, as_json)
    return {"mailq": lambda: listing(False), "mailq-json": lambda: listing(True)}


def list_queue(cfg: Config, spool: Spool, out: IO[str], as_json: bool = False) -> list[str]:
    """List the whole queue on ``out``; returns the problems met (stages
    that could not be listed, e.g. ``maildrop/`` for a user who is not
    the mail system's owner)."""
    problems: list[str] = []
    entries = scan(spool, listing_stages(cfg, spool), problems)
    if as_json:
        write_json(entries, out)
    else:
        write_text(entries, out)
    return problems

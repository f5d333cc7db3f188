"""Delivery status notifications (RFC 3464), built by pure functions.

A DSN is ``multipart/report; report-type=delivery-status`` (RFC 6522)
with three parts: a human-readable explanation, a ``message/delivery-status``
part with one block per recipient, and the original message
(``message/rfc822``) or only its header section (``text/rfc822-headers``).

The original may be 50 MB, so it is never built into the DSN here:
:func:`build_dsn` returns the bytes before it (``head``), how many bytes of
the original to copy (``include``, always from its start) and the bytes
after it (``tail``). The caller streams ``include`` bytes of the original
between the two, and knows the total size before writing (the queue file's
``Size`` comes before the message).

Decisions:

- Only the first ``limit`` bytes of the original are looked at; a message
  larger than ``limit`` or with ``RET=HDRS`` (RFC 3461 §4.3) is returned
  as headers only (RFC 3464 §2: "or only its headers").
- The DSN goes from the null sender to the original sender
  (RFC 3464 §2 / RFC 5321 §4.5.5), with ``Auto-Submitted: auto-replied``
  (RFC 3834). Nothing here decides *whether* to send one; the runner never
  asks for a DSN about a message whose own sender is null.
- Messages with non-ASCII addresses get the RFC 6533 types
  (``message/global-delivery-status``, ``message/global``, ``utf-8;``
  address type).
- An 8-bit original makes the DSN 8-bit (``Body: 8BITMIME``), since a
  ``message/rfc822`` part may not be base64-encoded (RFC 2046 §5.2.1).
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import re
from dataclasses import dataclass

from msa.message.queuefile import Envelope, one_line, utc_iso
from msa.protocol import xtext

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[^<>\r\n]{1,500}>)")


@dataclass
class RecipientReport:
    """What happened to one recipient (RFC 3464 §2.3)."""

    address: str
    action: str                  # "failed" or "delayed"
    status: str                  # enhanced status code, "5.1.1"
    diagnostic: str = ""         # the reply as received: "550 5.1.1 No such user"
    remote_mta: str = ""         # host name of the server that replied
    orcpt: str = ""              # ORCPT as given in RCPT: "rfc822;bob+2B1@x.test"
    last_attempt: float | None = None
    will_retry_until: float | None = None


@dataclass
class DsnRequest:
    queue_id: str
    reporting_mta: str
    sender: str                  # the original sender: the DSN goes to them
    arrival: float
    now: float
    recipients: list[RecipientReport]
    original_size: int
    original_head: bytes         # the first min(size, limit) bytes
    boundary: str
    envid: str = ""
    ret: str = ""                # "FULL", "HDRS" or ""
    eight_bit: bool = False
    limit: int = 1024 * 1024


@dataclass
class Dsn:
    head: bytes
    include: int
    tail: bytes
    subject: str
    headers_only: bool
    utf8: bool
    eight_bit: bool

    @property
    def size(self) -> int:
        return len(self.head) + self.include + len(self.tail)


def rfc5322_date(ts: float) -> str:
    return email.utils.format_datetime(
        _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).replace(microsecond=0))


def header_length(head: bytes, total: int) -> int:
    """Bytes of the header section at the start of ``head`` (the first
    bytes of a ``total``-byte message), ending with its last CRLF."""
    if head.startswith(b"\r\n"):
        return 0
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        return end + 2
    if len(head) >= total:
        return total  # the message is all headers
    cut = head.rfind(b"\r\n")
    return cut + 2 if cut >= 0 else 0


def _is_ascii(text: str) -> bool:
    return text.isascii()


def _addr_field(address: str) -> str:
    return f"rfc822; {address}" if _is_ascii(address) else f"utf-8; {address}"


def _recipient_block(r: RecipientReport) -> list[str]:
    lines = [f"Final-Recipient: {_addr_field(r.address)}"]
    if r.orcpt:
        kind, _, addr = xtext.decode(r.orcpt).partition(";")
        lines.append(f"Original-Recipient: {kind.strip()}; {one_line(addr.strip(), 900)}")
    lines += [f"Action: {r.action}", f"Status: {r.status}"]
    if r.remote_mta:
        lines.append(f"Remote-MTA: dns; {r.remote_mta}")
    if r.diagnostic:
        lines.append(f"Diagnostic-Code: smtp; {one_line(r.diagnostic, 900)}")
    if r.last_attempt is not None:
        lines.append(f"Last-Attempt-Date: {rfc5322_date(r.last_attempt)}")
    if r.will_retry_until is not None:
        lines.append(f"Will-Retry-Until: {rfc5322_date(r.will_retry_until)}")
    return lines


def _status_part(req: DsnRequest) -> str:
    lines = [f"Reporting-MTA: dns; {req.reporting_mta}", f"X-Msa-Queue-ID: {req.queue_id}"]
    if req.envid:
        lines.append(f"Original-Envelope-Id: {one_line(xtext.decode(req.envid), 900)}")
    lines += [f"Arrival-Date: {rfc5322_date(req.arrival)}", ""]
    for r in req.recipients:
        lines += _recipient_block(r) + [""]
    return "\r\n".join(lines)


def _human_part(req: DsnRequest, delayed: bool) -> str:
    if delayed:
        intro = ["This is the mail system at host " + req.reporting_mta + ".", "",
                 "Your message could not be delivered yet to the recipients",
                 "below. It is still being retried; you do not need to send",
                 "it again. You will be told if it finally fails."]
    else:
        intro = ["This is the mail system at host " + req.reporting_mta + ".", "",
                 "I'm sorry to have to inform you that your message could not",
                 "be delivered to one or more recipients. It's attached below."]
    lines = intro + [""]
    for r in req.recipients:
        where = f"host {r.remote_mta} said: " if r.remote_mta else ""
        lines.append(f"<{r.address}>: {where}{one_line(r.diagnostic or r.status, 900)}")
        if r.will_retry_until is not None:
            lines.append(f"    (will retry until {rfc5322_date(r.will_retry_until)})")
    return "\r\n".join(lines) + "\r\n"


def build_dsn(req: DsnRequest) -> Dsn:
    """The DSN for ``req``; see the module docstring for ``head``/``include``/``tail``."""
    if not req.recipients:
        raise ValueError("a DSN needs at least one recipient")
    actions = {r.action for r in req.recipients}
    if not actions <= set(ACTIONS):
        raise ValueError(f"bad action in {actions}")
    delayed = actions == {"delayed"}
    utf8 = not all(_is_ascii(a) for a in [req.sender] + [r.address for r in req.recipients])
    headers_only = req.ret.upper() == "HDRS" or req.original_size > req.limit
    head_bytes = req.original_head[:req.limit]
    include = (header_length(head_bytes, req.original_size) if headers_only
               else req.original_size)
    eight_bit = req.eight_bit or not head_bytes[:include].isascii()
    b = req.boundary
    subject = ("Delayed Mail (still being retried)" if delayed
               else "Undelivered Mail Returned to Sender")
    msgid = _MESSAGE_ID.search(head_bytes[:header_length(head_bytes, req.original_size)])
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{req.reporting_mta}>",
        f"To: <{req.sender}>",
        f"Subject: {subject}",
        f"Date: {rfc5322_date(req.now)}",
        f"Message-ID: <{req.queue_id}.{int(req.now)}.dsn@{req.reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{b}"',
    ]
    if msgid:
        ref = msgid.group(1).decode("ascii", "replace")
        headers += [f"In-Reply-To: {ref}", f"References: {ref}"]
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    if headers_only:
        original_type = "message/global-headers" if utf8 else "text/rfc822-headers"
    else:
        original_type = "message/global" if utf8 else "message/rfc822"
    parts = [
        "\r\n".join(headers), "",
        "This is a MIME-encapsulated message.", "",
        f"--{b}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8", "",
        _human_part(req, delayed),
        f"--{b}",
        "Content-Description: Delivery report",
        f"Content-Type: {status_type}", "",
        _status_part(req),
        f"--{b}",
        "Content-Description: " + ("Undelivered Message Headers" if headers_only
                                   else "Undelivered Message"),
        f"Content-Type: {original_type}",
    ]
    if eight_bit:
        parts.append("Content-Transfer-Encoding: 8bit")
    parts += ["", ""]
    head = "\r\n".join(parts).encode("utf-8")
    tail = f"\r\n--{b}--\r\n".encode("ascii")
    return Dsn(head, include, tail, subject, headers_only, utf8,
               eight_bit or utf8 or not head.isascii())


def dsn_envelope(req: DsnRequest, dsn: Dsn, queue_id: str) -> Envelope:
    """The queue-file envelope of the DSN: from ``<>`` to the original
    sender, ``Bounce-Of`` the original's queue id."""
    env = Envelope(sender="", queue_id=queue_id, arrival=utc_iso(req.now),
                   origin="dsn", size=str(dsn.size), bounce_of=req.queue_id)
    env.add_recipient(req.sender, notify="NEVER")
    if dsn.eight_bit:
        env.body = "8BITMIME"
    if dsn.utf8:
        env.smtputf8 = "yes"
    return env

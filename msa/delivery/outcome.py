"""What one delivery attempt means for a message (pure: no I/O, no clock).

:func:`decide` takes the queue file's envelope, the recipients tried, the
relay's result for each, the time and the retry settings, and says what
the runner is to do: the new recipient states, the DSNs to send, and
whether the file is removed or deferred, and until when. The runner does
the I/O around it (it logs, spools the DSNs, rewrites and moves the file).
Rules, each from the runner's contract (``msa.delivery.runner``):

- A recipient's state is its result's: ``sent`` and ``failed`` are final,
  ``deferred`` is tried again.
- When some recipients are deferred and the message has been queued for
  its whole lifetime (``[retry] lifetime``, ``bounce_lifetime`` for a null
  sender), they fail with status 4.4.7 (RFC 3463: delivery time expired)
  and the last reply as the diagnostic.
- Failed recipients get a DSN (RFC 3464) unless they asked for none
  (``NOTIFY`` without FAILURE, or NEVER: RFC 3461 §4.1) or the sender is
  null: a bounce is never bounced. Instead, its failed recipients are
  reported to the postmaster (``notice``; the runner sends it when
  ``[server] postmaster`` is set), unless the failed message is itself
  such a notice (Origin :data:`DOUBLE_BOUNCE`): then it is dropped.
- Deferred recipients get one delay warning (``NOTIFY`` absent or with
  DELAY) when ``[retry] delay_warning`` is set and the message is at least
  that old, once per message (``Delay-Warned``); never for a null sender.
- With deferred recipients left, the next attempt is
  :func:`msa.delivery.backoff.next_attempt`; with none, the file is
  removed. The envelope records the attempt (Attempts, First-Attempt,
  Last-Attempt, History, Last-Error, Next-Attempt) only when the file or
  a DSN will show it: a message delivered to everyone is removed unread.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from msa.delivery import backoff
from msa.delivery.relay import RcptResult
from msa.message.dsn import RecipientReport
from msa.message.queuefile import Envelope, Recipient, utc_iso
from msa.protocol.replies import status_of

EXPIRED = "4.4.7"
# The Origin of a notice to the postmaster about an undeliverable bounce
# (Postfix's 2bounce_notice_recipient): one that fails is dropped.
DOUBLE_BOUNCE = "double-bounce"


@dataclass
class Outcome:
    envelope: Envelope                                  # the new version
    # (recipient, result, status) of each recipient that failed now,
    # expired ones included with 4.4.7: what the log and a DSN report.
    failed: list[tuple[Recipient, RcptResult, str]] = field(default_factory=list)
    expired: list[tuple[Recipient, RcptResult]] = field(default_factory=list)
    bounce: list[RecipientReport] = field(default_factory=list)    # the DSN, if any
    warn: list[RecipientReport] = field(default_factory=list)      # the delay warning
    # A bounce (null sender) that failed: what the postmaster is told,
    # unless the failed message was such a notice itself (never a loop).
    notice: list[RecipientReport] = field(default_factory=list)
    due: float | None = None                            # None: remove the file

    @property
    def remove(self) -> bool:
        return self.due is None


def wants(rcpt: Recipient, what: str) -> bool:
    """Whether ``rcpt`` asked for a DSN of kind ``what`` (FAILURE, DELAY):
    RFC 3461 §4.1; no NOTIFY means FAILURE (and DELAY, which we send only
    when ``delay_warning`` is configured)."""
    notify = rcpt.notify.upper()
    if not notify:
        return True
    return what in notify.split(",") and "NEVER" not in notify


def decide(env: Envelope, todo: list[Recipient], results: list[RcptResult], *,
           attempt: int, arrival: float, start: float, now: float, retry,
           rand: float) -> Outcome:
    """The outcome of attempt number ``attempt`` that began at ``start``
    and ended at ``now`` (epoch seconds), for the recipients ``todo`` of
    ``env`` (which is not changed). ``retry`` is a
    :class:`msa.config.RetryConfig`; ``rand`` in [0, 1) sets the jitter."""
    # A copy of what changes (recipients, history): a few microseconds,
    # where deepcopy costs tens on the runner's path.
    new = copy.copy(env)
    new.recipients = [copy.copy(r) for r in env.recipients]
    new.history = list(env.history)
    index = {id(r): i for i, r in enumerate(env.recipients)}
    mine = [new.recipients[index[id(r)]] for r in todo]
    out = Outcome(new)
    deferred: list[tuple[Recipient, RcptResult]] = []
    for rcpt, res in zip(mine, results):
        rcpt.state, rcpt.reply = res.state, res.reply
        if res.state == "failed":
            out.failed.append((rcpt, res, res.status))
        elif res.state == "deferred":
            deferred.append((rcpt, res))
    null_sender = new.sender == ""
    life = backoff.lifetime(retry, null_sender)
    if deferred and backoff.expired(arrival, now, life):
        for rcpt, res in deferred:
            rcpt.state = "failed"
            out.failed.append((rcpt, res, EXPIRED))
            out.expired.append((rcpt, res))
        deferred = []
    if out.failed or deferred:
        _record(new, results, attempt, start, now)
    if not null_sender:
        out.bounce = [RecipientReport(rcpt.address, "failed", status, res.reply, res.host,
                                      rcpt.orcpt, last_attempt=now)
                      for rcpt, res, status in out.failed if wants(rcpt, "FAILURE")]
    elif new.origin != DOUBLE_BOUNCE:
        out.notice = [RecipientReport(rcpt.address, "failed", status, res.reply, res.host,
                                      rcpt.orcpt, last_attempt=now)
                      for rcpt, res, status in out.failed]
    if deferred:
        out.due = backoff.next_attempt(retry, attempt, arrival, now, rand, life)
        new.next_attempt = utc_iso(out.due)
        if (retry.delay_warning > 0 and not new.delay_warned and not null_sender
                and now - arrival >= retry.delay_warning):
            new.delay_warned = utc_iso(now)
            out.warn = [RecipientReport(rcpt.address, "delayed",
                                        status_of(res.reply, "4.0.0"), res.reply, res.host,
                                        rcpt.orcpt, last_attempt=now,
                                        will_retry_until=arrival + life)
                        for rcpt, res in deferred if wants(rcpt, "DELAY")]
    return out


def _record(env: Envelope, results: list[RcptResult], attempt: int, start: float,
            now: float) -> None:
    stamp = utc_iso(now)
    env.attempts = str(attempt)
    env.first_attempt = env.first_attempt or utc_iso(start)
    env.last_attempt = stamp
    env.next_attempt = ""
    seen = set()
    for res in results:
        key = (res.relay, res.state, res.reply)
        if key in seen:
            continue
        seen.add(key)
        env.add_history(f"{stamp} {res.relay} {res.state} {res.reply}")
    errors = [r.reply for r in results if r.state != "sent"]
    env.last_error = errors[0] if errors else ""

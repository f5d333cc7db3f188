"""``sendmail -bs``: an SMTP dialogue on standard input and output, as a
pure state machine (command line in, reply out; no I/O).

The caller (:func:`msa.submission.sendmail.run_smtp`) reads lines, feeds
:meth:`LocalSmtp.command`, writes the replies, and after a ``354`` reads
the message itself through :class:`msa.submission.sendmail_input.MessageInput` in
``"smtp"`` dot mode, then reports the outcome with
:meth:`LocalSmtp.message_queued` or :meth:`LocalSmtp.message_failed`.

Invariants:

- The peer is the local user who ran the command; there is no AUTH or
  STARTTLS (502). What the user may do is what ``sendmail -f`` allows.
- Transaction states follow RFC 5321 §4.1.4: MAIL needs no open
  transaction, RCPT needs MAIL, DATA needs at least one accepted RCPT;
  RSET, HELO and EHLO clear the transaction. Out of order: 503 5.5.1.
- Every reply carries an enhanced status code (RFC 2034, RFC 3463).
- Bare local parts are qualified with the configured domain, as on the
  command line. DSN parameters (RFC 3461) and BODY (RFC 6152), SIZE (RFC
  1870) and SMTPUTF8 (RFC 6531) are read by the SMTP edge's own parser
  (:mod:`msa.protocol.smtpcmd`) and kept in the envelope as the edge keeps
  them (ENVID and ORCPT in xtext).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from msa.message.headers import normalize_address
from msa.protocol.errors import AddressError, MsaError
from msa.protocol.smtpcmd import parse_mail_params, parse_rcpt_params

MAX_COMMAND_LINE = 4096


@dataclass
class Reply:
    code: int
    text: str | list[str]
    action: str = ""  # "data": read the message next; "quit": close

    def lines(self) -> list[str]:
        texts = self.text if isinstance(self.text, list) else [self.text]
        out = [f"{self.code}-{t}" for t in texts[:-1]]
        out.append(f"{self.code} {texts[-1]}")
        return out

    def to_bytes(self) -> bytes:
        return "".join(line + "\r\n" for line in self.lines()).encode("utf-8")


@dataclass
class Transaction:
    sender: str
    params: dict[str, str] = field(default_factory=dict)
    recipients: list[tuple[str, dict[str, str]]] = field(default_factory=list)


def split_path(arg: str) -> tuple[str, list[str]]:
    """``<addr> PARAM=value ...`` to the address text and the parameters
    (RFC 5321 §4.1.2; a space after the colon is tolerated)."""
    arg = arg.strip()
    if arg.startswith("<"):
        end = arg.find(">")
        if end < 0:
            raise AddressError("unbalanced '<'")
        return arg[1:end], arg[end + 1:].split()
    words = arg.split()
    if not words:
        raise AddressError("missing address")
    return words[0], words[1:]


class LocalSmtp:
    """One ``-bs`` session."""

    def __init__(self, hostname: str, domain: str, max_size: int,
                 max_recipients: int = 1000):
        self.hostname, self.domain = hostname, domain
        self.max_size, self.max_recipients = max_size, max_recipients
        self.txn: Transaction | None = None

    def greeting(self) -> Reply:
        return Reply(220, f"{self.hostname} ESMTP msa (sendmail -bs)")

    def command(self, line: str) -> Reply:
        verb, _, arg = line.strip().partition(" ")
        handler = getattr(self, f"_cmd_{verb.lower()}", None) if verb.isalpha() else None
        if handler is None:
            return Reply(500, "5.5.2 Error: command not recognized")
        return handler(arg.strip())

    def message_queued(self, qid: str) -> Reply:
        self.txn = None
        return Reply(250, f"2.0.0 Ok: queued as {qid}")

    def message_failed(self, reply: Reply) -> Reply:
        self.txn = None
        return reply

    # -- commands ---------------------------------------------------------

    def _cmd_helo(self, arg: str) -> Reply:
        if not arg:
            return Reply(501, "5.5.4 Syntax: HELO hostname")
        self.txn = None
        return Reply(250, self.hostname)

    def _cmd_ehlo(self, arg: str) -> Reply:
        if not arg:
            return Reply(501, "5.5.4 Syntax: EHLO hostname")
        self.txn = None
        return Reply(250, [self.hostname, "PIPELINING", f"SIZE {self.max_size}",
                           "8BITMIME", "DSN", "SMTPUTF8", "ENHANCEDSTATUSCODES"])

    def _cmd_mail(self, arg: str) -> Reply:
        if self.txn is not None:
            return Reply(503, "5.5.1 Error: nested MAIL command")
        if not arg.upper().startswith("FROM:"):
            return Reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
        try:
            text, words = split_path(arg[5:])
            sender = normalize_address(text, self.domain, allow_null=True)
            mp = parse_mail_params(" ".join(words))
        except AddressError as exc:
            return Reply(501, f"5.1.7 Bad sender address syntax: {exc}")
        except MsaError as exc:
            return Reply(exc.code, f"{exc.status} {exc.message}")
        if mp.size is not None and mp.size > self.max_size:
            return Reply(552, "5.3.4 Message size exceeds fixed limit")
        # As the SMTP edge keeps them: ENVID in xtext (msa-spool(5)).
        params = {"SIZE": "" if mp.size is None else str(mp.size), "BODY": mp.body,
                  "RET": mp.ret, "ENVID": mp.envid, "SMTPUTF8": "yes" if mp.smtputf8 else ""}
        self.txn = Transaction(sender, {k: v for k, v in params.items() if v})
        return Reply(250, "2.1.0 Ok")

    def _cmd_rcpt(self, arg: str) -> Reply:
        if self.txn is None:
            return Reply(503, "5.5.1 Error: need MAIL command")
        if not arg.upper().startswith("TO:"):
            return Reply(501, "5.5.4 Syntax: RCPT TO:<address>")
        if len(self.txn.recipients) >= self.max_recipients:
            return Reply(452, "4.5.3 Error: too many recipients")
        try:
            text, words = split_path(arg[3:])
            rcpt = normalize_address(text, self.domain)
            rp = parse_rcpt_params(" ".join(words), utf8=bool(self.txn.params.get("SMTPUTF8")))
        except AddressError as exc:
            return Reply(501, f"5.1.3 Bad recipient address syntax: {exc}")
        except MsaError as exc:
            return Reply(exc.code, f"{exc.status} {exc.message}")
        params = {k: v for k, v in (("NOTIFY", rp.notify), ("ORCPT", rp.orcpt)) if v}
        self.txn.recipients.append((rcpt, params))
        return Reply(250, "2.1.5 Ok")

    def _cmd_data(self, arg: str) -> Reply:
        if arg:
            return Reply(501, "5.5.4 Syntax: DATA")
        if self.txn is None:
            return Reply(503, "5.5.1 Error: need MAIL command")
        if not self.txn.recipients:
            return Reply(503, "5.5.1 Error: need RCPT command")
        return Reply(354, "End data with <CR><LF>.<CR><LF>", action="data")

    def _cmd_rset(self, arg: str) -> Reply:
        self.txn = None
        return Reply(250, "2.0.0 Ok")

    def _cmd_noop(self, arg: str) -> Reply:
        return Reply(250, "2.0.0 Ok")

    def _cmd_vrfy(self, arg: str) -> Reply:
        return Reply(252, "2.0.0 Send some mail, I'll try my best")

    def _cmd_help(self, arg: str) -> Reply:
        return Reply(214, "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY QUIT")

    def _cmd_quit(self, arg: str) -> Reply:
        return Reply(221, "2.0.0 Bye", action="quit")

    def _cmd_starttls(self, arg: str) -> Reply:
        return Reply(502, "5.5.1 Error: not available on a local pipe")

    _cmd_auth = _cmd_starttls

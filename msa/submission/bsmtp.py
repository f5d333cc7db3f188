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
  1870) and SMTPUTF8 (RFC 6531) are understood and kept in the envelope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from msa.protocol.errors import AddressError
from msa.message.headers import normalize_address
from msa.submission.sendmail_args import UsageError, parse_body, parse_envid, parse_notify, parse_ret

MAX_COMMAND_LINE = 4096
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")


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


def parse_params(words: list[str]) -> dict[str, str]:
    params = {}
    for word in words:
        key, _, value = word.partition("=")
        params[key.upper()] = value
    return params


def xtext_decode(text: str) -> str:
    """RFC 3461 §4: ``+XX`` is a hex-coded byte."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "+" and _HEX2.fullmatch(text[i + 1:i + 3]):
            out.append(chr(int(text[i + 1:i + 3], 16)))
            i += 3
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


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
            params = self._mail_params(parse_params(words))
        except AddressError as exc:
            return Reply(501, f"5.1.7 Bad sender address syntax: {exc}")
        except (UsageError, ValueError) as exc:
            return Reply(555, f"5.5.4 {exc}")
        if params.get("SIZE", "0").isdigit() and int(params.get("SIZE", "0")) > self.max_size:
            return Reply(552, "5.3.4 Message size exceeds fixed limit")
        self.txn = Transaction(sender, params)
        return Reply(250, "2.1.0 Ok")

    def _mail_params(self, params: dict[str, str]) -> dict[str, str]:
        out = {}
        for key, value in params.items():
            if key == "SIZE" and value.isdigit():
                out[key] = value
            elif key == "BODY":
                out[key] = parse_body(value)
            elif key == "RET":
                out[key] = parse_ret(value)
            elif key == "ENVID":
                out[key] = parse_envid(xtext_decode(value))
            elif key == "SMTPUTF8" and not value:
                out[key] = "yes"
            elif key == "AUTH":
                continue  # RFC 4954 §5: ignored without AUTH
            else:
                raise ValueError(f"Unsupported MAIL parameter {key}")
        return out

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
            params = {}
            for key, value in parse_params(words).items():
                if key == "NOTIFY":
                    params[key] = parse_notify(value)
                elif key == "ORCPT":
                    params[key] = value
                else:
                    raise ValueError(f"Unsupported RCPT parameter {key}")
        except AddressError as exc:
            return Reply(501, f"5.1.3 Bad recipient address syntax: {exc}")
        except (UsageError, ValueError) as exc:
            return Reply(555, f"5.5.4 {exc}")
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

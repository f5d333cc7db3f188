"""Replies and per-session validator hooks of the SMTP edge (pure).

:class:`Reply` is the mutable reply a hook may change, as in slimta:
setting ``code`` moves the enhanced status code (RFC 3463) into the same
class, and a ``message`` that starts with an enhanced status code sets it.
``{0}`` in a message is replaced by the address the command named.

:class:`SmtpValidators` is the base class of the tutorial's validators.
One instance is made per session (made again after STARTTLS, which resets
the session, RFC 3207 §4.2) and sees it as ``self.session``. A hook runs
only after the edge's own checks accepted the command (authentication,
owned senders, limits), so a hook can refuse or reword, never open what
the edge closed. Hooks may be plain or ``async`` methods; ``handle_mail``
and ``handle_rcpt`` may omit the ``params`` argument (the tutorial's
``handle_mail(self, reply, sender)``).
"""

from __future__ import annotations

import re
from typing import Any

_ESC = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")

# Default enhanced status for replies that carry none (RFC 3463 §3.5 for
# protocol errors, §3.8 for security).
_DEFAULT_ESC = {
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
    "504": "5.5.4", "530": "5.7.0", "535": "5.7.8", "538": "5.7.11",
    "550": "5.0.0", "554": "5.0.0", "555": "5.5.4", "421": "4.3.0",
    "451": "4.3.0", "452": "4.3.1", "454": "4.7.0", "235": "2.7.0",
    "252": "2.5.0",
}


class Reply:
    """An SMTP reply a validator can change in place."""

    def __init__(self, code: str | int = "250", message: str = "",
                 enhanced_status_code: str | None = None):
        self._code = str(code)
        self._esc: str | None = None
        self._message = ""
        self.message = message
        if enhanced_status_code:
            self._esc = enhanced_status_code

    @property
    def code(self) -> str:
        return self._code

    @code.setter
    def code(self, value: str | int) -> None:
        self._code = str(value)
        if self._esc:
            self._esc = self._code[0] + self._esc[1:]

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        m = _ESC.match(value or "")
        if m:
            self._esc = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
            value = value[m.end():]
        self._message = value or ""

    @property
    def enhanced_status_code(self) -> str | None:
        """The enhanced status code, its class always the code's class;
        None for replies that carry none (1xx/3xx)."""
        if self._code[:1] not in ("2", "4", "5"):
            return None
        esc = self._esc or _DEFAULT_ESC.get(self._code) or f"{self._code[0]}.0.0"
        return self._code[0] + esc[1:]

    @enhanced_status_code.setter
    def enhanced_status_code(self, value: str | None) -> None:
        self._esc = value

    def positive(self) -> bool:
        return self._code[:1] in ("2", "3")

    def line(self, address: str | None = None) -> str:
        """The reply as sent: ``550 5.7.1 text``, ``{0}`` filled."""
        text = self._message
        if address is not None:
            text = text.replace("{0}", address)
        esc = self.enhanced_status_code
        return " ".join(p for p in (self._code, esc, text) if p)

    def __str__(self) -> str:
        return self.line()

    def __repr__(self) -> str:
        return f"Reply({self.line()!r})"


def enhance(line: str) -> str:
    """Add a default enhanced status code to a one-line reply that lacks
    one (RFC 2034 §3: every 2xx/4xx/5xx reply after EHLO carries one)."""
    code, sep, text = line.partition(" ")
    if not sep or len(code) != 3 or code[0] not in "245" or _ESC.match(text):
        return line
    if text.startswith("Error: "):
        text = text[len("Error: "):]
    return Reply(code, text).line()


class SmtpValidators:
    """Override any hook; each gets the :class:`Reply` the edge is about
    to send and may change it. The defaults accept."""

    def __init__(self, session: Any):
        self.session = session

    def handle_banner(self, reply: Reply, address: tuple) -> None:
        pass

    def handle_ehlo(self, reply: Reply, ehlo_as: str) -> None:
        pass

    def handle_auth(self, reply: Reply, user: str) -> None:
        pass

    def handle_mail(self, reply: Reply, sender: str, params: dict) -> None:
        pass

    def handle_rcpt(self, reply: Reply, recipient: str, params: dict) -> None:
        pass

    def handle_data(self, reply: Reply) -> None:
        pass

    def handle_have_data(self, reply: Reply, envelope: Any) -> None:
        pass

    def handle_queued(self, reply: Reply, queue_id: str) -> None:
        pass

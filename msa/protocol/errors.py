"""One exception hierarchy for msa.

Every error that can reach an SMTP client or a relay decision carries its
reply code and enhanced status code (RFC 3463). Whether it is transient or
permanent is its class, not a flag: ``isinstance(e, TransientError)``.
"""

from __future__ import annotations


class MsaError(Exception):
    """Base of msa's errors. ``code``/``status`` are the SMTP reply they map to."""

    code = 451
    status = "4.3.0"

    def __init__(self, message: str = "", code: int | None = None,
                 status: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def reply(self) -> str:
        """The reply line as sent to a client: ``451 4.3.0 text``."""
        return f"{self.code} {self.status} {self.message}".rstrip()


class TransientError(MsaError):
    """Try again later (4xx, timeouts, SERVFAIL, a full disk)."""

    code = 451
    status = "4.3.0"


class PermanentError(MsaError):
    """Will never succeed as is (5xx, NXDOMAIN, null MX, bad input)."""

    code = 550
    status = "5.0.0"


class AddressError(PermanentError):
    """An address that does not parse (RFC 5321 §4.1.2)."""

    code = 553
    status = "5.1.3"

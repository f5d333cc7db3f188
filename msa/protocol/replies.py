"""SMTP replies as text (pure): the enhanced status code in a reply.

An enhanced status code (RFC 3463 §2, RFC 2034 §4) is ``class.subject.detail``
at the start of a reply's text: ``550 5.1.1 No such user``. A server need not
send one; the caller says what to assume then.
"""

from __future__ import annotations

import re

_STATUS = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")


def status_of(reply: str, default: str) -> str:
    """The enhanced status code at the start of an SMTP reply's text, else
    ``default``."""
    m = _STATUS.match(reply)
    return m.group(1) if m else default

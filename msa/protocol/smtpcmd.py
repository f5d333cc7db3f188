"""SMTP command lines, paths and ESMTP parameters (pure: no I/O).

Every function either returns parsed values or raises an
:class:`msa.protocol.errors.MsaError` whose ``reply()`` is the line to send.

Decisions, with the RFC that makes them:

- A command line ends with CRLF and holds no other CR, LF or NUL (RFC 5321
  §2.3.8). Its length limit is 512 octets with CRLF (§4.5.3.1.4), raised
  for MAIL and RCPT by the parameters we offer (RFC 1869 §4.1.2: SIZE,
  BODY, SMTPUTF8, RET, ENVID, NOTIFY, ORCPT) to :data:`EXTENDED_LIMIT`, and
  for AUTH to 12288 octets (RFC 4954 §4, the initial response).
- Paths follow RFC 5321 §4.1.2, with UTF-8 in local parts and domains
  when the transaction uses SMTPUTF8 (RFC 6531 §3.3). A source route
  (``<@a,@b:user@c>``) is accepted and ignored (§C). Local part at most 64
  octets, domain 255, path 256 (§4.5.3.1).
- Angle brackets may be left out of a path (Postfix's default leniency);
  ``<>`` is the null reverse-path, allowed only for MAIL.
- Parameter keywords are case-insensitive; values keep their case (ORCPT
  and ENVID are xtext, RFC 3461 §4). A repeated keyword is a syntax error.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from msa.protocol import xtext
from msa.protocol.errors import MsaError

COMMAND_LIMIT = 512
EXTENDED_LIMIT = 1024
AUTH_LIMIT = 12288
MAX_LINE_READ = AUTH_LIMIT + 2


def command_limit(verb: str) -> int:
    """Longest line (with CRLF) a command may have."""
    if verb == "AUTH":
        return AUTH_LIMIT + 2
    if verb in ("MAIL", "RCPT"):
        return EXTENDED_LIMIT
    return COMMAND_LIMIT


class SmtpReplyError(MsaError):
    """A command refused with a specific reply."""


def error(code: int, status: str, text: str) -> SmtpReplyError:
    return SmtpReplyError(text, code=code, status=status)


def split_command(line: bytes) -> tuple[str, str]:
    """``b"MAIL FROM:<a@b>\\r\\n"`` -> ``("MAIL", "FROM:<a@b>")``."""
    if (not line.endswith(b"\r\n") or line.count(b"\r") != 1 or line.count(b"\n") != 1
            or b"\x00" in line):
        raise error(500, "5.5.2", "Syntax error: bare CR, LF or NUL in command line")
    if len(line) > MAX_LINE_READ:
        raise error(500, "5.5.2", "Line too long")
    verb_b, _, arg_b = line[:-2].partition(b" ")
    try:
        verb = verb_b.decode("ascii").upper()
        arg = arg_b.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise error(500, "5.5.2", "Syntax error: invalid UTF-8 in command") from None
    if len(line) > command_limit(verb):
        raise error(500, "5.5.2", "Line too long")
    return verb, arg


# -- paths --------------------------------------------------------------------

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_U = r"\u0080-\U0010ffff"


def _mailbox_re(utf8: bool) -> re.Pattern[str]:
    u = _U if utf8 else ""
    atom = f"[{u}{_ATEXT}]+"           # "-" stays last in the class
    dot_string = f"{atom}(?:\\.{atom})*"
    quoted = f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{u}]|\\\\[\\x20-\\x7e])*"'
    sub = f"[A-Za-z0-9{u}](?:[A-Za-z0-9{u}-]*[A-Za-z0-9{u}])?"
    domain = f"{sub}(?:\\.{sub})*"
    literal = r"\[[^\[\]\\\s]+\]"
    return re.compile(f"(?P<local>{dot_string}|{quoted})@(?P<domain>{domain}|{literal})")


_MAILBOX = {False: _mailbox_re(False), True: _mailbox_re(True)}
_ADL = r"@[^,:<>\s]+(?:,@[^,:<>\s]+)*:"
_ADL_RE = re.compile(_ADL)


def _check_literal(domain: str) -> None:
    inner = domain[1:-1]
    try:
        if inner.upper().startswith("IPV6:"):
            ipaddress.IPv6Address(inner[5:])
        elif ":" in inner:
            tag, _, _ = inner.partition(":")   # General-address-literal
            if not re.fullmatch(r"[A-Za-z0-9-]*[A-Za-z0-9]", tag):
                raise ValueError(tag)
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise error(553, "5.1.3", "Bad address literal") from None


def parse_path(text: str, null_ok: bool = False, utf8: bool = True) -> tuple[str, str]:
    """Parse ``<mailbox> params`` (the text after ``FROM:`` or ``TO:``).
    Returns the address (``""`` for ``<>``) and the parameter text."""
    text = text.strip()
    if text.startswith("<"):
        end = text.find(">")
        if end < 0:
            raise error(501, "5.1.3", "Syntax error: missing '>'")
        inner, rest = text[1:end], text[end + 1:]
        if rest and not rest[0].isspace():
            raise error(501, "5.5.4", "Syntax error after address")
    else:
        inner, _, rest = text.partition(" ")
    if inner[:1] == "@":
        adl = _ADL_RE.match(inner)
        if adl:
            inner = inner[adl.end():]
    if inner == "":
        if null_ok and text.startswith("<"):
            return "", rest.strip()
        raise error(501, "5.1.3", "Syntax error: empty address")
    m = _MAILBOX[utf8].fullmatch(inner)
    if m is None:
        if not utf8 and not inner.isascii():
            raise error(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        raise error(553, "5.1.3", f"Bad address syntax <{inner}>")
    local, domain = m.group("local", "domain")
    if domain[0] == "[":
        _check_literal(domain)
    if inner.isascii():          # octets are characters
        too_long = len(local) > 64 or len(domain) > 255 or len(inner) > 254
    else:
        try:
            too_long = (len(local.encode()) > 64 or len(domain.encode()) > 255
                        or len(inner.encode()) > 254)
        except UnicodeEncodeError:  # bytes that are not UTF-8 (RFC 6531 §3.3)
            raise error(553, "5.6.7", "Address is not valid UTF-8") from None
    if too_long:
        raise error(553, "5.1.3", "Address too long")
    return inner, rest.strip() if rest else rest


# -- ESMTP parameters ---------------------------------------------------------

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def parse_params(text: str) -> dict[str, str | None]:
    """``"SIZE=10 BODY=8BITMIME SMTPUTF8"`` -> ``{"SIZE": "10", ...}``."""
    params: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not value):
            raise error(501, "5.5.4", f"Syntax error in parameter {word!r}")
        key = key.upper()
        if key in params:
            raise error(501, "5.5.4", f"Duplicate parameter {key}")
        params[key] = value if eq else None
    return params


@dataclass
class MailParams:
    size: int | None = None
    body: str = ""          # "", "7BIT" or "8BITMIME"
    smtputf8: bool = False
    ret: str = ""           # "", "FULL" or "HDRS"
    envid: str = ""


def parse_mail_params(text: str) -> MailParams:
    """MAIL parameters: SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8 (RFC
    6531), RET and ENVID (RFC 3461 §4.3, §4.4), AUTH (RFC 4954 §5, accepted
    and ignored: we trust no other server's word about who sent it)."""
    out = MailParams()
    if not text:
        return out
    for key, value in parse_params(text).items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise error(501, "5.5.4", "Syntax error in SIZE")
            out.size = int(value)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise error(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
            out.body = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                raise error(501, "5.5.4", "SMTPUTF8 takes no value")
            out.smtputf8 = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise error(501, "5.5.4", "RET must be FULL or HDRS")
            out.ret = value.upper()
        elif key == "ENVID":
            if value is None or len(value) > 100 or not xtext.is_xtext(value):
                raise error(501, "5.5.4", "Syntax error in ENVID")
            out.envid = value
        elif key == "AUTH":
            continue
        else:
            raise error(555, "5.5.4", f"MAIL parameter {key} not recognized")
    return out


@dataclass
class RcptParams:
    notify: str = ""
    orcpt: str = ""


_NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}


def parse_rcpt_params(text: str, utf8: bool = False) -> RcptParams:
    """RCPT parameters: NOTIFY and ORCPT (RFC 3461 §4.1, §4.2)."""
    out = RcptParams()
    if not text:
        return out
    for key, value in parse_params(text).items():
        if key == "NOTIFY":
            words = (value or "").upper().split(",")
            if not (words == ["NEVER"] or (words[0] and set(words) <= _NOTIFY_WORDS
                                            and len(set(words)) == len(words))):
                raise error(501, "5.5.4", "NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")
            out.notify = ",".join(words)
        elif key == "ORCPT":
            addr_type, semi, text = (value or "").partition(";")
            ok = _KEYWORD.fullmatch(addr_type) and semi and text and len(value) <= 500 and (
                xtext.is_xtext(text) or (utf8 and not re.search(r"[\x00-\x20=]", text)))
            if not ok:
                raise error(501, "5.5.4", "Syntax error in ORCPT")
            out.orcpt = value
        else:
            raise error(555, "5.5.4", f"RCPT parameter {key} not recognized")
    return out

"""The ``sendmail`` command line, parsed without touching anything (pure).

Options follow Postfix's ``sendmail(1)`` (``getopt`` letters
``B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q::tvx``), as real callers pass
them: cron ``-FCronDaemon -i -B8BITMIME -oem
root``, mutt ``-oem -oi -- rcpt``, mailx ``-i -t``, git send-email ``-i
rcpt``. Invariants:

- Options and recipients may be mixed (GNU getopt order, as glibc's
  ``getopt`` gives Postfix on Linux); everything after ``--`` is a
  recipient.
- A value is attached (``-fADDR``) or the next word (``-f ADDR``); ``-o``
  takes the rest of its word (``-oi``, ``-oem``) or the next word.
- An unknown letter, a missing value, ``-B`` other than ``7BIT`` or
  ``8BITMIME``, a bad ``-N``/``-R``/``-V`` value or an unsupported ``-b``
  mode is a :class:`UsageError` (exit 64, EX_USAGE).
- Every value that becomes header or envelope text is checked here, before
  anything is spooled: ``-F`` with a control character, line break or
  more than 256 characters, and a recipient or ``-f`` that is not UTF-8,
  are a :class:`UsageError`. (Addresses are checked further by
  :func:`msa.message.headers.normalize_address`: exit 67.)
- Options that only make sense for Sendmail's own daemon or alias database
  (``-G -U -m -n -x -c -h -L -O -p -X -e``) are accepted and ignored, as
  Postfix does, so scripts written for Sendmail keep working.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from msa import sysexits
from msa.message.headers import display_name_problem
from msa.protocol import xtext

USAGE = ("usage: sendmail [-t] [-i] [-f sender] [-F name] [-N dsn] [-R ret]\n"
         "                [-V envid] [-B 7BIT|8BITMIME] [-C config] [-v]\n"
         "                [-bm|-bs|-bp|-bi|-bv] [-q] [--] [recipient ...]")

# Letters that take a value; the rest are flags.
_WITH_VALUE = set("BCFLNORVXbefhopr")
_FLAGS = set("GIUcimntvx")
_IGNORED_WITH_VALUE = set("LOXhep")  # -e x: Sendmail's error mode letter
_IGNORED_FLAGS = set("GUcmnx")
_MODES = {"m": "deliver", "s": "smtp", "p": "list", "d": None, "D": None,
          "i": "newaliases", "t": None, "v": "verify"}
_NOTIFY = ("success", "failure", "delay")


class UsageError(Exception):
    """Bad command line; ``code`` is the sysexits status to exit with."""

    def __init__(self, message: str, code: int = sysexits.EX_USAGE):
        super().__init__(message)
        self.code = code


@dataclass
class Options:
    # "deliver" (-bm), "smtp" (-bs), "list" (-bp), "flush" (-q),
    # "newaliases" (-bi), "verify" (-bv: where mail to the recipients goes)
    mode: str = "deliver"
    extract: bool = False          # -t
    ignore_dots: bool = False      # -i, -oi
    sender: str | None = None      # -f / -r; "" is the null sender
    full_name: str | None = None   # -F
    notify: str = ""               # -N, SMTP form: "FAILURE,DELAY" or "NEVER"
    ret: str = ""                  # -R: "HDRS" or "FULL"
    envid: str = ""                # -V, as xtext
    body: str = ""                 # -B: "7BIT" or "8BITMIME"
    error_mode: str = ""           # -oe<x>: "m", "e", "p", "q", "w" (accepted, see sendmail(1))
    config: str | None = None      # -C / --config
    verbose: int = 0               # -v
    json: bool = False             # --json (with -bp)
    recipients: list[str] = field(default_factory=list)


def _split(argv: list[str]) -> list[tuple[str, str | None]]:
    """GNU-getopt style: a list of (letter, value) with letter "" for an
    operand (a recipient)."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            out.extend(("", w) for w in argv[i:])
            break
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if name == "config":
                if not eq:
                    if i >= len(argv):
                        raise UsageError("option --config needs a value")
                    value, i = argv[i], i + 1
                out.append(("config", value))
            elif name == "json" and not eq:
                out.append(("json", None))
            else:
                raise UsageError(f"unknown option {word}")
            continue
        if not word.startswith("-") or word == "-":
            out.append(("", word))
            continue
        j = 1
        while j < len(word):
            letter = word[j]
            j += 1
            if letter == "q":
                out.append(("q", word[j:]))
                break
            if letter in _WITH_VALUE:
                if j < len(word):
                    value = word[j:]
                elif i < len(argv):
                    value, i = argv[i], i + 1
                else:
                    raise UsageError(f"option -{letter} needs a value")
                out.append((letter, value))
                break
            if letter in _FLAGS:
                out.append((letter, None))
                continue
            raise UsageError(f"unknown option -{letter}")
    return out


def parse_notify(value: str) -> str:
    """``-N`` value to the SMTP NOTIFY form (RFC 3461 §4.1)."""
    words = [w.strip().lower() for w in value.split(",") if w.strip()]
    if words == ["never"]:
        return "NEVER"
    if not words or any(w not in _NOTIFY for w in words):
        raise UsageError(f"bad -N value {value!r}: use never or a list of "
                         "success, failure, delay")
    return ",".join(w.upper() for w in _NOTIFY if w in words)


def parse_ret(value: str) -> str:
    """``-R`` value (RFC 3461 §4.3)."""
    if value.lower() not in ("hdrs", "full"):
        raise UsageError(f"bad -R value {value!r}: use hdrs or full")
    return value.upper()


def parse_body(value: str) -> str:
    """``-B`` value (RFC 6152): other values are an error, as in Postfix."""
    if value.upper() not in ("7BIT", "8BITMIME"):
        raise UsageError(f"bad -B value {value!r}: use 7BIT or 8BITMIME")
    return value.upper()


def parse_envid(value: str) -> str:
    """``-V`` value, printable ASCII without spaces, as the xtext it is
    kept and relayed in (RFC 3461 §4.4: at most 100 characters encoded;
    msa-spool(5))."""
    if not value or any(not 33 <= ord(c) <= 126 for c in value):
        raise UsageError(f"bad -V value {value!r}")
    encoded = xtext.encode(value)
    if len(encoded) > 100:
        raise UsageError("bad -V value: longer than 100 characters as xtext")
    return encoded


def parse_full_name(value: str) -> str:
    """``-F`` value: it becomes the display name of the ``From:`` field
    msa writes, so a line break or other control character (which would
    end that field and start another) is refused, not repaired
    (:func:`msa.message.headers.display_name_problem`)."""
    problem = display_name_problem(value)
    if problem:
        raise UsageError(f"bad -F value: {problem}")
    return value


def utf8_text(what: str, value: str) -> str:
    """A recipient or ``-f`` value: Python gives bytes of the command line
    that are not UTF-8 as lone surrogates, which no header or envelope can
    carry."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"bad {what}: not valid UTF-8") from None
    return value


def _apply(opts: Options, letter: str, value: str | None) -> None:
    if letter == "":
        opts.recipients.append(utf8_text("recipient", value or ""))
    elif letter == "config" or letter == "C":
        opts.config = value
    elif letter == "json":
        opts.json = True
    elif letter == "t":
        opts.extract = True
    elif letter == "i":
        opts.ignore_dots = True
    elif letter == "v":
        opts.verbose += 1
    elif letter in ("f", "r"):
        opts.sender = utf8_text(f"-{letter} value", value or "")
    elif letter == "F":
        opts.full_name = parse_full_name(value or "")
    elif letter == "N":
        opts.notify = parse_notify(value or "")
    elif letter == "R":
        opts.ret = parse_ret(value or "")
    elif letter == "V":
        opts.envid = parse_envid(value or "")
    elif letter == "B":
        opts.body = parse_body(value or "")
    elif letter == "o":
        _apply_o(opts, value or "")
    elif letter == "b":
        _apply_b(opts, value or "")
    elif letter == "q":
        opts.mode = "flush"
    elif letter == "I":
        raise UsageError("-I (newaliases): msa has no alias database")
    elif letter in _IGNORED_WITH_VALUE or letter in _IGNORED_FLAGS:
        pass


def _apply_o(opts: Options, value: str) -> None:
    """``-oX``: ``-oi`` ignores dots, ``-oe<x>`` sets the error mode, the
    rest is ignored (Postfix)."""
    if value == "i":
        opts.ignore_dots = True
    elif value.startswith("e") and len(value) == 2:
        opts.error_mode = value[1]


def _apply_b(opts: Options, value: str) -> None:
    if value not in _MODES:
        raise UsageError(f"unknown mode -b{value}")
    mode = _MODES[value]
    if mode is None:
        raise UsageError(f"-b{value} is not supported by msa's sendmail")
    opts.mode = mode


def parse_args(argv: list[str]) -> Options:
    """Parse ``argv`` (without the program name)."""
    opts = Options()
    for letter, value in _split(argv):
        _apply(opts, letter, value)
    return opts

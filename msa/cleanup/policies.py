"""Queue policies: small classes run once per message by the watcher
(python-slimta's ``QueuePolicy``, with the names of those applied stored
in the queue file so none is run twice). :func:`run_stages` runs every
stage of the pipeline on one message in memory.

A policy has a ``name`` (recorded in ``Envelope.policies`` once applied,
so a rerun after a crash skips it) and ``apply(envelope, headers)`` that
edits the envelope and the :class:`~msa.message.headerblock.HeaderBlock` in place
and returns None, or returns a list of envelopes when it splits the message
(the parts share the headers). Policies are pure: no I/O; the time they
write comes from the envelope's ``Arrival``, so a rerun writes the same
bytes.

Stage names in ``[policies].stages`` map to policies by :func:`pipeline`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import email.utils
import functools
import operator
import re
from typing import Iterable

from msa.config import Config, ConfigError
from msa.message import queuefile
from msa.message.headerblock import HeaderBlock
from msa.message.queuefile import Envelope, Recipient


def _arrival(env: Envelope) -> _dt.datetime:
    try:
        ts = queuefile.parse_iso(env.arrival)
    except ValueError:
        ts = 0.0
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).astimezone()


def rfc5322_date(env: Envelope) -> str:
    """The arrival time as an RFC 5322 §3.3 date-time in local time."""
    return _rfc5322_date(env.arrival)


def _rfc5322_date(arrival: str) -> str:
    # The date has whole seconds: the messages of one second (and the
    # Received and Date of one message) share one formatting.
    if queuefile.is_utc_iso(arrival):
        arrival = arrival[:19] + ".000000Z"
    return _format_date(arrival)


@functools.lru_cache(maxsize=64)
def _format_date(arrival: str) -> str:
    return email.utils.format_datetime(_arrival(Envelope(arrival=arrival)))


def applied(env: Envelope) -> list[str]:
    return [p for p in env.policies.split(",") if p]


def mark_applied(env: Envelope, name: str) -> None:
    if name not in applied(env):
        env.policies = ",".join([*applied(env), name])


class Policy:
    """Base class; subclasses set ``name`` and implement :meth:`apply`."""

    name = "policy"
    stage = "policy"  # default stage name when added through the API

    def apply(self, env: Envelope, headers: HeaderBlock) -> list[Envelope] | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AddDateHeader(Policy):
    """Add ``Date:`` (the arrival time) when the message has none
    (RFC 6409 §8.2: an MSA may add a missing Date)."""

    name = stage = "date"

    def apply(self, env, headers):
        if not headers.has("date"):
            headers.append("Date", rfc5322_date(env))


class AddMessageIdHeader(Policy):
    """Add ``Message-ID: <queue-id@hostname>`` when missing (RFC 6409 §8.3)."""

    name = stage = "message-id"

    def __init__(self, hostname: str):
        self.hostname = hostname

    def apply(self, env, headers):
        if not headers.has("message-id"):
            headers.append("Message-ID", f"<{env.queue_id}@{self.hostname}>")


def _with_protocol(env: Envelope) -> str:
    """RFC 3848 transmission types: ESMTP + S (TLS) + A (authenticated)."""
    return "ESMTP" + ("S" if env.tls else "") + ("A" if env.auth_user else "")


def received_clauses(env: Envelope, hostname: str, private: bool = False) -> list[str]:
    """Our ``Received:`` field (RFC 5321 §4.4) as clauses, each kept on
    one line when folded; the date is always the last. ``private``
    (``[policies] private_submission``): for an authenticated user, no
    ``from`` clause and no TLS details, so the user's address and device
    stay out of every copy of the message, as large providers do."""
    date = rfc5322_date(env)
    if env.origin == "local":
        uid = env.local_uid or "unknown"
        return [f"by {hostname} (msa, from userid {uid})", f"id {env.queue_id};", date]
    if not env.client_address:
        # Made here (a DSN): no client to name, and an empty address
        # literal "[]" is not one RFC 5321 §4.1.3 allows.
        return [f"by {hostname} (msa)", f"id {env.queue_id};", date]
    helo = env.helo or "unknown"
    hide = private and bool(env.auth_user)
    out = [] if hide else [f"from {helo} ({env.client_name or 'unknown'} "
                           f"[{env.client_address}])"]
    if env.tls and not hide:
        version, _, cipher = env.tls.partition(" ")
        out.append(f"(using {version} with cipher {cipher})" if cipher else f"(using {version})")
    if env.auth_user and not hide:
        out.append(f"(authenticated as {env.auth_user})")
    out.append(f"by {hostname} (msa) with {_with_protocol(env)} id {env.queue_id}")
    if len(env.recipients) == 1:  # only one: do not disclose the others
        out.append(f"for <{env.recipients[0].address}>")
    out[-1] += ";"
    return [*out, date]


class AddReceivedHeader(Policy):
    name = stage = "received"

    def __init__(self, hostname: str, private: bool = False):
        self.hostname, self.private = hostname, private

    def apply(self, env, headers):
        headers.prepend("Received", received_clauses(env, self.hostname, self.private))


class RemoveBccHeader(Policy):
    """Remove ``Bcc`` and ``Resent-Bcc`` so blind recipients stay blind
    (RFC 5322 §3.6.3)."""

    name = stage = "remove-bcc"

    def apply(self, env, headers):
        headers.remove("bcc")
        headers.remove("resent-bcc")


def _address_key(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address


class Forward(Policy):
    """Rewrite recipients by regular expression: the first rule whose
    pattern is found in a recipient replaces it (``re.sub``, once); a
    replacement may list several addresses separated by commas (an alias).
    The result is deduplicated (domain compared without case)."""

    name = stage = "forward"

    def __init__(self, rules: Iterable[tuple[str, str]] = ()):
        self.rules: list[tuple[re.Pattern, str]] = []
        for pattern, replacement in rules:
            self.add_mapping(pattern, replacement)

    def add_mapping(self, pattern: str, replacement: str) -> None:
        try:
            self.rules.append((re.compile(pattern), replacement))
        except re.error as exc:
            raise ConfigError(f"policies.forward: bad pattern {pattern!r}: {exc}") from None

    def rewrite(self, address: str) -> list[str]:
        for pattern, replacement in self.rules:
            new, n = pattern.subn(replacement, address, count=1)
            if n:
                return [a.strip() for a in new.split(",") if a.strip()]
        return [address]

    def apply(self, env, headers):
        replace_recipients(env, self.rewrite)


def replace_recipients(env, rewrite) -> None:
    """Each recipient replaced by ``rewrite(address)`` (a list): a new
    address keeps the original as its ORCPT (RFC 3461), an address that
    could not be one (a rule yielding garbage) is the original again,
    duplicates go (domain compared without case)."""
    seen: set[str] = set()
    out: list[Recipient] = []
    for rcpt in env.recipients:
        for address in rewrite(rcpt.address):
            if any(c in address for c in "\r\n\x00<> ") or len(address) > 254:
                address = rcpt.address
            key = _address_key(address)
            if key not in seen:
                seen.add(key)
                out.append(Recipient(address, rcpt.state, rcpt.reply, rcpt.notify,
                                     rcpt.orcpt or (f"rfc822;{rcpt.address}"
                                                    if address != rcpt.address else "")))
    env.recipients = out


def recipient_domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


class RecipientDomainSplit(Policy):
    """One message per recipient domain, so each part goes to one MX
    (the tutorial's Step 3). Parts keep the order of first appearance;
    the watcher names them ``<qid>-1``, ``<qid>-2``..."""

    name = stage = "split"

    def apply(self, env, headers):
        groups: dict[str, list[Recipient]] = {}
        for rcpt in env.recipients:
            groups.setdefault(recipient_domain(rcpt.address), []).append(rcpt)
        if len(groups) <= 1:
            return None
        parts = []
        for i, rcpts in enumerate(groups.values(), 1):
            part = env.copy()
            part.recipients = [Recipient(r.address, r.state, r.reply, r.notify, r.orcpt)
                               for r in rcpts]
            part.queue_id = f"{env.queue_id}-{i}"
            parts.append(part)
        return parts


# -- running a pipeline ---------------------------------------------------

def run_stages(env: Envelope, headers: HeaderBlock, stages: list[list[Policy]]
               ) -> tuple[list[tuple[Envelope, HeaderBlock]], bool]:
    """Apply the policies of every stage, in order, to one message in
    memory (pure). Returns the resulting messages, and whether any policy
    changed anything (when not, the file can move on as it is).

    The result is what passing the stages one at a time gives: a stage
    runs the policies not yet recorded in ``Policies:`` when it starts, and
    records them when they changed something. A split ends its stage; each
    part (named ``<qid>-1``...) records the stage's policies and goes on
    through the later stages with its own copy of the headers.
    """
    out: list[tuple[Envelope, HeaderBlock]] = []
    changed = _run_stages(env, headers, stages, out)
    return out, changed


def _run_stages(env: Envelope, headers: HeaderBlock, stages: list[list[Policy]],
                out: list[tuple[Envelope, HeaderBlock]]) -> bool:
    changed = False
    for i, pols in enumerate(stages):
        done = applied(env)
        todo = [p for p in pols if p.name not in done]
        if not todo:
            continue
        fields, envelope = list(headers.fields), _state(env)
        parts = None
        for p in todo:
            parts = p.apply(env, headers)
            if parts:
                break
        if parts:
            for part in parts:
                for p in todo:
                    mark_applied(part, p.name)
                _run_stages(part, headers.copy(), stages[i + 1:], out)
            return True
        if headers.fields != fields or _state(env) != envelope:
            for p in todo:
                mark_applied(env, p.name)
            changed = True
    out.append((env, headers))
    return changed


_ENVELOPE_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(Envelope)
                                         if f.name not in ("recipients", "history", "extra")))


def _state(env: Envelope) -> tuple:
    """Everything a policy may change in an envelope, to compare (cheaper
    than serialising it)."""
    return (_ENVELOPE_FIELDS(env),
            tuple((r.address, r.state, r.reply, r.notify, r.orcpt) for r in env.recipients),
            tuple(env.history), tuple(env.extra))


# -- configuration --------------------------------------------------------

def _header_policies(cfg: Config) -> list[Policy]:
    p = cfg.policies
    out: list[Policy] = []
    if p.add_received:
        out.append(AddReceivedHeader(cfg.server.hostname, p.private_submission))
    if p.add_date:
        out.append(AddDateHeader())
    if p.add_message_id:
        out.append(AddMessageIdHeader(cfg.server.hostname))
    if p.remove_bcc:
        out.append(RemoveBccHeader())
    return out


class Aliases(Policy):
    """Expand local recipients through the aliases table
    (:mod:`msa.cleanup.aliases`); each new address keeps the original as
    its ORCPT (RFC 3461), duplicates go."""

    name = stage = "aliases"

    def __init__(self, table):
        self.table = table

    def apply(self, env, headers):
        replace_recipients(env, self.table.expand)


def _forward_policies(cfg: Config) -> list[Policy]:
    """The forward stage: aliases (when a file or [server] admin is set),
    then the forward rules."""
    from msa.cleanup import aliases
    out: list[Policy] = []
    if cfg.policies.aliases or cfg.server.admin:
        table = aliases.load(cfg.policies.aliases)
        out.append(Aliases(aliases.AliasTable(table, cfg.domain, cfg.server.admin)))
    if cfg.policies.forward:
        out.append(Forward(_rules(cfg)))
    return out


def stage_policies(name: str, cfg: Config) -> list[Policy]:
    """The policies a stage name in ``[policies].stages`` runs."""
    host = cfg.server.hostname
    table = {
        "headers": lambda: _header_policies(cfg),
        "forward": lambda: _forward_policies(cfg),
        "split": lambda: [RecipientDomainSplit()],
        "date": lambda: [AddDateHeader()],
        "message-id": lambda: [AddMessageIdHeader(host)],
        "received": lambda: [AddReceivedHeader(host, cfg.policies.private_submission)],
        "remove-bcc": lambda: [RemoveBccHeader()],
    }
    if name not in table:
        raise ConfigError(f"policies.stages: unknown stage {name!r} "
                          f"(known: {', '.join(sorted(table))})")
    return table[name]()


def _rules(cfg: Config) -> list[tuple[str, str]]:
    for rule in cfg.policies.forward:
        if not (isinstance(rule, list) and len(rule) == 2
                and all(isinstance(x, str) for x in rule)):
            raise ConfigError(f"policies.forward: each rule is [pattern, replacement], got {rule!r}")
    return [tuple(r) for r in cfg.policies.forward]


def check_stage(name: str, policies: list[Policy]) -> None:
    """A split must be the last policy of its stage: its parts leave the
    stage at once."""
    for p in policies[:-1]:
        if isinstance(p, RecipientDomainSplit):
            raise ConfigError(f"stage {name}: RecipientDomainSplit must be last in its stage")


def pipeline(cfg: Config) -> list[tuple[str, list[Policy]]]:
    """(stage directory, policies) in the order a message passes them."""
    out = []
    for name in cfg.policies.stages:
        policies = stage_policies(name, cfg)
        check_stage(name, policies)
        out.append((f"policy-{name}", policies))
    return out

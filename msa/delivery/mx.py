"""Where mail for a domain goes: MX lookup with dnspython's async resolver.

Decisions (RFC 5321 §5.1 unless noted):

- MX records are tried in order of preference; hosts of equal preference
  in random order (load spreading, §5.1 "SHOULD randomize").
- No MX records (NODATA) → the domain itself is the one, implicit, MX
  (``implicit=True``); its A/AAAA records are its addresses.
- A single MX ``0 .`` is a null MX (RFC 7505 §3): the domain accepts no
  mail; permanent ``556 5.1.10``. A ``.`` mixed with real MX records is
  ignored (the domain is misconfigured, the real hosts still work).
- NXDOMAIN → permanent ``550 5.1.2``; SERVFAIL, timeouts, no answer from
  any server → transient ``451 4.4.3`` (RFC 3463: directory server failure).
- Hosts the administrator configured (``force_mx``, smarthost) never turn a
  DNS failure into a bounce: every failure to resolve them is transient
  (dma#30: a smarthost whose name did not resolve bounced all mail).
- IP literals (``127.0.0.1``, ``[::1]``, a ``[192.0.2.1]`` domain literal)
  need no lookup. A configured host that DNS does not know is also looked
  up with the system resolver (``/etc/hosts``: ``localhost``).

:func:`classify_dns_error` is the one place that decides what a dnspython
exception means (chasquid's habit); everything else maps its outcome to an
``msa.protocol.errors`` exception carrying the reply code and enhanced status.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import random
import socket
from dataclasses import dataclass
from typing import Iterable

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from msa.protocol.errors import MsaError, PermanentError, TransientError


@dataclass(frozen=True)
class MxHost:
    """One host to try: a name (or IP literal) and the port to connect to."""

    name: str
    port: int = 25
    preference: int = 0
    implicit: bool = False
    configured: bool = False  # force_mx or smarthost: DNS failures defer

    def __str__(self) -> str:
        return self.name


class DnsOutcome(enum.Enum):
    NODATA = "nodata"        # the name exists, no record of that type
    NXDOMAIN = "nxdomain"    # the name does not exist
    TRANSIENT = "transient"  # SERVFAIL, timeout, network: try later
    PERMANENT = "permanent"  # a name that cannot be looked up at all


def classify_dns_error(exc: BaseException) -> DnsOutcome:
    """What a resolver exception means for delivery (the one place)."""
    if isinstance(exc, dns.resolver.NoAnswer):
        return DnsOutcome.NODATA
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return DnsOutcome.NXDOMAIN
    if isinstance(exc, (dns.resolver.YXDOMAIN, dns.name.NameTooLong,
                        dns.name.EmptyLabel, dns.name.LabelTooLong,
                        dns.name.BadEscape, UnicodeError)):
        return DnsOutcome.PERMANENT
    # NoNameservers (SERVFAIL/REFUSED everywhere), LifetimeTimeout, network
    # errors and anything unforeseen: a later attempt may succeed.
    return DnsOutcome.TRANSIENT


def dns_failure(exc: BaseException, name: str, rtype: str,
                configured: bool = False) -> MsaError:
    """The msa error for a failed lookup of ``name``/``rtype``."""
    outcome = classify_dns_error(exc)
    if configured or outcome is DnsOutcome.TRANSIENT:
        return TransientError(f"DNS lookup of {name} {rtype} failed: {_why(exc)}",
                              451, "4.4.3")
    if outcome is DnsOutcome.NXDOMAIN:
        return PermanentError(f"Domain {name} not found (NXDOMAIN)", 550, "5.1.2")
    if outcome is DnsOutcome.NODATA:
        return PermanentError(f"No {rtype} record for {name}", 550, "5.4.4")
    return PermanentError(f"Bad domain name {name}: {_why(exc)}", 550, "5.1.2")


def _why(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.NoNameservers):
        return "SERVFAIL"
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    return type(exc).__name__


NULL_MX = PermanentError("Domain does not accept mail (null MX, RFC 7505)", 556, "5.1.10")


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random) -> list[tuple[int, str]]:
    """MX records by preference, random among equals; null MX raises.

    ``records`` are (preference, target) with the target's final dot
    removed; the null MX target is ``""``.
    """
    records = list(records)
    real = [(p, t) for p, t in records if t not in ("", ".")]
    if not real:
        if records:
            raise NULL_MX
        return []
    rng.shuffle(real)
    real.sort(key=lambda r: r[0])  # stable: shuffled order kept among equals
    return real


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port``, ``1.2.3.4:port`` → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"bad port in {text!r} (1 to 65535)")
    if not host:
        raise ValueError(f"no host in {text!r}")
    return host, int(port) if port else default_port


@functools.lru_cache(maxsize=1024)
def ip_literal(host: str) -> str | None:
    """The address if ``host`` is an IP literal (``[IPv6:...]`` allowed).
    Cached: asked for every host of every message."""
    h = host.strip("[]")
    if h[:5].lower() == "ipv6:":
        h = h[5:]
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return None


DNS_CACHE_SIZE = 10000  # answers (an MX set or an address set each)


def make_resolver(nameservers: Iterable[str] = (), timeout: float = 10.0
                  ) -> dns.asyncresolver.Resolver:
    """A dnspython async resolver: the system's, or the given servers
    (``"127.0.0.1:15353"``, ``"[::1]:53"``)."""
    nameservers = list(nameservers)
    r = dns.asyncresolver.Resolver(configure=not nameservers)
    if nameservers:
        r.nameservers = [dns.nameserver.Do53Nameserver(*parse_hostport(ns, 53))
                         for ns in nameservers]
    r.lifetime = timeout
    r.timeout = min(timeout, 5.0)
    # Answers kept for their TTL (RFC 1035 §3.2.1; RFC 2308 for NXDOMAIN
    # and NODATA): messages to one domain cost no MX/A/AAAA round trips
    # each. Failures (SERVFAIL, timeouts) are not cached.
    r.cache = dns.resolver.LRUCache(DNS_CACHE_SIZE)
    return r


class MxResolver:
    """MX and address lookups. A test may pass any object with the same two
    coroutines (``mx``, ``addresses``) to the relay."""

    def __init__(self, nameservers: Iterable[str] = (), timeout: float = 10.0,
                 rng: random.Random | None = None,
                 resolver: dns.asyncresolver.Resolver | None = None):
        self.resolver = resolver or make_resolver(nameservers, timeout)
        self.rng = rng or random.Random()

    async def mx(self, domain: str, port: int = 25) -> list[MxHost]:
        """The hosts to try for ``domain``, in order."""
        literal = ip_literal(domain) if domain.startswith("[") else None
        if literal:
            return [MxHost(literal, port, implicit=True)]
        try:
            answer = await self.resolver.resolve(domain, "MX", search=False)
        except Exception as exc:  # noqa: BLE001 - classified below
            outcome = classify_dns_error(exc)
            if outcome is DnsOutcome.NODATA:
                return [MxHost(domain, port, implicit=True)]
            raise dns_failure(exc, domain, "MX") from None
        records = [(r.preference, r.exchange.to_text(omit_final_dot=True))
                   for r in answer]
        ordered = order_mx(records, self.rng)
        if not ordered:
            return [MxHost(domain, port, implicit=True)]
        return [MxHost(t, port, p) for p, t in ordered]

    async def addresses(self, host: MxHost) -> list[str]:
        """IPv4 then IPv6 addresses of ``host``; raises when it has none."""
        literal = ip_literal(host.name)
        if literal:
            return [literal]
        results = await asyncio.gather(
            self._lookup(host.name, "A"), self._lookup(host.name, "AAAA"),
            return_exceptions=True)
        addrs = [a for r in results if isinstance(r, list) for a in r]
        if not addrs and host.configured:
            addrs = await _native_addresses(host.name)
        if addrs:
            return addrs
        errors = [r for r in results if isinstance(r, BaseException)]
        transient = [e for e in errors
                     if classify_dns_error(e) is DnsOutcome.TRANSIENT]
        exc = (transient or errors or [dns.resolver.NoAnswer()])[0]
        if isinstance(exc, dns.resolver.NoAnswer) and host.implicit:
            # RFC 5321 §5.1: no MX and no address: no route to the domain.
            raise PermanentError(
                f"Domain {host.name} has no MX and no address", 550, "5.1.2")
        raise dns_failure(exc, host.name, "A/AAAA", host.configured)

    async def _lookup(self, name: str, rtype: str) -> list[str]:
        answer = await self.resolver.resolve(name, rtype, search=False)
        return [r.address for r in answer]


async def _native_addresses(name: str) -> list[str]:
    """The system's lookup (``/etc/hosts``, then DNS), for hosts named in
    the config such as ``localhost`` (Postfix ``smtp_host_lookup=native``)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            name, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    out: list[str] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for fam, _, _, _, sockaddr in infos:
            if fam == family and sockaddr[0] not in out:
                out.append(sockaddr[0])
    return out


def combine_host_errors(errors: list[MsaError], domain: str) -> MsaError:
    """One error for a domain none of whose hosts could be resolved or
    reached: transient if any host failed transiently (another attempt may
    reach it; the last such, as Postfix reports), else the first permanent
    one."""
    for e in reversed(errors):
        if isinstance(e, TransientError):
            return e
    if errors:
        return errors[0]
    return TransientError(f"No usable host for {domain}", 451, "4.4.4")

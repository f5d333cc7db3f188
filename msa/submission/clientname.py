"""A client's name: its forward-confirmed reverse DNS, else ``unknown``.

What the logs (``name[ip]``) and our ``Received:`` field (``from HELO
(name [ip])``) show as the client's name must be one the client cannot
choose: not the HELO, and not a PTR record alone (whoever controls the
address's reverse zone writes any name there). So, as Postfix's smtpd:
PTR of the address, then A/AAAA of each name found (at most
:data:`MAX_NAMES`); the first name whose addresses include the client's
is its name. Anything else (no PTR, no match, a timeout, a DNS error) is
``unknown``; the lookup never fails a session.

Lookups go through the configured resolver (``[relay] resolver``; the
tests point it at their loopback DNS server), are bounded by
``[edge] client_dns_timeout`` as a whole, and are cached (both outcomes,
:data:`CACHE_SECONDS`, at most :data:`CACHE_SIZE` addresses): a client
that connects for every message costs one lookup per few minutes. A
name is checked to be a host name (letters, digits, ``-``, ``.``) before
it is used: a PTR can hold any bytes.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import re
import time
from typing import Callable

import dns.asyncresolver
import dns.reversename

MAX_NAMES = 3
CACHE_SIZE = 4096
CACHE_SECONDS = 300.0
UNKNOWN = "unknown"
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def plausible_hostname(name: str) -> bool:
    return bool(_HOSTNAME.match(name))


class ClientNames:
    """``await names.lookup(ip)`` → the client's name or ``unknown``."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, timeout: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        self.resolver, self.timeout, self.clock = resolver, timeout, clock
        self.cache: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()

    async def lookup(self, ip: str) -> str:
        now = self.clock()
        hit = self.cache.get(ip)
        if hit is not None and hit[1] > now:
            self.cache.move_to_end(ip)
            return hit[0]
        try:
            name = await asyncio.wait_for(self._confirmed(ip), self.timeout)
        except Exception:  # noqa: BLE001 - timeouts and DNS errors alike: unknown
            name = UNKNOWN
        self.cache[ip] = (name, now + CACHE_SECONDS)
        self.cache.move_to_end(ip)
        while len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        return name

    async def _confirmed(self, ip: str) -> str:
        addr = ipaddress.ip_address(ip)
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        answer = await self.resolver.resolve(dns.reversename.from_address(str(addr)), "PTR",
                                             search=False)
        names = [r.target.to_text(omit_final_dot=True).lower() for r in answer][:MAX_NAMES]
        rtype = "AAAA" if addr.version == 6 else "A"
        for name in names:
            if not plausible_hostname(name):
                continue
            try:
                forward = await self.resolver.resolve(name, rtype, search=False)
            except Exception:  # noqa: BLE001 - this name does not confirm
                continue
            if any(ipaddress.ip_address(r.address) == addr for r in forward):
                return name
        return UNKNOWN

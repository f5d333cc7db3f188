"""``msa route ADDRESS...`` and ``sendmail -bv ADDRESS...``: where mail to
each address would go, without sending anything or looking up DNS.

For each address: the recipients the policies make of it (aliases,
forward rules, the domain split: the very policies of ``[policies]
stages``, run on an empty message), then for each of them the route the
relay would take: the smarthost, a ``force_mx`` host, or the domain's MX,
with the TLS policy that applies.
"""

from __future__ import annotations

import argparse
import sys

from msa import config, sysexits
from msa.admin.common import args_and_config
from msa.cleanup import policies
from msa.message.headerblock import HeaderBlock
from msa.message.headers import normalize_address
from msa.message.queuefile import Envelope, utc_iso
from msa.protocol.errors import AddressError

PROG = "msa route"


def expand(cfg: config.Config, address: str) -> list[str]:
    """The recipients the policies make of ``address``."""
    env = Envelope(sender="", queue_id="ROUTE", arrival=utc_iso(0), size="0")
    env.add_recipient(normalize_address(address, cfg.domain))
    stages = [pols for _, pols in policies.pipeline(cfg)]
    results, _ = policies.run_stages(env, HeaderBlock.parse(b"\r\n"), stages)
    return [r.address for e, _ in results for r in e.recipients]


def route_of(cfg: config.Config, address: str) -> str:
    """How the relay would send to ``address`` (pure)."""
    rc = cfg.relay
    domain = address.rpartition("@")[2].lower()
    if rc.smarthost:
        return f"smarthost {rc.smarthost}, tls={rc.smarthost_tls}"
    tls = "required" if (rc.tls == "required" or domain in
                         [d.lower() for d in rc.tls_required_domains]) else rc.tls
    forced = {d.lower(): v for d, v in rc.force_mx.items()}.get(domain)
    if forced:
        return f"host {forced} (force_mx), tls={tls}"
    return f"MX of {domain} (port {rc.port}), tls={tls}"


def describe(cfg: config.Config, addresses: list[str], out) -> None:
    for address in addresses:
        finals = expand(cfg, address)
        out.write(f"{address} -> {', '.join(finals)}\n")
        for final in finals:
            out.write(f"    {final}: {route_of(cfg, final)}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("-C", "--config", help="config file (default $MSA_CONFIG, /etc/msa/msa.toml)")
    p.add_argument("addresses", nargs="+", metavar="ADDRESS")
    loaded = args_and_config(p, argv, PROG)
    if isinstance(loaded, int):
        return loaded
    args, cfg = loaded
    try:
        describe(cfg, args.addresses, sys.stdout)
    except config.ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return sysexits.EX_CONFIG
    except AddressError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return sysexits.EX_USAGE
    return sysexits.EX_OK

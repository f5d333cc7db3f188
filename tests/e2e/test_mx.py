"""MX resolution (msa.delivery.mx) against real DNS servers on loopback: dnsmasq for
the ordinary cases, a dnspython server for SERVFAIL and timeouts."""

from __future__ import annotations

import random

import dns.resolver
import pytest

from msa.delivery import mx
from msa.protocol.errors import PermanentError, TransientError
from tests.relay_support import DnsServer, run_async, start_dnsmasq

ZONE = """
$TTL 60
@            IN SOA ns.test. root.test. 1 60 60 60 60
example      IN MX 10 mx1.example
example      IN MX 20 mx2.example
mx1.example  IN A 127.0.0.2
mx2.example  IN A 127.0.0.3
mx2.example  IN AAAA ::1
eq           IN MX 10 a.eq
eq           IN MX 10 b.eq
eq           IN MX 10 c.eq
eq           IN MX 5 first.eq
a.eq         IN A 127.0.0.4
b.eq         IN A 127.0.0.5
c.eq         IN A 127.0.0.6
first.eq     IN A 127.0.0.7
amx          IN A 127.0.0.8
nullmx       IN MX 0 .
mixednull    IN MX 0 .
mixednull    IN MX 10 mx1.example
noaddr       IN TXT "nothing"
dangling     IN MX 10 missing.dangling
dangling     IN MX 20 mx1.example
broken       IN MX 10 sf.broken
sf.broken    IN A 127.0.0.9
"""


@pytest.fixture(scope="module")
def dnsserver():
    server = DnsServer(ZONE)
    server.servfail.update({"servfail.test", "sf.broken.test"})
    server.silent.add("timeout.test")
    yield server
    server.stop()


def resolver(server, timeout=2.0, seed=1):
    return mx.MxResolver([server.address], timeout=timeout, rng=random.Random(seed))


# -- pure parts --------------------------------------------------------------

def test_order_mx_by_preference_random_among_equals():
    recs = [(10, "a"), (10, "b"), (10, "c"), (5, "z"), (20, "y")]
    orders = {tuple(t for _, t in mx.order_mx(recs, random.Random(s))) for s in range(40)}
    for o in orders:
        assert o[0] == "z" and o[-1] == "y"
    assert len(orders) > 1  # equals do get shuffled


def test_null_mx_alone_is_permanent_5_1_10():
    with pytest.raises(PermanentError) as e:
        mx.order_mx([(0, "")], random.Random())
    assert (e.value.code, e.value.status) == (556, "5.1.10")


def test_null_mx_mixed_with_real_ones_is_ignored():
    assert mx.order_mx([(0, ""), (10, "mx")], random.Random()) == [(10, "mx")]


@pytest.mark.parametrize("text,want", [
    ("mx.test", ("mx.test", 25)), ("mx.test:2525", ("mx.test", 2525)),
    ("127.0.0.1:26", ("127.0.0.1", 26)), ("[::1]:27", ("::1", 27)), ("[::1]", ("::1", 25)),
    ("::1", ("::1", 25)),
])
def test_parse_hostport(text, want):
    assert mx.parse_hostport(text, 25) == want


def test_classify_dns_error():
    C = mx.DnsOutcome
    assert mx.classify_dns_error(dns.resolver.NoAnswer()) is C.NODATA
    assert mx.classify_dns_error(dns.resolver.NXDOMAIN()) is C.NXDOMAIN
    assert mx.classify_dns_error(dns.resolver.NoNameservers()) is C.TRANSIENT
    assert mx.classify_dns_error(dns.resolver.LifetimeTimeout(timeout=1, errors=[])) is C.TRANSIENT
    assert mx.classify_dns_error(OSError("network down")) is C.TRANSIENT
    assert mx.classify_dns_error(dns.resolver.YXDOMAIN()) is C.PERMANENT


def test_configured_hosts_never_fail_permanently():
    e = mx.dns_failure(dns.resolver.NXDOMAIN(), "smarthost.test", "A", configured=True)
    assert isinstance(e, TransientError) and e.status == "4.4.3"


# -- against the dnspython server ----------------------------------------------

def test_mx_in_preference_order(dnsserver):
    hosts = run_async(resolver(dnsserver).mx("example.test", 2525))
    assert [(h.name, h.port, h.preference) for h in hosts] == [
        ("mx1.example.test", 2525, 10), ("mx2.example.test", 2525, 20)]


def test_equal_preference_shuffled(dnsserver):
    seen = set()
    for seed in range(12):
        hosts = run_async(resolver(dnsserver, seed=seed).mx("eq.test"))
        names = [h.name for h in hosts]
        assert names[0] == "first.eq.test"
        seen.add(tuple(names))
    assert len(seen) > 1


def test_implicit_mx_when_no_mx_record(dnsserver):
    r = resolver(dnsserver)
    hosts = run_async(r.mx("amx.test"))
    assert [(h.name, h.implicit) for h in hosts] == [("amx.test", True)]
    assert run_async(r.addresses(hosts[0])) == ["127.0.0.8"]


def test_implicit_mx_without_address_is_permanent(dnsserver):
    r = resolver(dnsserver)
    hosts = run_async(r.mx("noaddr.test"))
    with pytest.raises(PermanentError) as e:
        run_async(r.addresses(hosts[0]))
    assert e.value.status == "5.1.2"


def test_addresses_ipv4_first_then_ipv6(dnsserver):
    r = resolver(dnsserver)
    assert run_async(r.addresses(mx.MxHost("mx2.example.test"))) == ["127.0.0.3", "::1"]


def test_null_mx(dnsserver):
    with pytest.raises(PermanentError) as e:
        run_async(resolver(dnsserver).mx("nullmx.test"))
    assert e.value.reply().startswith("556 5.1.10")


def test_null_mx_mixed(dnsserver):
    hosts = run_async(resolver(dnsserver).mx("mixednull.test"))
    assert [h.name for h in hosts] == ["mx1.example.test"]


def test_nxdomain_is_permanent_5_1_2(dnsserver):
    with pytest.raises(PermanentError) as e:
        run_async(resolver(dnsserver).mx("nx.test"))
    assert (e.value.code, e.value.status) == (550, "5.1.2")


def test_servfail_is_transient_4_4_3(dnsserver):
    with pytest.raises(TransientError) as e:
        run_async(resolver(dnsserver).mx("servfail.test"))
    assert e.value.status == "4.4.3"
    assert "SERVFAIL" in str(e.value)


def test_timeout_is_transient(dnsserver):
    with pytest.raises(TransientError) as e:
        run_async(resolver(dnsserver, timeout=0.5).mx("timeout.test"))
    assert e.value.status == "4.4.3"


def test_servfail_on_mx_target_address_is_transient(dnsserver):
    r = resolver(dnsserver)
    hosts = run_async(r.mx("broken.test"))
    with pytest.raises(TransientError):
        run_async(r.addresses(hosts[0]))


def test_dangling_mx_target_is_permanent_for_that_host(dnsserver):
    r = resolver(dnsserver)
    hosts = run_async(r.mx("dangling.test"))
    with pytest.raises(PermanentError):
        run_async(r.addresses(hosts[0]))
    assert run_async(r.addresses(hosts[1])) == ["127.0.0.2"]


def test_ip_literals_need_no_dns(dnsserver):
    r = resolver(dnsserver)
    hosts = run_async(r.mx("[127.0.0.9]", 26))
    assert [(h.name, h.port) for h in hosts] == [("127.0.0.9", 26)]
    assert run_async(r.addresses(mx.MxHost("[IPv6:::1]"))) == ["::1"]


# -- against dnsmasq --------------------------------------------------------------

def test_against_dnsmasq(tmp_path):
    proc, port = start_dnsmasq(tmp_path, [
        "--mx-host=example.test,mx1.example.test,10",
        "--host-record=mx1.example.test,127.0.0.2",
        "--mx-host=nullmx.test,.,0", "--host-record=amx.test,127.0.0.3"])
    try:
        r = mx.MxResolver([f"127.0.0.1:{port}"], timeout=2)
        hosts = run_async(r.mx("example.test"))
        assert [h.name for h in hosts] == ["mx1.example.test"]
        assert run_async(r.addresses(hosts[0])) == ["127.0.0.2"]
        amx = run_async(r.mx("amx.test"))
        assert amx[0].implicit and run_async(r.addresses(amx[0])) == ["127.0.0.3"]
        with pytest.raises(PermanentError) as e:
            run_async(r.mx("nullmx.test"))
        assert e.value.status == "5.1.10"
        with pytest.raises(PermanentError) as e:
            run_async(r.mx("nx.test"))
        assert e.value.status == "5.1.2"
    finally:
        proc.stop()


def test_answers_are_cached_for_their_ttl_failures_are_not(dnsserver):
    r = resolver(dnsserver)
    before = len(dnsserver.queries)  # the server is shared by the module

    async def go():
        for _ in range(3):
            hosts = await r.mx("example.test")
            await r.addresses(hosts[0])
            with pytest.raises(TransientError):
                await r.mx("servfail.test")
    run_async(go())
    asked = dnsserver.queries[before:]
    assert asked.count(("example.test", "MX")) == 1
    assert asked.count(("mx1.example.test", "A")) == 1
    assert asked.count(("servfail.test", "MX")) >= 3

"""A client's name is its forward-confirmed reverse DNS, through the
configured resolver (the real dnsmasq on loopback), else ``unknown``; never
its HELO. Against ``msa daemon``: the log's ``name[ip]`` and the
``Received:`` field's ``from HELO (name [ip])`` for a client whose PTR
confirms, one whose PTR names a host with another address, and one with
no PTR at all; plus the lookup itself (cache, timeout) in-process."""

from __future__ import annotations

import asyncio
import smtplib
import ssl

from msa import config
from msa.delivery.mx import make_resolver
from msa.store import open_spool
from msa.submission.clientname import ClientNames, plausible_hostname
from tests import support
from tests.daemon_support import add_user, load_all, start_daemon, write_daemon_config
from tests.relay_support import start_dnsmasq

RECORDS = ["--host-record=good.test,127.0.0.32",
           "--ptr-record=33.0.0.127.in-addr.arpa,liar.test",
           "--host-record=liar.test,127.0.0.99"]


def _send(port: int, ca, source: str, n: int) -> None:
    ctx = ssl.create_default_context(cafile=str(ca.ca_pem))
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as s:
        s.ehlo("[10.9.8.7]")            # a HELO that looks like someone else
        assert s.docmd("XNAME")[0] == 500
        s.starttls(context=ctx)
        s.ehlo("[10.9.8.7]")
        s.login("alice", "alice-pw")
        s.sendmail("alice@example.org", ["bob@example.test"],
                   f"From: alice@example.org\r\nSubject: {n}\r\n\r\nhi\r\n".encode())


def test_names_in_log_and_received(tmp_path, ca):
    dns_proc, dns_port = start_dnsmasq(tmp_path, RECORDS)
    ports = support.free_port(), support.free_port()
    log = tmp_path / "msa.log"
    path = write_daemon_config(tmp_path, ca, *ports, edge="client_dns = true\n",
                               extra=f'log = "{log}"\nprocesses = false\n')
    path.write_text(path.read_text().replace(
        "[relay]\n", f'[relay]\nresolver = ["127.0.0.1:{dns_port}"]\n', 1))
    add_user(tmp_path / "passwd", "alice", "alice-pw", ["alice@example.org"])
    sp = open_spool(config.load(str(path)))
    proc = start_daemon(path)
    try:
        support.wait_port(ports[0])
        for n, source in enumerate(["127.0.0.32", "127.0.0.33", "127.0.0.34"]):
            _send(ports[0], ca, source, n)
        support.wait_for(lambda: len(load_all(sp, "active")) + len(list(
            sp.deferred_stages())) >= 1 and log.read_text().count("client=") == 3,
            what="three messages queued")
    finally:
        proc.stop()
        dns_proc.stop()
    text = log.read_text()
    assert "NOQUEUE: protocol error: XNAME from good.test[127.0.0.32]" in text
    assert "NOQUEUE: protocol error: XNAME from unknown[127.0.0.33]" in text   # liar
    assert "NOQUEUE: protocol error: XNAME from unknown[127.0.0.34]" in text   # no PTR
    assert "[10.9.8.7][" not in text
    received = {}
    for stage in ["active", *sp.deferred_stages()]:
        for env, message in load_all(sp, stage).values():
            received[env.client_address] = message.split(b"\r\n", 1)[0].decode()
    assert received["127.0.0.32"].startswith(
        "Received: from [10.9.8.7] (good.test [127.0.0.32])"), received
    assert received["127.0.0.33"].startswith("Received: from [10.9.8.7] (unknown [127.0.0.33])")
    assert received["127.0.0.34"].startswith("Received: from [10.9.8.7] (unknown [127.0.0.34])")


def test_lookup_is_cached_and_bounded(tmp_path):
    dns_proc, dns_port = start_dnsmasq(tmp_path, RECORDS)
    clock = support.FakeClock(0.0)

    async def main():
        names = ClientNames(make_resolver([f"127.0.0.1:{dns_port}"], 2.0), 2.0, clock=clock)
        assert await names.lookup("127.0.0.32") == "good.test"
        assert await names.lookup("::ffff:127.0.0.32") == "good.test"
        assert await names.lookup("127.0.0.33") == "unknown"
        dns_proc.stop()                   # no DNS server any more
        assert await names.lookup("127.0.0.32") == "good.test"     # cached
        clock.advance(301)
        assert await names.lookup("127.0.0.32") == "unknown"       # expired: times out
        # A server that never answers: bounded by the timeout.
        silent = ClientNames(make_resolver([f"127.0.0.1:{support.free_port()}"], 0.5), 0.5)
        assert await silent.lookup("127.0.0.32") == "unknown"
    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        dns_proc.stop()


def test_a_ptr_is_used_only_when_it_is_a_host_name():
    assert plausible_hostname("mail.example.org") and plausible_hostname("a-b.c9")
    for bad in ("", "a..b", "-a.b", "a b", "a\nb", "a_b", "x" * 64 + ".org", "é.org", "a.b."):
        assert not plausible_hostname(bad), bad

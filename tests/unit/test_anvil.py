"""msa.submission.anvil: the per-client counters (pure, with a clock the
test moves), their wire protocol over a real socket pair, and the
per-client turn for password checks."""

from __future__ import annotations

import asyncio

import pytest

from msa.submission.anvil import (
    Anvil,
    AnvilClient,
    AnvilServer,
    HashGate,
    LocalAnvil,
    client_key,
)
from tests.support import FakeClock


def test_client_key():
    assert client_key("192.0.2.7") == "192.0.2.7"
    # One IPv6 host may use its whole /64: counted as one client.
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("") == "unknown"
    assert " " not in client_key("not an address at all")


def test_connections_open_and_close_and_rate_window():
    clock = FakeClock(1000.0)
    a = Anvil(clock)
    assert a.connect("c", 60) == (1, 1)
    assert a.connect("c", 60) == (2, 2)
    assert a.connect("other", 60) == (1, 1)
    a.disconnect("c")
    assert a.connect("c", 60) == (2, 3)        # open again 2; 3 opened this window
    clock.advance(59.9)
    assert a.connect("c", 60) == (3, 4)
    clock.advance(0.1)                          # the window started at 1000 ends at 1060
    assert a.connect("c", 60) == (4, 1)
    for _ in range(4):
        a.disconnect("c")
    a.disconnect("c")                           # one too many: ignored
    assert a.connect("c", 60)[0] == 1


def test_auth_failures_count_in_their_window():
    clock = FakeClock(0.0)
    a = Anvil(clock)
    assert a.auth_failures("c", 600) == 0
    assert [a.auth_failed("c", 600) for _ in range(3)] == [1, 2, 3]
    clock.advance(599)
    assert a.auth_failures("c", 600) == 3
    assert a.auth_failures("d", 600) == 0
    clock.advance(1)
    assert a.auth_failures("c", 600) == 0
    assert a.auth_failed("c", 600) == 1


def test_a_dead_owner_s_connections_are_forgotten():
    a = Anvil(FakeClock(0.0))
    one, two = object(), object()
    a.connect("c", 60, one)
    a.connect("c", 60, one)
    a.connect("c", 60, two)
    a.disconnect("c", two)
    a.disconnect("c", two)          # two had only one open: not taken off one's
    assert a.clients["c"].open == 2
    assert a.forget(one) == 2
    assert a.clients["c"].open == 0
    a.disconnect("c", one)          # after forget: nothing to take off
    assert a.clients["c"].open == 0


def test_sweep_drops_idle_clients_only():
    clock = FakeClock(0.0)
    a = Anvil(clock)
    a.connect("open", 60)
    a.connect("closed", 60)
    a.disconnect("closed")
    a.auth_failed("guesser", 600)
    clock.advance(61)
    a.sweep()
    assert set(a.clients) == {"open", "guesser"}
    clock.advance(600)
    a.sweep()
    assert set(a.clients) == {"open"}


def test_server_answers_and_refuses_bad_requests():
    srv = AnvilServer(Anvil(FakeClock(0.0)))
    me = object()
    assert srv.answer(b"C 192.0.2.1 60\n", me) == b"1 1\n"
    assert srv.answer(b"C 192.0.2.1 60\n", me) == b"2 2\n"
    assert srv.answer(b"D 192.0.2.1\n", me) is None
    assert srv.answer(b"F 192.0.2.1 600\n", me) == b"1\n"
    assert srv.answer(b"A 192.0.2.1 600\n", me) == b"1\n"
    for bad in (b"X 192.0.2.1 60\n", b"C\n", b"C 192.0.2.1\n", b"C a b c d\n",
                b"C " + b"x" * 65 + b" 60\n", b"C k sixty\n", b"\xff 1 2\n", b"D k 60 1\n"):
        with pytest.raises(ValueError):
            srv.answer(bad, me)


def test_client_and_server_over_a_socket_pair():
    async def main():
        srv = AnvilServer(Anvil(FakeClock(0.0)))
        clients = [AnvilClient(srv.pair()), AnvilClient(srv.pair())]
        for c in clients:
            await c.start()
        # Two processes' connections add up in one count.
        assert await clients[0].connect("k", 60) == (1, 1)
        assert await clients[1].connect("k", 60) == (2, 2)
        # Pipelined requests on one socket are answered in order.
        got = await asyncio.gather(clients[1].auth_failed("k", 600),
                                   clients[1].auth_failed("k", 600),
                                   clients[1].auth_failures("k", 600),
                                   clients[1].connect("k", 60))
        assert got == [1, 2, 2, (3, 3)]
        assert await clients[0].auth_failures("k", 600) == 2
        clients[1].disconnect("k")
        assert await clients[0].connect("k", 60) == (3, 4)
        # One process goes: what it had open is forgotten, the rest stays.
        await clients[1].close()
        async def open_now():
            return (await clients[0].connect("probe", 60), srv.anvil.clients["k"].open)
        for _ in range(200):
            _, n_open = await open_now()
            if n_open == 2:
                break
            await asyncio.sleep(0.01)
        assert srv.anvil.clients["k"].open == 2
        # The server goes: the client counts in its own process from then on.
        await srv.close()
        for _ in range(200):
            if clients[0].local is not None:
                break
            await asyncio.sleep(0.01)
        assert clients[0].local is not None
        assert await clients[0].connect("k", 60) == (1, 1)
        assert await clients[0].auth_failed("k", 600) == 1
        await clients[0].close()
    asyncio.run(main())


def test_a_malformed_request_closes_only_that_socket():
    async def main():
        srv = AnvilServer(Anvil(FakeClock(0.0)))
        good, bad = AnvilClient(srv.pair()), AnvilClient(srv.pair())
        await good.start()
        await bad.start()
        assert await bad.connect("k", 60) == (1, 1)
        answer = bad._ask("C k not-a-number", lambda f: f)
        assert await answer is None                 # lost: the caller allows
        assert bad.local is not None
        assert await good.connect("k", 60) == (1, 2)   # bad's connection forgotten
        await good.close()
        await bad.close()
        await srv.close()
    asyncio.run(main())


def test_local_anvil_has_the_client_interface():
    async def main():
        local = LocalAnvil(Anvil(FakeClock(0.0)))
        assert await local.connect("k", 60) == (1, 1)
        local.disconnect("k")
        assert await local.connect("k", 60) == (1, 2)
        assert await local.auth_failed("k", 600) == 1
        assert await local.auth_failures("k", 600) == 1
    asyncio.run(main())


def test_hash_gate_one_turn_per_client():
    async def main():
        gate = HashGate()
        inside: dict[str, int] = {}
        most: dict[str, int] = {}
        release = asyncio.Event()

        async def check(client):
            async with gate.turn(client):
                inside[client] = inside.get(client, 0) + 1
                most[client] = max(most.get(client, 0), inside[client])
                await release.wait()
                inside[client] -= 1

        tasks = [asyncio.ensure_future(check(c)) for c in ["a"] * 5 + ["b"] * 3 + [None] * 2]
        for _ in range(20):
            await asyncio.sleep(0)
        # One of a's, one of b's and both anonymous checks are running.
        assert inside == {"a": 1, "b": 1, None: 2}
        release.set()
        await asyncio.gather(*tasks)
        assert most == {"a": 1, "b": 1, None: 2}
        assert gate.locks == {}             # nothing kept once nobody waits
    asyncio.run(main())

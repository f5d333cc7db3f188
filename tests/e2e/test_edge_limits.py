"""Per-client limits against a running ``msa daemon`` with two edge
processes sharing the listening address (SO_REUSEPORT): the connection
cap and the connection rate hold across both processes, the failed-AUTH
budget does too (and then costs no password check), and another client
is unaffected all along. Clients come from distinct loopback addresses
(127.0.0.0/8 is all loopback on Linux)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import smtplib
import socket
import ssl

from tests import support
from tests.daemon_support import (
    MESSAGE,
    add_user,
    start_daemon,
    write_daemon_config,
)


@contextlib.contextmanager
def _daemon(tmp_path, ca, edge: str):
    """``msa daemon`` with two edge processes and these [edge] lines:
    (the process, the submission port), once all four children are up."""
    ports = support.free_port(), support.free_port()
    path = write_daemon_config(tmp_path, ca, *ports, edge=edge,
                               extra="edge_workers = 2\n")
    add_user(tmp_path / "passwd", "alice", "alice-pw", ["alice@example.org"])
    proc = start_daemon(path)
    try:
        support.wait_port(ports[0])
        # The supervisor logs 'started ... as N processes' once every
        # child said it is ready.
        support.wait_for(lambda: "as 4 processes" in _log(proc), timeout=30,
                         what="all four children ready")
        yield proc, ports[0]
    finally:
        proc.stop()


def _greeting(port: int, source: str) -> tuple[socket.socket, str]:
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return s, s.makefile("rb").readline().decode()


def _submit(port: int, ca, source: str) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(ca.ca_pem))
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as s:
        s.starttls(context=ctx)
        s.login("alice", "alice-pw")
        s.sendmail("alice@example.org", ["bob@example.test"], MESSAGE)
        return s.noop()


def _log(proc) -> str:
    return support.read_so_far(proc).decode(errors="replace")


def test_connection_cap_holds_across_edge_processes(tmp_path, ca):
    edge = "max_connections_per_client = 6\nmax_connection_rate_per_client = 0\n"
    with _daemon(tmp_path, ca, edge) as (proc, port):
        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            opened = list(pool.map(lambda _: _greeting(port, "127.0.0.2"), range(30)))
        greeted = [s for s, line in opened if line.startswith("220 ")]
        refused = [line for _, line in opened if not line.startswith("220 ")]
        # Six across both processes (each alone would have let in six).
        assert len(greeted) == 6, [line for _, line in opened]
        assert len(refused) == 24
        assert all(line.startswith("421 4.7.0 ") for line in refused), refused
        # Another client submits meanwhile.
        assert _submit(port, ca, "127.0.0.3")[0] == 250
        # The flood's connections close: the count comes down, it may connect.
        for s, _ in opened:
            s.close()

        def welcome_again():
            s, line = _greeting(port, "127.0.0.2")
            s.close()
            return line.startswith("220 ")
        support.wait_for(welcome_again, timeout=30, what="127.0.0.2 greeted again")
        assert ("Connection concurrency limit exceeded: 7 from unknown[127.0.0.2] for service "
                "submission") in _log(proc)


def test_connection_rate_holds_across_edge_processes(tmp_path, ca):
    edge = "max_connection_rate_per_client = 5\nrate_window = 3600\n"
    with _daemon(tmp_path, ca, edge) as (proc, port):
        lines = []
        for _ in range(12):
            s, line = _greeting(port, "127.0.0.4")
            lines.append(line[:9])
            s.close()
        assert lines == ["220 msa.t"] * 5 + ["421 4.7.0"] * 7
        s, line = _greeting(port, "127.0.0.5")
        s.close()
        assert line.startswith("220 ")


def _guess(port: int, ca, source: str, password: str, tries: int) -> list[int]:
    """Up to ``tries`` AUTH attempts on one connection: the reply codes."""
    ctx = ssl.create_default_context(cafile=str(ca.ca_pem))
    codes = []
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0)) as s:
            s.starttls(context=ctx)
            s.ehlo()
            for _ in range(tries):
                code, _ = s.docmd("AUTH", "PLAIN " + _plain("alice", password))
                codes.append(code)
                if code == 235 or code == 421:
                    break
    except smtplib.SMTPServerDisconnected:
        pass
    return codes


def _plain(user: str, password: str) -> str:
    import base64
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_failed_auth_budget_holds_across_edge_processes(tmp_path, ca):
    edge = ("max_auth_failures_per_client = 4\nauth_failure_window = 3600\n"
            "auth_failure_delay = 0\nmax_errors = 100\n")
    with _daemon(tmp_path, ca, edge) as (proc, port):
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            runs = list(pool.map(lambda _: _guess(port, ca, "127.0.0.6", "wrong", 3),
                                 range(10)))
        codes = [c for run in runs for c in run]
        # Four checked passwords, and at most one more that was being
        # checked in the other process when the fourth failure was counted;
        # every other attempt got 454 without a check.
        assert 4 <= codes.count(535) <= 5, runs
        assert codes.count(454) == len(codes) - codes.count(535) >= 20, runs
        # The right password from that address is refused too, unchecked...
        assert _guess(port, ca, "127.0.0.6", "alice-pw", 1) == [454]
        # ...and from another address it works.
        assert _guess(port, ca, "127.0.0.7", "alice-pw", 1) == [235]
        assert _submit(port, ca, "127.0.0.7")[0] == 250
        log = support.wait_for(lambda: "authentication blocked" in _log(proc) and _log(proc),
                               what="the block logged")
        assert log.count("SASL authentication blocked") == 1
        assert "4 failed logins from 127.0.0.6" in log


def test_trusted_clients_are_not_counted(tmp_path, ca):
    edge = 'max_connections_per_client = 2\ntrusted_networks = ["127.0.0.8/32"]\n'
    with _daemon(tmp_path, ca, edge) as (proc, port):
        opened = [_greeting(port, "127.0.0.8") for _ in range(6)]
        assert all(line.startswith("220 ") for _, line in opened), opened
        for s, _ in opened:
            s.close()

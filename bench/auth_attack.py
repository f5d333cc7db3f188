"""AUTH latency of a legitimate user while one address guesses passwords.

``python3 bench/auth_attack.py [--guessers 20] [--seconds 20]``: runs
``msa daemon`` (two edge processes) on loopback, starts ``--guessers``
connections from 127.0.0.2 that send wrong AUTH PLAIN passwords as fast
as they are answered (reconnecting after each 421), and meanwhile logs in
as the real user from 127.0.0.3 once a second, timing AUTH alone (TLS is
set up first). Twice: with the per-client failure budget of msa.toml
(``max_auth_failures_per_client``, default 10) and with it off (0), so
the effect of the budget is seen beside the cost without it; and first
with nobody guessing, for the baseline. Prints the
legitimate login's median and worst AUTH time and how many guesses got
their password checked (535) or were refused unchecked (454).
"""

from __future__ import annotations

import argparse
import base64
import smtplib
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import support  # noqa: E402
from tests.daemon_support import add_user, write_daemon_config  # noqa: E402


def _plain(user: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def _session(port: int, ctx: ssl.SSLContext, source: str) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, timeout=120, source_address=(source, 0))
    s.starttls(context=ctx)
    s.ehlo()
    return s


def _guesser(port: int, ctx, stop: threading.Event, codes: dict) -> None:
    while not stop.is_set():
        try:
            s = _session(port, ctx, "127.0.0.2")
            while not stop.is_set():
                code, _ = s.docmd("AUTH", _plain("alice", "wrong"))
                codes[code] = codes.get(code, 0) + 1
                if code not in (535, 454):
                    break
            s.close()
        except (OSError, smtplib.SMTPException):
            pass


def run(budget: int, guessers: int, seconds: float, ca) -> dict:
    with tempfile.TemporaryDirectory(prefix="msa-auth-") as tmp:
        tmp = Path(tmp)
        port, tls_port = support.free_port(), support.free_port()
        path = write_daemon_config(tmp, ca, port, tls_port, extra="edge_workers = 2\n",
                                   edge=f"max_auth_failures_per_client = {budget}\n"
                                        "max_errors = 1000000\n")
        add_user(tmp / "passwd", "alice", "alice-pw", ["alice@example.org"])
        # The log to a file: a pipe nobody reads would fill and stop the daemon.
        log = open(tmp / "msa.log", "wb")
        proc = support.Proc([sys.executable, str(support.BIN / "msa"), "daemon", "--config",
                             str(path)], env=support.msa_env(), stdout=log)
        try:
            support.wait_port(port, timeout=60)
            ctx = ssl.create_default_context(cafile=str(ca.ca_pem))
            stop, codes = threading.Event(), {}
            threads = [threading.Thread(target=_guesser, args=(port, ctx, stop, codes))
                       for _ in range(guessers)]
            for t in threads:
                t.start()
            times = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                s = _session(port, ctx, "127.0.0.3")
                t0 = time.monotonic()
                code, _ = s.docmd("AUTH", _plain("alice", "alice-pw"))
                times.append(time.monotonic() - t0)
                s.close()
                assert code == 235, code
                time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join(180)
        finally:
            proc.stop()
            log.close()
    return {"budget": budget, "logins": len(times), "median_s": statistics.median(times),
            "max_s": max(times), "checked": codes.get(535, 0), "refused": codes.get(454, 0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--guessers", type=int, default=20)
    p.add_argument("--seconds", type=float, default=20.0)
    a = p.parse_args(argv)
    socket.setdefaulttimeout(120)
    with tempfile.TemporaryDirectory(prefix="msa-auth-ca-") as d:
        ca = support.make_ca(Path(d))
        for budget, guessers in ((10, 0), (10, a.guessers), (0, a.guessers)):
            r = run(budget, guessers, a.seconds, ca)
            print(f"budget {r['budget']:>2}: {guessers:>2} guessing connections; legitimate "
                  f"AUTH median {r['median_s'] * 1000:.0f} ms, worst {r['max_s'] * 1000:.0f} ms "
                  f"over {r['logins']} logins; guesses checked {r['checked']}, "
                  f"refused unchecked {r['refused']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fixtures for the delivery tests: DNS servers, SMTP sinks, queue files.

- :class:`DnsServer`: a small dnspython UDP server in a thread serving a
  zone from text, plus names that answer SERVFAIL or never answer (what
  dnsmasq cannot do).
- :func:`start_dnsmasq`: the real dnsmasq on a free port (TESTING.md).
- :class:`Sink`: an aiosmtpd server in a thread that records messages and
  connections and answers per recipient (``rules``), optionally with
  STARTTLS on a certificate nobody trusts.
- :func:`start_smtp_sink`: Postfix ``smtp-sink`` dumping messages to a dir.
- :func:`write_queue_file`: a queue file straight into a spool stage.
- :func:`start_runner_process`: the runner in a child process (for kill -9).

Everything binds loopback, waits in bounded loops and is stopped by the
test that started it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.zone

from tests import support

ROOT = support.ROOT

# ---------------------------------------------------------------- DNS


class DnsServer:
    """Serve ``zone_text`` (origin ``test.``) on 127.0.0.1:<free port>/udp.

    Names in ``servfail`` answer SERVFAIL, names in ``silent`` get no
    answer at all (a resolver timeout); both can be changed while running.
    Names outside the zone are NXDOMAIN; names in it without the asked
    type get an empty NOERROR (NODATA).
    """

    def __init__(self, zone_text: str, origin: str = "test."):
        self.origin = dns.name.from_text(origin)
        self.zone = dns.zone.from_text(zone_text, origin=self.origin, relativize=False,
                                       check_origin=False)
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except (socket.timeout, OSError):
                continue
            try:
                reply = self._answer(dns.message.from_wire(data))
            except Exception:  # noqa: BLE001 - a test server ignores junk
                continue
            if reply is not None:
                self.sock.sendto(reply.to_wire(), peer)

    def _answer(self, query: dns.message.Message):
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        self.queries.append((name, dns.rdatatype.to_text(q.rdtype)))
        if name in self.silent:
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if name in self.servfail:
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply
        node = self.zone.get_node(q.name)
        if node is None:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply
        rdataset = node.get_rdataset(q.rdclass, q.rdtype)
        if rdataset is not None:
            rrset = reply.find_rrset(reply.answer, q.name, q.rdclass, q.rdtype, create=True)
            rrset.update(rdataset)
        return reply

    def stop(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def start_dnsmasq(tmp: Path, records: list[str]) -> tuple[support.Proc, int]:
    """dnsmasq on 127.0.0.1:<free port> authoritative for ``test``;
    ``records`` are extra options (``--mx-host=...``)."""
    port = support.free_port()
    pidfile = tmp / "dnsmasq.pid"
    argv = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
            "--conf-file=/dev/null", f"--port={port}", "--listen-address=127.0.0.1",
            "--bind-interfaces", "--user=root", f"--pid-file={pidfile}",
            "--local=/test/", *records]
    proc = support.Proc(argv)
    _wait_dns(port, proc)
    return proc, port


def _wait_dns(port: int, proc: support.Proc, timeout: float = 10.0) -> None:
    query = dns.message.make_query("probe.test", "A").to_wire()
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            if proc.p.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {proc.output()}")
            s.sendto(query, ("127.0.0.1", port))
            try:
                s.recvfrom(4096)
                return
            except OSError:
                continue
    raise TimeoutError("dnsmasq did not answer")


# ---------------------------------------------------------------- SMTP sinks


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    tls: bool
    peer: tuple
    connection: int


@dataclass
class Sink:
    """An aiosmtpd server in its own thread.

    ``rules`` maps a recipient (or ``"*"``) to the reply its RCPT gets, e.g.
    ``{"bad@x.test": "550 5.1.1 No such user"}``; ``data_reply`` replaces
    the reply after DATA. ``tls_context`` enables STARTTLS.
    """

    host: str = "127.0.0.1"
    port: int = 0
    rules: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    tls_context: ssl.SSLContext | None = None
    size_limit: int = 33554432
    messages: list[Received] = field(default_factory=list)
    connections: int = 0
    data_delay: float = 0.0  # seconds to wait before answering DATA
    pipelining: bool = False  # offer PIPELINING (RFC 2920) in the EHLO reply
    # the Nth MAIL on each connection (1 = the first) gets 421 and the
    # connection is closed, as a server's idle timeout would
    drop_at_mail: int = 0
    commands: list[str] = field(default_factory=list)  # verbs, in order
    # per MAIL: were more commands already waiting (sent without waiting
    # for the MAIL reply, i.e. pipelined)?
    pipelined: list[bool] = field(default_factory=list)

    def start(self) -> "Sink":
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP

        sink = self
        if not self.port:
            self.port = support.free_port(self.host)

        class Handler:
            async def handle_EHLO(self, server, session, envelope, hostname, responses):
                session.host_name = hostname
                if sink.pipelining:
                    responses.insert(1, "250-PIPELINING")
                return responses

            async def handle_MAIL(self, server, session, envelope, address, mail_options):
                server.mails += 1
                if server.mails == sink.drop_at_mail:
                    asyncio.get_running_loop().call_soon(server.transport.close)
                    return "421 4.4.2 sink.test closing: idle too long"
                envelope.mail_from = address
                envelope.mail_options.extend(mail_options)
                return "250 OK"

            async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
                reply = sink.rules.get(address, sink.rules.get("*"))
                if reply and not reply.startswith("2"):
                    return reply
                envelope.rcpt_tos.append(address)
                return reply or "250 2.1.5 OK"

            async def handle_DATA(self, server, session, envelope):
                if sink.data_delay:
                    await asyncio.sleep(sink.data_delay)
                if sink.data_reply and not sink.data_reply.startswith("2"):
                    return sink.data_reply
                sink.messages.append(Received(
                    envelope.mail_from, list(envelope.rcpt_tos),
                    bytes(envelope.original_content), list(envelope.mail_options),
                    session.ssl is not None, session.peer, server.conn_no))
                return sink.data_reply or f"250 2.0.0 Ok: queued as M{len(sink.messages)}"

        class CountingSMTP(SMTP):
            conn_no = 0
            mails = 0

            async def smtp_MAIL(self, arg):
                sink.commands.append("MAIL")
                sink.pipelined.append(bool(self._reader._buffer))
                await super().smtp_MAIL(arg)

            async def smtp_RCPT(self, arg):
                sink.commands.append("RCPT")
                await super().smtp_RCPT(arg)

            async def smtp_DATA(self, arg):
                sink.commands.append("DATA")
                await super().smtp_DATA(arg)

            async def smtp_RSET(self, arg):
                sink.commands.append("RSET")
                await super().smtp_RSET(arg)

            def connection_made(self, transport):
                if self._original_transport is None and not self.conn_no:
                    sink.connections += 1  # not again after STARTTLS
                    self.conn_no = sink.connections
                super().connection_made(transport)

        class Ctl(Controller):
            def factory(self):
                return CountingSMTP(self.handler, data_size_limit=sink.size_limit,
                                    enable_SMTPUTF8=True, decode_data=False,
                                    tls_context=sink.tls_context,
                                    require_starttls=False, hostname="sink.test")

        self.controller = Ctl(Handler(), hostname=self.host, port=self.port)
        self.controller.start()
        self.connections = 0  # start() made one connection to check the server
        return self

    def stop(self) -> None:
        self.controller.stop()

    def wait_messages(self, n: int, timeout: float = 20.0) -> list[Received]:
        support.wait_for(lambda: len(self.messages) >= n, timeout, what=f"{n} messages at sink")
        return self.messages


def server_tls_context(ca: support.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(ca.cert_pem), str(ca.key_pem))
    return ctx


def start_smtp_sink(host: str = "127.0.0.1", port: int | None = None,
                    options: list[str] = ()) -> tuple[support.Proc, int, Path]:
    """Postfix smtp-sink dumping each message into a fresh directory, which
    is returned. smtp-sink runs as ``nobody``, so the directory is made in
    /tmp (pytest's tmp_path is not traversable by others); the caller
    removes it with :func:`stop_smtp_sink`."""
    import tempfile
    port = port or support.free_port(host)
    dump_dir = Path(tempfile.mkdtemp(prefix="msa-smtp-sink-"))
    os.chmod(dump_dir, 0o777)
    argv = ["/usr/sbin/smtp-sink", "-u", "nobody", "-d", f"{dump_dir}/%M.", *options,
            f"{host}:{port}", "50"]
    proc = support.Proc(argv)
    support.wait_port(port, host)
    return proc, port, dump_dir


def stop_smtp_sink(proc: support.Proc, dump_dir: Path) -> None:
    import shutil
    proc.stop()
    shutil.rmtree(dump_dir, ignore_errors=True)


# ---------------------------------------------------------------- spool helpers


def write_queue_file(spool, stage: str, sender: str, recipients: list[str],
                     message: bytes, **fields) -> str:
    """A queue file in ``stage`` as the watcher would leave it in active/."""
    from msa.message.queuefile import Envelope, utc_iso
    from spool import new_id

    qid = fields.pop("queue_id", None) or new_id()
    env = Envelope(sender=sender, queue_id=qid,
                   arrival=fields.pop("arrival", None) or utc_iso(time.time()),
                   origin=fields.pop("origin", "smtp"), size=str(len(message)))
    for r in recipients:
        env.add_recipient(r)
    for k, v in fields.items():
        setattr(env, k, v)
    return spool.deposit(stage, [env.to_bytes(), message], qid=qid)


def read_queue_file(path):
    from msa.message.queuefile import load
    return load(path)[0]


# ---------------------------------------------------------------- runner process

RUNNER_MAIN = """
import asyncio, logging, signal, sys
sys.path.insert(0, {root!r})
from msa import config, store
from msa.delivery.runner import Runner
logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                    format="%(asctime)s %(name)s %(message)s")
cfg = config.load({config!r})
async def main():
    r = Runner(cfg, store.open_spool(cfg))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(r.stop()))
    print("runner started", flush=True)
    await r.run()
asyncio.run(main())
"""


def start_runner_process(config: Path) -> support.Proc:
    """The delivery runner of ``config`` as a child process."""
    code = RUNNER_MAIN.format(root=str(ROOT), config=str(config))
    return support.Proc([sys.executable, "-u", "-c", code])


def run_async(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class ScriptedServer:
    """A raw TCP server in a thread that sends ``greeting`` on connect (and
    then closes, or with ``hang`` says nothing more and keeps the socket)."""

    def __init__(self, host: str, port: int, greeting: bytes = b"", hang: bool = False):
        self.host, self.port, self.greeting, self.hang = host, port, greeting, hang
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.connections = 0
        self.clients: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            if self.greeting:
                c.sendall(self.greeting)
            if self.hang:
                self.clients.append(c)
            else:
                time.sleep(0.05)
                c.close()

    def stop(self) -> None:
        self._stop = True
        self.thread.join(2)
        for c in self.clients:
            c.close()
        self.sock.close()


# ---------------------------------------------------------------- config and runner


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_value(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


FAST_RELAY = dict(connect_timeout=3.0, command_timeout=5.0, data_timeout=5.0,
                  idle_timeout=2.0, dns_timeout=2.0)
FAST_RETRY = dict(min_delay=300.0, max_delay=600.0, jitter=0.0, scan_interval=30.0)


def relay_config(directory: Path, ca=None, relay: dict | None = None,
                 retry: dict | None = None, extra: str = "") -> Path:
    """A config file with short relay timeouts; ``relay``/``retry`` keys
    override :data:`FAST_RELAY`/:data:`FAST_RETRY`."""
    sections = ""
    for name, base, over in (("relay", FAST_RELAY, relay), ("retry", FAST_RETRY, retry)):
        values = {**base, **(over or {})}
        sections += f"[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n"
                                            for k, v in values.items()) + "\n"
    return support.write_config(directory, ca, sections + extra)


class RunnerHarness:
    """A Runner in the current event loop: ``async with RunnerHarness(cfg)``."""

    def __init__(self, cfg, **kw):
        from msa.store import open_spool
        self.cfg = cfg
        self.spool = open_spool(cfg)
        self.kw = kw
        self.runner = None

    async def __aenter__(self) -> "RunnerHarness":
        from msa.delivery.runner import Runner
        self.runner = Runner(self.cfg, self.spool, **self.kw)
        self.task = asyncio.create_task(self.runner.run())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.stop(grace=2)
        await asyncio.wait_for(self.task, 20)

    async def until(self, pred, timeout: float = 20.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = pred()
            if value:
                return value
            if self.task.done():
                self.task.result()
                raise RuntimeError("runner stopped")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def names(self, stage: str) -> list[str]:
        return sorted(self.spool.names(stage))

    def deferred(self) -> list[tuple[str, str]]:
        return [(s, n) for s in self.spool.deferred_stages() for n in self.spool.names(s)]

    def queue_empty(self) -> bool:
        return not self.names("active") and not self.deferred()


def load_config(path: Path):
    from msa import config
    return config.load(str(path))


# ---------------------------------------------------------------- measurement

def measure_backlog(n: int, seconds: float = 20.0) -> dict:
    """Fill active/ with ``n`` queue files (plain writes, test setup), run
    ``bin/msa deliver`` against Postfix smtp-sink for ``seconds`` and
    sample the runner's RSS. ``python3 -m tests.relay_support N [SECONDS]``."""
    import shutil
    import tempfile

    from msa.message.queuefile import Envelope, utc_iso
    from msa.store import open_spool
    from spool import new_id
    tmp = Path(tempfile.mkdtemp(prefix="msa-backlog-"))
    port = support.free_port()
    # No dumps: measure the runner, not the sink's disk.
    proc = support.Proc(["/usr/sbin/smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "200"])
    support.wait_port(port)
    cfg_path = relay_config(tmp, relay={"force_mx": {"x.test": f"127.0.0.1:{port}"},
                                        "tls": "none", "max_connections_per_domain": 20})
    spool = open_spool(load_config(cfg_path))
    msg = b"Subject: backlog\r\n\r\nx\r\n"
    arrival = utc_iso(time.time())
    for _ in range(n):
        qid = new_id()
        env = Envelope(sender="a@example.org", queue_id=qid, arrival=arrival, size=str(len(msg)))
        env.add_recipient("b@x.test")
        with open(spool.path("active", qid), "wb") as f:
            f.write(env.to_bytes() + msg)
    # Logs to /dev/null: a pipe nobody reads would stop the runner when full.
    runner = support.Proc([sys.executable, str(support.BIN / "msa"), "deliver", "--config",
                           str(cfg_path)], env=support.msa_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            time.sleep(1)
            with open(f"/proc/{runner.p.pid}/status") as f:
                rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            samples.append(rss)
    finally:
        runner.stop()
        proc.stop()
    left = sum(1 for _ in spool.names("active"))
    shutil.rmtree(tmp, ignore_errors=True)
    return {"backlog": n, "seconds": seconds, "delivered": n - left,
            "rate_per_s": round((n - left) / seconds, 1),
            "rss_kb_first": samples[0], "rss_kb_max": max(samples), "rss_kb_last": samples[-1]}


if __name__ == "__main__":
    print(measure_backlog(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 20.0))

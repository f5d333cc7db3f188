"""Helpers for the watcher, policy, maildrop, daemon and demo tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from msa import config
from msa.message import queuefile
from msa.message.queuefile import Envelope
from tests import support


def make_cfg(tmp_path: Path, **policies) -> config.Config:
    cfg = config.from_dict({
        "spool": {"root": str(tmp_path / "spool")},
        "server": {"hostname": "msa.test", "domain": "example.org"},
        "policies": policies,
    })
    return cfg


def queue_file(recipients, message: bytes, sender: str = "alice@example.org",
               qid: str = "", **fields) -> bytes:
    env = Envelope(sender=sender, queue_id=qid, arrival=queuefile.utc_iso(1_800_000_000),
                   size=str(len(message)), **fields)
    for r in recipients:
        env.add_recipient(r)
    return env.to_bytes() + message


def smtp_file(recipients, message: bytes, **fields) -> bytes:
    """A queue file as the SMTP edge writes it into incoming/."""
    defaults = dict(origin="smtp", client_address="127.0.0.1", client_name="localhost",
                    helo="client.example", tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
                    auth_user="alice")
    defaults.update(fields)
    return queue_file(recipients, message, **defaults)


MESSAGE = (b"From: alice@example.org\r\nTo: bob@example.test\r\n"
           b"Bcc: secret@example.net\r\nSubject: hi\r\n\r\nHello.\r\n")


def deposit(spool, stage: str, data: bytes, qid: str | None = None) -> str:
    """Deposit with the Queue-ID line matching the file name."""
    qid = qid or spool_new_id()
    data = data.replace(b"\nSender:", f"\nQueue-ID: {qid}\nSender:".encode(), 1) \
        if b"Queue-ID:" not in data else data
    return spool.deposit(stage, data, qid=qid)


def spool_new_id() -> str:
    from spool import new_id
    return new_id()


def load_all(spool, stage: str) -> dict[str, tuple[Envelope, bytes]]:
    out = {}
    for name in spool.names(stage):
        path = spool.path(stage, name)
        env, offset = queuefile.load(path)
        out[name] = (env, path.read_bytes()[offset:])
    return out


def wait_files(spool, stage: str, n: int, timeout: float = 20.0) -> list[str]:
    return support.wait_for(lambda: (names := sorted(spool.names(stage))) and len(names) >= n
                            and names, timeout=timeout, what=f"{n} files in {stage}/")


def run_python(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=support.msa_env(**(env or {})), timeout=timeout)


def write_daemon_config(tmp_path: Path, ca, submission: int, submissions: int,
                        extra: str = "", edge: str = "") -> Path:
    """A config with both listeners on loopback, the test certificate, a
    password file, and delivery to a closed port (mail stays deferred).
    ``edge``: more lines for ``[edge]``; ``extra``: more sections."""
    closed = support.free_port()
    path = tmp_path / "msa.toml"
    if "client_dns" not in edge:
        # No reverse DNS through the machine's resolver (its answers, and
        # its reachability, vary between machines); test_client_names
        # turns it on with the loopback DNS server.
        edge = "client_dns = false\n" + edge
    path.write_text(
        f'[spool]\nroot = "{tmp_path / "spool"}"\n\n'
        f'[server]\nhostname = "msa.test"\ndomain = "example.org"\n\n'
        f'[edge]\nsubmission = ["127.0.0.1:{submission}"]\n'
        f'submissions = ["127.0.0.1:{submissions}"]\n'
        f'certfile = "{ca.cert_pem}"\nkeyfile = "{ca.key_pem}"\n{edge}\n'
        f'[auth]\npasswd_file = "{tmp_path / "passwd"}"\n\n'
        f'[relay]\nforce_mx = {{ "example.test" = "127.0.0.1:{closed}" }}\n'
        f'tls = "none"\nconnect_timeout = 2.0\n\n'
        f'[daemon]\ngrace = 10.0\n\n' + extra)
    return path


def add_user(passwd: Path, name: str, password: str, senders=()) -> None:
    from msa.submission.auth import PasswdEntry, PasswdFile, hash_password
    f = PasswdFile(passwd)
    f.set(PasswdEntry(name, hash_password(password), list(senders)))
    f.save()


def start_daemon(cfg_path: Path, command: str = "daemon", *args) -> support.Proc:
    return support.Proc([sys.executable, str(support.BIN / "msa"), command,
                         "--config", str(cfg_path), *args],
                        env=support.msa_env(), stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)


def start_detached(cfg_path: Path, cwd: Path, command: str = "daemon") -> int:
    """``msa COMMAND --detach`` with ``msa.pid`` and ``msa.log`` in ``cwd``;
    the pid from the pid file once it is there."""
    proc = subprocess.run([sys.executable, str(support.BIN / "msa"), command, "--config",
                           str(cfg_path), "--detach", "--pidfile", "msa.pid", "--log", "msa.log"],
                          cwd=cwd, env=support.msa_env(), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pidfile = cwd / "msa.pid"
    return support.wait_for(lambda: pidfile.exists() and int(pidfile.read_text() or 0),
                            what="pid file of the detached daemon")


def smtp_login(port: int, ca, user: str, password: str, implicit: bool = False):
    import smtplib
    import ssl
    ctx = ssl.create_default_context(cafile=str(ca.ca_pem))
    if implicit:
        s = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=20)
    else:
        s = smtplib.SMTP("127.0.0.1", port, timeout=20)
        s.starttls(context=ctx)
    s.login(user, password)
    return s


def numbered_message(sender: str, rcpt: str, n: int) -> bytes:
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: test {n}\r\nX-Seq: {n}\r\n\r\n"
            f"message number {n}\r\n").encode()


def spooled_seqs(spool) -> dict[int, str]:
    """X-Seq of every whole queue file in any stage -> the stage it is in.
    The stages are listed in the order mail moves, so a file the daemon
    moves on while this runs is found in the later stage."""
    from msa.message.headerblock import HeaderBlock
    out = {}
    for stage in [*spool.stages, *spool.deferred_stages(), "hold"]:
        for name in spool.names(stage):
            try:
                env, offset = queuefile.load(spool.path(stage, name))  # raises if not whole
                head = spool.path(stage, name).read_bytes()[offset:].split(b"\r\n\r\n")[0]
            except FileNotFoundError:
                continue  # moved on to a later stage, which is listed after this one
            seq = HeaderBlock.parse(head + b"\r\n").get("x-seq")
            if seq is not None:
                out[int(seq)] = stage
    return out

"""``msa demo``: a working msa on loopback in one command (``make demo``).

Creates, under ``./var`` (or ``--var DIR`` / ``$MSA_DEMO_VAR``):

- ``msa.toml``: spool ``var/spool``, submission on 127.0.0.1:2587
  (STARTTLS) and 127.0.0.1:2465 (implicit TLS), mail for the demo
  recipient domain relayed to 127.0.0.1:2525 (start any SMTP sink there to
  see it delivered; until then it waits in ``deferred/``);
- ``tls/cert.pem``, ``tls/key.pem``: a self-signed certificate for
  localhost, 127.0.0.1 and ::1 (``cryptography``), which clients trust by
  using the certificate itself as CA file;
- ``passwd``: user ``demo``, password ``demo``, who may send as
  ``demo@example.org``;

prints what it set up and a ready-to-paste ``swaks`` command, then runs
``msa daemon`` in the foreground until Ctrl-C. Rerunning it changes
nothing that exists (idempotent): the config, certificate and user are
kept, so edits survive.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import os
import sys
from pathlib import Path

DEMO_USER, DEMO_PASSWORD, DEMO_SENDER = "demo", "demo", "demo@example.org"
DEMO_RCPT = "friend@example.net"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="msa demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--var", default=os.environ.get("MSA_DEMO_VAR", "var"),
                   help="directory for the demo's files (default ./var)")
    p.add_argument("--port", type=int, default=2587, help="STARTTLS submission port")
    p.add_argument("--ssl-port", type=int, default=2465, help="implicit TLS port")
    p.add_argument("--sink-port", type=int, default=2525,
                   help="where mail for example.net is relayed")
    p.add_argument("--setup-only", action="store_true", help="set up, print, do not run")
    return p.parse_args(argv)


def make_certificate(cert: Path, key: Path) -> None:
    """A self-signed EC certificate for localhost, 127.0.0.1 and ::1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = _dt.datetime.now(_dt.timezone.utc)
    san = x509.SubjectAlternativeName([
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1"))])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=825))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(private, hashes.SHA256()))
    key.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def config_text(var: Path, port: int, ssl_port: int, sink_port: int) -> str:
    return f"""# msa demo configuration (made by `msa demo`; edits are kept). See msa.toml(5).
[spool]
root = "spool"

[server]
hostname = "localhost"
domain = "example.org"

[edge]
submission = ["127.0.0.1:{port}"]
submissions = ["127.0.0.1:{ssl_port}"]
certfile = "tls/cert.pem"
keyfile = "tls/key.pem"

[auth]
passwd_file = "passwd"

[relay]
# Demo recipients' mail goes to a local sink instead of the Internet.
force_mx = {{ "example.net" = "127.0.0.1:{sink_port}" }}
tls = "opportunistic"

[retry]
min_delay = 30.0

[daemon]
log = "stderr"
"""


def setup(var: Path, port: int, ssl_port: int, sink_port: int) -> list[str]:
    """Create what is missing; returns one line per thing done."""
    done = []
    var.mkdir(parents=True, exist_ok=True)
    cfg_path = var / "msa.toml"
    if not cfg_path.exists():
        cfg_path.write_text(config_text(var, port, ssl_port, sink_port))
        done.append(f"wrote {cfg_path}")
    cert, key = var / "tls" / "cert.pem", var / "tls" / "key.pem"
    if not (cert.exists() and key.exists()):
        make_certificate(cert, key)
        done.append(f"made a self-signed certificate {cert}")
    from msa.submission.auth import PasswdEntry, PasswdFile, hash_password, locked
    passwd = var / "passwd"
    with locked(passwd):
        f = PasswdFile(passwd)
        if f.get(DEMO_USER) is None:
            f.set(PasswdEntry(DEMO_USER, hash_password(DEMO_PASSWORD), [DEMO_SENDER]))
            f.save()
            done.append(f"added user {DEMO_USER!r} (password {DEMO_PASSWORD!r}) "
                        f"who may send as {DEMO_SENDER}")
    from msa import config
    from msa.store import open_spool
    open_spool(config.load(str(cfg_path)))
    return done


def swaks_command(var: str, port: int) -> str:
    return (f"swaks --server 127.0.0.1 --port {port} --tls --tls-verify "
            f"--tls-ca-path {var}/tls/cert.pem --auth PLAIN --auth-user {DEMO_USER} "
            f"--auth-password {DEMO_PASSWORD} --from {DEMO_SENDER} --to {DEMO_RCPT}")


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    var = Path(opts.var)
    from msa import config
    try:
        done = setup(var, opts.port, opts.ssl_port, opts.sink_port)
        cfg = config.load(str(var / "msa.toml"))
    except (OSError, config.ConfigError) as exc:
        print(f"msa demo: {exc}", file=sys.stderr)
        return 73
    sub = cfg.edge.submission[0] if cfg.edge.submission else "?"
    subs = cfg.edge.submissions[0] if cfg.edge.submissions else "?"
    port = int(sub.rpartition(":")[2]) if sub != "?" else opts.port
    print("\n".join(done) if done else f"{var}: already set up, nothing changed")
    print(f"""
msa demo
  config        {var}/msa.toml
  spool         {cfg.spool.root}   (ls it; cat a file to see envelope + message)
  submission    {sub} (STARTTLS), {subs} (implicit TLS), AUTH PLAIN/LOGIN
  user          {DEMO_USER} / {DEMO_PASSWORD}, may send as {DEMO_SENDER}
  relay         mail for example.net goes to 127.0.0.1:{opts.sink_port}; until an
                SMTP server listens there it waits in deferred/ (see mailq)

Submit a message (in another terminal):

  {swaks_command(str(var), port)}

List the queue:   MSA_CONFIG={var}/msa.toml bin/mailq
Local mail:       echo hi | MSA_CONFIG={var}/msa.toml bin/sendmail {DEMO_RCPT}
""", flush=True)
    if opts.setup_only:
        return 0
    print("Running msa daemon in the foreground; Ctrl-C stops it.\n", flush=True)
    from msa.process import daemon
    return daemon.main(["daemon", "--config", str(var / "msa.toml")])

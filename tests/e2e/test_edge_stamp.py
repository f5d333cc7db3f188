"""The edge applies the [policies] to a message held in memory before it
writes it (``[edge] apply_policies``, Postfix's cleanup); the watcher then
only renames the file into active/. What reaches active/ must be what the
watcher alone makes of the message as received."""

from __future__ import annotations

import os
import smtplib

import pytest

from msa.cleanup import policies
from msa.cleanup.pipeline import apply_in_memory
from msa.cleanup.watcher import Watcher
from msa.message import queuefile
from msa.store import open_spool
from tests.daemon_support import deposit, load_all, make_cfg
from tests.edge_support import Edges, client_context

SMALL = b"From: alice@example.org\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"
MESSAGES = {
    "plain": SMALL,
    "has date and id": (b"From: alice@example.org\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                        b"Message-ID: <x@y>\r\n\r\nbody\r\n"),
    "bcc": b"From: a@example.org\r\nBcc: hidden@example.net\r\nResent-Bcc: h2@x.test\r\n\r\nb\r\n",
    "no separator": b"From: alice@example.org\r\nthis is body, not a field\r\n",
    "folded": b"Subject: a\r\n  long\r\n\tfold\r\nFrom: a@example.org\r\n\r\n\r\n",
    "headers only": b"From: alice@example.org\r\nSubject: x\r\n",
    "empty": b"",
}
ONE_DOMAIN = ["bob@example.test", "carol@example.test"]
TWO_DOMAINS = ["bob@example.test", "carol@other.test"]


def envelope(recipients) -> queuefile.Envelope:
    return queuefile.Envelope(
        sender="alice@example.org", queue_id="6616A0000000000000A000",
        arrival=queuefile.utc_iso(1_800_000_000.25), origin="smtp",
        client_address="127.0.0.1", client_name="localhost", helo="client.example",
        tls="TLSv1.3 TLS_AES_256_GCM_SHA384", auth_user="alice",
        recipients=[queuefile.Recipient(a) for a in recipients])


def without_policies_line(data: bytes) -> bytes:
    return b"".join(line for line in data.splitlines(keepends=True)
                    if not line.startswith(b"Policies:"))


def watcher_result(cfg, tmp, data: bytes, qid: str) -> dict[str, bytes]:
    """What the watcher alone writes to active/ for a file in incoming/."""
    sp = open_spool(cfg)
    deposit(sp, "incoming", data, qid=qid)
    Watcher(cfg, sp).drain()
    return {n: sp.path("active", n).read_bytes() for n in sp.names("active")}


@pytest.mark.parametrize("forward", [[], [[r"^bob@", "robert@"], [r"^carol@(.*)$", r"c1@\1, c2@\1"]]])
@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_edge_result_is_the_watchers_and_the_watcher_only_renames(tmp_path, name, forward):
    message = MESSAGES[name]
    cfg_raw = make_cfg(tmp_path / "raw", forward=forward)
    cfg_edge = make_cfg(tmp_path / "edge", forward=forward)
    stages = [pols for _, pols in policies.pipeline(cfg_edge)]
    env = envelope(ONE_DOMAIN)
    env.size = str(len(message))
    before = env.to_bytes()

    stamped = apply_in_memory(env, message, stages, cfg_edge.policies.max_header_bytes)
    assert stamped is not None
    assert env.to_bytes() == before, "the caller's envelope must not change"
    new_env, headers, offset, message_id = stamped
    assert message_id is not None and message_id.strip().startswith("<")
    assert set(policies.applied(new_env)) == {p.name for pols in stages for p in pols}
    edge_file = new_env.to_bytes() + headers + message[offset:]

    # The watcher finds nothing to do: one rename, the same inode, same bytes.
    sp = open_spool(cfg_edge)
    deposit(sp, "incoming", edge_file, qid=env.queue_id)
    inode = os.stat(sp.path("incoming", env.queue_id)).st_ino
    assert Watcher(cfg_edge, sp).drain() == 1
    assert list(sp.names("active")) == [env.queue_id] and not list(sp.names("incoming"))
    assert os.stat(sp.path("active", env.queue_id)).st_ino == inode
    assert sp.path("active", env.queue_id).read_bytes() == edge_file

    # And it is what the watcher makes of the message as received (only the
    # Policies: line differs: the edge also names those that changed nothing).
    raw = watcher_result(cfg_raw, tmp_path, env.to_bytes() + message, env.queue_id)
    assert list(raw) == [env.queue_id]
    assert without_policies_line(raw[env.queue_id]) == without_policies_line(edge_file)
    if forward:
        assert [r.address for r in new_env.recipients] == [
            "robert@example.test", "c1@example.test", "c2@example.test"]


def test_a_message_that_splits_is_left_to_the_watcher(tmp_path):
    cfg = make_cfg(tmp_path)
    stages = [pols for _, pols in policies.pipeline(cfg)]
    env = envelope(TWO_DOMAINS)
    before = env.to_bytes()
    assert apply_in_memory(env, SMALL, stages, cfg.policies.max_header_bytes) is None
    assert env.to_bytes() == before


def test_a_header_section_over_the_cap_is_left_to_the_watcher(tmp_path):
    cfg = make_cfg(tmp_path, max_header_bytes=100)
    stages = [pols for _, pols in policies.pipeline(cfg)]
    message = b"Subject: " + b"x" * 200 + b"\r\n\r\nbody\r\n"
    assert apply_in_memory(envelope(ONE_DOMAIN), message, stages, 100) is None


@pytest.fixture
def edges(tmp_path, ca):
    e = Edges(tmp_path, ca, "apply_policies = true\n")
    yield e
    e.stop()


def submit(edges, message: bytes, rcpts=("bob@example.test",)) -> str:
    with smtplib.SMTP("127.0.0.1", edges.port, timeout=30) as s:
        s.starttls(context=client_context(edges.ca))
        s.login("alice", "alice-pw")
        s.mail("alice@example.org")
        for r in rcpts:
            s.rcpt(r)
        code, reply = s.data(message)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def test_smtp_submission_is_stamped_and_the_watcher_renames_it(edges):
    qid = submit(edges, SMALL)
    sp = open_spool(edges.cfg)
    path = sp.path("incoming", qid)
    env, message = queuefile.load(path)[0], path.read_bytes()
    body = message[queuefile.load(path)[1]:]
    assert body.startswith(b"Received: from ")
    assert b"(authenticated as alice)" in body and f"id {qid}".encode() in body
    assert f"\r\nMessage-ID: <{qid}@msa.test>\r\n".encode() in body
    assert body.endswith(b"Subject: hi\r\n" + body[body.index(b"Date: "):].split(b"\r\n")[0]
                         + b"\r\n" + f"Message-ID: <{qid}@msa.test>".encode()
                         + b"\r\n\r\nHello.\r\n")
    assert env.size == str(len(body))
    assert policies.applied(env) == ["received", "date", "message-id", "remove-bcc", "split"]
    inode = os.stat(path).st_ino
    assert Watcher(edges.cfg, sp).drain() == 1
    assert os.stat(sp.path("active", qid)).st_ino == inode
    assert sp.path("active", qid).read_bytes() == message


def test_a_large_message_is_written_as_received_and_stamped_by_the_watcher(edges):
    text = b"".join(b"%07d " % i + b"y" * 70 + b"\r\n" for i in range(4000))  # > 256 KiB
    qid = submit(edges, SMALL + text)
    sp = open_spool(edges.cfg)
    env, offset = queuefile.load(sp.path("incoming", qid))
    assert sp.path("incoming", qid).read_bytes()[offset:] == SMALL + text
    assert env.policies == ""
    Watcher(edges.cfg, sp).drain()
    (env, message), = load_all(sp, "active").values()
    assert message.startswith(b"Received: from ") and message.endswith(b"Hello.\r\n" + text)


def test_a_message_to_two_domains_is_split_by_the_watcher(edges):
    qid = submit(edges, SMALL, TWO_DOMAINS)
    sp = open_spool(edges.cfg)
    env, offset = queuefile.load(sp.path("incoming", qid))
    assert env.policies == "" and sp.path("incoming", qid).read_bytes()[offset:] == SMALL
    Watcher(edges.cfg, sp).drain()
    assert sorted(sp.names("active")) == [f"{qid}-1", f"{qid}-2"]

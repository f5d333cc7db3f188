"""The Received: field the edge and the watcher add (pure)."""

from __future__ import annotations

from msa.cleanup.policies import received_clauses
from msa.message.queuefile import Envelope, Recipient


def _env(**kw) -> Envelope:
    base = dict(sender="alice@example.org", recipients=[Recipient("bob@example.net")],
                queue_id="Q1", arrival="2026-11-29T10:04:15Z", origin="smtp",
                client_address="192.0.2.7", client_name="host.example", helo="laptop",
                tls="TLSv1.3 TLS_AES_256_GCM_SHA384", auth_user="alice")
    base.update(kw)
    return Envelope(**base)


def test_received_names_the_client_beside_its_helo():
    clauses = received_clauses(_env(), "mail.example.org")
    assert clauses[:4] == ["from laptop (host.example [192.0.2.7])",
                           "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)",
                           "(authenticated as alice)",
                           "by mail.example.org (msa) with ESMTPSA id Q1"]
    assert clauses[4] == "for <bob@example.net>;"
    # No confirmed name: unknown, the HELO never standing in for it.
    assert received_clauses(_env(client_name=""), "m")[0] == "from laptop (unknown [192.0.2.7])"


def test_private_submission_hides_the_authenticated_client_only():
    private = received_clauses(_env(), "mail.example.org", private=True)
    assert private[:2] == ["by mail.example.org (msa) with ESMTPSA id Q1",
                           "for <bob@example.net>;"]
    assert not any("192.0.2.7" in c or "laptop" in c or "alice" in c for c in private)
    # An unauthenticated (trusted network) client is still named.
    trusted = received_clauses(_env(auth_user=""), "m", private=True)
    assert trusted[0] == "from laptop (host.example [192.0.2.7])"

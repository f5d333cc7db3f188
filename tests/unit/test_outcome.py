"""msa.delivery.outcome.decide with fixed numbers: what one attempt means
for the queue file, the DSNs and the next attempt."""

from __future__ import annotations

import pytest

from msa.config import RetryConfig
from msa.delivery.outcome import DOUBLE_BOUNCE, EXPIRED, decide, wants
from msa.delivery.relay import RcptResult
from msa.message.queuefile import Envelope, Recipient, utc_iso

T0 = 1_800_000_000.0            # arrival
RETRY = RetryConfig(min_delay=300.0, max_delay=4000.0, factor=2.0, jitter=0.1,
                    lifetime=5 * 86400.0, bounce_lifetime=86400.0, delay_warning=0.0)
SENT = ("sent", "250 2.0.0 Ok", "2.0.0")
BUSY = ("deferred", "450 4.2.1 Mailbox busy", "4.2.1")
GONE = ("failed", "550 5.1.1 No such user", "5.1.1")


def env_of(sender: str, *rcpts: tuple[str, str]) -> Envelope:
    env = Envelope(sender=sender, queue_id="Q", arrival=utc_iso(T0), size="10")
    for address, notify in rcpts:
        env.add_recipient(address, notify=notify)
    return env


def run(env: Envelope, answers, *, age: float, attempt: int = 1, retry=RETRY, rand=0.5):
    todo = env.pending()
    results = [RcptResult(r.address, *a, host="mx.test", addr="127.0.0.2", port=25)
               for r, a in zip(todo, answers)]
    now = T0 + age
    return decide(env, todo, results, attempt=attempt, arrival=T0, start=now - 1, now=now,
                  retry=retry, rand=rand)


# (answers, sender, age, notify) -> states, bounced statuses, warned, due offset
TABLE = [
    # everyone sent: removed, nothing recorded
    ([SENT, SENT], "a@x.test", 10, "", ["sent", "sent"], [], 0, None),
    # one deferred: retry after min_delay (rand 0.5: no jitter)
    ([SENT, BUSY], "a@x.test", 10, "", ["sent", "deferred"], [], 0, 300.0),
    # one failed: a DSN for it, the file removed
    ([GONE, SENT], "a@x.test", 10, "", ["failed", "sent"], ["5.1.1"], 0, None),
    # failed and deferred: a DSN now, a retry later
    ([GONE, BUSY], "a@x.test", 10, "", ["failed", "deferred"], ["5.1.1"], 0, 300.0),
    # deferred after the lifetime: failed with 4.4.7, bounced
    ([BUSY, SENT], "a@x.test", 5 * 86400, "", ["failed", "sent"], [EXPIRED], 0, None),
    # a null sender's failure: no DSN (never bounce a bounce)
    ([GONE], "", 10, "", ["failed"], [], 0, None),
    # a null sender expires after bounce_lifetime, silently
    ([BUSY], "", 86400, "", ["failed"], [], 0, None),
    # NOTIFY=NEVER and NOTIFY=SUCCESS: no failure DSN
    ([GONE], "a@x.test", 10, "NEVER", ["failed"], [], 0, None),
    ([GONE], "a@x.test", 10, "SUCCESS", ["failed"], [], 0, None),
    ([GONE], "a@x.test", 10, "FAILURE,DELAY", ["failed"], ["5.1.1"], 0, None),
    # near the end of the lifetime: one last try at its end, not after it
    ([BUSY], "a@x.test", 5 * 86400 - 100, "", ["deferred"], [], 0, 101.0),
]


@pytest.mark.parametrize("answers,sender,age,notify,states,bounced,warned,due", TABLE)
def test_table(answers, sender, age, notify, states, bounced, warned, due):
    env = env_of(sender, *[(f"r{i}@y.test", notify) for i in range(len(answers))])
    out = run(env, answers, age=age)
    assert [r.state for r in out.envelope.recipients] == states
    assert [r.status for r in out.bounce] == bounced
    assert len(out.warn) == warned
    if due is None:
        assert out.remove and out.due is None
    else:
        assert out.due == pytest.approx(T0 + age + due)
        assert out.envelope.next_attempt == utc_iso(out.due)
    assert [r.state for r in env.recipients] == ["pending"] * len(answers)  # input unchanged


def test_record_of_a_deferral():
    env = env_of("a@x.test", ("r@y.test", ""))
    out = run(env, [BUSY], age=60, attempt=3)
    e = out.envelope
    assert e.attempts == "3" and e.last_attempt == utc_iso(T0 + 60)
    assert e.first_attempt == utc_iso(T0 + 59)
    assert e.last_error == "450 4.2.1 Mailbox busy"
    assert e.history == [f"{utc_iso(T0 + 60)} mx.test[127.0.0.2]:25 deferred 450 4.2.1 Mailbox busy"]
    assert e.recipients[0].reply == "450 4.2.1 Mailbox busy"
    # attempt 3: 300 * 2**2 = 1200 s, jitter +-10 % at the ends of rand
    assert run(env, [BUSY], age=60, attempt=3, rand=0.0).due == pytest.approx(T0 + 60 + 1080)
    assert run(env, [BUSY], age=60, attempt=3, rand=0.999999).due == pytest.approx(
        T0 + 60 + 1320, abs=0.01)


def test_only_the_recipients_tried_change():
    env = env_of("a@x.test", ("done@y.test", ""), ("r@y.test", ""))
    env.recipients[0].state, env.recipients[0].reply = "sent", "250 earlier"
    out = run(env, [GONE], age=10)
    assert [(r.state, r.reply) for r in out.envelope.recipients] == [
        ("sent", "250 earlier"), ("failed", "550 5.1.1 No such user")]


@pytest.mark.parametrize("age,warned_before,sender,notify,expect", [
    (400, "", "a@x.test", "", 0),          # younger than delay_warning
    (600, "", "a@x.test", "", 1),          # old enough: one warning
    (600, utc_iso(T0 + 500), "a@x.test", "", 0),   # warned already
    (600, "", "", "", 0),                  # null sender: never
    (600, "", "a@x.test", "FAILURE", 0),   # did not ask for DELAY
    (600, "", "a@x.test", "DELAY", 1),
])
def test_delay_warning(age, warned_before, sender, notify, expect):
    retry = RetryConfig(**{**RETRY.__dict__, "delay_warning": 500.0})
    env = env_of(sender, ("r@y.test", notify))
    env.delay_warned = warned_before
    out = run(env, [BUSY], age=age, retry=retry)
    assert len(out.warn) == expect
    if expect:
        w = out.warn[0]
        assert (w.action, w.status, w.will_retry_until) == ("delayed", "4.2.1", T0 + 5 * 86400)
        assert out.envelope.delay_warned == utc_iso(T0 + age)
    assert env.delay_warned == warned_before


@pytest.mark.parametrize("notify,what,expect", [
    ("", "FAILURE", True), ("", "DELAY", True), ("NEVER", "FAILURE", False),
    ("SUCCESS,FAILURE", "FAILURE", True), ("SUCCESS", "DELAY", False),
    ("failure", "FAILURE", True),
])
def test_wants(notify, what, expect):
    assert wants(Recipient("r@y.test", notify=notify), what) is expect


def test_a_failed_bounce_is_reported_to_the_postmaster_once():
    out = run(env_of("", ("a@x.test", ""), ("b@x.test", "")), [GONE, SENT], age=10)
    assert [(r.address, r.status) for r in out.notice] == [("a@x.test", "5.1.1")]
    assert out.bounce == [] and out.remove
    # The notice itself failing: nothing more.
    notice = env_of("", ("postmaster@x.test", ""))
    notice.origin = DOUBLE_BOUNCE
    out = run(notice, [GONE], age=10)
    assert out.notice == [] and out.bounce == [] and out.remove
    # A message with a sender is bounced to it, the postmaster not told.
    out = run(env_of("s@x.test", ("a@x.test", "")), [GONE], age=10)
    assert out.notice == [] and len(out.bounce) == 1

"""The retry schedule (msa.delivery.backoff): pure, so tested with fixed numbers."""

from __future__ import annotations

import pytest

from msa.config import RetryConfig
from msa.delivery import backoff

S = RetryConfig(min_delay=300, max_delay=4000, factor=2, jitter=0.0, lifetime=5 * 86400)


Schedule = RetryConfig


def test_exponential_doubles_from_min_and_caps_at_max():
    delays = [backoff.base_delay(S, a, age=0) for a in range(1, 8)]
    assert delays == [300, 600, 1200, 2400, 4000, 4000, 4000]


def test_huge_attempt_numbers_do_not_overflow():
    assert backoff.base_delay(S, 10_000, age=0) == 4000


def test_age_strategy_is_postfix_clamp():
    s = Schedule(strategy="age")
    assert backoff.base_delay(s, 1, age=10) == 300
    assert backoff.base_delay(s, 9, age=1000) == 1000
    assert backoff.base_delay(s, 2, age=86400) == 4000


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError):
        backoff.base_delay(Schedule(strategy="fibonacci"), 1, 0)


@pytest.mark.parametrize("rand", [0.0, 0.25, 0.5, 0.999999])
def test_jitter_stays_within_bounds(rand):
    d = backoff.jittered(1000, 0.1, rand)
    assert 900 <= d <= 1100


def test_jitter_spreads():
    assert backoff.jittered(1000, 0.1, 0.0) != backoff.jittered(1000, 0.1, 0.99)
    assert backoff.jittered(1000, 0.1, 0.5) == 1000


def test_jitter_never_below_one_second():
    assert backoff.jittered(0.5, 1.0, 0.0) == 1.0


def test_next_attempt_is_after_now():
    now = 1_000_000.0
    due = backoff.next_attempt(S, 1, arrival=now - 10, now=now, rand=0.5, life=S.lifetime)
    assert due == now + 300


def test_next_attempt_does_not_pass_end_of_lifetime():
    now = 1_000_000.0
    s = Schedule(min_delay=300, max_delay=4000, jitter=0)
    due = backoff.next_attempt(s, 5, arrival=now - 900, now=now, rand=0.5, life=1000)
    assert due == now - 900 + 1000 + 1
    assert not backoff.expired(now - 900, now, 1000)
    assert backoff.expired(now - 900, due, 1000)


def test_bounces_live_bounce_lifetime():
    cfg = RetryConfig(lifetime=100, bounce_lifetime=7)
    assert backoff.lifetime(cfg) == 100
    assert backoff.lifetime(cfg, null_sender=True) == 7

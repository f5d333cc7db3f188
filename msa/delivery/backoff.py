"""The retry schedule: when a deferred message is tried again, and when it
has been queued too long. Pure: time and randomness come in as arguments.

Two strategies (``[retry].strategy``):

``exponential`` (default)
    ``delay = min_delay * factor ** (attempt - 1)``, capped at ``max_delay``.
    With the defaults (300 s, factor 2, 4000 s) attempts follow at about
    5, 10, 20, 40 minutes, then every 66 minutes: a relay that is down is
    not hammered (nullmailer#4), a short outage costs little delay.
``age``
    Postfix ``qmgr``: ``delay = clamp(age of message, min_delay,
    max_delay)``. Waiting as long as the message has already waited is
    also a doubling schedule, but keyed on arrival time, so a message
    released from hold after a day starts at ``max_delay``.

Jitter (``[retry].jitter``, a fraction) spreads each delay uniformly over
``delay * (1 ± jitter)`` so that messages deferred together by one outage
do not all come back in the same second (thundering herd).

Invariants:

- ``min_delay <= delay`` before jitter and ``delay <= max_delay`` before
  jitter; jitter never makes a delay negative or shorter than one second.
- The due time is never later than the end of the queue lifetime (plus one
  second), so the message is tried one last time when its lifetime ends and
  then bounced, instead of lingering up to ``max_delay`` past it.
"""

from __future__ import annotations

STRATEGIES = ("exponential", "age")


def lifetime(retry, null_sender: bool = False) -> float:
    """How long a message may stay queued: a bounce (null sender) lives
    ``bounce_lifetime``, anything else ``lifetime``."""
    return retry.bounce_lifetime if null_sender else retry.lifetime


STRATEGIES = ("exponential", "age")  # [retry] strategy


def base_delay(s, attempt: int, age: float) -> float:
    """The delay after failed attempt number ``attempt`` (1-based), before
    jitter, for a message that arrived ``age`` seconds ago. ``s`` is a
    :class:`msa.config.RetryConfig` (any object with its attributes)."""
    strategy = getattr(s, "strategy", "exponential")
    if strategy == "age":
        delay = age
    elif strategy == "exponential":
        exponent = max(attempt - 1, 0)
        # Cap the exponent: factor ** 1000 overflows a float.
        delay = s.min_delay * (s.factor ** min(exponent, 64))
    else:
        raise ValueError(f"unknown retry strategy {strategy!r}")
    return min(max(delay, s.min_delay), s.max_delay)


def jittered(delay: float, jitter: float, rand: float) -> float:
    """``delay`` moved by up to ``±jitter`` of itself; ``rand`` in [0, 1)."""
    spread = delay * max(0.0, min(jitter, 1.0)) * (2.0 * rand - 1.0)
    return max(1.0, delay + spread)


def expired(arrival: float, now: float, life: float) -> bool:
    """True when the message has been queued for its whole lifetime."""
    return now >= arrival + life


def next_attempt(s, attempt: int, arrival: float, now: float, rand: float,
                 life: float) -> float:
    """The due time (epoch seconds) after failed attempt ``attempt`` of a
    message that may live ``life`` seconds from ``arrival``."""
    delay = jittered(base_delay(s, attempt, now - arrival), s.jitter, rand)
    # One last try at the end of the lifetime rather than long after it.
    return max(now + 1.0, min(now + delay, arrival + life + 1.0))

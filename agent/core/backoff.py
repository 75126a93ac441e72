"""The one retry delay: device reconnects, broker reconnects and buffer commit retries wait by it."""

from __future__ import annotations

import random

_MAX_DOUBLINGS = 1000
"""``2.0 ** n`` overflows past 1023; a day-long outage counts tens of thousands of failures."""


def backoff_delay(failures: int, lo: float, hi: float, rng: random.Random | None = None) -> float:
    """Exponential backoff: the n-th consecutive failure waits ``lo·2^(n-1)``, capped at ``hi``.

    With ``rng`` the delay is scaled by a random factor in [0.5, 1], so that many peers that failed
    together (a switch reboot, a broker restart) do not retry in lockstep; the factor never exceeds
    1, so the delay, jitter included, never exceeds ``hi``. Without ``rng`` there is no jitter: a
    lone retrier (the buffer's commit thread) has no herd to spread."""
    base = min(hi, lo * 2.0 ** min(max(0, failures - 1), _MAX_DOUBLINGS))
    return base if rng is None else base * rng.uniform(0.5, 1.0)

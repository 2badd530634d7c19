"""Jittered, capped exponential backoff: the one delay policy of every retrying loop in the runner.

Used by the work queue (per key), the informer's reconnects, the heartbeat and the credential exchange.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff", "BackoffPolicy"]


@dataclass(frozen=True)
class BackoffPolicy:
    """``base * 2**failures`` seconds, at most ``cap``, less up to ``jitter`` of itself at random.

    Jitter takes away rather than adds, so the cap holds; with ``jitter=0.5`` a delay of 8 s becomes
    something between 4 s and 8 s, which keeps many runners that lost the same server from coming back at
    the same moment.
    """

    base: float = 0.5
    cap: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base or not 0 <= self.jitter <= 1:
            raise ValueError(f"bad backoff policy: {self}")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """The delay after the ``failures``-th failure in a row (counted from 1)."""
        exponent = min(max(failures - 1, 0), 64)  # 2**64 * base is past any cap
        ceiling = min(self.cap, self.base * 2.0**exponent)
        if self.jitter == 0:
            return ceiling
        return ceiling * (1 - self.jitter * (rng or random).random())


@dataclass
class Backoff:
    """The backoff state of one loop: how many failures in a row."""

    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    failures: int = 0
    rng: random.Random | None = None

    def next_delay(self) -> float:
        """Count a failure and return how long to wait before trying again."""
        self.failures += 1
        return self.policy.delay(self.failures, self.rng)

    def reset(self) -> None:
        self.failures = 0

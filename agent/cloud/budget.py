"""How much a model may ask of the cloud: calls per minute and calls in flight.

A token bucket holding up to ``per_minute`` calls, refilled continuously, so a
quiet minute does not allow a burst of more than one minute's worth; and a count
of calls in flight, so a slow cloud cannot tie up every connection. A refused
call is answered locally at once (``budget_exhausted``): the budget never makes a
caller wait. Used only from the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Lease:
    """One admitted call; ``release`` when it is over (idempotent)."""

    __slots__ = ("_budget", "released")

    def __init__(self, budget: CallBudget) -> None:
        self._budget = budget
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._budget.in_flight -= 1


class CallBudget:
    def __init__(
        self, per_minute: int, max_in_flight: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.per_minute = per_minute
        self.max_in_flight = max_in_flight
        self._clock = clock
        self.tokens = float(per_minute)
        self._stamp = clock()
        self.in_flight = 0

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(
            float(self.per_minute), self.tokens + (now - self._stamp) * self.per_minute / 60.0
        )
        self._stamp = now

    def acquire(self, reserve: float = 0.0) -> Lease | None:
        """A lease, or None when over budget.

        ``reserve`` is the share of the bucket that must stay for others: background
        work (retries) passes 0.5, so it only ever spends what live traffic leaves.
        """
        if self.in_flight >= self.max_in_flight:
            return None
        self._refill()
        if self.tokens < 1.0 + reserve * self.per_minute:
            return None
        self.tokens -= 1.0
        self.in_flight += 1
        return Lease(self)

    def snapshot(self) -> dict[str, float | int]:
        self._refill()
        return {
            "per_minute": self.per_minute,
            "tokens": round(self.tokens, 2),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }

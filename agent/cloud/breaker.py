"""A circuit breaker: stop calling what keeps failing, probe it now and then.

Closed: calls go through; ``failures`` consecutive failures open it. Open: calls
are refused at once (the caller answers locally) until the back-off has passed;
then exactly one call is let through as a probe (half-open). The probe's success
closes the breaker; its failure opens it again with the back-off doubled (up to a
cap, with jitter so a fleet of boxes does not probe in lockstep).

The agent keeps two kinds: one for the cloud endpoint (opened by the first
connection failure: that is the *offline* state) and one per model (opened by
timeouts and errors: *circuit_open*). Used only from the event loop, so no locks.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable


class State(enum.IntEnum):
    # The values are what the Prometheus gauge shows.
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class Permit:
    """One call let through; exactly one of success/failure/abandon settles it."""

    __slots__ = ("_breaker", "_generation", "probe", "settled")

    def __init__(self, breaker: CircuitBreaker, probe: bool) -> None:
        self._breaker = breaker
        self._generation = breaker.generation
        self.probe = probe
        self.settled = False

    def success(self) -> None:
        if not self.settled:
            self.settled = True
            self._breaker._on_success(self)

    def failure(self, error: str | None = None, *, trip: bool = False) -> None:
        """A failed call; ``trip`` opens at once, whatever the count (unreachable)."""
        if not self.settled:
            self.settled = True
            self._breaker._on_failure(self, error, trip)

    def abandon(self) -> None:
        """Neither: the call was cancelled, or failed for a reason not this breaker's."""
        if not self.settled:
            self.settled = True
            self._breaker._on_abandon(self)


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        backoff_s: float,
        max_backoff_s: float,
        jitter: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_change: Callable[[State], None] | None = None,
    ) -> None:
        self.failures_to_open = failures
        self.backoff_s = backoff_s
        self.max_backoff_s = max(max_backoff_s, backoff_s)
        self.jitter = jitter
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_change = on_change
        self.state = State.CLOSED
        self.consecutive_failures = 0
        self.opens = 0  # consecutive openings without a success: the back-off exponent
        self.retry_at = 0.0
        self.last_error: str | None = None
        # Bumped on every state change: a permit from an older generation (a slow
        # call that started before the breaker opened) must not close it.
        self.generation = 0

    # ---- queries --------------------------------------------------------------

    def would_allow(self) -> bool:
        if self.state is State.CLOSED:
            return True
        return self.state is State.OPEN and self._clock() >= self.retry_at

    def seconds_until_probe(self) -> float:
        if self.state is not State.OPEN:
            return 0.0
        return max(0.0, self.retry_at - self._clock())

    # ---- the one way in ---------------------------------------------------------

    def acquire(self) -> Permit | None:
        """A permit to call, or None: refused (open, or a probe is already out)."""
        if self.state is State.CLOSED:
            return Permit(self, probe=False)
        if self.state is State.OPEN and self._clock() >= self.retry_at:
            self._set(State.HALF_OPEN)
            return Permit(self, probe=True)
        return None

    # ---- outcomes ----------------------------------------------------------------

    def _on_success(self, permit: Permit) -> None:
        if permit.probe or self.state is State.CLOSED:
            self.consecutive_failures = 0
            self.opens = 0
            self.last_error = None
            if self.state is not State.CLOSED:
                self._set(State.CLOSED)
        # A stale success while open proves little (it started before the trouble).

    def _on_failure(self, permit: Permit, error: str | None, trip: bool) -> None:
        if error:
            self.last_error = error
        if permit.probe:
            self._open()
            return
        if self.state is not State.CLOSED or permit._generation != self.generation:
            return  # already open: late failures of calls started before do not pile up
        self.consecutive_failures += 1
        if trip or self.consecutive_failures >= self.failures_to_open:
            self._open()

    def _on_abandon(self, permit: Permit) -> None:
        if permit.probe and self.state is State.HALF_OPEN:
            # Nobody learnt anything: let the next call probe at once.
            self.state = State.OPEN
            self.generation += 1
            self.retry_at = self._clock()
            if self._on_change:
                self._on_change(self.state)

    def _open(self) -> None:
        self.opens += 1
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (self.opens - 1))
        if self.jitter:
            delay *= 1.0 + self._rng.uniform(-self.jitter, self.jitter)
        self.retry_at = self._clock() + delay
        self.consecutive_failures = 0
        self._set(State.OPEN)

    def _set(self, state: State) -> None:
        self.state = state
        self.generation += 1
        if self._on_change:
            self._on_change(state)

    def snapshot(self) -> dict[str, object]:
        return {
            "state": self.state.name.lower(),
            "consecutive_failures": self.consecutive_failures,
            "probe_in_s": round(self.seconds_until_probe(), 3),
            "last_error": self.last_error,
        }

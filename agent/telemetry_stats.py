"""Per-model inference aggregates for the fleet: ``inference_stats`` outbox records.

Every inference the data plane (``agent/dataplane.py``) answers (or fails) for a known
model version, whatever protocol brought it, is counted here, into a window per
(model, version): requests, errors, a latency histogram, a
confidence histogram, who answered (edge/cloud/mixed) and why the cloud did not
(fallback reasons). Every ``fleet.telemetry.stats_interval_s`` the windows are
swapped for empty ones and each window that saw a request becomes one LOW-priority
``inference_stats`` record in the outbox (format: docs/fleet.md). A clean stop writes
the last partial window, so nothing counted is lost on shutdown.

The recording side runs on the event loop for every request (thousands a second on
a small box), so it is kept to what is unavoidable: two dict lookups, a bisect on a
tuple of a dozen floats, and int increments in place. No locks (one thread: the
loop), no objects made per request. Everything expensive (building the JSON
documents, the outbox write) happens in the flush, once a window.

What is counted, per request (a batched OIP request is one request):

* ``count``: every request that reached a loaded version, answered or failed;
* ``errors``: the failed ones (bad input, full queue, runtime error...). Requests that
  never reach a loaded version (unknown model, version or label: 404; a model with
  nothing loaded: 503) have no version to count against and are not counted;
* ``latency_ms``: every request, failed ones included (time from arrival to the
  answer or the failure), so its counts add up to ``count``;
* ``sources`` and ``fallback``: answered requests only (``sum(sources) == count -
  errors``);
* ``confidence``: answered requests of models whose outputs carry a confidence
  (classifiers and detectors, not raw outputs): the answer's confidence by the
  model's confidence rule (the cloud's for items the cloud answered), on every
  endpoint, with or without a cloud. For a batch, the least confident item (the one
  that says the most about a model that is unsure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from edgefleet.agent.outbox import NewRecord, Priority
from edgefleet.core import protocol

log = logging.getLogger(__name__)

KIND = "inference_stats"

# Bucket upper bounds ("le", inclusive) of the wire format (core/protocol.py); each
# histogram's counts have one more entry, for "above the last bound".
LATENCY_BOUNDS_MS = protocol.LATENCY_BOUNDS_MS
CONFIDENCE_BOUNDS = protocol.CONFIDENCE_BOUNDS
# The hot path gets latencies in seconds: bisecting on bounds in seconds saves a
# multiplication per request.
_LATENCY_BOUNDS_S: tuple[float, ...] = tuple(b / 1000 for b in LATENCY_BOUNDS_MS)
_N_LATENCY = len(LATENCY_BOUNDS_MS) + 1
_N_CONFIDENCE = len(CONFIDENCE_BOUNDS) + 1

# Writes a batch of records (``Outbox.add``); injectable for the unit tests.
RecordSink = Callable[[Iterable[NewRecord]], Awaitable[Any]]


class _Window:
    """One (model, version)'s counts since the last flush. Mutated in place."""

    __slots__ = ("confidence", "count", "errors", "fallback", "latency", "sources")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.latency = [0] * _N_LATENCY
        self.confidence = [0] * _N_CONFIDENCE
        self.sources: dict[str, int] = {}
        self.fallback: dict[str, int] = {}


@dataclass
class StatsCounters:
    """How the aggregator itself is doing (diagnostics and tests)."""

    flushes: int = 0
    records_written: int = 0
    records_lost: int = 0  # built but the outbox refused them (closed, disk error)


class InferenceStats:
    """``record``/``record_error`` on every request; ``start``/``stop`` for the flush task."""

    def __init__(self, sink: RecordSink, interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.sink = sink
        self.interval_s = interval_s
        self.counters = StatsCounters()
        # model -> version -> window. Nested rather than keyed by (model, version) so
        # that a lookup builds no tuple.
        self._windows: dict[str, dict[str, _Window]] = {}
        self._window_start = time.time()  # wall clock: what the fleet shows
        self._window_t0 = time.monotonic()  # the window's length survives clock jumps
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- hot path (event loop, every request) -------------------------------------------

    def _new_window(self, model: str, version: str) -> _Window:
        # Once per model version and window: the slow path of the lookups below.
        w = self._windows.setdefault(model, {})[version] = _Window()
        return w

    def record(
        self,
        model: str,
        version: str,
        latency_s: float,
        source: str,
        fallback: str | None = None,
        confidence: float | None = None,
    ) -> None:
        """One answered request: who answered (``source``: edge, cloud, mixed), why the
        cloud did not (``fallback``), and the answer's ``confidence`` if it has one."""
        # The lookup is inlined (here and below): a method call costs as much as the rest.
        by_version = self._windows.get(model)
        w = by_version.get(version) if by_version is not None else None
        if w is None:
            w = self._new_window(model, version)
        w.count += 1
        w.latency[bisect_left(_LATENCY_BOUNDS_S, latency_s)] += 1
        if confidence is not None:
            w.confidence[bisect_left(CONFIDENCE_BOUNDS, confidence)] += 1
        sources = w.sources
        sources[source] = sources.get(source, 0) + 1
        if fallback is not None:
            fb = w.fallback
            fb[fallback] = fb.get(fallback, 0) + 1

    def record_error(self, model: str, version: str, latency_s: float) -> None:
        """One request for a loaded version that failed (any status)."""
        by_version = self._windows.get(model)
        w = by_version.get(version) if by_version is not None else None
        if w is None:
            w = self._new_window(model, version)
        w.count += 1
        w.errors += 1
        w.latency[bisect_left(_LATENCY_BOUNDS_S, latency_s)] += 1

    # ---- flush (once a window) ----------------------------------------------------------

    def take(self) -> list[dict[str, Any]]:
        """Swap in empty windows; the ``inference_stats`` data of each non-empty one."""
        windows, self._windows = self._windows, {}
        start, t0 = self._window_start, self._window_t0
        self._window_start, self._window_t0 = time.time(), time.monotonic()
        window_s = round(self._window_t0 - t0, 3)
        out = []
        for model, by_version in windows.items():
            for version, w in by_version.items():
                if w.count == 0:
                    continue
                try:
                    record = protocol.InferenceStats(
                        model=model,
                        version=version,
                        window_start=round(start, 3),
                        window_s=window_s,
                        count=w.count,
                        errors=w.errors,
                        latency_ms=protocol.Histogram(le=list(LATENCY_BOUNDS_MS), counts=w.latency),
                        confidence=protocol.Histogram(
                            le=list(CONFIDENCE_BOUNDS), counts=w.confidence
                        ),
                        sources=w.sources,
                        fallback=w.fallback,
                    )
                except ValidationError as exc:  # a bug here, not bad input: say so, go on
                    self.counters.records_lost += 1
                    log.error("inference stats of %s:%s not sent: %s", model, version, exc)
                    continue
                out.append(record.to_wire())
        return out

    async def flush(self) -> int:
        """Write the current windows to the outbox; the number of records written."""
        docs = self.take()
        self.counters.flushes += 1
        if not docs:
            return 0  # a quiet window sends nothing
        try:
            await self.sink([NewRecord(KIND, d, Priority.LOW) for d in docs])
        except Exception as exc:
            # The outbox is closed or its disk failing: these counts are gone, but
            # serving must go on, and the next window may fare better.
            self.counters.records_lost += len(docs)
            log.warning("inference stats for %d model versions lost: %s", len(docs), exc)
            return 0
        self.counters.records_written += len(docs)
        return len(docs)

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("inference stats already started")
        self._stopping.clear()
        # The first window starts now, not when the agent was built (before its models
        # loaded); anything counted before (nothing, normally) joins it.
        self._window_start, self._window_t0 = time.time(), time.monotonic()
        self._task = asyncio.create_task(self._run(), name="inference-stats")

    async def stop(self) -> None:
        """Flush the last partial window and end the task. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        try:
            # The task's own last iteration writes the final window: stopping by
            # cancellation could cut a flush off inside the outbox write and lose it.
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()  # our caller gave up: do not leave the task behind
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise
        except Exception:  # a bug in the flush loop must not break the agent's stop
            log.exception("inference stats task failed")

    async def _run(self) -> None:
        while True:
            stopping = self._stopping.is_set()
            if not stopping:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval_s):
                        await self._stopping.wait()
                stopping = self._stopping.is_set()
            await self.flush()
            if stopping:
                # Set before this flush began: what was counted until then is written.
                return

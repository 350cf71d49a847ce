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

**Input drift** (``drift_stats`` records, :class:`DriftMonitor`): the data plane also
hands each answered request's input tensors and scored answer to ``observe``. On the
loop that is a dict lookup and a list append; the binning against the version's
reference profile (``profile.json`` in its bundle, core/drift.py) runs in a thread of
its own, ``DRIFT_BATCH`` requests per job, one job at a time, so a busy box drops
queued requests (counted in ``dropped``) rather than work on the loop or pile up
memory. At each flush every version that saw requests gets one ``drift_stats``
record: PSI (max and mean over the input features, and of the answers' class
distribution or, for detectors, their confidence histogram) and Jensen–Shannon,
once at least ``core.drift.MIN_SAMPLES`` items were counted (until then the counts
carry over to the next window and the record says "too few samples"); a bundle
without a profile gets ``drift_reason`` "no reference profile". With a cloud, the
classes and confidences counted are those of the answer (the cloud's for the items
it answered), like the confidence histogram.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from edgefleet.agent.metrics import Gauge
from edgefleet.agent.outbox import NewRecord, Priority
from edgefleet.core import drift, protocol
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.processing.scoring import Scored

log = logging.getLogger(__name__)

KIND = "inference_stats"
DRIFT_KIND = "drift_stats"
DRIFT_BATCH = 16  # requests binned per job in the drift thread
# Requests waiting per version; more are dropped and counted. Bounds the memory a
# lagging drift thread holds: 64 requests of a 128x128 RGB float input are 12 MiB.
DRIFT_MAX_QUEUED = 64

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
# Another producer of windowed records flushed with these (agent/shadow.py's
# ``shadow_stats``): called on the event loop once a window, returns the records' data.
RecordSource = Callable[[], list[dict[str, Any]]]


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


Batch = tuple[Mapping[str, np.ndarray], Scored | None]


class _DriftVersion:
    """One version's drift state. The loop owns every field but ``counts``, which only
    the drift thread touches (created, added to, scored, reset there)."""

    __slots__ = (
        "counts",
        "directory",
        "dropped",
        "features",
        "job",
        "queued",
        "reason",
        "seen",
        "window_start",
        "window_t0",
    )

    def __init__(self, directory: Path, reason: str | None) -> None:
        self.directory = directory
        self.reason = reason  # why there is no drift figure, for good (no profile...)
        self.counts: drift.DriftCounts | None = None
        self.features = 0
        self.queued: list[Batch] = []
        self.job: asyncio.Future[str | None] | None = None
        self.seen = 0  # items this flush window
        self.dropped = 0
        self.window_start = time.time()
        self.window_t0 = time.monotonic()


class DriftMonitor:
    """Per-version live bins against the bundle's reference profile (module doc).

    ``observe`` on the loop for every answered request; ``take`` (a coroutine, the
    flush) the ``drift_stats`` data of every version that saw requests; ``close``
    at the end. ``current`` holds each version's last figures, for the agent's model
    metadata and /metrics.
    """

    def __init__(self, min_samples: int = drift.MIN_SAMPLES) -> None:
        self.min_samples = min_samples
        self._versions: dict[tuple[str, str], _DriftVersion] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.current: dict[tuple[str, str], dict[str, Any]] = {}
        # Registered with the agent's /metrics by the data plane; set at each flush.
        self.gauge = Gauge(
            "edgefleet_drift_psi",
            "Input drift of the last window with figures: PSI against the bundle's reference"
            " profile; feature max or mean over the inputs, output: the answers",
            "gauge",
            ("model", "version", "feature"),
        )

    def status(self, manifest: Manifest) -> dict[str, Any]:
        """The version's current drift, for its model metadata: the last record's
        figures, or null figures and why."""
        key = (manifest.name, manifest.version)
        doc = self.current.get(key)
        if doc is None:
            reason = "no drift window yet"
            if manifest.reference_profile is None:
                reason = drift.NO_PROFILE
            doc = {"samples": 0, "drift_reason": reason}
        figures = ("psi_max", "psi_mean", "psi_output", "js_max", "js_output")
        out = {k: doc.get(k) for k in ("window_start", "window_s", "samples", *figures)}
        return out | {"drift_reason": doc.get("drift_reason")}

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift")
        return self._pool

    # ---- hot path (event loop) ----------------------------------------------------------

    def observe(
        self,
        manifest: Manifest,
        directory: Path,
        inputs: Mapping[str, np.ndarray],
        scored: Scored | None,
    ) -> None:
        """One answered request of ``manifest``'s version (bundle in ``directory``)."""
        key = (manifest.name, manifest.version)
        v = self._versions.get(key)
        if v is None:
            reason = None if manifest.reference_profile is not None else drift.NO_PROFILE
            v = self._versions[key] = _DriftVersion(directory, reason)
        first = next(iter(inputs.values()), None)
        n = int(first.shape[0]) if first is not None and first.ndim else 1
        v.seen += n
        if v.reason is not None:
            return
        if len(v.queued) >= DRIFT_MAX_QUEUED:
            v.dropped += n
            return
        v.queued.append((inputs, scored))
        if v.job is None and len(v.queued) >= DRIFT_BATCH:
            self._submit(v)

    def _submit(self, v: _DriftVersion) -> None:
        items, v.queued = v.queued, []
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._executor(), self._bin, v, items)
        v.job = job

        def done(f: asyncio.Future[str | None]) -> None:
            v.job = None
            if f.cancelled():
                return
            exc = f.exception()
            error = f"drift binning failed: {exc}" if exc is not None else f.result()
            if error is not None and v.reason is None:
                v.reason = error[: protocol.MAX_REASON_CHARS]
                v.queued.clear()
                log.warning("%s: %s", v.directory, error)
            elif len(v.queued) >= DRIFT_BATCH:
                self._submit(v)

        job.add_done_callback(done)

    # ---- the drift thread ---------------------------------------------------------------

    @staticmethod
    def _bin(v: _DriftVersion, items: list[Batch]) -> str | None:
        """Count ``items`` (drift thread); an error message when the profile is unusable."""
        if v.counts is None:
            path = v.directory / drift.PROFILE_FILE
            try:
                profile = drift.ReferenceProfile.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as exc:
                return f"reference profile unreadable: {type(exc).__name__}: {exc}"
            v.counts = drift.DriftCounts(profile)
            v.features = sum(len(p.features) for p in profile.inputs)
        rule = v.counts.profile.confidence.rule if v.counts.profile.confidence else None
        for inputs, scored in items:
            if scored is None:
                v.counts.add(inputs)
                continue
            if rule is not None and scored.rule != rule:
                # A version calibrated to another confidence rule than its profile's
                # (edge-convert calibrate): judge the answers by the profile's rule.
                with contextlib.suppress(ValueError, KeyError):
                    scored = scored.under(rule)
            v.counts.add(inputs, scored.top_class, scored.confidence)
        return None

    def _score(self, v: _DriftVersion) -> drift.DriftScore | None:
        """The window's score (drift thread); the counts start over when it has figures."""
        if v.counts is None:
            return None
        score = v.counts.score(self.min_samples)
        if score.reason is None:
            v.counts.reset()
        return score

    # ---- flush (once a window) ----------------------------------------------------------

    async def take(self) -> list[dict[str, Any]]:
        """The ``drift_stats`` data of every version that saw requests since the last
        take; versions that saw none are forgotten (an unloaded version leaves)."""
        out = []
        loop = asyncio.get_running_loop()
        for key, v in list(self._versions.items()):
            if v.seen == 0:
                del self._versions[key]
                for feature in ("max", "mean", "output"):
                    self.gauge.remove(*key, feature)
                continue
            if v.job is not None:
                with contextlib.suppress(Exception):
                    await v.job  # its callback may already have queued the next one
            if v.queued and v.reason is None:
                items, v.queued = v.queued, []
                error = await loop.run_in_executor(self._executor(), self._bin, v, items)
                if error is not None and v.reason is None:
                    v.reason = error[: protocol.MAX_REASON_CHARS]
            score = None
            if v.reason is None:
                score = await loop.run_in_executor(self._executor(), self._score, v)
            now, t1 = time.time(), time.monotonic()
            fields: dict[str, Any] = {
                "model": key[0],
                "version": key[1],
                "window_start": round(v.window_start, 3),
                "window_s": round(t1 - v.window_t0, 3),
                "features": v.features,
                "dropped": v.dropped,
            }
            if score is None:
                fields |= {"samples": v.seen, "drift_reason": v.reason or drift.NO_PROFILE}
            else:
                fields |= {
                    "samples": score.samples,
                    "psi_max": score.psi_max,
                    "psi_mean": score.psi_mean,
                    "psi_output": score.psi_output,
                    "js_max": score.js_max,
                    "js_output": score.js_output,
                    "worst_feature": score.worst_feature,
                    "drift_reason": score.reason,
                }
            try:
                doc = protocol.DriftStats(**fields).to_wire()
            except ValidationError as exc:  # a bug here, not bad input: say so, go on
                log.error("drift stats of %s:%s not sent: %s", *key, exc)
                continue
            if v.dropped:
                log.info("%s:%s: %d items not binned for drift (busy)", *key, v.dropped)
            v.seen = v.dropped = 0
            # A window ends with figures or for good reasons; too few samples carry over.
            if score is None or score.reason is None:
                v.window_start, v.window_t0 = now, t1
            out.append(doc)
            if doc["drift_reason"] is None or key not in self.current:
                self.current[key] = doc  # too few samples keep the last figures shown
            for feature in ("max", "mean", "output"):
                value = doc[f"psi_{feature}"]
                if value is not None:
                    self.gauge.set(*key, feature, value=value)
        return out

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True)


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
        self.drift = DriftMonitor()
        self._sources: list[tuple[str, RecordSource]] = []

    def add_source(self, kind: str, take: RecordSource) -> None:
        """Flush ``take()``'s records as ``kind`` with every window (the same interval
        and outbox write; on a clean stop, the last partial window too)."""
        self._sources.append((kind, take))

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

    def observe(
        self,
        manifest: Manifest,
        directory: Path,
        inputs: Mapping[str, np.ndarray],
        scored: Scored | None,
    ) -> None:
        """An answered request's inputs and scored answer, for the drift score."""
        self.drift.observe(manifest, directory, inputs, scored)

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
        drift_docs = await self.drift.take()
        self.counters.flushes += 1
        records = [NewRecord(KIND, d, Priority.LOW) for d in docs]
        records += [NewRecord(DRIFT_KIND, d, Priority.LOW) for d in drift_docs]
        docs += drift_docs
        for kind, take in self._sources:
            try:
                more = take()
            except Exception:  # a defect of one producer must not lose the others
                log.exception("%s records not built", kind)
                continue
            records += [NewRecord(kind, d, Priority.LOW) for d in more]
            docs += more
        if not docs:
            return 0  # a quiet window sends nothing
        try:
            await self.sink(records)
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
            await self.drift.close()
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
        await self.drift.close()

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

"""Dynamic batching for one model version, like Triton's dynamic batcher or
MLServer's adaptive batching, behind the same async face as ``ModelRunner``.

Requests queue; whenever one of the version's model instances is free the
batcher takes, oldest first, as many *compatible* requests as fit
``max_batch_size`` rows and runs them as one execution in the inference executor,
then hands each caller its own rows back.

- Compatible: the same input names, and per input the same dtype and the same
  non-batch dimensions. Requests that differ go in different batches, never the
  same one (their tensors could not be concatenated, and padding would change
  the answers).
- Rows, not requests: a request with batch N counts N rows. A single request
  larger than ``max_batch_size`` runs alone (the runtime takes any batch; refusing
  it would break a caller that worked with batching off).
- ``max_queue_delay_us: 0``: batches only what already waits, so a lone request is
  run at once, by its own coroutine, exactly like ``ModelRunner`` (no added
  latency). With a delay, the oldest queued request waits at most that long for
  company (counted from its arrival); a batch that reaches ``max_batch_size`` or one
  of ``preferred_batch_sizes`` is sent at once.
- One batch in flight per instance. ``instances`` executions of this version may
  run at once (ONNX Runtime: concurrent runs on one session; LiteRT: one
  interpreter each, so never more than the backend's pool).
- A full queue (``server.max_queue_per_model`` requests) answers 503 with
  ``Retry-After``. With ``queue_timeout_ms``, a request that has not *started*
  within that time is dropped with 503 ``Unavailable`` (with ``Retry-After``) and
  never run; one already executing runs to the end.
- Only models whose every input and output has a dynamic first dimension (-1 in
  the manifest) are batched; the others, and any request whose inputs disagree on
  their batch size, go through the same queue one by one.
- A batch that fails is retried one request at a time, so one caller's bad input
  cannot fail the others' requests; a model whose outputs turn out not to have one
  row per input row stops being batched (logged once).

All blocking work (concatenating, the backend's ``infer``, splitting) runs in the
inference executor, never on the event loop; the bookkeeping runs on the loop
and is not thread-safe by design (no locks on the hot path).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.config import BatchingConfig
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.runner import FallbackNotice, wait_idle
from edgefleet.core.backends.base import Backend
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.bundle.selftest import load_vectors
from edgefleet.core.errors import Unavailable

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
# Requests that may not share a batch with any other all go in this one FIFO group.
_ALONE = "alone"
# Timers may fire a hair early (the loop's clock resolution): count that as due.
_EPSILON_S = 1e-6


def manifest_batchable(manifest: Manifest) -> bool:
    """Every input and output has a dynamic first (batch) dimension."""
    return all(t.shape and t.shape[0] == -1 for t in (*manifest.inputs, *manifest.outputs))


@dataclass(eq=False)
class _Request:
    inputs: Tensors
    rows: int
    key: Hashable
    enqueued: float  # time.monotonic()
    future: asyncio.Future[Tensors]


# Per execution: (rows, seconds spent in the executor).
_Execution = tuple[int, float]
_Outcome = Tensors | Exception


class DynamicBatcher:
    """The async face of one model version with dynamic batching (see the module doc)."""

    def __init__(
        self,
        backend: Backend,
        executor: Executor,
        metrics: Metrics,
        max_queue: int,
        settings: BatchingConfig,
        can_batch: bool | None = None,
        not_batched_because: str | None = None,
    ) -> None:
        self.backend = backend
        self.executor = executor
        self.metrics = metrics
        self.max_queue = max_queue
        self.settings = settings
        m = backend.manifest
        self._labels = (m.name, m.version)
        self._name = f"{m.name}:{m.version}"
        instances = settings.instances or backend.max_concurrency
        limit = backend.instance_limit
        if limit is not None and instances > limit:
            # A LiteRT pool cannot run more at once: more "instances" would only
            # park executor threads on the pool.
            log.warning(
                "%s: batching.instances %d > the backend's %d instances; using %d",
                self._name,
                instances,
                limit,
                limit,
            )
            instances = limit
        self.instances = instances
        self.max_batch_size = settings.max_batch_size
        self._preferred = frozenset(settings.preferred_batch_sizes)
        self._delay_s = settings.max_queue_delay_us / 1e6
        self._timeout_s = settings.queue_timeout_ms / 1e3
        if can_batch is None:
            can_batch = manifest_batchable(m)
            if not can_batch and not_batched_because is None:
                not_batched_because = "the manifest gives a fixed batch dimension"
        self.can_batch = can_batch
        self.not_batched_because = None if can_batch else not_batched_because
        if not can_batch:
            log.info("%s: requests run one by one (%s)", self._name, self.not_batched_because)
        self._free = instances  # instances not executing
        self._busy = 0  # executions whose thread has not finished
        self._pending = 0  # requests accepted and not answered yet
        self._queued = 0  # requests in _groups (including ones whose caller left)
        self._groups: dict[Hashable, deque[_Request]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._exec_ewma = 0.005  # seconds per execution, for Retry-After
        self._fallback = FallbackNotice()

    # ---- the InferenceHandle interface ---------------------------------------

    @property
    def pending(self) -> int:
        return self._pending

    async def infer(self, inputs: Tensors) -> Tensors:
        if self._closed:
            raise Unavailable(f"{self._name} is unloading", retry_after=1.0)
        if self._pending >= self.max_queue:
            self.metrics.inference_requests.inc(*self._labels, "rejected")
            raise Unavailable(
                f"{self._name} queue is full ({self._pending} waiting)",
                retry_after=self._retry_after(),
            )
        rows, key = self._describe(inputs)
        self._pending += 1
        self._idle.clear()
        self.metrics.queue_depth.set(*self._labels, value=self._pending)
        try:
            if self._free > 0 and self._queued == 0 and self._send_alone(rows, key):
                return await self._run_now(inputs, rows)
            loop = asyncio.get_running_loop()
            request = _Request(inputs, rows, key, time.monotonic(), loop.create_future())
            self._groups.setdefault(key, deque()).append(request)
            self._queued += 1
            self.metrics.queue_waiting.set(*self._labels, value=self._queued)
            self._schedule()
            return await request.future
        finally:
            self._pending -= 1
            self.metrics.queue_depth.set(*self._labels, value=self._pending)
            self._check_idle()

    async def drain(self, within_s: float) -> bool:
        """Wait until nothing is queued or executing; False if ``within_s`` passed first."""
        return await wait_idle(self._idle, within_s)

    def close(self) -> None:
        """Refuse new requests and fail queued ones (after ``drain``, there are none)."""
        self._closed = True
        self._cancel_timer()
        for queue in self._groups.values():
            for r in queue:
                if not r.future.done():
                    r.future.set_exception(Unavailable(f"{self._name} was unloaded", 1.0))
        self._groups.clear()
        self._queued = 0
        self.metrics.queue_waiting.set(*self._labels, value=0)

    def describe(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "batched": self.can_batch,
            "not_batched_because": self.not_batched_because,
            "max_batch_size": self.max_batch_size,
            "preferred_batch_sizes": sorted(self._preferred),
            "max_queue_delay_us": self.settings.max_queue_delay_us,
            "queue_timeout_ms": self.settings.queue_timeout_ms,
            "instances": self.instances,
        }

    # ---- requests ------------------------------------------------------------

    def _describe(self, inputs: Tensors) -> tuple[int, Hashable]:
        """Rows of a request, and the key of the requests it may share a batch with."""
        first = next(iter(inputs.values()), None)
        rows = int(first.shape[0]) if first is not None and first.ndim else 1
        if not self.can_batch or rows == 0:
            return max(rows, 1), _ALONE
        parts = []
        for name in sorted(inputs):
            a = inputs[name]
            if a.ndim == 0 or a.shape[0] != rows:
                return rows, _ALONE  # the backend will say what is wrong with it
            parts.append((name, a.dtype.str, a.shape[1:]))
        return rows, tuple(parts)

    def _send_alone(self, rows: int, key: Hashable) -> bool:
        """Nothing waits: may this request go now rather than wait for company?"""
        return (
            self._delay_s == 0
            or key == _ALONE
            or rows >= self.max_batch_size
            or rows in self._preferred
        )

    def _retry_after(self) -> float:
        per_execution = self.max_batch_size if self.can_batch else 1
        executions = math.ceil(self._pending / per_execution) / max(1, self.instances)
        # A hint, not a promise: HTTP's Retry-After is whole seconds anyway.
        return max(1.0, round(executions * self._exec_ewma, 1))

    def _check_idle(self) -> None:
        if self._pending == 0 and self._busy == 0:
            self._idle.set()

    # ---- scheduling (event loop) -----------------------------------------------

    def _schedule(self) -> None:
        """Drop timed-out requests, start every batch that is due, arm the timer."""
        if self._queued == 0:
            self._cancel_timer()
            return
        now = time.monotonic()
        wake = self._expire(now) if self._timeout_s else math.inf
        delay_wake = math.inf
        while self._free > 0 and self._groups:
            delay_wake = math.inf
            best: tuple[Hashable, deque[_Request], int] | None = None
            for key, queue in list(self._groups.items()):
                while queue and queue[0].future.done():  # the caller went away
                    queue.popleft()
                    self._queued -= 1
                if not queue:
                    del self._groups[key]
                    continue
                take, due = self._plan(key, queue, now)
                if take == 0:
                    delay_wake = min(delay_wake, due)
                elif best is None or queue[0].enqueued < best[1][0].enqueued:
                    best = (key, queue, take)  # oldest first among the due batches
            if best is None:
                break
            self._dispatch(*best)
        if self._free > 0:
            wake = min(wake, delay_wake)
        self.metrics.queue_waiting.set(*self._labels, value=self._queued)
        self._arm_timer(wake, now)

    def _plan(self, key: Hashable, queue: deque[_Request], now: float) -> tuple[int, float]:
        """How many queue entries to send now (0: wait), and when they are due if 0."""
        if key == _ALONE or not self.can_batch:
            return 1, 0.0
        limit = self.max_batch_size
        entries = rows = preferred = 0
        full = False
        for r in queue:
            if r.future.done():
                entries += 1  # popped and skipped with the batch
                continue
            if rows and rows + r.rows > limit:
                full = True
                break
            entries += 1
            rows += r.rows
            if rows in self._preferred:
                preferred = entries
            if rows >= limit:
                full = True
                break
        due = queue[0].enqueued + self._delay_s
        if full or now + _EPSILON_S >= due:
            return entries, 0.0
        if preferred:
            return preferred, 0.0
        return 0, due

    def _expire(self, now: float) -> float:
        """Fail requests that waited past ``queue_timeout_ms``; when the next one will."""
        wake = math.inf
        for key, queue in list(self._groups.items()):
            # One timeout for all and FIFO queues: the expired ones are a prefix.
            while queue and (
                queue[0].future.done() or now + _EPSILON_S >= queue[0].enqueued + self._timeout_s
            ):
                r = queue.popleft()
                self._queued -= 1
                if not r.future.done():
                    waited_ms = (now - r.enqueued) * 1000
                    self.metrics.inference_requests.inc(*self._labels, "timeout")
                    r.future.set_exception(
                        Unavailable(
                            f"{self._name}: request waited {waited_ms:.0f} ms in the queue"
                            f" (queue_timeout_ms {self.settings.queue_timeout_ms}); not run",
                            retry_after=1.0,
                        )
                    )
            if queue:
                wake = min(wake, queue[0].enqueued + self._timeout_s)
            else:
                del self._groups[key]
        return wake

    def _arm_timer(self, wake: float, now: float) -> None:
        if wake == math.inf:
            self._cancel_timer()
            return
        if self._timer is not None and abs(self._timer_at - wake) < _EPSILON_S:
            return
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        # call_later, not call_at: loop.time() is not time.monotonic() on every loop.
        self._timer = loop.call_later(max(0.0, wake - now), self._on_timer)
        self._timer_at = wake

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._schedule()

    # ---- execution -------------------------------------------------------------

    def _dispatch(self, key: Hashable, queue: deque[_Request], entries: int) -> None:
        batch: list[_Request] = []
        for _ in range(entries):
            r = queue.popleft()
            self._queued -= 1
            if not r.future.done():
                batch.append(r)
        if not queue:
            del self._groups[key]
        if not batch:
            return
        started = time.monotonic()
        for r in batch:
            self.metrics.queue_duration.observe(*self._labels, value=started - r.enqueued)
        loop = asyncio.get_running_loop()
        self._free -= 1
        self._busy += 1
        try:
            work = self.executor.submit(
                self._compute, [r.inputs for r in batch], [r.rows for r in batch]
            )
        except RuntimeError as exc:  # the executor is shut down: the agent is stopping
            self._release()
            for r in batch:
                r.future.set_exception(Unavailable(f"{self._name}: {exc}", 1.0))
            return
        # Not a task per batch: the worker thread's completion schedules _finish
        # on the loop directly (what wrap_future does too, minus a coroutine).
        work.add_done_callback(_on_loop(loop, lambda f: self._finish(batch, f)))

    def _finish(self, batch: list[_Request], work: Future[Any]) -> None:
        # Free the instance and start the next batch before answering this one.
        self._release()
        if work.cancelled():
            error: BaseException | None = Unavailable(f"{self._name}: the agent is stopping", 1.0)
        else:
            error = work.exception()
        if error is not None:
            # _compute catches the backend's errors: this is a bug or a shutdown.
            for r in batch:
                if not r.future.done():
                    self.metrics.inference_requests.inc(*self._labels, "failure")
                    r.future.set_exception(error)
            return
        outcomes, executions, problem = work.result()
        self._record(executions, problem)
        for r, outcome in zip(batch, outcomes, strict=True):
            if r.future.done():
                continue
            if isinstance(outcome, Exception):
                self.metrics.inference_requests.inc(*self._labels, "failure")
                r.future.set_exception(outcome)
            else:
                self.metrics.inference_requests.inc(*self._labels, "success")
                r.future.set_result(outcome)

    async def _run_now(self, inputs: Tensors, rows: int) -> Tensors:
        """Nothing waits and an instance is free: run in the caller's own coroutine."""
        self._free -= 1
        self._busy += 1
        self.metrics.queue_duration.observe(*self._labels, value=0.0)
        release_now = True
        try:
            work = self.executor.submit(self._compute, [inputs], [rows])
            try:
                outcomes, executions, problem = await asyncio.wrap_future(work)
            except asyncio.CancelledError:
                if not work.done():
                    # The thread still computes: the instance stays taken until it ends.
                    release_now = False
                    work.add_done_callback(_on_loop(asyncio.get_running_loop(), self._released))
                raise
        except Exception:
            self.metrics.inference_requests.inc(*self._labels, "failure")
            raise
        finally:
            if release_now:
                self._release()
        self._record(executions, problem)
        outcome = outcomes[0]
        if isinstance(outcome, Exception):
            self.metrics.inference_requests.inc(*self._labels, "failure")
            raise outcome
        self.metrics.inference_requests.inc(*self._labels, "success")
        return outcome

    def _released(self, _work: Future[Any]) -> None:
        self._release()

    def _release(self) -> None:
        self._busy -= 1
        self._free += 1
        self._schedule()
        self._check_idle()

    def _record(self, executions: list[_Execution], problem: str | None) -> None:
        for rows, seconds in executions:
            self._exec_ewma = 0.9 * self._exec_ewma + 0.1 * seconds
            self.metrics.executions.inc(*self._labels)
            self.metrics.inference_rows.inc(*self._labels, value=rows)
            self.metrics.batch_size.observe(*self._labels, value=rows)
            self.metrics.compute_duration.observe(*self._labels, value=seconds)
        self._fallback.check(self.backend, self.metrics, self._labels)
        if problem and self.can_batch:
            self.can_batch = False
            self.not_batched_because = problem
            log.warning("%s: batching turned off: %s", self._name, problem)

    # ---- worker thread ---------------------------------------------------------

    def _compute(
        self, requests: list[Tensors], rows: list[int]
    ) -> tuple[list[_Outcome], list[_Execution], str | None]:
        """Run one batch (inference executor). Never raises: outcomes are per request."""
        started = time.perf_counter()
        if len(requests) == 1:
            try:
                outcome: _Outcome = self.backend.infer(requests[0])
            except Exception as exc:
                outcome = exc
            return [outcome], [(rows[0], time.perf_counter() - started)], None
        total = sum(rows)
        problem: str | None = None
        try:
            feed = {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}
            outputs = self.backend.infer(feed)
        except Exception:
            pass  # one request may be bad: below, each gets its own answer or error
        else:
            bad = sorted(n for n, v in outputs.items() if v.ndim == 0 or v.shape[0] != total)
            if not bad:
                results: list[_Outcome] = []
                start = 0
                for n in rows:
                    results.append({k: v[start : start + n] for k, v in outputs.items()})
                    start += n
                return results, [(total, time.perf_counter() - started)], None
            problem = f"outputs {bad} do not have one row per input row"
        executions: list[_Execution] = [(total, time.perf_counter() - started)]
        results = []
        for request, n in zip(requests, rows, strict=True):
            started = time.perf_counter()
            try:
                results.append(self.backend.infer(request))
            except Exception as exc:
                results.append(exc)
            executions.append((n, time.perf_counter() - started))
        return results, executions, problem


def _on_loop(
    loop: asyncio.AbstractEventLoop, callback: Callable[[Future[Any]], None]
) -> Callable[[Future[Any]], None]:
    """A concurrent future's done-callback (worker thread) that runs ``callback`` on the loop."""

    def done(work: Future[Any]) -> None:
        try:
            loop.call_soon_threadsafe(callback, work)
        except RuntimeError:
            pass  # the loop is closed: the agent has stopped, nobody waits for this

    return done


# ---- load time: warm-up and the row-independence check --------------------------


def warmup_batch_sizes(settings: BatchingConfig | None, can_batch: bool) -> list[int]:
    """The batch sizes a version will run at: 1, and with batching the preferred and max."""
    if settings is None or not settings.enabled or not can_batch:
        return [1]
    return sorted({1, *settings.preferred_batch_sizes, settings.max_batch_size})


def _sample_rows(manifest: Manifest, directory: Path) -> Tensors | None:
    """Real inputs to warm up with: the self-test vectors, else zeros of a static shape."""
    if manifest.self_test is not None:
        try:
            inputs, _ = load_vectors(directory / manifest.self_test.file)
            return inputs
        except Exception:  # the self-test already reported any problem with them
            return None
    if any(-1 in t.shape[1:] for t in manifest.inputs):
        return None  # no way to know the other dimensions
    from edgefleet.core.bundle.manifest import OIP_TO_NUMPY

    return {
        t.name: np.zeros([1, *t.shape[1:]], dtype=OIP_TO_NUMPY[t.datatype]) for t in manifest.inputs
    }


@dataclass
class WarmUp:
    summary: str
    # Set when a batch size above 1 failed: the version then runs one by one.
    batch_problem: str | None = None


def warm_up(backend: Backend, manifest: Manifest, directory: Path, sizes: list[int]) -> WarmUp:
    """Run the model at each batch size it will see, so that the first real request
    (or batch) does not pay for the runtime's allocations. Blocking: run it in a thread.

    A failure at batch 1 raises (the model cannot serve); one at a larger batch only
    turns batching off for this version.
    """
    sample = _sample_rows(manifest, directory)
    if sample is None:
        return WarmUp("no warm-up (no sample input)")
    fixed = {t.name: t.shape[0] for t in manifest.inputs if t.shape and t.shape[0] > 0}
    if fixed:
        sizes = [1]  # a fixed batch dimension: the model only ever sees its own batch
    started = time.perf_counter()
    done: list[int] = []
    for n in sizes:
        # Repeat the sample's rows up to n: real values, unlike zeros, take the same
        # kernels' paths as real requests (e.g. no shortcut for all-zero blocks).
        feed = {k: np.resize(v, (fixed.get(k, n), *v.shape[1:])) for k, v in sample.items()}
        try:
            for _ in range(backend.warmup_repeats):
                backend.infer(feed)
        except Exception as exc:
            if n == 1:
                raise
            return WarmUp(
                f"warmed up at batch {done}, batch {n} failed",
                f"batch {n} failed at warm-up: {exc}",
            )
        done.append(n)
    ms = (time.perf_counter() - started) * 1000
    return WarmUp(f"warmed up at batch {done} in {ms:.0f} ms")


def check_rows_independent(
    backend: Backend, manifest: Manifest, directory: Path, max_batch_size: int
) -> str | None:
    """None when the model answers a batch exactly as it answers its rows one by one
    (within the self-test's tolerance); else why batching must stay off for it.

    A dynamic first dimension in the manifest does not prove the rows are
    independent: e.g. dynamic quantization computes one scale over the whole batch.
    Without test vectors there is nothing to compare and the manifest is trusted.
    """
    spec = manifest.self_test
    if spec is None or not manifest_batchable(manifest):
        return None
    try:
        inputs, _ = load_vectors(directory / spec.file)
    except Exception:
        return None
    n = min(max_batch_size, 8, *(len(v) for v in inputs.values()))
    if n < 2:
        return None
    try:
        batched = backend.infer({k: v[:n] for k, v in inputs.items()})
        singles = [backend.infer({k: v[i : i + 1] for k, v in inputs.items()}) for i in range(n)]
    except Exception as exc:  # the self-test passed: the model serves, only not batched
        return f"comparing a batch of {n} with its rows one by one failed: {exc}"
    for name, together in batched.items():
        apart = np.concatenate([s[name] for s in singles])
        if together.shape != apart.shape:
            return f"output {name!r}: shape {together.shape} batched, {apart.shape} one by one"
        if name == spec.argmax_output:
            agree = float(np.mean(together.argmax(axis=-1) == apart.argmax(axis=-1)))
            if agree < spec.min_argmax_agreement:
                return f"output {name!r}: batched top-1 agrees with one by one on {agree:.0%}"
        elif not np.allclose(together, apart, atol=spec.atol, rtol=spec.rtol):
            worst = float(np.max(np.abs(together.astype(np.float64) - apart.astype(np.float64))))
            return f"output {name!r} differs batched vs one by one (max abs {worst:.3g})"
    return None


__all__ = [
    "DynamicBatcher",
    "WarmUp",
    "check_rows_independent",
    "manifest_batchable",
    "warm_up",
    "warmup_batch_sizes",
]

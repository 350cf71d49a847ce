"""Runs a loaded backend from the event loop without ever blocking it.

``ModelRunner`` is the async face of one model version: a bounded queue (a full
queue answers 503 with Retry-After rather than letting latency grow without end),
a semaphore sized to the backend's declared concurrency, and the blocking
``infer`` in a worker thread. The dynamic batcher (``agent/batcher.py``) has this
same interface; the registry picks one of the two per model version
(``runtime.batching.enabled``), and the HTTP handlers never know which.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Any, Protocol

import numpy as np

from edgefleet.agent.metrics import Metrics
from edgefleet.core.backends.base import Backend
from edgefleet.core.errors import Unavailable

Tensors = dict[str, np.ndarray]


class InferenceHandle(Protocol):
    async def infer(self, inputs: Tensors) -> Tensors: ...


class ServingHandle(InferenceHandle, Protocol):
    """What the registry needs from a version's runner besides ``infer``."""

    @property
    def pending(self) -> int:
        """Requests accepted and not answered yet."""
        ...

    async def drain(self, within_s: float) -> bool: ...

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class FallbackNotice:
    """Counts, once, that a version's backend moved to the CPU after an accelerator
    failed at run time. The backend records it in a worker thread, where the metrics
    (loop-only) must not be touched; the runner looks after each execution."""

    def __init__(self) -> None:
        self.noted = False

    def check(self, backend: Backend, metrics: Metrics, labels: tuple[str, str]) -> None:
        if not self.noted and backend.info.runtime_fallback:
            self.noted = True
            metrics.provider_fallbacks.inc(*labels, backend.info.provider)


async def wait_idle(idle: asyncio.Event, within_s: float) -> bool:
    """``drain`` for every handle: True once ``idle`` is set, False after ``within_s``."""
    try:
        await asyncio.wait_for(idle.wait(), within_s)
        return True
    except TimeoutError:
        return False


def _rows(inputs: Tensors) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


class ModelRunner:
    def __init__(
        self,
        backend: Backend,
        executor: Executor,
        metrics: Metrics,
        max_queue: int,
    ) -> None:
        self.backend = backend
        self.executor = executor
        self.metrics = metrics
        self.max_queue = max_queue
        self._slots = asyncio.Semaphore(backend.max_concurrency)
        self._pending = 0
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        m = backend.manifest
        self._labels = (m.name, m.version)
        self._compute_ewma = 0.005
        self._fallback = FallbackNotice()

    @property
    def pending(self) -> int:
        return self._pending

    async def infer(self, inputs: Tensors) -> Tensors:
        if self._pending >= self.max_queue:
            self.metrics.inference_requests.inc(*self._labels, "rejected")
            # How long the queue ahead needs, roughly: a hint, not a promise.
            wait = self._pending * self._compute_ewma / max(1, self.backend.max_concurrency)
            raise Unavailable(
                f"{self._labels[0]}:{self._labels[1]} queue is full ({self._pending} waiting)",
                retry_after=max(1.0, round(wait, 1)),
            )
        self._pending += 1
        self._idle.clear()
        self._set_gauges()
        queued = time.perf_counter()
        try:
            async with self._slots:
                started = time.perf_counter()
                self._running += 1
                self._set_gauges()
                loop = asyncio.get_running_loop()
                try:
                    outputs = await loop.run_in_executor(self.executor, self.backend.infer, inputs)
                finally:
                    self._running -= 1
                done = time.perf_counter()
        except Exception:
            self.metrics.inference_requests.inc(*self._labels, "failure")
            raise
        finally:
            self._pending -= 1
            self._set_gauges()
            if self._pending == 0:
                self._idle.set()
        compute = done - started
        self._compute_ewma = 0.9 * self._compute_ewma + 0.1 * compute
        self.metrics.queue_duration.observe(*self._labels, value=started - queued)
        self.metrics.compute_duration.observe(*self._labels, value=compute)
        self.metrics.executions.inc(*self._labels)
        rows = _rows(inputs)
        self.metrics.inference_rows.inc(*self._labels, value=rows)
        self.metrics.batch_size.observe(*self._labels, value=rows)
        self.metrics.inference_requests.inc(*self._labels, "success")
        self._fallback.check(self.backend, self.metrics, self._labels)
        return outputs

    def _set_gauges(self) -> None:
        self.metrics.queue_depth.set(*self._labels, value=self._pending)
        self.metrics.queue_waiting.set(*self._labels, value=self._pending - self._running)

    async def drain(self, within_s: float) -> bool:
        """Wait until nothing is queued or running; False if ``within_s`` passed first."""
        return await wait_idle(self._idle, within_s)

    def close(self) -> None:
        """Nothing to release: requests still running finish on their own."""

    def describe(self) -> dict[str, Any]:
        return {"enabled": False, "instances": self.backend.max_concurrency}

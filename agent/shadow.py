"""The shadow runner: a candidate version runs beside the active one and answers nothing.

The fleet's desired state names a shadow candidate per model (``models.<m>.shadow``:
version, bundle, ``sample_rate``). The sync (agent/sync.py) downloads, verifies and
installs it like any version and the registry loads and self-tests it as *shadow*
(``ModelRegistry.load_shadow``: not served, not activated, not labelled). From then
on, for a sampled share of the requests the *active* version answered:

1. the data plane (agent/dataplane.py) schedules ``ShadowRunner.offer`` with
   ``loop.call_soon`` as it returns the answer: the request never waits for the
   shadow, not even for the offer (a few µs: a random draw and a queue put);
2. ``offer`` (event loop) puts the item on a bounded queue; when the queue is full
   the item is dropped and counted (``dropped_queue``);
3. one worker thread (``shadow-runner``, never the event loop) takes items one at a
   time. Before each it checks the CPU budget: the CPU time the worker spent
   (``time.thread_time()``) over the last ``runtime.shadow.budget_window_s`` may not
   exceed ``cpu_budget`` x that window (a share of one core); over it the item is
   dropped and counted (``dropped_budget``). Otherwise it runs the candidate (its
   backend directly, one intra-op thread, under the candidate's lock), scores both
   answers and compares them per item:

   * classifiers: top-1 class agreement;
   * detectors: the same number of boxes, each matched one-to-one to a box of the
     same class with IoU >= 0.5;
   * raw outputs (``tensor``): the argmax of the first output, per item;
   * the confidence delta (candidate - active, each by the model's confidence rule;
     0 for raw outputs) and the model times (candidate: its compute; active: its
     runner time, queue included, once per request).

   An exception of the candidate (or of the comparison) counts the items as
   ``errors``, is logged once per (model, candidate), and goes no further;
4. the outcome comes back to the event loop (``call_soon_threadsafe``), which adds it
   to the window of (model, active version, candidate version), to ``/metrics``
   (``edgefleet_shadow_items_total{outcome=agreed|disagreed|dropped|error}``,
   ``edgefleet_shadow_latency_ratio``, ``edgefleet_shadow_cpu_seconds_total``) and
   hands disagreements (at most ``hard_examples_per_minute``) to the hard-example
   store as kind ``shadow_disagreement`` with both answers: the active one as the
   ``edge_*`` columns, the candidate's as the ``cloud_*`` ones (``cloud_version``: the
   candidate version). Without a cloud fallback the runner opens the store itself
   (the same file and settings, ``fallback.hard_examples``) on the first disagreement.

Every ``fleet.telemetry.stats_interval_s`` the windows become ``shadow_stats`` outbox
records (core/protocol.py ``ShadowStats``), written by the flush of
agent/telemetry_stats.py (``InferenceStats.add_source``), so a clean stop writes the
last partial window too.

Threads: ``offer``, ``take``, ``describe``, ``start``, ``close`` and the settling of
outcomes run on the event loop (windows, metrics and the store's API are loop-only);
the worker thread touches only its queue item, the candidate under its lock, and its
own budget and rate-limit state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from edgefleet.agent.cloud.config import HardExamplesConfig
from edgefleet.agent.cloud.fallback import default_store_path, take_rows
from edgefleet.agent.cloud.hard_examples import HardExampleStore, NewExample
from edgefleet.agent.config import ShadowConfig
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.serving_registry import ModelRegistry, ShadowVersion
from edgefleet.core import protocol
from edgefleet.core.bundle.manifest import ClassificationPost, DetectionPost, Manifest
from edgefleet.core.processing.detection import Detection
from edgefleet.core.processing.scoring import Scored, score

log = logging.getLogger(__name__)

KIND = "shadow_stats"
HARD_EXAMPLE_KIND = "shadow_disagreement"
IOU_MATCH = 0.5  # a detector's box matches one of the other answer's at this IoU or more
_PENDING_EXAMPLES = 256  # kept while the runner's own store opens; more are dropped

Tensors = dict[str, np.ndarray]
Task = Literal["classification", "detection", "tensor"]
Key = tuple[str, str, str]  # model, active version, candidate version


def task_of(active: Manifest, candidate: Manifest) -> Task:
    """How two versions' answers are compared (both must have the same postprocessing)."""
    a, c = active.postprocessing, candidate.postprocessing
    if isinstance(a, ClassificationPost) and isinstance(c, ClassificationPost):
        return "classification"
    if isinstance(a, DetectionPost) and isinstance(c, DetectionPost):
        return "detection"
    return "tensor"


# ----------------------------------------------------------------- comparison


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (xmin, ymin, xmax, ymax) boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def boxes_agree(a: list[Detection], b: list[Detection], iou_min: float = IOU_MATCH) -> bool:
    """Same box count, and every box of ``a`` (best first) matched greedily to a distinct
    box of ``b`` of the same class with IoU >= ``iou_min``."""
    if len(a) != len(b):
        return False
    used: set[int] = set()
    for d in a:
        best, best_iou = -1, iou_min
        for j, e in enumerate(b):
            if j in used or e.class_id != d.class_id:
                continue
            iou = box_iou(d.box, e.box)
            if iou >= best_iou:
                best, best_iou = j, iou
        if best < 0:
            return False
        used.add(best)
    return True


@dataclass
class Comparison:
    """Two answers to the same items, per item."""

    task: Task
    agree: list[bool]
    active_class: list[int | None]
    active_conf: list[float]
    candidate_class: list[int | None]
    candidate_conf: list[float]


def _classes(scored: Scored) -> list[int | None]:
    if scored.top_class is not None:
        return [int(c) for c in scored.top_class]
    assert scored.detections is not None
    return [found[0].class_id if found else None for found in scored.detections]


def compare(
    active: Manifest,
    active_out: Mapping[str, np.ndarray],
    candidate: Manifest,
    candidate_out: Mapping[str, np.ndarray],
) -> Comparison:
    """Compare the two versions' answers per item (module doc). Runs in the caller's
    thread (the shadow worker): a detector's decoding is real work."""
    task = task_of(active, candidate)
    if task == "tensor":
        name = active.outputs[0].name
        a = np.asarray(active_out[name])
        c = np.asarray(candidate_out[name])
        if a.shape != c.shape:
            raise ValueError(f"candidate output {name} has shape {c.shape}, active {a.shape}")
        rows = a.shape[0] if a.ndim else 1
        top_a = a.reshape(rows, -1).argmax(axis=1)
        top_c = c.reshape(rows, -1).argmax(axis=1)
        zeros = [0.0] * rows
        return Comparison(
            task,
            [bool(x) for x in top_a == top_c],
            [int(x) for x in top_a],
            zeros,
            [int(x) for x in top_c],
            zeros,
        )
    sa, sc = score(active, active_out), score(candidate, candidate_out)
    if len(sa) != len(sc):
        raise ValueError(f"candidate answered {len(sc)} items, active {len(sa)}")
    if task == "classification":
        assert sa.top_class is not None and sc.top_class is not None
        agree = [bool(x) for x in sa.top_class == sc.top_class]
    else:
        assert sa.detections is not None and sc.detections is not None
        agree = [boxes_agree(x, y) for x, y in zip(sa.detections, sc.detections, strict=True)]
    return Comparison(
        task,
        agree,
        _classes(sa),
        [float(v) for v in sa.confidence],
        _classes(sc),
        [float(v) for v in sc.confidence],
    )


# ----------------------------------------------------------------- worker side


class CpuBudget:
    """The worker's CPU time over a rolling window (worker thread only)."""

    def __init__(self, share_of_core: float, window_s: float) -> None:
        self.window_s = window_s
        self.limit_s = share_of_core * window_s
        self._spent: collections.deque[tuple[float, float]] = collections.deque()
        self._total = 0.0

    def _expire(self, now: float) -> None:
        while self._spent and self._spent[0][0] < now - self.window_s:
            self._total -= self._spent.popleft()[1]

    def over(self, now: float) -> bool:
        self._expire(now)
        return self._total >= self.limit_s

    def spend(self, now: float, cpu_s: float) -> None:
        self._spent.append((now, cpu_s))
        self._total += cpu_s


class _RateLimit:
    """At most ``per_minute`` events a minute, as a token bucket (worker thread only)."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._tokens = float(per_minute)
        self._t = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._t) * self.rate)
        self._t = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(frozen=True)
class _Item:
    sv: ShadowVersion
    active: Manifest
    key: Key
    task: Task
    inputs: Tensors
    outputs: Tensors
    active_ms: float
    rows: int
    image: bytes | None


@dataclass
class _Outcome:
    key: Key
    task: Task
    rows: int
    compared: int = 0
    agreed: int = 0
    errors: int = 0
    dropped_budget: int = 0
    conf_delta_sum: float = 0.0
    conf_delta_sumsq: float = 0.0
    candidate_ms: float = 0.0
    active_ms: float = 0.0
    cpu_s: float = 0.0
    error: str | None = None
    examples: list[NewExample] = field(default_factory=list)
    examples_not_kept: int = 0  # disagreements past hard_examples_per_minute


# ----------------------------------------------------------------- loop side


@dataclass
class ShadowCounts:
    """Counts of one (model, active version, candidate): a window, or since start."""

    task: Task = "tensor"
    sampled: int = 0
    compared: int = 0
    agreed: int = 0
    errors: int = 0
    dropped_queue: int = 0
    dropped_budget: int = 0
    conf_delta_sum: float = 0.0
    conf_delta_sumsq: float = 0.0
    candidate_latency_ms_sum: float = 0.0
    active_latency_ms_sum: float = 0.0

    def add(self, o: _Outcome) -> None:
        self.compared += o.compared
        self.agreed += o.agreed
        self.errors += o.errors
        self.dropped_budget += o.dropped_budget
        self.conf_delta_sum += o.conf_delta_sum
        self.conf_delta_sumsq += o.conf_delta_sumsq
        self.candidate_latency_ms_sum += o.candidate_ms
        self.active_latency_ms_sum += o.active_ms

    def empty(self) -> bool:
        return not (
            self.sampled
            or self.compared
            or self.errors
            or self.dropped_queue
            or self.dropped_budget
        )

    def describe(self) -> dict[str, Any]:
        n = self.compared
        return {
            "task": self.task,
            "sampled": self.sampled,
            "compared": n,
            "agreed": self.agreed,
            "errors": self.errors,
            "dropped_queue": self.dropped_queue,
            "dropped_budget": self.dropped_budget,
            "agreement": round(self.agreed / n, 6) if n else None,
            "conf_delta_mean": round(self.conf_delta_sum / n, 6) if n else None,
            "latency_ratio": round(self.candidate_latency_ms_sum / self.active_latency_ms_sum, 4)
            if self.active_latency_ms_sum > 0
            else None,
        }


def _rows(tensors: Mapping[str, np.ndarray]) -> int:
    for t in tensors.values():
        return int(t.shape[0]) if t.ndim else 1
    return 0


class ShadowRunner:
    """One per agent (the data plane's). See the module doc for the threads."""

    def __init__(
        self,
        config: ShadowConfig,
        registry: ModelRegistry,
        metrics: Metrics,
        *,
        hard_examples: HardExamplesConfig | None = None,
        store_path: Path | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self._queue: queue.Queue[_Item | None] = queue.Queue(config.queue_size)
        self._budget = CpuBudget(config.cpu_budget, config.budget_window_s)
        self._examples_limit = _RateLimit(config.hard_examples_per_minute)
        self._rng = random.Random()
        self._windows: dict[Key, ShadowCounts] = {}
        self._totals: dict[Key, ShadowCounts] = {}
        self._window_start = time.time()
        self._window_t0 = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._logged: set[tuple[str, str]] = set()
        self.examples_dropped = 0  # disagreements not kept (rate limit, no store)
        # Hard examples: the cloud router's store when it has one (``start``), else
        # our own, opened on the first disagreement (None: disabled).
        self._store: HardExampleStore | None = None
        self._own: HardExampleStore | None = None
        if hard_examples is not None and hard_examples.enabled and store_path is not None:
            path = hard_examples.path or default_store_path(store_path)
            self._own = HardExampleStore(path, hard_examples)
        self._own_task: asyncio.Task[None] | None = None
        self._own_started = False
        # Called with our own store once it opened (the data plane: the router uploads
        # its cases to the fleet, agent/cloud/hard_example_upload.py).
        self.on_own_store: Callable[[HardExampleStore], None] | None = None
        self._waiting_examples: list[NewExample] = []

    # ---- lifecycle (event loop) ------------------------------------------------------

    def start(self, shared_store: HardExampleStore | None = None) -> None:
        """Start the worker thread; ``shared_store``: the cloud router's hard examples."""
        if self._thread is not None:
            raise RuntimeError("shadow runner already started")
        self._loop = asyncio.get_running_loop()
        if shared_store is not None:
            self._store, self._own = shared_store, None
        self._closing = False
        self._window_start, self._window_t0 = time.time(), time.monotonic()
        self._thread = threading.Thread(target=self._work, name="shadow-runner", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop taking items, drop what waits, end the worker (after its item in
        progress), close our own hard-example store. Idempotent."""
        self._closing = True
        thread, self._thread = self._thread, None
        if thread is not None:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._queue.put_nowait(None)  # room: only the loop puts, and it stopped
            await asyncio.to_thread(thread.join)
        task, self._own_task = self._own_task, None
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        if self._own is not None and self._own_started:
            self._own_started = False
            await self._own.close()

    # ---- the data plane's hand-off (event loop) --------------------------------------

    def offer(
        self,
        active: Manifest,
        inputs: Tensors,
        outputs: Tensors,
        active_ms: float,
        image: bytes | None = None,
    ) -> None:
        """The active version answered ``inputs`` with ``outputs`` (its own answer, before
        any cloud merge); run the shadow on them if sampled. Never raises."""
        try:
            if self._closing or self._thread is None:
                return
            sv = self.registry.shadow_for(active.name)
            if sv is None:
                return
            rate = sv.sample_rate
            if rate <= 0.0 or (rate < 1.0 and self._rng.random() >= rate):
                return
            key = (active.name, active.version, sv.version)
            task = task_of(active, sv.manifest)
            rows = _rows(inputs)
            w = self._counts(self._windows, key, task)
            t = self._counts(self._totals, key, task)
            w.sampled += rows
            t.sampled += rows
            item = _Item(sv, active, key, task, inputs, outputs, active_ms, rows, image)
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                w.dropped_queue += rows
                t.dropped_queue += rows
                self.metrics.shadow_items.inc(*key, "dropped", value=rows)
            self.metrics.shadow_queue.set(value=self._queue.qsize())
        except Exception as exc:  # the shadow never fails an answer
            self._log_once(active.name, "offer", f"shadow offer failed: {exc!r}")

    @staticmethod
    def _counts(table: dict[Key, ShadowCounts], key: Key, task: Task) -> ShadowCounts:
        c = table.get(key)
        if c is None:
            c = table[key] = ShadowCounts(task)
        return c

    # ---- worker thread ---------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                outcome = self._process(item)
            except BaseException as exc:  # a defect here: count it, keep the worker
                outcome = _Outcome(item.key, item.task, item.rows, errors=item.rows)
                outcome.error = f"{type(exc).__name__}: {exc}"
            loop = self._loop
            if loop is None:
                continue
            try:
                loop.call_soon_threadsafe(self._settle, outcome)
            except RuntimeError:  # the loop is closed: the agent is stopping
                return

    def _process(self, item: _Item) -> _Outcome:
        out = _Outcome(item.key, item.task, item.rows)
        now = time.monotonic()
        if self._budget.over(now):
            out.dropped_budget = item.rows
            return out
        t0 = time.thread_time()
        try:
            sv = item.sv
            with sv.lock:
                if sv.closed:  # unloaded while this item waited: nothing to compare
                    return out
                started = time.perf_counter()
                cand = sv.backend.infer(item.inputs)
                cand_ms = (time.perf_counter() - started) * 1000
            cmp = compare(item.active, item.outputs, sv.manifest, cand)
        except Exception as exc:
            out.errors = item.rows
            out.error = f"{type(exc).__name__}: {exc}"
            return out
        finally:
            out.cpu_s = time.thread_time() - t0
            self._budget.spend(now, out.cpu_s)
        out.compared = len(cmp.agree)
        out.agreed = sum(cmp.agree)
        out.candidate_ms, out.active_ms = cand_ms, item.active_ms
        for i, agree in enumerate(cmp.agree):
            delta = min(1.0, max(-1.0, cmp.candidate_conf[i] - cmp.active_conf[i]))
            out.conf_delta_sum += delta
            out.conf_delta_sumsq += delta * delta
            if agree:
                continue
            if not self._examples_limit.take():
                out.examples_not_kept += 1
                continue
            out.examples.append(
                NewExample(
                    model=item.active.name,
                    version=item.active.version,
                    cloud_model=item.active.name,
                    kind=HARD_EXAMPLE_KIND,
                    status="answered",
                    inputs=take_rows(item.inputs, [i]),
                    edge_outputs=take_rows(item.outputs, [i]),
                    edge_class=cmp.active_class[i],
                    edge_confidence=cmp.active_conf[i],
                    cloud_version=sv.version,
                    cloud_outputs=take_rows(cand, [i]),
                    cloud_class=cmp.candidate_class[i],
                    cloud_confidence=cmp.candidate_conf[i],
                    image=item.image,
                )
            )
        return out

    # ---- outcomes (event loop) -------------------------------------------------------

    def _settle(self, o: _Outcome) -> None:
        self.metrics.shadow_queue.set(value=self._queue.qsize())
        model, _, candidate = o.key
        for table in (self._windows, self._totals):
            self._counts(table, o.key, o.task).add(o)
        items = self.metrics.shadow_items
        if o.compared:
            items.inc(*o.key, "agreed", value=o.agreed)
            items.inc(*o.key, "disagreed", value=o.compared - o.agreed)
        if o.dropped_budget:
            items.inc(*o.key, "dropped", value=o.dropped_budget)
        if o.errors:
            items.inc(*o.key, "error", value=o.errors)
            self._log_once(model, candidate, f"shadow {model}:{candidate} failed: {o.error}")
        if o.cpu_s:
            self.metrics.shadow_cpu.inc(model, candidate, value=o.cpu_s)
        total = self._totals[o.key]
        if total.active_latency_ms_sum > 0:
            ratio = total.candidate_latency_ms_sum / total.active_latency_ms_sum
            self.metrics.shadow_latency_ratio.set(*o.key, value=ratio)
        self.examples_dropped += o.examples_not_kept
        if o.examples:
            self._keep(o.examples)

    def _log_once(self, model: str, what: str, message: str) -> None:
        if (model, what) not in self._logged:
            self._logged.add((model, what))
            log.warning("%s (logged once; counted in edgefleet_shadow_items_total)", message)

    def _keep(self, examples: list[NewExample]) -> None:
        if self._store is not None:
            self._store.add(examples)
            return
        if self._own is None or self._closing:
            self.examples_dropped += len(examples)
            return
        room = _PENDING_EXAMPLES - len(self._waiting_examples)
        self._waiting_examples.extend(examples[: max(0, room)])
        self.examples_dropped += max(0, len(examples) - max(0, room))
        if self._own_task is None:
            self._own_task = asyncio.get_running_loop().create_task(
                self._open_own(), name="shadow-hard-examples"
            )

    async def _open_own(self) -> None:
        assert self._own is not None
        try:
            await self._own.start()
        except Exception as exc:  # a broken disk: count, keep comparing
            log.error("shadow hard examples disabled: cannot open %s: %s", self._own.path, exc)
            self._own = None
            self.examples_dropped += len(self._waiting_examples)
            self._waiting_examples = []
            return
        self._own_started = True
        self._store = self._own
        if self.on_own_store is not None:
            self.on_own_store(self._own)
        waiting, self._waiting_examples = self._waiting_examples, []
        if waiting:
            self._store.add(waiting)

    @property
    def hard_example_store(self) -> HardExampleStore | None:
        """Where disagreements go (None until our own store has opened)."""
        return self._store

    # ---- reading (event loop) --------------------------------------------------------

    def take(self) -> list[dict[str, Any]]:
        """Swap in empty windows; the ``shadow_stats`` data of each non-empty one."""
        windows, self._windows = self._windows, {}
        start, t0 = self._window_start, self._window_t0
        self._window_start, self._window_t0 = time.time(), time.monotonic()
        window_s = round(self._window_t0 - t0, 3)
        out = []
        for (model, version, candidate), c in windows.items():
            if c.empty():
                continue
            try:
                record = protocol.ShadowStats(
                    model=model,
                    version=version,
                    candidate=candidate,
                    task=c.task,
                    window_start=round(start, 3),
                    window_s=window_s,
                    sampled=c.sampled,
                    compared=c.compared,
                    agreed=c.agreed,
                    errors=c.errors,
                    dropped_queue=c.dropped_queue,
                    dropped_budget=c.dropped_budget,
                    conf_delta_sum=c.conf_delta_sum,
                    conf_delta_sumsq=c.conf_delta_sumsq,
                    candidate_latency_ms_sum=c.candidate_latency_ms_sum,
                    active_latency_ms_sum=c.active_latency_ms_sum,
                )
            except ValidationError as exc:  # a bug here, not bad input: say so, go on
                log.error("shadow stats of %s:%s/%s not sent: %s", model, version, candidate, exc)
                continue
            out.append(record.to_wire())
        return out

    def describe(self, model: str) -> dict[str, Any] | None:
        """The model's shadow for ``GET /v1/models/{m}``: the candidate and its counts
        since the agent started, per active version; None without a candidate."""
        sv = self.registry.shadow_for(model)
        if sv is None:
            return None
        return {
            "version": sv.version,
            "sample_rate": sv.sample_rate,
            "self_test": sv.self_test,
            "provider": sv.backend.info.provider,
            "loaded_at": sv.loaded_at,
            "queue": self._queue.qsize(),
            "compared_with": {
                version: c.describe()
                for (m, version, candidate), c in sorted(self._totals.items())
                if m == model and candidate == sv.version
            },
        }

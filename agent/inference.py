"""Run a model version on some inputs, with cloud fallback: what both APIs call.

``InferenceService.run`` runs the edge model, judges each item's confidence with
the model's fallback policy, and involves the cloud as the policy says:

* ``cloud_when_unsure``: unsure items go to the cloud in one call and the caller
  waits for it, at most the timeout; the cloud's answer replaces the edge's for
  those items. If the cloud cannot answer (timeout, error, breaker open,
  offline, no budget) the edge answer is returned with the reason.
* ``edge_first_escalate``: the edge answer is returned at once; unsure items go
  to the cloud in the background and both answers are kept as hard examples.
* audits: a share of *confident* items also goes to the cloud in the background,
  to learn how often the edge is confidently wrong.

Batched requests are decided **per item**: only the unsure items of a batch are
sent (in one call), and the answer tensors are merged row by row. The result's
``Provenance`` says who answered what, both versions and confidences when both
ran, and the time spent locally and in the cloud.

A request never fails because of the cloud: every cloud failure becomes a
fallback reason. Background work (escalations, audits, retries) is owned here and
cancelled and awaited when the agent stops.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from edgefleet.agent.cloud.fallback import (
    CallOutcome,
    CloudFallback,
    default_store_path,
    expectation,
)
from edgefleet.agent.cloud.hard_examples import (
    HardExampleStore,
    NewExample,
    PendingExample,
    RetryAnswered,
    RetryFailed,
    RetryLoop,
    RetryOutcome,
    RetryRefused,
)
from edgefleet.agent.cloud.metrics import CloudMetrics
from edgefleet.agent.cloud.policy import (
    FallbackPolicy,
    ItemScores,
    Route,
    item_scores,
    resolve_policy,
    route_items,
)
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.serving_registry import LoadedVersion, ModelRegistry
from edgefleet.core.bundle.manifest import DetectionPost, Manifest

if TYPE_CHECKING:
    from edgefleet.agent.telemetry_stats import InferenceStats

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
# Background loops that run for the agent's life (idle() does not wait for them).
_LOOPS = ("hard-example retries", "fallback telemetry")
# Hard examples reach the writer thread this long after the answer that made them.
STORE_AFTER_S = 0.005


@dataclass
class Provenance:
    """Where an answer came from. ``source``: edge, cloud, or mixed (a batch of both)."""

    source: str
    edge_model: str
    edge_version: str
    edge_ms: float
    fallback: str | None = None  # why the cloud did not answer items it should have
    fallback_detail: str | None = None
    edge_confidence: list[float] | None = None
    edge_class: list[int] | None = None
    cloud_model: str | None = None
    cloud_version: str | None = None
    cloud_ms: float | None = None  # time spent on the cloud call, answered or not
    cloud_items: list[int] = field(default_factory=list)  # batch rows the cloud answered
    cloud_confidence: list[float] | None = None  # per cloud item, in cloud_items order
    cloud_class: list[int] | None = None
    escalated: bool = False  # unsure items sent to the cloud in the background
    audited: bool = False  # confident items sent to the cloud for an audit

    def oip_parameters(self) -> dict[str, Any]:
        """Flat scalars, as the Open Inference Protocol allows in ``parameters``.

        Per-item values (confidences, cloud rows) are numbers for a batch of one and
        comma-separated strings, in batch order, for larger batches.
        """
        p: dict[str, Any] = {"source": self.source}
        if self.fallback:
            p["fallback"] = self.fallback
            if self.fallback_detail:
                p["fallback_detail"] = self.fallback_detail
        p["edge_model_version"] = self.edge_version
        p["edge_ms"] = round(self.edge_ms, 3)
        if self.edge_confidence is not None:
            p["edge_confidence"] = _scalar_or_csv(self.edge_confidence)
        if self.cloud_model is not None:
            p["cloud_model"] = self.cloud_model
        if self.cloud_version is not None:
            p["cloud_model_version"] = self.cloud_version
        if self.cloud_ms is not None:
            p["cloud_ms"] = round(self.cloud_ms, 3)
        if self.cloud_confidence is not None:
            p["cloud_confidence"] = _scalar_or_csv(self.cloud_confidence)
        if self.source == "mixed":
            p["cloud_items"] = ",".join(str(i) for i in self.cloud_items)
        if self.escalated:
            p["escalated"] = True
        if self.audited:
            p["audited"] = True
        return p

    def image_fields(self, labels: list[str]) -> dict[str, Any]:
        """Nested, for the image endpoint's JSON (one image: one item)."""

        def side(
            model: str | None,
            version: str | None,
            ms: float,
            conf: list[float] | None,
            cls: list[int] | None,
        ) -> dict[str, Any]:
            """One model's part of the answer (edge or cloud)."""
            part: dict[str, Any] = {"model": model, "version": version, "latency_ms": round(ms, 3)}
            if conf:
                part["confidence"] = round(conf[0], 5)
            if cls:
                part["label"] = labels[cls[0]] if cls[0] < len(labels) else str(cls[0])
            return part

        edge = side(
            self.edge_model,
            self.edge_version,
            self.edge_ms,
            self.edge_confidence,
            self.edge_class,
        )
        doc: dict[str, Any] = {
            "source": self.source,
            "fallback": self.fallback,
            "edge": edge,
        }
        if self.cloud_model is not None and self.cloud_ms is not None:
            cloud = side(
                self.cloud_model,
                self.cloud_version,
                self.cloud_ms,
                self.cloud_confidence,
                self.cloud_class,
            )
            if self.fallback:
                cloud["error"] = self.fallback_detail or self.fallback
            doc["cloud"] = cloud
        if self.fallback_detail and "cloud" not in doc:
            doc["fallback_detail"] = self.fallback_detail
        if self.escalated:
            doc["escalated"] = True
        if self.audited:
            doc["audited"] = True
        return doc


def _scalar_or_csv(values: list[float]) -> float | str:
    if len(values) == 1:
        return round(values[0], 6)
    return ",".join(f"{v:.6g}" for v in values)


@dataclass
class InferenceResult:
    outputs: Tensors
    provenance: Provenance


def _take(tensors: Mapping[str, np.ndarray], rows: list[int]) -> Tensors:
    # Fancy indexing copies: what goes to the cloud or the store never aliases a
    # buffer the runtime or the request still owns.
    idx = np.asarray(rows, dtype=np.intp)
    return {name: np.asarray(value)[idx] for name, value in tensors.items()}


class InferenceService:
    """One per agent; ``lifecycle`` is its aiohttp cleanup context."""

    def __init__(
        self,
        config: AgentConfig,
        registry: ModelRegistry,
        metrics: Metrics,
        executor: Executor,
    ) -> None:
        self.config = config
        self.registry = registry
        self.executor = executor
        fb = config.fallback
        # The cloud profile is the end of the line: it answers itself, as "cloud".
        self.local_source = "cloud" if config.profile == "cloud" else "edge"
        self.cloud_configured = config.profile == "edge" and fb.cloud.url is not None
        self.metrics: CloudMetrics | None = None
        self.cloud: CloudFallback | None = None
        self.hard_examples: HardExampleStore | None = None
        self.retry_loop: RetryLoop | None = None
        if self.cloud_configured:
            self.metrics = CloudMetrics(metrics)
            self.cloud = CloudFallback(fb, self.metrics, executor)
            he = fb.hard_examples
            if he.enabled:
                self.hard_examples = HardExampleStore(
                    he.path or default_store_path(config.store.path),
                    he,
                    on_counts=self._hard_example_counts,
                    on_dropped=self._hard_examples_dropped,
                )
                self.retry_loop = RetryLoop(self.hard_examples, he, self._retry)
        self._policies: dict[tuple[str, str], FallbackPolicy] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unstored: list[NewExample] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        # Set when the agent has a fleet link: queues a telemetry record (kind, data).
        self.telemetry_sink: Callable[[str, Any], Awaitable[Any]] | None = None
        # Set when the agent has a fleet link: the HTTP handlers count every inference
        # in it (agent/telemetry_stats.py). None costs them one attribute check.
        self.stats: InferenceStats | None = None
        self._reported: dict[str, dict[tuple[str, ...], float]] = {}
        self._rng = random.Random()
        self._closing = False

    def _hard_example_counts(self, counts: dict[str, int]) -> None:
        assert self.metrics is not None
        for status, n in counts.items():
            self.metrics.hard_examples.set(status, value=n)

    def _hard_examples_dropped(self, reason: str, n: int) -> None:
        assert self.metrics is not None
        self.metrics.hard_examples_dropped.inc(reason, value=n)

    # ---- lifecycle ---------------------------------------------------------------------

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.close()

    async def start(self) -> None:
        if self.cloud is not None:
            await self.cloud.start()
        if self.hard_examples is not None:
            try:
                await self.hard_examples.start()
            except Exception as exc:  # a broken disk must not stop the agent serving
                log.error(
                    "hard examples disabled: cannot open %s: %s", self.hard_examples.path, exc
                )
                self.hard_examples = None
                self.retry_loop = None
        if self.retry_loop is not None:
            self._spawn(self.retry_loop.run(), "hard-example retries")
        if self.metrics is not None:
            self._spawn(self._telemetry_loop(), "fallback telemetry")

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.cloud is not None:
            await self.cloud.close()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._store_now()  # nothing kept is lost at shutdown
        if self.hard_examples is not None:
            await self.hard_examples.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        if self._closing:
            coro.close()
            return
        task = asyncio.create_task(coro, name=what)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background %s failed", task.get_name(), exc_info=task.exception())

    async def idle(self) -> None:
        """Wait until no background cloud work is out (tests, benchmarks, demo)."""
        while busy := [t for t in self._tasks if t.get_name() not in _LOOPS]:
            await asyncio.wait(busy)

    # ---- telemetry ---------------------------------------------------------------------

    async def _telemetry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.fallback.telemetry_interval_s)
            await self.report_telemetry()

    async def report_telemetry(self) -> dict[str, Any] | None:
        """Send what changed since the last report to the fleet (when linked)."""
        if self.telemetry_sink is None or self.metrics is None:
            return None
        doc = self._telemetry_delta()
        if doc is None:
            return None
        try:
            await self.telemetry_sink("fallback_stats", doc)
        except Exception as exc:  # the outbox not open yet, or full: next time
            log.debug("fallback telemetry not queued: %s", exc)
            return None
        return doc

    def _telemetry_delta(self) -> dict[str, Any] | None:
        assert self.metrics is not None
        m = self.metrics
        now = {
            "items": dict(m.items.values),
            "calls": dict(m.calls.values),
            "agreement": dict(m.agreement.values),
        }
        delta: dict[str, list[dict[str, Any]]] = {}
        for key, series in now.items():
            labels = {"items": m.items, "calls": m.calls, "agreement": m.agreement}[key].labels
            before = self._reported.get(key, {})
            rows = [
                {**dict(zip(labels, lv, strict=True)), "n": int(v - before.get(lv, 0.0))}
                for lv, v in sorted(series.items())
                if v - before.get(lv, 0.0) > 0
            ]
            if rows:
                delta[key] = rows
        self._reported = now
        if not delta:
            return None
        doc: dict[str, Any] = {"schema": 1, **delta}
        if self.cloud is not None:
            doc["breakers"] = self.cloud.breaker_states()
            doc["offline"] = self.cloud.offline
        doc["hard_examples"] = {status: int(v) for (status,), v in m.hard_examples.values.items()}
        return doc

    # ---- policy ------------------------------------------------------------------------

    def policy(self, manifest: Manifest) -> FallbackPolicy:
        key = (manifest.name, manifest.version)
        policy = self._policies.get(key)
        if policy is None:
            policy = resolve_policy(
                manifest, self.config.fallback, cloud_configured=self.cloud_configured
            )
            self._policies[key] = policy
            if policy.mode != "edge_only" and policy.inactive and self.cloud_configured:
                log.info("%s:%s answers locally only: %s", *key, policy.inactive)
        return policy

    # ---- the one entry point -------------------------------------------------------------

    async def run(
        self,
        lv: LoadedVersion,
        inputs: Tensors,
        *,
        image: bytes | None = None,
        allow_cloud: bool = True,
        received: float | None = None,
    ) -> InferenceResult:
        """Edge answer, and the cloud's for unsure items as the policy says.

        ``received`` (``time.perf_counter()`` at the request's arrival) starts the
        cloud timeout's clock: a waiting caller's answer is never later than
        ``timeout_ms`` after arrival plus the time to send it back.
        """
        started = time.perf_counter()
        received = started if received is None else received
        outputs = await lv.runner.infer(inputs)
        m = lv.manifest
        prov = Provenance(
            source=self.local_source,
            edge_model=m.name,
            edge_version=m.version,
            edge_ms=(time.perf_counter() - started) * 1000,
        )
        result = InferenceResult(outputs, prov)
        if self.cloud is None or self.metrics is None:
            return result
        policy = self.policy(m)
        batch = _batch_size(inputs, outputs)
        labels = (m.name, m.version)
        if not policy.active or not allow_cloud or batch is None:
            self.metrics.items.inc(*labels, "edge", "edge_only", value=batch or 1)
            return result
        scores = await self._scores(m, outputs, policy)
        prov.edge_confidence = [float(c) for c in scores.confidence]
        if scores.top_class is not None:
            prov.edge_class = [int(c) for c in scores.top_class]
        routes = route_items(policy, scores, self._rng)
        unsure = [i for i, r in enumerate(routes) if r is Route.UNSURE]
        audit = [i for i, r in enumerate(routes) if r is Route.AUDIT]
        confident = batch - len(unsure)
        if confident:
            self.metrics.items.inc(*labels, "edge", "confident", value=confident)
        if audit:
            prov.audited = True
            self._spawn(
                self._background(lv, policy, inputs, outputs, scores, audit, "audit", image),
                f"audit {m.name}",
            )
        if not unsure:
            return result
        if policy.mode == "edge_first_escalate":
            prov.escalated = True
            self.metrics.items.inc(*labels, "edge", "escalated", value=len(unsure))
            self._spawn(
                self._background(lv, policy, inputs, outputs, scores, unsure, "escalated", image),
                f"escalation {m.name}",
            )
            return result
        deadline = received + policy.timeout_ms / 1000
        return await self._ask_now(lv, policy, inputs, result, scores, unsure, image, deadline)

    async def _scores(self, m: Manifest, outputs: Tensors, policy: FallbackPolicy) -> ItemScores:
        if isinstance(m.postprocessing, DetectionPost):
            # Box decoding is real work: off the event loop.
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, item_scores, m, outputs, policy.rule)
        return item_scores(m, outputs, policy.rule)  # a few µs of numpy

    async def _ask_now(
        self,
        lv: LoadedVersion,
        policy: FallbackPolicy,
        inputs: Tensors,
        result: InferenceResult,
        scores: ItemScores,
        unsure: list[int],
        image: bytes | None,
        deadline: float,
    ) -> InferenceResult:
        assert self.cloud is not None and self.metrics is not None
        m = lv.manifest
        prov = result.provenance
        outcome = await self.cloud.call(
            policy,
            _take(inputs, unsure),
            expectation(result.outputs, len(unsure)),
            kind="unsure",
            deadline=deadline,
        )
        prov.cloud_model = policy.cloud_model
        prov.cloud_ms = outcome.ms
        labels = (m.name, m.version)
        if outcome.answer is None:
            assert outcome.reason is not None
            prov.fallback = outcome.reason
            prov.fallback_detail = outcome.detail
            self.metrics.items.inc(*labels, "edge", outcome.reason, value=len(unsure))
            self._keep_failed(
                lv, policy, inputs, result.outputs, scores, unsure, outcome, image, "unsure"
            )
            return result
        answer = outcome.answer
        cloud_scores = item_scores(m, answer.outputs, policy.rule)
        merged = {name: np.array(value, copy=True) for name, value in result.outputs.items()}
        idx = np.asarray(unsure, dtype=np.intp)
        for name, value in answer.outputs.items():
            merged[name][idx] = value
        prov.source = "cloud" if len(unsure) == len(scores.confidence) else "mixed"
        prov.cloud_version = answer.model_version
        prov.cloud_items = unsure
        prov.cloud_confidence = [float(c) for c in cloud_scores.confidence]
        if cloud_scores.top_class is not None:
            prov.cloud_class = [int(c) for c in cloud_scores.top_class]
        self.metrics.items.inc(*labels, "cloud", "unsure", value=len(unsure))
        self._keep_answered(
            lv,
            policy,
            inputs,
            result.outputs,
            scores,
            unsure,
            outcome,
            cloud_scores,
            image,
            "unsure",
        )
        return InferenceResult(merged, prov)

    # ---- background cloud work ---------------------------------------------------------

    async def _background(
        self,
        lv: LoadedVersion,
        policy: FallbackPolicy,
        inputs: Tensors,
        outputs: Tensors,
        scores: ItemScores,
        rows: list[int],
        kind: str,
        image: bytes | None,
    ) -> None:
        assert self.cloud is not None
        outcome = await self.cloud.call(
            policy, _take(inputs, rows), expectation(outputs, len(rows)), kind=kind
        )
        if outcome.answer is None:
            # A failed audit is just a missed sample; a failed escalation is a hard
            # case whose cloud answer we still want: keep it for the retry loop.
            if kind == "escalated":
                self._keep_failed(lv, policy, inputs, outputs, scores, rows, outcome, image, kind)
            return
        cloud_scores = item_scores(lv.manifest, outcome.answer.outputs, policy.rule)
        self._keep_answered(
            lv, policy, inputs, outputs, scores, rows, outcome, cloud_scores, image, kind
        )

    # ---- hard examples ---------------------------------------------------------------------

    def _keep_answered(
        self,
        lv: LoadedVersion,
        policy: FallbackPolicy,
        inputs: Tensors,
        outputs: Tensors,
        scores: ItemScores,
        rows: list[int],
        outcome: CallOutcome,
        cloud_scores: ItemScores,
        image: bytes | None,
        kind: str,
    ) -> None:
        assert self.metrics is not None and outcome.answer is not None
        m = lv.manifest
        answer = outcome.answer
        agreement_kind = "audited" if kind == "audit" else "escalated"
        rate = self.config.fallback.hard_examples.sample_rate
        keep: list[NewExample] = []
        for j, i in enumerate(rows):
            edge_cls = _cls(scores, i)
            cloud_cls = _cls(cloud_scores, j)
            agree = None if edge_cls is None or cloud_cls is None else edge_cls == cloud_cls
            if agree is not None:
                self.metrics.agreement.inc(m.name, m.version, agreement_kind, str(agree).lower())
            # Disagreements are the most useful cases there are: always kept.
            if self.hard_examples is None or (agree is not False and self._rng.random() >= rate):
                continue
            keep.append(
                NewExample(
                    model=m.name,
                    version=m.version,
                    cloud_model=policy.cloud_model,
                    cloud_version=answer.model_version,
                    kind=kind,
                    status="answered",
                    inputs=_take(inputs, [i]),
                    edge_outputs=_take(outputs, [i]),
                    edge_class=edge_cls,
                    edge_confidence=float(scores.confidence[i]),
                    cloud_outputs=_take(answer.outputs, [j]),
                    cloud_class=cloud_cls,
                    cloud_confidence=float(cloud_scores.confidence[j]),
                    image=image,
                )
            )
        if keep:
            self._keep_soon(keep)

    def _keep_failed(
        self,
        lv: LoadedVersion,
        policy: FallbackPolicy,
        inputs: Tensors,
        outputs: Tensors,
        scores: ItemScores,
        rows: list[int],
        outcome: CallOutcome,
        image: bytes | None,
        kind: str,
    ) -> None:
        """Cases that should have had a cloud answer: kept (all of them) to retry."""
        if self.hard_examples is None:
            return
        m = lv.manifest
        self._keep_soon(
            [
                NewExample(
                    model=m.name,
                    version=m.version,
                    cloud_model=policy.cloud_model,
                    kind=kind,
                    status="pending",
                    reason=outcome.reason,
                    attempts=1 if outcome.sent else 0,
                    inputs=_take(inputs, [i]),
                    edge_outputs=_take(outputs, [i]),
                    edge_class=_cls(scores, i),
                    edge_confidence=float(scores.confidence[i]),
                    image=image,
                )
                for i in rows
            ]
        )

    def _keep_soon(self, examples: list[NewExample]) -> None:
        """Hand examples to the writer a moment from now, once this answer is sent:
        the writer thread's work would otherwise compete for the GIL with the
        response (a few ms at p99 when the cloud has just timed out)."""
        self._unstored.extend(examples)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(STORE_AFTER_S, self._store_now)

    def _store_now(self) -> None:
        self._flush_handle = None
        examples, self._unstored = self._unstored, []
        if self.hard_examples is not None and examples:
            self.hard_examples.add(examples)

    async def _retry(self, row: PendingExample) -> RetryOutcome:
        """One retry of a pending case, through the same gate as live traffic."""
        assert self.cloud is not None and self.metrics is not None
        loaded = self.registry.loaded_versions(row.model)
        lv = loaded.get(row.version)
        if lv is None:
            # That version was retired; any loaded version knows how to read answers.
            lv = next(iter(loaded.values()), None)
        if lv is None:
            return RetryRefused("model not loaded")
        policy = self.policy(lv.manifest)
        if policy.inactive or not policy.cloud_model:
            return RetryRefused(policy.inactive or "no cloud model")
        # Retries spend only what live traffic leaves: half the bucket stays for it.
        outcome = await self.cloud.call(
            policy, row.inputs, expectation(row.edge_outputs, 1), kind="retry", reserve=0.5
        )
        if outcome.answer is None:
            assert outcome.reason is not None
            return RetryFailed(outcome.reason) if outcome.sent else RetryRefused(outcome.reason)
        cloud_scores = item_scores(lv.manifest, outcome.answer.outputs, policy.rule)
        cloud_cls = _cls(cloud_scores, 0)
        if row.edge_class is not None and cloud_cls is not None:
            self.metrics.agreement.inc(
                row.model, row.version, "escalated", str(row.edge_class == cloud_cls).lower()
            )
        return RetryAnswered(
            cloud_model=policy.cloud_model,
            cloud_version=outcome.answer.model_version,
            cloud_outputs=outcome.answer.outputs,
            cloud_class=cloud_cls,
            cloud_confidence=float(cloud_scores.confidence[0]),
        )

    # ---- status ----------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """``GET /v1/fallback``: the endpoint, breakers, budgets, policies, hard examples."""
        doc: dict[str, Any] = {
            "profile": self.config.profile,
            "cloud": self.cloud.snapshot() if self.cloud else None,
        }
        models: dict[str, Any] = {}
        for name in self.registry.model_names():
            for version, lv in sorted(self.registry.loaded_versions(name).items()):
                models[f"{name}:{version}"] = self.policy(lv.manifest).describe(lv.manifest.labels)
        doc["policies"] = models
        if self.metrics is not None:
            doc["items"] = _items_by_model(self.metrics)
        if self.hard_examples is not None:
            doc["hard_examples"] = await self.hard_examples.stats()
        return doc


def _cls(scores: ItemScores, i: int) -> int | None:
    return int(scores.top_class[i]) if scores.top_class is not None else None


def _batch_size(inputs: Tensors, outputs: Tensors) -> int | None:
    """The batch size, or None when some tensor has no batch dimension to split by."""
    sizes = {a.shape[0] if a.ndim else None for a in (*inputs.values(), *outputs.values())}
    if len(sizes) != 1:
        return None
    size = sizes.pop()
    return size if size else None


def _items_by_model(metrics: CloudMetrics) -> dict[str, Any]:
    """Counts and the fallback rate per model version, from the counters."""
    out: dict[str, dict[str, Any]] = {}
    for (model, version, source, reason), n in metrics.items.values.items():
        row = out.setdefault(f"{model}:{version}", {"total": 0, "by_reason": {}})
        row["total"] += int(n)
        key = f"{source}/{reason}"
        row["by_reason"][key] = row["by_reason"].get(key, 0) + int(n)
    for row in out.values():
        wanted_cloud = sum(
            n
            for k, n in row["by_reason"].items()
            if k.split("/")[1] not in ("confident", "edge_only")
        )
        row["cloud_share"] = round(wanted_cloud / row["total"], 4) if row["total"] else 0.0
    return out


INFERENCE = web.AppKey("inference", InferenceService)


def inference(request: web.Request) -> InferenceService:
    return request.app[INFERENCE]

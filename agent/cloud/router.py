"""Who answers each item of a request: the edge alone, the cloud now, or the cloud later.

The data plane (``agent/dataplane.py``) runs the edge model and scores its outputs;
then, when ``engage`` says the model's fallback policy involves the cloud in this
request, ``route`` decides per item by the policy's rule and threshold:

* ``cloud_when_unsure``: unsure items go to the cloud in one call and the caller
  waits for it, at most the timeout (counted from the request's arrival); the
  cloud's answer replaces the edge's for those items. If the cloud cannot answer
  (timeout, error, breaker open, offline, no budget) the edge answer is returned
  with the reason.
* ``edge_first_escalate``: the edge answer is returned at once; unsure items go to
  the cloud in the background and both answers are kept as hard examples.
* audits: a share of *confident* items also goes to the cloud in the background,
  to learn how often the edge is confidently wrong.

Batched requests are decided **per item**: only the unsure items of a batch are
sent (in one call), and the answer tensors are merged row by row. The request's
``Provenance`` gets who answered what, both versions and confidences, and the time
spent in the cloud.

A request never fails because of the cloud: every cloud failure becomes a fallback
reason. The router owns the background work (escalations, audits, hard-example
retries, ``fallback_stats`` telemetry): started with the agent, cancelled and
awaited when it stops. Everything here runs on the event loop; box decoding of a
cloud answer runs in the inference executor.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Coroutine, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

from edgefleet.agent.cloud.config import ModelFallback
from edgefleet.agent.cloud.fallback import (
    CallOutcome,
    CloudFallback,
    default_store_path,
    expectation,
    take_rows,
)
from edgefleet.agent.cloud.hard_example_upload import HardExampleUploader
from edgefleet.agent.cloud.hard_examples import (
    Case,
    HardExampleRecorder,
    HardExampleStore,
    PendingExample,
    RetryAnswered,
    RetryFailed,
    RetryLoop,
    RetryOutcome,
    RetryRefused,
)
from edgefleet.agent.cloud.metrics import CloudMetrics
from edgefleet.agent.cloud.policy import FallbackPolicy, Route, resolve_policy, route_items
from edgefleet.agent.cloud.telemetry import FallbackTelemetry, TelemetrySink
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.provenance import Provenance
from edgefleet.agent.serving_registry import ModelRegistry
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.processing.scoring import Scored, score_off_loop
from edgefleet.core.protocol import FleetFallback

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
# Background loops that run for the agent's life (idle() does not wait for them).
_LOOPS = ("hard-example retries", "fallback telemetry", "hard-example upload")


class CloudRouter:
    """One per agent. Without a cloud endpoint (``cloud`` is None) it only resolves
    policies (model metadata, ``GET /v1/fallback``) and ``engage`` always says no."""

    def __init__(
        self,
        config: AgentConfig,
        registry: ModelRegistry,
        metrics: Metrics,
        executor: Executor,
        telemetry_sink: TelemetrySink | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.executor = executor
        fb = config.fallback
        self.cloud_configured = config.profile == "edge" and fb.cloud.url is not None
        self.metrics: CloudMetrics | None = None
        self.cloud: CloudFallback | None = None
        self.telemetry: FallbackTelemetry | None = None
        self.hard_examples: HardExampleStore | None = None
        self.recorder: HardExampleRecorder | None = None
        self.retry_loop: RetryLoop | None = None
        self.uploader: HardExampleUploader | None = None
        self._rng = random.Random()
        if self.cloud_configured:
            self.metrics = CloudMetrics(metrics)
            self.cloud = CloudFallback(fb, self.metrics, executor)
            self.telemetry = FallbackTelemetry(
                self.metrics, self.cloud, fb.telemetry_interval_s, telemetry_sink
            )
            he = fb.hard_examples
            if he.enabled:
                self.hard_examples = HardExampleStore(
                    he.path or default_store_path(config.store.path),
                    he,
                    on_counts=self._hard_example_counts,
                    on_dropped=self._hard_examples_dropped,
                )
                self.recorder = HardExampleRecorder(self.hard_examples, he.sample_rate, self._rng)
                self.retry_loop = RetryLoop(self.hard_examples, he, self._retry)
                if he.upload.enabled and config.fleet is not None and config.device_id:
                    # Kept cases to the fleet (agent/cloud/hard_example_upload.py).
                    self.uploader = HardExampleUploader(
                        self.hard_examples, he.upload, config.device_id, config.fleet
                    )
        self._policies: dict[tuple[str, str], FallbackPolicy] = {}
        # The fleet's policy per model (desired state, agent/sync.py: set_fleet_policy).
        self._fleet_policies: dict[str, ModelFallback] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    def _hard_example_counts(self, counts: dict[str, int]) -> None:
        assert self.metrics is not None
        for status, n in counts.items():
            self.metrics.hard_examples.set(status, value=n)

    def _hard_examples_dropped(self, reason: str, n: int) -> None:
        assert self.metrics is not None
        self.metrics.hard_examples_dropped.inc(reason, value=n)

    # ---- lifecycle ---------------------------------------------------------------------

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
                self.recorder = None
                self.retry_loop = None
                self.uploader = None
        if self.retry_loop is not None:
            self._spawn(self.retry_loop.run(), "hard-example retries")
        if self.telemetry is not None:
            self._spawn(self.telemetry.run(), "fallback telemetry")
        if self.uploader is not None:
            self._spawn(self.uploader.run(), "hard-example upload")

    def adopt_hard_examples(self, store: HardExampleStore) -> None:
        """Upload another store's cases too (event loop): the shadow runner's own store,
        opened when no cloud is configured (agent/shadow.py). Only when this agent has
        a fleet section and no uploader yet (the router's own store is the same file)."""
        cfg = self.config
        upload = cfg.fallback.hard_examples.upload
        if self.uploader is not None or cfg.fleet is None or not cfg.device_id:
            return
        if not upload.enabled or self._closing:
            return
        self.uploader = HardExampleUploader(store, upload, cfg.device_id, cfg.fleet)
        self._spawn(self.uploader.run(), "hard-example upload")

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.cloud is not None:
            await self.cloud.close()
        if self.recorder is not None:
            self.recorder.flush()  # nothing kept is lost at shutdown
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

    # ---- policy ------------------------------------------------------------------------

    def policy(self, manifest: Manifest) -> FallbackPolicy:
        """The model version's policy: its bundle's defaults with this agent's config laid
        over them (resolved once per version)."""
        key = (manifest.name, manifest.version)
        policy = self._policies.get(key)
        if policy is None:
            policy = resolve_policy(
                manifest,
                self.config.fallback,
                cloud_configured=self.cloud_configured,
                fleet=self._fleet_policies.get(manifest.name),
            )
            self._policies[key] = policy
            if policy.mode != "edge_only" and policy.inactive and self.cloud_configured:
                log.info("%s:%s answers locally only: %s", *key, policy.inactive)
        return policy

    def set_fleet_policy(self, model: str, policy: FleetFallback | None) -> bool:
        """Event loop (the sync's worker): the fleet's fallback settings for ``model``
        (None or empty: none). Applies to the very next request of every loaded version
        (the resolved policies of the model are dropped). True when it changed."""
        new = None
        if policy is not None and not policy.is_empty():
            new = ModelFallback.model_validate(policy.to_wire())
        if self._fleet_policies.get(model) == new:
            return False
        if new is None:
            self._fleet_policies.pop(model, None)
        else:
            self._fleet_policies[model] = new
        for key in [k for k in self._policies if k[0] == model]:
            del self._policies[key]
        log.info(
            "fleet fallback policy for %s: %s",
            model,
            new.model_dump(exclude_none=True) if new else "none",
        )
        return True

    def fleet_policy(self, model: str) -> ModelFallback | None:
        return self._fleet_policies.get(model)

    def engage(
        self, manifest: Manifest, inputs: Tensors, outputs: Tensors, *, allow_cloud: bool
    ) -> FallbackPolicy | None:
        """The policy that involves the cloud in this answer, or None: the edge answers
        alone (no cloud endpoint, policy ``edge_only`` or inactive, the caller said
        ``cloud: false``, or tensors without a batch dimension to split by). With a
        cloud endpoint, the items answered alone are counted here as ``edge_only``."""
        if self.metrics is None:
            return None
        policy = self.policy(manifest)
        batch = _batch_size(inputs, outputs)
        if policy.active and allow_cloud and batch is not None:
            return policy
        self.metrics.items.inc(
            manifest.name, manifest.version, "edge", "edge_only", value=batch or 1
        )
        return None

    # ---- the decision ----------------------------------------------------------------------

    async def route(
        self,
        policy: FallbackPolicy,
        manifest: Manifest,
        inputs: Tensors,
        outputs: Tensors,
        scored: Scored,
        prov: Provenance,
        *,
        image: bytes | None,
        received: float,
    ) -> tuple[Tensors, Scored]:
        """The answer's tensors and scores, with the cloud's items merged in when it
        answered now; ``prov`` gets the cloud's part. ``scored``: the edge outputs
        scored (by any rule: the policy's is derived from it, nothing is decoded
        again). The returned scores are by ``scored``'s rule.

        ``received`` (``time.perf_counter()`` at the request's arrival) starts the
        cloud timeout's clock: a waiting caller's answer is never later than
        ``timeout_ms`` after arrival plus the time to send it back.
        """
        assert self.metrics is not None
        judged = scored.under(policy.rule)
        prov.edge_confidence = [float(c) for c in judged.confidence]
        if judged.top_class is not None:
            prov.edge_class = [int(c) for c in judged.top_class]
        routes = route_items(policy, judged, self._rng)
        unsure = [i for i, r in enumerate(routes) if r is Route.UNSURE]
        audit = [i for i, r in enumerate(routes) if r is Route.AUDIT]
        labels = (manifest.name, manifest.version)
        case = Case(
            manifest.name, manifest.version, policy.cloud_model, inputs, outputs, judged, image
        )
        confident = len(judged) - len(unsure)
        if confident:
            self.metrics.items.inc(*labels, "edge", "confident", value=confident)
        if audit:
            prov.audited = True
            self._spawn(
                self._background(policy, manifest, case, audit, "audit"),
                f"audit {manifest.name}",
            )
        if not unsure:
            return outputs, scored
        if policy.mode == "edge_first_escalate":
            prov.escalated = True
            self.metrics.items.inc(*labels, "edge", "escalated", value=len(unsure))
            self._spawn(
                self._background(policy, manifest, case, unsure, "escalated"),
                f"escalation {manifest.name}",
            )
            return outputs, scored
        deadline = received + policy.timeout_ms / 1000
        return await self._ask_now(policy, manifest, case, scored, prov, unsure, deadline)

    async def _ask_now(
        self,
        policy: FallbackPolicy,
        manifest: Manifest,
        case: Case,
        scored: Scored,
        prov: Provenance,
        unsure: list[int],
        deadline: float,
    ) -> tuple[Tensors, Scored]:
        assert self.cloud is not None and self.metrics is not None
        outputs = dict(case.edge_outputs)
        outcome = await self.cloud.call(
            policy,
            take_rows(case.inputs, unsure),
            expectation(outputs, len(unsure)),
            kind="unsure",
            deadline=deadline,
        )
        prov.cloud_model = policy.cloud_model
        prov.cloud_ms = outcome.ms
        labels = (manifest.name, manifest.version)
        if outcome.answer is None:
            assert outcome.reason is not None
            prov.fallback = outcome.reason
            prov.fallback_detail = outcome.detail
            self.metrics.items.inc(*labels, "edge", outcome.reason, value=len(unsure))
            self._keep_failed(case, unsure, outcome, "unsure")
            return outputs, scored
        answer = outcome.answer
        cloud_scored = await score_off_loop(manifest, answer.outputs, self.executor)
        cloud_judged = cloud_scored.under(policy.rule)
        merged = {name: np.array(value, copy=True) for name, value in outputs.items()}
        idx = np.asarray(unsure, dtype=np.intp)
        for name, value in answer.outputs.items():
            merged[name][idx] = value
        prov.source = "cloud" if len(unsure) == len(scored) else "mixed"
        prov.cloud_version = answer.model_version
        prov.cloud_items = unsure
        prov.cloud_confidence = [float(c) for c in cloud_judged.confidence]
        if cloud_judged.top_class is not None:
            prov.cloud_class = [int(c) for c in cloud_judged.top_class]
        self.metrics.items.inc(*labels, "cloud", "unsure", value=len(unsure))
        self._keep_answered(case, unsure, outcome, cloud_judged, "unsure")
        return merged, scored.replace(unsure, cloud_scored)

    # ---- background cloud work ---------------------------------------------------------

    async def _background(
        self,
        policy: FallbackPolicy,
        manifest: Manifest,
        case: Case,
        rows: list[int],
        kind: str,
    ) -> None:
        assert self.cloud is not None
        outcome = await self.cloud.call(
            policy,
            take_rows(case.inputs, rows),
            expectation(case.edge_outputs, len(rows)),
            kind=kind,
        )
        if outcome.answer is None:
            # A failed audit is just a missed sample; a failed escalation is a hard
            # case whose cloud answer we still want: keep it for the retry loop.
            if kind == "escalated":
                self._keep_failed(case, rows, outcome, kind)
            return
        cloud_scored = await score_off_loop(
            manifest, outcome.answer.outputs, self.executor, policy.rule
        )
        self._keep_answered(case, rows, outcome, cloud_scored, kind)

    def _keep_answered(
        self,
        case: Case,
        rows: Sequence[int],
        outcome: CallOutcome,
        cloud: Scored,
        kind: str,
    ) -> None:
        """Counts top-1 agreement and hands the cases to the recorder (``cloud``: the
        answer scored by the policy's rule)."""
        assert self.metrics is not None and outcome.answer is not None
        agreement_kind = "audited" if kind == "audit" else "escalated"
        agree: list[bool | None] = []
        for j, i in enumerate(rows):
            edge_cls = case.edge_class(i)
            cloud_cls = int(cloud.top_class[j]) if cloud.top_class is not None else None
            same = None if edge_cls is None or cloud_cls is None else edge_cls == cloud_cls
            agree.append(same)
            if same is not None:
                self.metrics.agreement.inc(
                    case.model, case.version, agreement_kind, str(same).lower()
                )
        if self.recorder is not None:
            self.recorder.answered(
                case,
                rows,
                kind,
                cloud_version=outcome.answer.model_version,
                cloud_outputs=outcome.answer.outputs,
                cloud=cloud,
                agree=agree,
            )

    def _keep_failed(
        self, case: Case, rows: Sequence[int], outcome: CallOutcome, kind: str
    ) -> None:
        """Cases that should have had a cloud answer: kept (all of them) to retry."""
        if self.recorder is not None:
            self.recorder.failed(case, rows, kind, reason=outcome.reason, sent=outcome.sent)

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
        cloud = await score_off_loop(
            lv.manifest, outcome.answer.outputs, self.executor, policy.rule
        )
        cloud_cls = int(cloud.top_class[0]) if cloud.top_class is not None else None
        if row.edge_class is not None and cloud_cls is not None:
            self.metrics.agreement.inc(
                row.model, row.version, "escalated", str(row.edge_class == cloud_cls).lower()
            )
        return RetryAnswered(
            cloud_model=policy.cloud_model,
            cloud_version=outcome.answer.model_version,
            cloud_outputs=outcome.answer.outputs,
            cloud_class=cloud_cls,
            cloud_confidence=float(cloud.confidence[0]),
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
        doc["fleet_policies"] = {
            name: p.model_dump(exclude_none=True) for name, p in self._fleet_policies.items()
        }
        if self.metrics is not None:
            doc["items"] = _items_by_model(self.metrics)
        if self.hard_examples is not None:
            doc["hard_examples"] = await self.hard_examples.stats()
            if self.uploader is not None:
                doc["hard_examples"]["upload"] = self.uploader.describe()
        return doc


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

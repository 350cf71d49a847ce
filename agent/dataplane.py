"""The data plane: every inference, whatever protocol brought it, runs through here.

``DataPlane.infer`` takes a protocol-neutral ``InferenceRequest`` and returns an
``InferenceResponse``. In order, for one request:

1. resolve the model and version (a version or a label) to a loaded version: an
   unknown one raises ``NotFound``, one not loaded ``Unavailable``; neither is
   counted anywhere (there is no version to count it against). With a traffic
   split (agent/split.py), the split's share of the requests that name no version
   goes to its canary (sticky per routing key, read only then);
2. start the request's clock (``received``, or now) and let the protocol adapter
   decode its payload against that version's manifest (``InferenceRequest.decode``:
   the inputs, types and shapes the model takes);
3. run the edge model (its runner: a queue, a batcher, an executor thread);
4. score the outputs, once (``edgefleet.core.processing.scoring``), when anyone needs
   them: the protocol's answer (labels, boxes), the cloud-fallback policy, or the
   fleet's confidence histogram;
5. let the cloud router (``agent/cloud/router.py``) involve the cloud as the model's
   fallback policy says, merging its answer for the items it answered;
6. record the request: the ``edgefleet_request_duration_seconds`` histogram and,
   with a fleet link, the per-version window of ``InferenceStats``
   (``agent/telemetry_stats.py``): one answer (its source, fallback reason and the
   confidence of its least sure item, by the model's confidence rule) or one error;
7. with a shadow candidate (agent/shadow.py), hand the active version's own outputs
   to the shadow runner with ``call_soon``: after the answer, never awaited.

A failure after step 1 is an error of that version, counted and re-raised: errors
of the core's tree (``edgefleet.core.errors``) as they are; anything else the model
run or the scoring raised becomes an ``EdgeError`` (500) saying only its type, after
it is logged with the model's name. A cancelled request (the client hung up) is
neither an answer nor an error.

So the answer and the fleet's statistics do not depend on the protocol: an OIP
request and an image request with the same tensors count the same confidence,
with or without a cloud. The protocol adapters (``agent/server/oip.py``,
``agent/server/image.py``) only decode and encode.

Everything here runs on the event loop; the model runs in its runner's executor
and a detector's box decoding in the inference executor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from edgefleet.agent.cloud.router import CloudRouter
from edgefleet.agent.cloud.telemetry import TelemetrySink
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.provenance import Provenance
from edgefleet.agent.serving_registry import LoadedVersion, ModelRegistry
from edgefleet.agent.shadow import KIND as SHADOW_KIND
from edgefleet.agent.shadow import ShadowRunner
from edgefleet.agent.telemetry_stats import InferenceStats
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.errors import EdgeError
from edgefleet.core.processing.scoring import Scored, scorable, score_off_loop

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
# The protocol adapter's own decoded request (e.g. which outputs, in which encoding),
# handed back untouched in the response for the adapter to encode the answer with.
C = TypeVar("C")


@dataclass
class ModelInput(Generic[C]):
    """What a protocol adapter decoded for the model."""

    tensors: Tensors
    context: C
    allow_cloud: bool = True  # False: the caller keeps this request on the box
    image: bytes | None = None  # the original image, kept with a hard example


@dataclass
class InferenceRequest(Generic[C]):
    """One inference request, before the model version is known.

    ``decode`` turns the protocol's payload into the model's inputs once the version
    is resolved (the manifest says which inputs, types and shapes are valid); it runs
    inside the request's accounting, so a bad payload counts as an error of that
    version. It raises ``BadRequest`` (or the transport's own errors) for bad input.
    """

    model: str
    version: str | None  # a version, a label, or None for the active version
    decode: Callable[[Manifest], Awaitable[ModelInput[C]]]
    # The protocol's answer is built from the scored outputs (labels, boxes); the
    # adapter refuses models whose outputs cannot be scored (``scoring.scorable``)
    # while decoding.
    scores: bool = False
    # ``time.perf_counter()`` at the request's arrival; None: when ``infer`` is called.
    received: float | None = None
    # The app's routing key for a traffic split (agent/split.py), read only when the
    # model has a split and the request names no version: a coroutine, because the
    # OIP adapter finds it in the body (``parameters.routing_key``). It raises
    # ``BadRequest`` for a bad key.
    routing_key: Callable[[], Awaitable[str | None]] | None = None


@dataclass
class InferenceResponse(Generic[C]):
    manifest: Manifest  # the version that answered
    provider: str  # the runtime's execution provider
    outputs: Tensors  # the answer (cloud items merged in)
    provenance: Provenance
    # The answer scored by the model's confidence rule; None when nobody needed it
    # (raw outputs, or an OIP request with no cloud policy and no fleet link).
    scored: Scored | None
    latency_ms: float  # arrival to answer ready, model included
    context: C


class DataPlane:
    """One per agent. ``stats``: the fleet link's aggregates, None without a fleet;
    ``telemetry_sink``: where the cloud fallback's ``fallback_stats`` records go."""

    def __init__(
        self,
        config: AgentConfig,
        registry: ModelRegistry,
        metrics: Metrics,
        executor: Executor,
        *,
        stats: InferenceStats | None = None,
        telemetry_sink: TelemetrySink | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.executor = executor
        self.stats = stats
        if stats is not None:
            metrics.register(stats.drift.gauge)  # edgefleet_drift_psi on /metrics
        # The cloud profile is the end of the line: it answers itself, as "cloud".
        self.local_source = "cloud" if config.profile == "cloud" else "edge"
        self.router = CloudRouter(config, registry, metrics, executor, telemetry_sink)
        self._unscored: set[tuple[str, str]] = set()  # versions whose scoring failed, logged
        # Shadow candidates (agent/shadow.py): offered the active answers, after them.
        self.shadow = ShadowRunner(
            config.runtime.shadow,
            registry,
            metrics,
            hard_examples=config.fallback.hard_examples if config.profile == "edge" else None,
            store_path=config.store.path,
        )
        if stats is not None:
            stats.add_source(SHADOW_KIND, self.shadow.take)

    async def lifecycle(self, app: object) -> AsyncIterator[None]:
        """An aiohttp cleanup context (started after the models load, stopped before
        they unload): the cloud router's background work, the shadow runner."""
        await self.router.start()
        self.shadow.on_own_store = self.router.adopt_hard_examples  # uploads (issue 11)
        self.shadow.start(self.router.hard_examples)
        try:
            yield
        finally:
            await self.shadow.close()
            await self.router.close()

    async def infer(self, request: InferenceRequest[C]) -> InferenceResponse[C]:
        """Resolve, decode, run, score, involve the cloud, record (see the module doc)."""
        received = time.perf_counter() if request.received is None else request.received
        key = None
        if (
            request.version is None
            and request.routing_key is not None
            and self.registry.split_for(request.model) is not None
        ):
            key = await request.routing_key()
        lv = self.registry.resolve(request.model, request.version, routing_key=key)
        m = lv.manifest
        stats = self.stats
        try:
            given = await request.decode(m)
            outputs, prov, scored, edge = await self._answer(lv, given, received, request.scores)
        except Exception:
            if stats is not None:
                stats.record_error(m.name, m.version, time.perf_counter() - received)
            raise
        latency_s = time.perf_counter() - received
        self.metrics.request_duration.observe(m.name, m.version, value=latency_s)
        if stats is not None:
            confidence = scored.least_confident() if scored is not None else None
            stats.record(m.name, m.version, latency_s, prov.source, prov.fallback, confidence)
            stats.observe(m, lv.directory, given.tensors, scored)  # drift: binned off the loop
        if self.registry.shadow_for(m.name) is not None:
            self._offer_shadow(lv, given, edge, prov.edge_ms)
        return InferenceResponse(
            m,
            lv.backend.info.provider,
            outputs,
            prov,
            scored,
            latency_s * 1000,
            given.context,
        )

    async def _answer(
        self, lv: LoadedVersion, given: ModelInput[C], received: float, wants_scores: bool
    ) -> tuple[Tensors, Provenance, Scored | None, Tensors]:
        """The answer, its provenance and scores, and the edge model's own outputs."""
        m = lv.manifest
        inputs = given.tensors
        try:
            started = time.perf_counter()
            outputs = edge = await lv.runner.infer(inputs)
            prov = Provenance(
                source=self.local_source,
                edge_model=m.name,
                edge_version=m.version,
                edge_ms=(time.perf_counter() - started) * 1000,
            )
            policy = self.router.engage(m, inputs, outputs, allow_cloud=given.allow_cloud)
            scored: Scored | None = None
            if policy is not None or wants_scores:
                scored = await score_off_loop(m, outputs, self.executor)
            elif self.stats is not None and scorable(m):
                scored = await self._score_for_stats(m, outputs)
            if policy is not None:
                assert scored is not None
                outputs, scored = await self.router.route(
                    policy,
                    m,
                    inputs,
                    outputs,
                    scored,
                    prov,
                    image=given.image,
                    received=received,
                )
        except EdgeError:
            raise
        except Exception as exc:
            # ONNX Runtime, LiteRT or a decoder refusing these outputs: not the caller's
            # fault and not a bug of the server's; logged here, with the model's name.
            log.error("%s:%s: inference failed", m.name, m.version, exc_info=exc)
            raise EdgeError(f"internal error ({type(exc).__name__})") from exc
        return outputs, prov, scored, edge

    def _offer_shadow(
        self, lv: LoadedVersion, given: ModelInput[C], edge: Tensors, edge_ms: float
    ) -> None:
        """Hand the active version's answer to the shadow runner once this request's
        answer is on its way (``call_soon``: after the handler returns, never awaited).
        Only answers of the active version: a split's canary or a named version is
        not what the candidate would replace."""
        m = lv.manifest
        state = self.registry.known_state(m.name)
        if state.active != m.version:
            return
        asyncio.get_running_loop().call_soon(
            self.shadow.offer, m, given.tensors, edge, edge_ms, given.image
        )

    async def _score_for_stats(self, m: Manifest, outputs: Tensors) -> Scored | None:
        """Scores wanted only for the fleet's histogram: a failure loses the confidence
        of this answer, not the answer."""
        try:
            return await score_off_loop(m, outputs, self.executor)
        except Exception as exc:
            key = (m.name, m.version)
            if key not in self._unscored:
                self._unscored.add(key)
                log.warning("%s:%s: outputs cannot be scored: %s", *key, exc)
            return None

"""The cloud endpoint as the cloud router sees it: gate, call, judge, record.

``CloudFallback.call`` is the one way to the cloud, for live requests, background
escalations and audits, and retries alike. Before a call: the endpoint must not
be offline, the model's breaker must not be open, and the model's budget must
have room; otherwise the call is refused at once with that reason. After it: the
answer is checked against what the edge model produced (same output names, same
per-item shapes, compatible types, finite values), and the outcome settles the
breakers. A connection failure trips the endpoint's breaker at once (the offline
state: nothing to gain from waiting for K of them, each possibly a full connect
timeout); timeouts and errors count towards the model's breaker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.agent.cloud.breaker import CircuitBreaker, Permit, State
from edgefleet.agent.cloud.budget import CallBudget, Lease
from edgefleet.agent.cloud.config import FallbackConfig
from edgefleet.agent.cloud.metrics import CloudMetrics
from edgefleet.agent.cloud.policy import FallbackPolicy
from edgefleet.core.oip_client import (
    CallTrace,
    CloudAnswer,
    CloudError,
    CloudProtocolError,
    CloudUnreachable,
    OipClient,
    client_ssl_context,
)

log = logging.getLogger(__name__)

OFFLINE = "offline"
CIRCUIT_OPEN = "circuit_open"
BUDGET_EXHAUSTED = "budget_exhausted"
CLOUD_ERROR = "cloud_error"
CLOUD_TIMEOUT = "cloud_timeout"
# How long after a caller stopped waiting its cloud call is cancelled (see call()).
CANCEL_AFTER_S = 0.002
# Per output: the shape one item must have, and the edge output's dtype.
Expectation = Mapping[str, tuple[tuple[int, ...], np.dtype]]


@dataclass(frozen=True)
class CallOutcome:
    """What became of one attempt to ask the cloud."""

    answer: CloudAnswer | None
    reason: str | None  # the fallback reason when there is no answer
    sent: bool  # False: refused before anything went on the wire
    ms: float | None  # time spent on the call (sent calls only)
    detail: str | None = None  # a human-readable why, for logs and callers

    @property
    def ok(self) -> bool:
        return self.answer is not None


def _read_token(config: FallbackConfig) -> str | None:
    cloud = config.cloud
    if cloud.token_file is not None:
        token = cloud.token_file.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"{cloud.token_file} is empty")
        return token
    return cloud.token


class CloudFallback:
    def __init__(
        self, config: FallbackConfig, metrics: CloudMetrics, executor: Executor | None = None
    ) -> None:
        assert config.cloud.url is not None
        self.config = config
        self.metrics = metrics
        self.executor = executor
        self.url = config.cloud.url
        self.client: OipClient | None = None
        # Set when the endpoint cannot be used at all (unreadable token or CA file):
        # every call is refused as cloud_error, and the agent serves on regardless.
        self.unusable: str | None = None
        b = config.breaker
        self.endpoint = CircuitBreaker(
            failures=1,
            backoff_s=b.backoff_ms / 1000,
            max_backoff_s=b.max_backoff_ms / 1000,
            jitter=b.jitter,
            on_change=self._endpoint_changed,
        )
        self._breakers: dict[str, CircuitBreaker] = {}
        self._budgets: dict[str, CallBudget] = {}
        self._inflight: set[asyncio.Task[CloudAnswer]] = set()

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            token = await loop.run_in_executor(self.executor, _read_token, self.config)
            cloud = self.config.cloud
            context = None
            if cloud.url is not None and cloud.url.startswith("https://"):
                try:
                    context = await loop.run_in_executor(
                        self.executor, client_ssl_context, cloud.ca_file
                    )
                except (OSError, ValueError) as exc:  # ssl's errors do not name the file
                    raise ValueError(f"CA file {cloud.ca_file}: {exc}") from exc
            self.client = OipClient(
                self.url,
                token=token,
                ssl_context=context,
                max_connections=cloud.max_connections,
                keepalive_s=cloud.keepalive_s,
                max_response_bytes=cloud.max_response_bytes,
                executor=self.executor,
            )
        except (OSError, ValueError) as exc:
            self.unusable = f"cloud endpoint not usable: {exc}"
            log.error("%s; every model answers locally (fallback cloud_error)", self.unusable)
            return
        log.info(
            "cloud fallback to %s (timeout %d ms, %s)",
            self.url,
            self.config.cloud.timeout_ms,
            "token set" if token else "no token",
        )

    async def close(self) -> None:
        # Calls still out (their callers gone, or about to be cancelled): end them all.
        for task in list(self._inflight):
            task.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self.client is not None:
            await self.client.close()

    # ---- state -----------------------------------------------------------------------------

    def _endpoint_changed(self, state: State) -> None:
        self.metrics.offline.set(value=int(state))
        if state is State.OPEN:
            log.warning(
                "cloud %s unreachable (%s): answering locally, next try in %.1f s",
                self.url,
                self.endpoint.last_error,
                self.endpoint.seconds_until_probe(),
            )
        elif state is State.CLOSED:
            log.warning("cloud %s reachable again", self.url)

    def breaker(self, model: str) -> CircuitBreaker:
        breaker = self._breakers.get(model)
        if breaker is None:
            b = self.config.breaker

            def changed(state: State) -> None:
                self.metrics.breaker_state.set(model, value=int(state))
                if state is State.OPEN:
                    log.warning(
                        "cloud circuit for %s open after %s; probing again in %.1f s",
                        model,
                        breaker.last_error if breaker else "failures",
                        breaker.seconds_until_probe() if breaker else 0.0,
                    )
                elif state is State.CLOSED:
                    log.warning("cloud circuit for %s closed: the cloud answers again", model)

            breaker = CircuitBreaker(
                failures=b.failures,
                backoff_s=b.backoff_ms / 1000,
                max_backoff_s=b.max_backoff_ms / 1000,
                jitter=b.jitter,
                on_change=changed,
            )
            self._breakers[model] = breaker
            self.metrics.breaker_state.set(model, value=0)
        return breaker

    def budget(self, policy: FallbackPolicy) -> CallBudget:
        budget = self._budgets.get(policy.model)
        if budget is None or (budget.per_minute, budget.max_in_flight) != (
            policy.max_calls_per_minute,
            policy.max_in_flight,
        ):
            old = budget
            budget = CallBudget(policy.max_calls_per_minute, policy.max_in_flight)
            if old is not None:  # limits changed: keep the count of calls still out
                budget.in_flight = old.in_flight
                budget.tokens = min(budget.tokens, old.tokens)
            self._budgets[policy.model] = budget
        return budget

    def refusal(self, policy: FallbackPolicy) -> str | None:
        """The reason a call would be refused now, without taking anything."""
        if self.unusable is not None or self.client is None:
            return CLOUD_ERROR
        if not self.endpoint.would_allow():
            return OFFLINE
        if not self.breaker(policy.model).would_allow():
            return CIRCUIT_OPEN
        return None

    @property
    def offline(self) -> bool:
        return self.endpoint.state is not State.CLOSED

    def breaker_states(self) -> dict[str, str]:
        return {model: b.state.name.lower() for model, b in sorted(self._breakers.items())}

    def snapshot(self) -> dict[str, object]:
        return {
            "url": self.url,
            "unusable": self.unusable,
            "offline": self.offline,
            "endpoint": self.endpoint.snapshot(),
            "breakers": {m: b.snapshot() for m, b in sorted(self._breakers.items())},
            "budgets": {m: b.snapshot() for m, b in sorted(self._budgets.items())},
        }

    # ---- the call --------------------------------------------------------------------------

    async def call(
        self,
        policy: FallbackPolicy,
        inputs: Mapping[str, np.ndarray],
        expect: Expectation,
        *,
        kind: str,
        reserve: float = 0.0,
        deadline: float | None = None,
    ) -> CallOutcome:
        """Ask ``policy.cloud_model`` about ``inputs``; never raises a cloud failure.

        ``deadline`` (``time.perf_counter()`` time) caps the call for a caller who is
        waiting: the request's own timeout counts from its arrival, so the edge
        model's time is inside it. Background calls get the policy's full timeout.
        """
        labels = (policy.model, policy.version)
        timeout_s = policy.timeout_ms / 1000
        if deadline is not None:
            timeout_s = min(timeout_s, deadline - time.perf_counter())
        reason = self.refusal(policy)
        if reason is None and timeout_s <= 0:
            reason = CLOUD_TIMEOUT  # the edge alone used up the caller's time
        lease: Lease | None = None
        if reason is None:
            lease = self.budget(policy).acquire(reserve)
            if lease is None:
                reason = BUDGET_EXHAUSTED
        if reason is not None:
            self.metrics.calls.inc(*labels, kind, reason)
            return CallOutcome(None, reason, False, None, self.unusable)
        assert lease is not None and self.client is not None and policy.cloud_model
        endpoint = self.endpoint.acquire()
        model = self.breaker(policy.model).acquire()
        assert endpoint is not None and model is not None  # would_allow said so, no await since
        trace = CallTrace()
        started = time.perf_counter()
        # The call runs as its own task and the caller waits for it at most timeout_s.
        # At the deadline the caller leaves at once and the call is cancelled a moment
        # later: aiohttp's clean-up of a cancelled request (~0.5 ms) then runs after
        # the local answer is on its way instead of before it.
        task = asyncio.create_task(
            self._send(policy, inputs, expect, timeout_s, trace, lease),
            name=f"cloud call {policy.model}",
        )
        self._inflight.add(task)
        task.add_done_callback(self._call_done)
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
        except asyncio.CancelledError:
            # The caller went away, or shutdown: nobody learnt anything.
            endpoint.abandon()
            model.abandon()
            task.cancel()
            raise
        ms = (time.perf_counter() - started) * 1000
        if not done:
            asyncio.get_running_loop().call_later(CANCEL_AFTER_S, task.cancel)
            error: BaseException | None = self.client.timeout_error(trace, timeout_s)
        elif task.cancelled():
            error = CloudError("the call was cancelled")
        else:
            error = task.exception()
        if error is not None:
            if not isinstance(error, CloudError):
                # A bug of ours must not fail the request either: the edge answer stands.
                log.error("unexpected error calling the cloud for %s", policy.model, exc_info=error)
                error = CloudError(f"{type(error).__name__}: {error}")
            self._settle_failure(error, endpoint, model)
            self.metrics.calls.inc(*labels, kind, error.reason)
            self.metrics.call_duration.observe(*labels, value=ms / 1000)
            log.debug("cloud call for %s (%s) failed: %s", policy.model, kind, error.message)
            return CallOutcome(None, error.reason, True, ms, error.message)
        endpoint.success()
        model.success()
        self.metrics.calls.inc(*labels, kind, "ok")
        self.metrics.call_duration.observe(*labels, value=ms / 1000)
        return CallOutcome(task.result(), None, True, ms)

    def _call_done(self, task: asyncio.Task[CloudAnswer]) -> None:
        self._inflight.discard(task)
        if not task.cancelled():
            # Retrieved here too: the outcome of a call whose caller had already left
            # (timed out) is of no interest, and asyncio would log it as unretrieved.
            task.exception()

    async def _send(
        self,
        policy: FallbackPolicy,
        inputs: Mapping[str, np.ndarray],
        expect: Expectation,
        timeout_s: float,
        trace: CallTrace,
        lease: Lease,
    ) -> CloudAnswer:
        """The call itself; the lease is held until the connection is free again."""
        assert self.client is not None and policy.cloud_model
        try:
            answer = await self.client.infer(
                policy.cloud_model,
                inputs,
                list(expect),
                version=policy.cloud_version,
                # A safety net: the waiter in call() normally cancels before this.
                timeout_s=timeout_s + CANCEL_AFTER_S + 0.05,
                trace=trace,
            )
            return check_answer(answer, expect)
        finally:
            lease.release()

    def _settle_failure(self, exc: CloudError, endpoint: Permit, model: Permit) -> None:
        if isinstance(exc, CloudUnreachable):
            endpoint.failure(exc.message, trip=True)
            model.abandon()  # the model did nothing wrong
        else:
            endpoint.success()  # we reached it; it is the answer that failed
            model.failure(exc.message)


def check_answer(answer: CloudAnswer, expect: Expectation) -> CloudAnswer:
    """The cloud's outputs must fit where the edge's go: names, item shapes, types."""
    fixed: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in expect.items():
        got = answer.outputs[name]
        if tuple(got.shape) != tuple(shape):
            raise CloudProtocolError(
                f"cloud output {name!r} has shape {list(got.shape)}, expected {list(shape)}"
            )
        kinds = {got.dtype.kind, dtype.kind}
        if got.dtype.kind != dtype.kind and not kinds <= {"i", "u"}:
            raise CloudProtocolError(
                f"cloud output {name!r} is {got.dtype}, the edge model's is {dtype}"
            )
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise CloudProtocolError(f"cloud output {name!r} holds NaN or infinity")
        fixed[name] = got.astype(dtype, copy=False)
    return CloudAnswer(answer.model_name, answer.model_version, fixed, answer.binary)


def expectation(
    outputs: Mapping[str, np.ndarray], items: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """What the cloud must return for ``items`` items, given the edge model's outputs."""
    return {name: ((items, *arr.shape[1:]), arr.dtype) for name, arr in outputs.items()}


def take_rows(tensors: Mapping[str, np.ndarray], rows: Sequence[int]) -> dict[str, np.ndarray]:
    """Items ``rows`` of every tensor, as copies: what goes to the cloud or the store
    never aliases a buffer the runtime or the request still owns."""
    idx = np.asarray(rows, dtype=np.intp)
    return {name: np.asarray(value)[idx] for name, value in tensors.items()}


def default_store_path(store_path: Path) -> Path:
    return store_path.parent / "hard-examples.sqlite"

"""``fallback_stats`` telemetry: what the cloud fallback did since the last report.

Every ``fallback.telemetry_interval_s`` the fallback's counters (items by source and
reason, cloud calls by kind and outcome, top-1 agreement) are read, and what grew
since the previous report goes to the fleet as one ``fallback_stats`` record, with
the breakers' states, the offline flag and the hard-example counts. Nothing changed:
nothing sent. Without a fleet link (``sink`` is None) nothing is read at all.

Runs on the event loop (the counters are loop-only).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from edgefleet.agent.cloud.fallback import CloudFallback
from edgefleet.agent.cloud.metrics import CloudMetrics
from edgefleet.core import protocol

log = logging.getLogger(__name__)

KIND = "fallback_stats"
# Queues one telemetry record (kind, data): the fleet link's ``Outbox.add_one``.
TelemetrySink = Callable[[str, Any], Awaitable[Any]]


class FallbackTelemetry:
    def __init__(
        self,
        metrics: CloudMetrics,
        cloud: CloudFallback,
        interval_s: float,
        sink: TelemetrySink | None = None,
    ) -> None:
        self.metrics = metrics
        self.cloud = cloud
        self.interval_s = interval_s
        self.sink = sink
        self._reported: dict[str, dict[tuple[str, ...], float]] = {}

    async def run(self) -> None:
        """Report every ``interval_s``, for the agent's life (cancelled at its stop)."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.report()

    async def report(self) -> dict[str, Any] | None:
        """Send what changed since the last report to the fleet (when linked)."""
        if self.sink is None:
            return None
        doc = self.delta()
        if doc is None:
            return None
        try:
            await self.sink(KIND, doc)
        except Exception as exc:  # the outbox not open yet, or full: next time
            log.debug("fallback telemetry not queued: %s", exc)
            return None
        return doc

    def delta(self) -> dict[str, Any] | None:
        """The counts that grew since the last call (and now count as reported)."""
        m = self.metrics
        series = {"items": m.items, "calls": m.calls, "agreement": m.agreement}
        now = {key: dict(counter.values) for key, counter in series.items()}
        delta: dict[str, list[dict[str, Any]]] = {}
        for key, values in now.items():
            labels = series[key].labels
            before = self._reported.get(key, {})
            rows = [
                {**dict(zip(labels, lv, strict=True)), "n": int(v - before.get(lv, 0.0))}
                for lv, v in sorted(values.items())
                if v - before.get(lv, 0.0) > 0
            ]
            if rows:
                delta[key] = rows
        self._reported = now
        if not delta:
            return None
        # The record's data is core.protocol.FallbackStats (the fleet checks it with it).
        return protocol.FallbackStats.model_validate(
            {
                **delta,
                "breakers": self.cloud.breaker_states(),
                "offline": self.cloud.offline,
                "hard_examples": {
                    status: int(v) for (status,), v in m.hard_examples.values.items()
                },
            }
        ).to_wire()

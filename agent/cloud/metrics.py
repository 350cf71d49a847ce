"""The fallback's Prometheus series, registered into the agent's ``Metrics``.

Labels ``model``/``version`` are the *edge* model version that answered (or would
have), so a canary's fallback rate compares with the stable version's.

Fallback rate per model version::

    sum by (model, version)
        (rate(edgefleet_fallback_items_total{reason!~"confident|edge_only"}[5m]))
      / sum by (model, version) (rate(edgefleet_fallback_items_total[5m]))
"""

from __future__ import annotations

from edgefleet.agent.metrics import LATENCY_BUCKETS, Counter, Gauge, Histogram, Metrics

# Cloud calls take longer than local inference: extend the range to the longest timeout.
CLOUD_BUCKETS = (*LATENCY_BUCKETS, 10.0, 30.0)


class CloudMetrics:
    def __init__(self, metrics: Metrics) -> None:
        mv = ("model", "version")
        self.items = Counter(
            "edgefleet_fallback_items_total",
            "Answered items by source (edge, cloud) and reason: confident, edge_only, unsure"
            " (the cloud answered), escalated (edge answered, cloud asked in the background),"
            " or the fallback reason (cloud_timeout, cloud_error, circuit_open, offline,"
            " budget_exhausted)",
            "counter",
            (*mv, "source", "reason"),
        )
        self.calls = Counter(
            "edgefleet_cloud_calls_total",
            "Cloud calls by purpose (unsure, escalated, audit, retry) and outcome (ok or the"
            " fallback reason; circuit_open, offline and budget_exhausted were never sent)",
            "counter",
            (*mv, "kind", "outcome"),
        )
        self.call_duration = Histogram(
            "edgefleet_cloud_call_duration_seconds",
            "Cloud round trip of calls that were sent, whatever their outcome",
            mv,
            CLOUD_BUCKETS,
        )
        self.breaker_state = Gauge(
            "edgefleet_cloud_breaker_state",
            "Per-model circuit breaker: 0 closed, 1 open, 2 half-open (one probe out)",
            "gauge",
            ("model",),
        )
        self.offline = Gauge(
            "edgefleet_cloud_offline",
            "1 while the cloud endpoint is unreachable (2 while a probe is out), else 0",
            "gauge",
            (),
        )
        self.agreement = Counter(
            "edgefleet_cloud_agreement_total",
            "Items both models answered, by kind (escalated: the edge was unsure; audited: the"
            " edge was confident) and whether their top-1 classes agree",
            "counter",
            (*mv, "kind", "agree"),
        )
        self.hard_examples = Gauge(
            "edgefleet_hard_examples",
            "Hard examples kept locally by status (pending retry, answered, expired)",
            "gauge",
            ("status",),
        )
        self.hard_examples_dropped = Counter(
            "edgefleet_hard_examples_dropped_total",
            "Hard examples not kept or evicted: queue_full, evicted (size cap), error",
            "counter",
            ("reason",),
        )
        self.offline.set(value=0)
        for m in (
            self.items,
            self.calls,
            self.call_duration,
            self.breaker_state,
            self.offline,
            self.agreement,
            self.hard_examples,
            self.hard_examples_dropped,
        ):
            metrics.register(m)

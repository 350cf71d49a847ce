"""A small Prometheus registry: counters, gauges and histograms with labels.

Only ever touched from the event loop thread (the runner records after awaiting
the executor), so no locks.

Why not ``prometheus_client`` for the series themselves (issue 12 asked): a request
records about ten figures (queue, compute and request times, executions, rows, batch
size, outcome, queue depth twice, the HTTP route), and a microbenchmark of exactly
those calls (timeit, best of 5 x 100,000, this repository's VM) measured 4.3 µs per
request record here against 9.8 µs with ``prometheus_client`` even with every label
child cached, and 24.9 µs looking the children up per call: 5.5 to 20 µs more on the
path of every inference, for no gain in what is exposed. The data plane and the
telemetry (agent/cloud/telemetry.py, agent/cloud/router.py) also read
``values``/``series`` directly. So the series stay plain dicts, and the exposition
prints every number exactly (``_num``: integers as integers, other floats by their
shortest round-trip ``repr``; it used ``%g`` before, so 1,234,567 showed as
``1.23457e+06``); what ``%g`` printed exactly prints the same as before. The process
figures (``process_*``, ``python_info``) come from ``prometheus_client``'s
``ProcessCollector`` and ``PlatformCollector`` on a registry private to each
``Metrics`` (several agents run in one process in tests and the fleet demo), read at
the scrape on the event loop: a few small /proc reads.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

LabelValues = tuple[str, ...]

# Rows per execution: powers of two, the sizes batches are usually capped at.
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


# Integers print as integers up to here (every integer below 2**53 is an exact float).
_EXACT_INT = 2.0**53


def _num(v: float) -> str:
    """A sample value for the text format, exactly: ``1234567``, ``0.30000000000000004``,
    ``+Inf``, ``NaN`` (Go's ``ParseFloat`` reads them all back to the same float)."""
    v = float(v)  # ints arrive too (value=rows)
    if v != v:
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < _EXACT_INT:
        return str(int(v))
    return repr(v)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


@dataclass
class _Metric:
    name: str
    help: str
    kind: str
    labels: tuple[str, ...]
    values: dict[LabelValues, float] = field(default_factory=dict)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for lv, v in sorted(self.values.items()):
            out.append(f"{self.name}{_fmt_labels(self.labels, lv)} {_num(v)}")
        return out


class Counter(_Metric):
    def inc(self, *labels: str, value: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + value


class Gauge(_Metric):
    def set(self, *labels: str, value: float) -> None:
        self.values[labels] = value

    def remove(self, *labels: str) -> None:
        self.values.pop(labels, None)


@dataclass
class _HistogramSeries:
    counts: list[int]
    total: float = 0.0
    n: int = 0


class Histogram:
    def __init__(
        self, name: str, help: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self.name, self.help, self.labels, self.buckets = name, help, labels, buckets
        self.series: dict[LabelValues, _HistogramSeries] = {}

    def observe(self, *labels: str, value: float) -> None:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = _HistogramSeries([0] * len(self.buckets))
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            s.counts[i] += 1
        s.total += value
        s.n += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for lv, s in sorted(self.series.items()):
            cumulative = 0
            for bound, c in zip(self.buckets, s.counts, strict=True):
                cumulative += c
                le = _fmt_labels(self.labels, lv, f'le="{_num(bound)}"')
                out.append(f"{self.name}_bucket{le} {cumulative}")
            inf = _fmt_labels(self.labels, lv, 'le="+Inf"')
            out.append(f"{self.name}_bucket{inf} {s.n}")
            out.append(f"{self.name}_sum{_fmt_labels(self.labels, lv)} {_num(s.total)}")
            out.append(f"{self.name}_count{_fmt_labels(self.labels, lv)} {s.n}")
        return out


class Metrics:
    """The agent's metrics. Names follow Prometheus conventions (seconds, _total)."""

    def __init__(self) -> None:
        mv = ("model", "version")
        self._registered: list[_Metric | Histogram] = []
        # process_* (CPU, memory, file descriptors, start time) and python_info: a
        # registry of this object's own, so several agents in one process (tests,
        # the fleet demo) do not register the same collectors twice.
        self._process = CollectorRegistry()
        ProcessCollector(registry=self._process)
        PlatformCollector(registry=self._process)
        self.http_requests = Counter(
            "edgefleet_http_requests_total",
            "HTTP requests by route and status",
            "counter",
            ("route", "status"),
        )
        self.inference_requests = Counter(
            "edgefleet_inference_requests_total",
            "Inference requests by model version and outcome (success, failure, rejected)",
            "counter",
            (*mv, "outcome"),
        )
        self.request_duration = Histogram(
            "edgefleet_request_duration_seconds",
            "Time from request received to answer ready, per model version",
            mv,
            LATENCY_BUCKETS,
        )
        self.queue_duration = Histogram(
            "edgefleet_queue_duration_seconds",
            "Time an inference waited for a free model instance",
            mv,
            LATENCY_BUCKETS,
        )
        self.compute_duration = Histogram(
            "edgefleet_compute_duration_seconds",
            "Time the backend spent computing one execution",
            mv,
            LATENCY_BUCKETS,
        )
        self.executions = Counter(
            "edgefleet_inference_executions_total",
            "Backend executions (one batch counts once)",
            "counter",
            mv,
        )
        self.queue_depth = Gauge(
            "edgefleet_queue_depth",
            "Inferences waiting or running per model version",
            "gauge",
            mv,
        )
        self.model_ready = Gauge(
            "edgefleet_model_ready",
            "1 when the version is loaded and passed its self-test; active says which serves",
            "gauge",
            (*mv, "active"),
        )
        self.activations = Counter(
            "edgefleet_activations_total",
            "Model version activations by result",
            "counter",
            ("model", "result"),
        )
        # Triton's nv_inference_count: with executions_total, rows / executions is the
        # average batch size.
        self.inference_rows = Counter(
            "edgefleet_inference_rows_total",
            "Rows (batch elements) inferred; divided by executions: the average batch size",
            "counter",
            mv,
        )
        self.batch_size = Histogram(
            "edgefleet_batch_size",
            "Rows per backend execution",
            mv,
            BATCH_BUCKETS,
        )
        self.queue_waiting = Gauge(
            "edgefleet_queue_waiting",
            "Requests queued for a model version and not yet executing",
            "gauge",
            mv,
        )
        self.provider_fallbacks = Counter(
            "edgefleet_provider_fallbacks_total",
            "Model versions moved to the CPU after an inference failed on an accelerator",
            "counter",
            (*mv, "provider"),
        )
        # Shadow candidates (agent/shadow.py): items per outcome, per (model, active
        # version, candidate); the latency ratio since the candidate was loaded.
        shadow = (*mv, "candidate")
        self.shadow_items = Counter(
            "edgefleet_shadow_items_total",
            "Shadow items by outcome (agreed, disagreed, dropped, error)",
            "counter",
            (*shadow, "outcome"),
        )
        self.shadow_latency_ratio = Gauge(
            "edgefleet_shadow_latency_ratio",
            "Candidate model time / active model time over the compared items",
            "gauge",
            shadow,
        )
        self.shadow_cpu = Counter(
            "edgefleet_shadow_cpu_seconds_total",
            "CPU time the shadow runner's worker spent (its budget's measure)",
            "counter",
            ("model", "candidate"),
        )
        self.shadow_queue = Gauge(
            "edgefleet_shadow_queue_depth",
            "Shadow items waiting for the shadow runner's worker",
            "gauge",
            (),
        )

    def register(self, metric: _Metric | Histogram) -> None:
        """Add a series defined elsewhere (e.g. agent/cloud/metrics.py) to ``render``."""
        self._registered.append(metric)

    def render(self) -> str:
        lines: list[str] = []
        for m in (
            self.http_requests,
            self.inference_requests,
            self.request_duration,
            self.queue_duration,
            self.compute_duration,
            self.executions,
            self.queue_depth,
            self.model_ready,
            self.activations,
            self.inference_rows,
            self.batch_size,
            self.queue_waiting,
            self.provider_fallbacks,
            self.shadow_items,
            self.shadow_latency_ratio,
            self.shadow_cpu,
            self.shadow_queue,
        ):
            lines.extend(m.render())
        for extra in self._registered:
            lines.extend(extra.render())
        return "\n".join(lines) + "\n" + generate_latest(self._process).decode()

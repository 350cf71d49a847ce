"""``inference_stats`` records on the fleet side: strict validation and merging.

Pure functions, no database: every record's ``data`` is checked by
``core.protocol.InferenceStats`` before it is stored (``fleet/ingest.py``; payloads
come from devices and are untrusted; ``validate_inference_stats`` is that check for
plain dicts), and ``fleet/telemetry.py`` merges stored ones with
``merge_inference_stats`` for its views (per model version, per device, any time
range). The record format is fixed in core/protocol.py and docs/fleet.md.

Percentiles come from the merged histogram, as Prometheus' ``histogram_quantile``
does but without interpolation: p50/p95 is the **upper bound of the bucket where the
cumulative count reaches 50 %/95 %** of the requests. So "p95 = 20 ms" means "95 % of
the requests took at most 20 ms", read at the buckets' resolution. When that bucket
is the overflow bucket (above the last bound, 1000 ms), the value is the last bound
and ``p95_above`` is true: "above 1000 ms".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

import orjson

from edgefleet.core import protocol

# The bucket bounds of schema 1: the wire contract's (core/protocol.py). A record with
# other bounds is refused: histograms merge by adding counts, which needs the same
# buckets everywhere; other bounds would be a new schema.
LATENCY_BOUNDS_MS = protocol.LATENCY_BOUNDS_MS
CONFIDENCE_BOUNDS = protocol.CONFIDENCE_BOUNDS


class Histogram(TypedDict):
    le: list[float]
    counts: list[int]


class InferenceStatsData(TypedDict):
    """One validated ``inference_stats`` record's data."""

    model: str
    version: str
    window_start: float
    window_s: float
    count: int
    errors: int
    latency_ms: Histogram
    confidence: Histogram
    sources: dict[str, int]
    fallback: dict[str, int]


class StatsSummary(TypedDict):
    """Several records merged (``merge_inference_stats``)."""

    records: int
    requests: int
    errors: int
    error_rate: float  # errors / requests, 0.0 without requests
    window_start: float | None  # earliest window start (device clocks)
    window_end: float | None  # latest window end
    latency_ms: Histogram
    p50_ms: float | None  # None without requests
    p50_above: bool  # True: p50 is above p50_ms (the last bound)
    p95_ms: float | None
    p95_above: bool
    confidence: Histogram
    sources: dict[str, int]
    fallback: dict[str, int]


# ---- validation ---------------------------------------------------------------------------


def validate_inference_stats(data: Any) -> InferenceStatsData:
    """The record's data, checked and normalised; ``ValueError`` saying what is wrong.

    The checks are ``core.protocol.InferenceStats``'s (the model the agent builds its
    records with): every field present with its type, bounds equal to schema 1's,
    counts non-negative integers, the totals consistent, no unknown fields. The result
    holds plain copies (floats for times, the canonical bounds), safe to store as JSON.
    """
    s = protocol.InferenceStats.from_obj(data)
    return {
        "model": s.model,
        "version": s.version,
        "window_start": s.window_start,
        "window_s": s.window_s,
        "count": s.count,
        "errors": s.errors,
        "latency_ms": {"le": list(LATENCY_BOUNDS_MS), "counts": list(s.latency_ms.counts)},
        "confidence": {"le": list(CONFIDENCE_BOUNDS), "counts": list(s.confidence.counts)},
        "sources": dict(s.sources),
        "fallback": dict(s.fallback),
    }


# ---- merging and percentiles -------------------------------------------------------------


def histogram_percentile(
    le: list[float] | tuple[float, ...], counts: list[int], pct: int
) -> tuple[float, bool] | None:
    """``(bound, above)`` for percentile ``pct`` (1..100) of a non-cumulative histogram.

    The upper bound of the first bucket where the cumulative count reaches ``pct`` %
    of the total; for the overflow bucket the last bound with ``above`` true. None
    for an empty histogram. Integer arithmetic: no float rounding at the edges (with
    100 requests, p95 is the bucket holding the 95th).
    """
    if not 0 < pct <= 100:
        raise ValueError("pct must be in 1..100")
    if len(counts) != len(le) + 1 or not le:
        raise ValueError("counts must have one more entry than le")
    total = sum(counts)
    if total <= 0:
        return None
    cumulative = 0
    for i, c in enumerate(counts):
        cumulative += c
        if cumulative * 100 >= pct * total:
            if i < len(le):
                return float(le[i]), False
            break
    return float(le[-1]), True


def _add_into(acc: dict[str, int], more: Mapping[str, int]) -> None:
    for k, v in more.items():
        acc[k] = acc.get(k, 0) + v


def merge_inference_stats(records: Iterable[InferenceStatsData]) -> StatsSummary:
    """Several validated records (any devices, windows, versions) as one summary.

    Histograms merge by adding counts; p50/p95 are read from the merged latency
    histogram (see ``histogram_percentile``). The caller groups: pass one model
    version's records for a per-version view. Records must have passed
    ``validate_inference_stats`` (same bounds, consistent totals).
    """
    latency = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    confidence = [0] * (len(CONFIDENCE_BOUNDS) + 1)
    sources: dict[str, int] = {}
    fallback: dict[str, int] = {}
    n = requests = errors = 0
    start: float | None = None
    end: float | None = None
    for r in records:
        n += 1
        requests += r["count"]
        errors += r["errors"]
        for i, c in enumerate(r["latency_ms"]["counts"]):
            latency[i] += c
        for i, c in enumerate(r["confidence"]["counts"]):
            confidence[i] += c
        _add_into(sources, r["sources"])
        _add_into(fallback, r["fallback"])
        r_start, r_end = r["window_start"], r["window_start"] + r["window_s"]
        start = r_start if start is None else min(start, r_start)
        end = r_end if end is None else max(end, r_end)
    p50 = histogram_percentile(LATENCY_BOUNDS_MS, latency, 50)
    p95 = histogram_percentile(LATENCY_BOUNDS_MS, latency, 95)
    return {
        "records": n,
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else 0.0,
        "window_start": start,
        "window_end": end,
        "latency_ms": {"le": list(LATENCY_BOUNDS_MS), "counts": latency},
        "p50_ms": p50[0] if p50 else None,
        "p50_above": bool(p50 and p50[1]),
        "p95_ms": p95[0] if p95 else None,
        "p95_above": bool(p95 and p95[1]),
        "confidence": {"le": list(CONFIDENCE_BOUNDS), "counts": confidence},
        "sources": sources,
        "fallback": fallback,
    }


# ---------------------------------------------------------------------- drift_stats

# The drift_stats table's columns (fleet/db.py), in the order of ``drift_rows``' rows.
DRIFT_COLUMNS = (
    "id, device_id, model, version, window_start, window_s, samples, psi_max, psi_mean,"
    " psi_output, js_max, js_output, drift_reason, received_at, data"
)
DRIFT_FIGURES = ("psi_max", "psi_mean", "psi_output", "js_max", "js_output")


def drift_rows(
    b: protocol.TelemetryBatch, t: float
) -> tuple[list[tuple[Any, ...]], int, str | None]:
    """The ``drift_stats`` rows of a valid batch (``DRIFT_COLUMNS``), how many of its
    drift records were invalid (stored raw only, counted by the ingest as
    ``bad_drift_stats``: negative PSI, a mean over the max, figures without samples...)
    and the first one's problem (for the ingest's rate-limited log)."""
    rows: list[tuple[Any, ...]] = []
    bad = 0
    why: str | None = None
    for r in b.records:
        if r.kind != "drift_stats":
            continue
        try:
            d = protocol.DriftStats.from_obj(r.data)
        except protocol.WireError as exc:
            bad += 1
            why = why or f"record {r.id}: {exc.detail}"
            continue
        doc = d.to_wire()
        rows.append(
            (
                r.id,
                b.device_id,
                d.model,
                d.version,
                d.window_start,
                d.window_s,
                d.samples,
                *(doc[f] for f in DRIFT_FIGURES),
                d.drift_reason,
                t,
                orjson.dumps(doc).decode(),
            )
        )
    return rows, bad, why


class DriftSummary(TypedDict):
    """A model version's drift across devices (``merge_drift``): each device's newest
    record with figures; the worst device's ``psi_max`` and ``psi_output``, the mean
    over devices of ``psi_mean``; ``reason`` when no device has figures."""

    psi_max: float | None
    psi_mean: float | None
    psi_output: float | None
    js_max: float | None
    js_output: float | None
    samples: int
    devices: int
    window_end: float | None  # newest window end among them (device clocks)
    reason: str | None


def merge_drift(records: Iterable[Mapping[str, Any]]) -> DriftSummary:
    """``records``: validated ``drift_stats`` data with ``device_id``, in any order."""
    newest: dict[str, Mapping[str, Any]] = {}
    reasons: dict[str, int] = {}
    for r in records:
        if r.get("psi_max") is None and r.get("psi_output") is None:
            reason = str(r.get("drift_reason") or "no figures")
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        dev = str(r["device_id"])
        if dev not in newest or r["window_start"] > newest[dev]["window_start"]:
            newest[dev] = r
    rs = list(newest.values())

    def worst(key: str) -> float | None:
        vals = [float(r[key]) for r in rs if r.get(key) is not None]
        return max(vals) if vals else None

    means = [float(r["psi_mean"]) for r in rs if r.get("psi_mean") is not None]
    return {
        "psi_max": worst("psi_max"),
        "psi_mean": round(sum(means) / len(means), 6) if means else None,
        "psi_output": worst("psi_output"),
        "js_max": worst("js_max"),
        "js_output": worst("js_output"),
        "samples": sum(int(r["samples"]) for r in rs),
        "devices": len(rs),
        "window_end": max((r["window_start"] + r["window_s"] for r in rs), default=None),
        "reason": None
        if rs
        else (max(reasons, key=lambda k: reasons[k]) if reasons else "no drift_stats records"),
    }

"""``inference_stats`` records on the fleet side: strict validation and merging.

Pure functions, no database: ``fleet/ingest.py`` validates every record's ``data``
with ``validate_inference_stats`` before storing it (payloads come from devices and
are untrusted), and ``fleet/telemetry.py`` merges stored ones with
``merge_inference_stats`` for its views (per model version, per device, any time
range). The record format is fixed in docs/fleet.md.

Percentiles come from the merged histogram, as Prometheus' ``histogram_quantile``
does but without interpolation: p50/p95 is the **upper bound of the bucket where the
cumulative count reaches 50 %/95 %** of the requests. So "p95 = 20 ms" means "95 % of
the requests took at most 20 ms", read at the buckets' resolution. When that bucket
is the overflow bucket (above the last bound, 1000 ms), the value is the last bound
and ``p95_above`` is true: "above 1000 ms".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

# The bucket bounds of schema 1 (docs/fleet.md, agent/telemetry_stats.py). A record
# with other bounds is refused: histograms merge by adding counts, which needs the
# same buckets everywhere; other bounds would be a new schema.
LATENCY_BOUNDS_MS: tuple[float, ...] = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
CONFIDENCE_BOUNDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

_FIELDS = frozenset(
    {
        "model",
        "version",
        "window_start",
        "window_s",
        "count",
        "errors",
        "latency_ms",
        "confidence",
        "sources",
        "fallback",
    }
)
# Bounds on what a device may claim, so one bad record cannot blow up a view.
MAX_NAME = 200  # model name, version
MAX_KEY = 64  # a source or fallback reason
MAX_KEYS = 32  # entries in sources / fallback
MAX_COUNT = 2**53 - 1  # exact in a float and in SQLite
MAX_WINDOW_S = 7 * 24 * 3600.0


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


def _count(value: Any, what: str) -> int:
    # bool is an int in Python, but "count": true is garbage.
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{what} must be an integer in 0..{MAX_COUNT}")
    return value


def _number(value: Any, what: str, lo: float, hi: float) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f"{what} must be a finite number in {lo:g}..{hi:g}")
    return float(value)


def _name(value: Any, what: str, max_len: int) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ValueError(f"{what} must be a non-empty string of at most {max_len} characters")
    return value


def _histogram(value: Any, what: str, bounds: tuple[float, ...]) -> Histogram:
    if not isinstance(value, dict) or set(value) != {"le", "counts"}:
        raise ValueError(f"{what} must be an object with exactly 'le' and 'counts'")
    le, counts = value["le"], value["counts"]
    if (
        not isinstance(le, list)
        or len(le) != len(bounds)
        or any(type(b) not in (int, float) or b != want for b, want in zip(le, bounds, strict=True))
    ):
        raise ValueError(f"{what}.le must be {list(bounds)}")
    if not isinstance(counts, list) or len(counts) != len(bounds) + 1:
        raise ValueError(f"{what}.counts must be a list of {len(bounds) + 1} integers")
    return {
        "le": list(bounds),
        "counts": [_count(c, f"{what}.counts[{i}]") for i, c in enumerate(counts)],
    }


def _tally(value: Any, what: str) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > MAX_KEYS:
        raise ValueError(f"{what} must be an object of at most {MAX_KEYS} counts")
    return {_name(k, f"{what} key", MAX_KEY): _count(v, f"{what}[{k!r}]") for k, v in value.items()}


def validate_inference_stats(data: Any) -> InferenceStatsData:
    """The record's data, checked and normalised; ``ValueError`` saying what is wrong.

    Strict: every field present with its type, bounds equal to schema 1's, counts
    non-negative integers, and the totals consistent (``errors <= count``, the
    latency counts add up to ``count``, sources to ``count - errors``, confidence and
    fallback counts at most ``count - errors``). Unknown extra fields are refused too:
    they would be a new schema. The result holds plain copies (floats for times, the
    canonical bounds), safe to store as JSON.
    """
    if not isinstance(data, dict):
        raise ValueError("inference_stats data must be a JSON object")
    keys = set(data)
    if keys != _FIELDS:
        missing, extra = sorted(_FIELDS - keys), sorted(map(str, keys - _FIELDS))
        raise ValueError(f"inference_stats fields: missing {missing}, unexpected {extra}")
    count = _count(data["count"], "count")
    errors = _count(data["errors"], "errors")
    if errors > count:
        raise ValueError("errors must be at most count")
    out: InferenceStatsData = {
        "model": _name(data["model"], "model", MAX_NAME),
        "version": _name(data["version"], "version", MAX_NAME),
        "window_start": _number(data["window_start"], "window_start", 0.0, 1e11),
        "window_s": _number(data["window_s"], "window_s", 0.0, MAX_WINDOW_S),
        "count": count,
        "errors": errors,
        "latency_ms": _histogram(data["latency_ms"], "latency_ms", LATENCY_BOUNDS_MS),
        "confidence": _histogram(data["confidence"], "confidence", CONFIDENCE_BOUNDS),
        "sources": _tally(data["sources"], "sources"),
        "fallback": _tally(data["fallback"], "fallback"),
    }
    answered = count - errors
    if sum(out["latency_ms"]["counts"]) != count:
        raise ValueError("latency_ms.counts must add up to count")
    if sum(out["sources"].values()) != answered:
        raise ValueError("sources must add up to count - errors")
    if sum(out["confidence"]["counts"]) > answered:
        raise ValueError("confidence.counts must add up to at most count - errors")
    if sum(out["fallback"].values()) > answered:
        raise ValueError("fallback must add up to at most count - errors")
    return out


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

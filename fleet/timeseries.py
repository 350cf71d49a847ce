"""Time series for charts (issue 12): the roll-ups of fleet/rollup.py as columnar JSON.

``GET /v1/series/models/{model}`` — a model's versions, fleet-wide;
``GET /v1/series/devices/{id}`` — one device (its models' versions, or ``model=``'s).

Query: ``from``/``to`` (unix seconds, or relative to now: ``-7d``, ``-36h``, ``-90m``,
``-600s``; ``to`` also ``now``; default the last 24 h), ``step`` (``minute``,
``hour`` or ``auto``, the default), ``version`` (repeat it or separate with commas:
only those lines), and ``model`` on the device route. Anything else, a bad value, an
empty or reversed range, a range over ``MAX_RANGE_S``, or a step that would give more
than ``MAX_POINTS`` points: 400 with what is wrong. Unknown device or model: 404.

``auto`` picks the finest step of ``STEPS`` that keeps a chart at ``MAX_POINTS``
points or fewer, reading the per-minute table for steps under an hour when it still
holds the start of the range (retention, fleet/config.py ``telemetry.retention``),
else the per-hour table. Coarser steps than the table's are summed in SQL.

The answer (one chart per metric, one line per model version; uPlot takes ``[t,
*requests]`` as its data)::

    {"t": [unix s, ...], "step_s": 600, "source": "minute", "from": ..., "to": ...,
     "model": "m" | null, "device_id": "d" | null,
     "lines": [{"model": "m", "version": "3"}, ...],
     "requests": [[...], ...], "errors": ..., "error_rate": ..., "p50_ms": ...,
     "p95_ms": ..., "fallback_rate": ..., "psi_max": ..., "psi_mean": ...,
     "psi_output": ..., "shadow_compared": ..., "shadow_agreement": ...,
     "cloud_agreement": ...,
     "latency_ms": {"le": [...], "counts": [[12 ints] per line]},
     "confidence": {"le": [...], "counts": [[11 ints] per line]},
     "summary": [{"requests": ..., "errors": ..., "p50_ms": ..., "p95_ms": ...,
                  "p95_above": false, "fallback_rate": ..., "shadow_agreement": ...}]}

Each series is aligned with ``t`` (the start of each step); ``null`` where the line has
no figure in that step (no record, or a rate without a denominator). ``p50_ms`` and
``p95_ms`` are read from the step's merged latency histogram (bucket upper bounds;
the last bound, 1000, when the percentile is in the overflow bucket, flagged only in
``summary``); ``fallback_rate``: answers the cloud gave (``cloud`` + ``mixed``) of
those answered; ``psi_max``/``psi_output``: the worst record of the step,
``psi_mean``: the mean of the records' means; ``shadow_*``: the line's version as the
shadow candidate. The histograms and ``summary`` are over the whole range.

Threads: the handlers run on the event loop; the queries on the database's reader
threads (``FleetDB.read``).
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from edgefleet.core import names
from edgefleet.core.errors import BadRequest, NotFound
from edgefleet.core.http import json_response
from edgefleet.fleet.api import READ, _api, requires
from edgefleet.fleet.db import FleetDB, dumps
from edgefleet.fleet.rollup import CONFIDENCE_COLUMNS, LATENCY_COLUMNS
from edgefleet.fleet.telemetry_math import (
    CONFIDENCE_BOUNDS,
    LATENCY_BOUNDS_MS,
    histogram_percentile,
)

routes = web.RouteTableDef()

MAX_POINTS = 2000  # per line and chart
MAX_RANGE_S = 400 * 86400.0
DEFAULT_RANGE_S = 86400.0
MAX_VERSIONS = 50
# auto's steps: each a multiple of the one before's table step (minute or hour).
STEPS: tuple[int, ...] = (
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
    7 * 86400,
)
METRICS: tuple[str, ...] = (
    "requests",
    "errors",
    "error_rate",
    "p50_ms",
    "p95_ms",
    "fallback_rate",
    "psi_max",
    "psi_mean",
    "psi_output",
    "shadow_compared",
    "shadow_agreement",
    "cloud_agreement",
)
_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
_RELATIVE = re.compile(r"-(\d{1,7})([dhms])")

_SUMMED = ("records", "requests", "errors", "answered", "cloud", "drift_records",
           "psi_mean_sum", "shadow_compared", "shadow_agreed", "cloud_compared",
           "cloud_agreed", *LATENCY_COLUMNS)  # fmt: skip
_TOTALS = ("requests", "errors", "answered", "cloud", "shadow_compared", "shadow_agreed",
           *LATENCY_COLUMNS, *CONFIDENCE_COLUMNS)  # fmt: skip


def _pct_sql(pct: int) -> str:
    """p``pct`` of the latency columns in SQL: ``histogram_percentile`` (the bucket where
    the cumulative count reaches pct %; the last bound for the overflow bucket)."""
    whens = [
        f"WHEN ({' + '.join(LATENCY_COLUMNS[: i + 1])}) * 100 >= {pct} * lat_n THEN {bound}"
        for i, bound in enumerate(LATENCY_BOUNDS_MS)
    ]
    return f"CASE WHEN lat_n = 0 THEN NULL {' '.join(whens)} ELSE {LATENCY_BOUNDS_MS[-1]} END"


def _rate_sql(k: str, n: str) -> str:
    return f"CASE WHEN {n} > 0 THEN round(1.0 * {k} / {n}, 6) END"


# Each of METRICS, in its order, from one step's sums (the inner query's columns): the
# derived figures are computed by SQLite, so a chart's rows reach Python small.
_METRIC_SQL: tuple[str, ...] = (
    "CASE WHEN records > 0 THEN requests END",
    "CASE WHEN records > 0 THEN errors END",
    _rate_sql("errors", "requests"),
    _pct_sql(50),
    _pct_sql(95),
    _rate_sql("cloud", "answered"),
    "psi_max",
    "CASE WHEN drift_records > 0 THEN round(psi_mean_sum / drift_records, 6) END",
    "psi_output_max",
    "CASE WHEN shadow_compared > 0 THEN shadow_compared END",
    _rate_sql("shadow_agreed", "shadow_compared"),
    _rate_sql("cloud_agreed", "cloud_compared"),
)
assert len(_METRIC_SQL) == len(METRICS)


# --------------------------------------------------------------------- parameters


def _time(raw: str, key: str, t_now: float) -> float:
    if raw == "now":
        return t_now
    m = _RELATIVE.fullmatch(raw)
    if m:
        return t_now - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BadRequest(
            f"{key} must be unix seconds (a number >= 0), 'now' or relative like -7d, -36h,"
            f" -90m, -600s; got {raw!r}"
        )
    return value


def _versions(request: web.Request) -> list[str] | None:
    given = [v for raw in request.query.getall("version", []) for v in raw.split(",") if v]
    if not given:
        return None
    if len(given) > MAX_VERSIONS:
        raise BadRequest(f"version: at most {MAX_VERSIONS} versions, got {len(given)}")
    return sorted({names.check_version(v) for v in given})


def _check_params(request: web.Request, allowed: Sequence[str]) -> None:
    unknown = sorted(set(request.query) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r} (known: {', '.join(allowed)})")
    for key in allowed:
        if key != "version" and len(request.query.getall(key, [])) > 1:
            raise BadRequest(f"{key} given more than once")


class Window:
    """The range and step a query reads: ``start`` (a multiple of ``step``) to ``end``."""

    def __init__(self, lo: float, hi: float, step: int, source: str) -> None:
        self.step = step
        self.source = source  # minute | hour: which table
        self.start = int(lo // step) * step
        self.end = hi
        self.points = max(1, math.ceil((hi - self.start) / step))


def _points(lo: float, hi: float, step: int) -> int:
    return max(1, math.ceil((hi - int(lo // step) * step) / step))


def parse_range(query: Any, t_now: float) -> tuple[float, float, str]:
    """``(from, to, step)`` from a request's query, checked; ``BadRequest`` saying what
    is wrong."""
    hi = _time(query.get("to", "now"), "to", t_now)
    lo = _time(query["from"], "from", t_now) if "from" in query else hi - DEFAULT_RANGE_S
    if lo >= hi:
        raise BadRequest(f"from ({lo:.0f}) must be before to ({hi:.0f})")
    if hi - lo > MAX_RANGE_S:
        raise BadRequest(
            f"the range is {(hi - lo) / 86400:.1f} days; at most {MAX_RANGE_S / 86400:.0f}"
        )
    step = query.get("step", "auto")
    if step not in ("minute", "hour", "auto"):
        raise BadRequest(f"step must be minute, hour or auto; got {step!r}")
    return lo, hi, step


def choose_window(
    lo: float, hi: float, step: str, minute_oldest: int | None, hour_oldest: int | None
) -> Window:
    """The table and step for a chart of ``lo``..``hi``; ``*_oldest``: the oldest
    bucket each table holds (None: empty). 400 past ``MAX_POINTS``."""
    if step in ("minute", "hour"):
        size = 60 if step == "minute" else 3600
        n = _points(lo, hi, size)
        if n > MAX_POINTS:
            raise BadRequest(
                f"step={step} over {(hi - lo) / 3600:.1f} h is {n} points, more than"
                f" {MAX_POINTS}: narrow the range, or use step=auto"
                + (" or step=hour" if step == "minute" else "")
            )
        return Window(lo, hi, size, step)
    chosen = next((s for s in STEPS if _points(lo, hi, s) <= MAX_POINTS), STEPS[-1])
    if chosen < 3600:
        # The minute table, unless retention already removed the range's start there
        # while the hour table still has it (then the hour table draws more of it).
        covered = (
            minute_oldest is None
            or minute_oldest <= lo
            or hour_oldest is None
            or hour_oldest >= int(minute_oldest // 3600) * 3600
        )
        if covered:
            return Window(lo, hi, chosen, "minute")
        chosen = 3600
    return Window(lo, hi, chosen, "hour")


# --------------------------------------------------------------------- queries


def _oldest(conn: sqlite3.Connection, device: bool) -> tuple[int | None, int | None]:
    scope = "device" if device else "version"
    return (
        conn.execute(f"SELECT min(bucket) FROM ts_{scope}_minute").fetchone()[0],
        conn.execute(f"SELECT min(bucket) FROM ts_{scope}_hour").fetchone()[0],
    )


def _series_sql(table: str, table_step: int, step: int, where: str) -> str:
    """One row per (model, version, step): METRICS. Steps of the table's own size read
    the rows as they are; coarser ones sum them first."""
    lat_n = " + ".join(LATENCY_COLUMNS)
    if step == table_step:
        inner = (
            f"SELECT model, version, bucket AS b, {', '.join(_SUMMED)}, psi_max,"
            f" psi_output_max, {lat_n} AS lat_n FROM {table} WHERE {where}"
        )
    else:
        sums = ", ".join(f"sum({c}) AS {c}" for c in _SUMMED)
        inner = (
            f"SELECT model, version, (bucket / {step}) * {step} AS b, {sums},"
            f" max(psi_max) AS psi_max, max(psi_output_max) AS psi_output_max,"
            f" sum({lat_n}) AS lat_n FROM {table} WHERE {where} GROUP BY model, version, b"
        )
    return f"SELECT model, version, b, {', '.join(_METRIC_SQL)} FROM ({inner})"


def _totals_sql(table: str, where: str) -> str:
    sums = ", ".join(f"sum({c})" for c in _TOTALS)
    return f"SELECT model, version, {sums} FROM {table} WHERE {where} GROUP BY model, version"


def _read(
    conn: sqlite3.Connection, w: Window, scope: str, where: list[str], args: list[Any]
) -> dict[str, Any]:
    table = f"ts_{scope}_{w.source}"
    cond = " AND ".join([*where, "bucket >= ?", "bucket < ?"])
    full = (*args, w.start, w.end)
    totals = conn.execute(_totals_sql(table, cond), full).fetchall()
    rows = conn.execute(
        _series_sql(table, 60 if w.source == "minute" else 3600, w.step, cond), full
    ).fetchall()
    return build(rows, totals, w)


def _rate(k: float, n: float) -> float | None:
    return round(k / n, 6) if n else None


def _pct(counts: list[int], pct: int) -> tuple[float | None, bool]:
    found = histogram_percentile(LATENCY_BOUNDS_MS, counts, pct)
    return (None, False) if found is None else found


def _natural(text: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text) if p]


def build(rows: list[Any], totals: list[Any], w: Window) -> dict[str, Any]:
    """``rows``: (model, version, step start, *METRICS); ``totals``: (model, version,
    *_TOTALS) over the range → the columnar answer."""
    totals = sorted(totals, key=lambda r: (r[0], _natural(r[1])))
    line_of = {(r[0], r[1]): j for j, r in enumerate(totals)}
    n = w.points
    series: dict[str, list[list[Any]]] = {m: [[None] * n for _ in totals] for m in METRICS}
    columns = [(k + 3, series[m]) for k, m in enumerate(METRICS)]
    for r in rows:
        j = line_of[(r[0], r[1])]
        i = (r[2] - w.start) // w.step
        if 0 <= i < n:
            for k, out in columns:
                out[j][i] = r[k]
    summary = []
    lat_counts, conf_counts = [], []
    ti = {c: 2 + k for k, c in enumerate(_TOTALS)}
    lat = slice(ti["l0"], ti["l0"] + len(LATENCY_COLUMNS))
    conf = slice(ti["c0"], ti["c0"] + len(CONFIDENCE_COLUMNS))
    for r in totals:
        lat_counts.append(list(r[lat]))
        conf_counts.append(list(r[conf]))
        p50, p50_above = _pct(lat_counts[-1], 50)
        p95, p95_above = _pct(lat_counts[-1], 95)
        requests, errors = r[ti["requests"]], r[ti["errors"]]
        summary.append(
            {
                "requests": requests,
                "errors": errors,
                "error_rate": _rate(errors, requests),
                "p50_ms": p50,
                "p50_above": p50_above,
                "p95_ms": p95,
                "p95_above": p95_above,
                "fallback_rate": _rate(r[ti["cloud"]], r[ti["answered"]]),
                "shadow_compared": r[ti["shadow_compared"]],
                "shadow_agreement": _rate(r[ti["shadow_agreed"]], r[ti["shadow_compared"]]),
            }
        )
    return {
        "t": [w.start + i * w.step for i in range(n)],
        "step_s": w.step,
        "source": w.source,
        "from": w.start,
        "to": w.end,
        "lines": [{"model": r[0], "version": r[1]} for r in totals],
        **series,
        "latency_ms": {"le": list(LATENCY_BOUNDS_MS), "counts": lat_counts},
        "confidence": {"le": list(CONFIDENCE_BOUNDS), "counts": conf_counts},
        "summary": summary,
    }


async def model_series(
    db: FleetDB,
    model: str,
    lo: float,
    hi: float,
    step: str = "auto",
    versions: list[str] | None = None,
) -> dict[str, Any]:
    """One model's versions, fleet-wide (reader thread). NotFound: no such model in the
    registry nor in the roll-ups."""

    def q(conn: sqlite3.Connection) -> dict[str, Any]:
        known = conn.execute(
            "SELECT 1 FROM model_versions WHERE name = ?"
            " UNION ALL SELECT 1 FROM ts_version_hour WHERE model = ? LIMIT 1",
            (model, model),
        ).fetchone()
        if known is None:
            raise NotFound(f"unknown model {model!r}")
        w = choose_window(lo, hi, step, *_oldest(conn, False))
        where: list[str] = ["model = ?"]
        args: list[Any] = [model]
        if versions is not None:
            where.append("version IN (SELECT value FROM json_each(?))")
            args.append(dumps(versions))
        return {"model": model, "device_id": None, **_read(conn, w, "version", where, args)}

    return await db.read(q)


async def device_series(
    db: FleetDB,
    device_id: str,
    lo: float,
    hi: float,
    step: str = "auto",
    model: str | None = None,
    versions: list[str] | None = None,
) -> dict[str, Any]:
    """One device's model versions (reader thread). NotFound: unknown device."""

    def q(conn: sqlite3.Connection) -> dict[str, Any]:
        if conn.execute("SELECT 1 FROM devices WHERE id = ?", (device_id,)).fetchone() is None:
            raise NotFound(f"unknown device {device_id!r}")
        w = choose_window(lo, hi, step, *_oldest(conn, True))
        where: list[str] = ["device_id = ?"]
        args: list[Any] = [device_id]
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if versions is not None:
            where.append("version IN (SELECT value FROM json_each(?))")
            args.append(dumps(versions))
        return {"model": model, "device_id": device_id, **_read(conn, w, "device", where, args)}

    return await db.read(q)


# --------------------------------------------------------------------- routes


def _db(request: web.Request) -> FleetDB:
    db: FleetDB = _api(request).devices.db
    return db


@routes.get("/v1/series/models/{model}")
@requires(READ)
async def series_model(request: web.Request) -> web.Response:
    _check_params(request, ("from", "to", "step", "version"))
    model = names.check_model_name(request.match_info["model"])
    lo, hi, step = parse_range(request.query, time.time())
    doc = await model_series(_db(request), model, lo, hi, step, _versions(request))
    return json_response(doc)


@routes.get("/v1/series/devices/{id}")
@requires(READ)
async def series_device(request: web.Request) -> web.Response:
    _check_params(request, ("from", "to", "step", "model", "version"))
    device_id = names.check_device_id(request.match_info["id"])
    model = request.query.get("model")
    if model is not None:
        names.check_model_name(model)
    lo, hi, step = parse_range(request.query, time.time())
    doc = await device_series(_db(request), device_id, lo, hi, step, model, _versions(request))
    return json_response(doc)

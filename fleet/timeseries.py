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

# The sums a query returns, in this order, after (model, version, bucket).
_SELECTED: tuple[str, ...] = (
    "records",
    "requests",
    "errors",
    "answered",
    "cloud",
    *LATENCY_COLUMNS,
    *CONFIDENCE_COLUMNS,
    "drift_records",
    "psi_mean_sum",
    "shadow_compared",
    "shadow_agreed",
    "cloud_compared",
    "cloud_agreed",
)
_I = {c: 3 + i for i, c in enumerate(_SELECTED)}  # column → index in a result row
_I_PSI_MAX = 3 + len(_SELECTED)
_I_PSI_OUT = _I_PSI_MAX + 1
_LAT = slice(_I["l0"], _I["l0"] + len(LATENCY_COLUMNS))
_CONF = slice(_I["c0"], _I["c0"] + len(CONFIDENCE_COLUMNS))


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


def _select(table: str, step: int, where: list[str]) -> str:
    sums = ", ".join(f"sum({c})" for c in _SELECTED)
    return (
        f"SELECT model, version, (bucket / {step}) * {step} AS b, {sums},"
        f" max(psi_max), max(psi_output_max) FROM {table}"
        f" WHERE {' AND '.join(where)} AND bucket >= ? AND bucket < ?"
        " GROUP BY model, version, b"
    )


def _rate(k: float, n: float) -> float | None:
    return round(k / n, 6) if n else None


def _pct(counts: list[int], pct: int) -> tuple[float | None, bool]:
    found = histogram_percentile(LATENCY_BOUNDS_MS, counts, pct)
    return (None, False) if found is None else found


def _natural(text: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text) if p]


def build(rows: list[sqlite3.Row | tuple[Any, ...]], w: Window) -> dict[str, Any]:
    """Grouped rows (model, version, step start, sums..., maxes) → the columnar answer."""
    keys = sorted({(r[0], r[1]) for r in rows}, key=lambda k: (k[0], _natural(k[1])))
    line_of = {k: i for i, k in enumerate(keys)}
    n = w.points
    series: dict[str, list[list[Any]]] = {m: [[None] * n for _ in keys] for m in METRICS}
    lat_tot = [[0] * len(LATENCY_COLUMNS) for _ in keys]
    conf_tot = [[0] * len(CONFIDENCE_COLUMNS) for _ in keys]
    tot = [dict.fromkeys(("requests", "errors", "answered", "cloud", "sc", "sa"), 0) for _ in keys]
    for r in rows:
        j = line_of[(r[0], r[1])]
        i = (int(r[2]) - w.start) // w.step
        if not 0 <= i < n:
            continue
        lat = list(r[_LAT])
        for col, c in enumerate(lat):
            lat_tot[j][col] += c
        for col, c in enumerate(r[_CONF]):
            conf_tot[j][col] += c
        t = tot[j]
        for name in ("requests", "errors", "answered", "cloud"):
            t[name] += r[_I[name]]
        t["sc"] += r[_I["shadow_compared"]]
        t["sa"] += r[_I["shadow_agreed"]]
        if r[_I["records"]]:
            requests, errors = r[_I["requests"]], r[_I["errors"]]
            series["requests"][j][i] = requests
            series["errors"][j][i] = errors
            series["error_rate"][j][i] = _rate(errors, requests)
            series["p50_ms"][j][i] = _pct(lat, 50)[0]
            series["p95_ms"][j][i] = _pct(lat, 95)[0]
            series["fallback_rate"][j][i] = _rate(r[_I["cloud"]], r[_I["answered"]])
        if r[_I["drift_records"]]:
            series["psi_mean"][j][i] = round(r[_I["psi_mean_sum"]] / r[_I["drift_records"]], 6)
        series["psi_max"][j][i] = r[_I_PSI_MAX]
        series["psi_output"][j][i] = r[_I_PSI_OUT]
        if r[_I["shadow_compared"]]:
            series["shadow_compared"][j][i] = r[_I["shadow_compared"]]
            series["shadow_agreement"][j][i] = _rate(
                r[_I["shadow_agreed"]], r[_I["shadow_compared"]]
            )
        series["cloud_agreement"][j][i] = _rate(r[_I["cloud_agreed"]], r[_I["cloud_compared"]])
    summary = []
    for j in range(len(keys)):
        t = tot[j]
        p50, p50_above = _pct(lat_tot[j], 50)
        p95, p95_above = _pct(lat_tot[j], 95)
        summary.append(
            {
                "requests": t["requests"],
                "errors": t["errors"],
                "error_rate": _rate(t["errors"], t["requests"]),
                "p50_ms": p50,
                "p50_above": p50_above,
                "p95_ms": p95,
                "p95_above": p95_above,
                "fallback_rate": _rate(t["cloud"], t["answered"]),
                "shadow_compared": t["sc"],
                "shadow_agreement": _rate(t["sa"], t["sc"]),
            }
        )
    return {
        "t": [w.start + i * w.step for i in range(n)],
        "step_s": w.step,
        "source": w.source,
        "from": w.start,
        "to": w.end,
        "lines": [{"model": m, "version": v} for m, v in keys],
        **series,
        "latency_ms": {"le": list(LATENCY_BOUNDS_MS), "counts": lat_tot},
        "confidence": {"le": list(CONFIDENCE_BOUNDS), "counts": conf_tot},
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
        where, args = ["model = ?"], [model]
        if versions is not None:
            where.append("version IN (SELECT value FROM json_each(?))")
            args.append(dumps(versions))
        sql = _select(f"ts_version_{w.source}", w.step, where)
        rows = conn.execute(sql, (*args, w.start, w.end)).fetchall()
        return {"model": model, "device_id": None, **build(rows, w)}

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
        sql = _select(f"ts_device_{w.source}", w.step, where)
        rows = conn.execute(sql, (*args, w.start, w.end)).fetchall()
        return {"model": model, "device_id": device_id, **build(rows, w)}

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

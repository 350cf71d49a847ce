"""Console pages for rollouts (issue 12): what the rollout gates decided and why.

- ``/ui/rollouts``: every rollout (newest first, ``?state=`` and ``?model=`` filter)
  with its state, stage, current wave and a progress bar of its devices by state.
- ``/ui/rollouts/{id}``: the plan, the shadow stage and the waves as progress bars
  (devices per state per wave), each gate's latest figures, one chart per gate of the
  canary against the baseline over time with the threshold drawn in
  (``static/rollouts.js`` draws them from the JSON route below), every decision with
  its evidence (the numbers, their intervals, the threshold, the sample), the evidence
  of a stop or rollback with the stores that served the version, and the operator's
  buttons (pause, resume, advance, roll back), which call the JSON API.
- ``GET /v1/rollouts/{id}/gates/series``: each gate's evaluations over time, from
  ``rollout_gate_evals`` (migration 8, written by ``fleet/rollouts.py``
  ``Rollouts._record_gates_in`` at most every ``series_interval_s`` per rollout, and at
  every decision), as columnar JSON; thinned to ``MAX_POINTS`` points per gate.

Both pages follow the fragment pattern (``pages.py``): the live part of a page is
re-fetched with ``HX-Request`` when the ``rollouts`` (or, throttled, ``telemetry``)
topic changes, and the handler answers only that fragment.

Threads: handlers on the event loop; every query on the database's reader threads
(``FleetDB.read``); the description of a rollout is ``Rollouts.get`` (the API's own).
"""

from __future__ import annotations

import math
import sqlite3
from typing import Any

from aiohttp import web

from edgefleet.core.errors import BadRequest, NotFound
from edgefleet.core.http import json_response
from edgefleet.fleet.api import READ, _api, _bus_call, _jsonable, requires
from edgefleet.fleet.console.render import live_page
from edgefleet.fleet.db import dumps, loads
from edgefleet.fleet.gates import GateSyntaxError, parse_gate

routes = web.RouteTableDef()

LIST_LIMIT = 100  # rollouts on the list page (newest first)
MAX_POINTS = 1000  # per gate on a chart: a week-long wave is thinned to this
STATES = ("running", "paused", "stopped", "completed", "rolled_back")
WAVE_STATES = ("succeeded", "failed", "pending", "waiting", "rolled_back")
_SERIES_COLUMNS = (
    "canary",
    "canary_low",
    "canary_high",
    "canary_n",
    "baseline",
    "baseline_n",
    "threshold",
)


# ----------------------------------------------------------------------- queries


def read_rollout_list(
    conn: sqlite3.Connection,
    state: str | None,
    model: str | None,
    *,
    live_only: bool = False,
    limit: int = LIST_LIMIT,
) -> list[dict[str, Any]]:
    """The newest ``limit`` rollouts (``live_only``: running, paused or stopped ones)
    with their device counts per state (two queries, whatever the number of rollouts
    and devices)."""
    where, args = [], []
    if state:
        where.append("state = ?")
        args.append(state)
    if live_only:
        where.append("state IN ('running', 'paused', 'stopped')")
    if model:
        where.append("model = ?")
        args.append(model)
    sql = (
        "SELECT id, model, version, target_kind, target, state, stage, current_wave, reason,"
        " created_at, updated_at, plan IS NOT NULL FROM rollouts"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY created_at DESC LIMIT ?"
    )
    rows = conn.execute(sql, (*args, limit)).fetchall()
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        out[r[0]] = {
            "id": r[0],
            "model": r[1],
            "version": r[2],
            "target": "all devices" if r[3] == "all" else f"{r[3]} {r[4]}",
            "state": r[5],
            "stage": r[6],
            "current_wave": r[7],
            "reason": r[8],
            "created_at": r[9],
            "updated_at": r[10],
            "planned": bool(r[11]),
            "waves": 0,
            "devices": 0,
            "counts": dict.fromkeys(WAVE_STATES, 0),
        }
    if out:
        # In the order of the covering index rollout_devices_wave (migration 8).
        for rid, wave, st, n in conn.execute(
            "SELECT rollout_id, wave, state, count(*) FROM rollout_devices"
            " WHERE rollout_id IN (SELECT value FROM json_each(?)) GROUP BY 1, 2, 3",
            (dumps(list(out)),),
        ):
            entry = out[rid]
            entry["counts"][st] = entry["counts"].get(st, 0) + n
            entry["devices"] += n
            entry["waves"] = max(entry["waves"], wave or 0)
    return list(out.values())


def _finite(x: Any) -> Any:
    """JSON has no Infinity: a p95 in the overflow bucket is drawn as a gap."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def read_gate_series(conn: sqlite3.Connection, rid: str, since: float | None) -> dict[str, Any]:
    """Each gate's evaluations of a rollout over time (reader thread). ``NotFound`` for
    an unknown rollout. Gates come in the plan's order (the shadow stage's first);
    a gate is listed even before it has a point."""
    row = conn.execute("SELECT plan, state FROM rollouts WHERE id = ?", (rid,)).fetchone()
    if row is None:
        raise NotFound(f"unknown rollout {rid!r}")
    plan = loads(row[0]) or {}
    gates: dict[tuple[str, str], dict[str, Any]] = {}

    def entry(stage: str, gate: str, signal: str) -> dict[str, Any]:
        key = (stage, gate)
        if key not in gates:
            op = "<=" if "<=" in gate else ">="
            gates[key] = {
                "stage": stage,
                "gate": gate,
                "signal": signal,
                "op": op,
                "t": [],
                "wave": [],
                "outcome": [],
                **{c: [] for c in _SERIES_COLUMNS},
            }
        return gates[key]

    for g in (plan.get("shadow") or {}).get("gates") or []:
        entry("shadow", g, g.split()[0])
    for g in plan.get("gates") or []:
        entry("wave", g, g.split()[0])
    lo = -math.inf if since is None else since
    most = conn.execute(
        "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM rollout_gate_evals"
        " WHERE rollout_id = ? AND at >= ? GROUP BY stage, gate)",
        (rid, lo),
    ).fetchone()[0]
    stride = max(1, math.ceil(most / MAX_POINTS))
    # Thinned evenly per gate; the last point and every decided one (not a wait) kept.
    for r in conn.execute(
        "SELECT stage, gate, signal, at, wave, outcome, canary, canary_low, canary_high,"
        " canary_n, baseline, baseline_n, threshold FROM ("
        " SELECT *, row_number() OVER (PARTITION BY stage, gate ORDER BY at, id) AS rn,"
        " count(*) OVER (PARTITION BY stage, gate) AS cnt FROM rollout_gate_evals"
        " WHERE rollout_id = ? AND at >= ?)"
        " WHERE rn % ? = 0 OR rn = cnt OR outcome != 'wait' ORDER BY at, id",
        (rid, lo, stride),
    ):
        e = entry(r[0], r[1], r[2])
        e["t"].append(r[3])
        e["wave"].append(r[4])
        e["outcome"].append(r[5])
        point = dict(zip(_SERIES_COLUMNS, map(_finite, r[6:]), strict=True))
        if not point["canary_n"]:
            # No canary item yet: Wilson's (0, 1) says nothing; not drawn as a band.
            point["canary_low"] = point["canary_high"] = None
        if point["threshold"] is None:
            point["threshold"] = _threshold(r[1], point["baseline"])
        for c in _SERIES_COLUMNS:
            e[c].append(point[c])
    decisions = [
        {"stage": st, "wave": w, "outcome": o, "at": at}
        for st, w, o, at in conn.execute(
            "SELECT stage, wave, outcome, at FROM rollout_decisions WHERE rollout_id = ?"
            " ORDER BY id",
            (rid,),
        )
    ]
    return {
        "rollout_id": rid,
        "state": row[1],
        "stride": stride,
        "gates": list(gates.values()),
        "decisions": decisions,
    }


def _threshold(text: str, baseline: float | None) -> float | None:
    """The line a gate draws before it decides anything (the gates store a threshold
    only past the minimum sample): ``b`` for an absolute gate, ``a * baseline + b``
    once the baseline has a figure."""
    try:
        gate = parse_gate(text)
    except GateSyntaxError:
        return None
    if not gate.relative:
        return gate.b
    return None if baseline is None else gate.a * baseline + gate.b


def latest_figures(series: dict[str, Any]) -> list[dict[str, Any]]:
    """Each gate's last evaluation, for the page's table (from ``read_gate_series``)."""
    out = []
    for g in series["gates"]:
        last: dict[str, Any] = {"stage": g["stage"], "gate": g["gate"], "points": len(g["t"])}
        if g["t"]:
            last.update({c: g[c][-1] for c in (*_SERIES_COLUMNS, "outcome", "wave")})
            last["at"] = g["t"][-1]
        out.append(last)
    return out


# ------------------------------------------------------------------------ pages


@routes.get("/ui/rollouts")
@requires(READ)
async def rollouts_page(request: web.Request) -> web.Response:
    api = _api(request)
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        raise BadRequest(f"state must be one of {', '.join(STATES)}")
    model = request.query.get("model") or None
    rows = await api.registry.db.read(lambda conn: read_rollout_list(conn, state, model))
    return live_page(
        request,
        "rollouts",
        active="rollouts",
        title="Rollouts",
        rollouts=rows,
        state=state or "",
        model=model or "",
        states=STATES,
        wave_states=WAVE_STATES,
        query=request.query_string,
        limit=LIST_LIMIT,
    )


@routes.get("/ui/rollouts/{id}")
@requires(READ)
async def rollout_page(request: web.Request) -> web.Response:
    api = _api(request)
    bus = api.need_bus()
    rid = request.match_info["id"]
    r = _jsonable(await _bus_call(lambda: bus.rollouts.get(rid)))
    series = await api.registry.db.read(lambda conn: read_gate_series(conn, rid, None))
    plan = r.get("plan") or {}
    return live_page(
        request,
        "rollout",
        active="rollouts",
        title=f"Rollout {r['model']} {r['version']}",
        r=r,
        plan=plan,
        shadow=plan.get("shadow"),
        latest=latest_figures(series),
        gate_series=series["gates"],
        wave_states=WAVE_STATES,
    )


@routes.get("/v1/rollouts/{id}/gates/series")
@requires(READ)
async def gate_series(request: web.Request) -> web.Response:
    """Each gate of a rollout over time (columnar, one object per gate)::

        {"rollout_id", "state", "stride", "decisions": [{"stage","wave","outcome","at"}],
         "gates": [{"stage": "shadow" | "wave", "gate": "error_rate <= 0.05",
                    "signal", "op", "t": [unix s], "wave": [...], "outcome": [...],
                    "canary": [...], "canary_low": [...], "canary_high": [...],
                    "canary_n": [...], "baseline": [...], "baseline_n": [...],
                    "threshold": [...]}]}

    ``from`` (unix seconds) keeps the points at or after it. ``null`` where a figure
    is missing (no baseline yet, a p95 above the last latency bucket). 404 unknown
    rollout, 400 a bad ``from`` or another parameter."""
    unknown = sorted(set(request.query) - {"from"})
    if unknown:
        raise BadRequest(f"unknown query parameter(s) {', '.join(map(repr, unknown))}")
    since: float | None = None
    raw = request.query.get("from")
    if raw is not None:
        try:
            since = float(raw)
        except ValueError:
            raise BadRequest("from must be unix seconds") from None
        if not math.isfinite(since):
            raise BadRequest("from must be unix seconds")
    rid = request.match_info["id"]
    doc = await _api(request).registry.db.read(lambda conn: read_gate_series(conn, rid, since))
    return json_response(doc)

"""Console pages for models (issue 12): how each model version does in the field.

- ``/ui/models``: every model with its versions, labels and where they run (devices
  per active version), its rollout in progress, and the bundle upload form (the raw
  file to ``POST /v1/models``, with a progress bar: ``static/console.js``).
- ``/ui/models/{name}``: per version the converter's figures from the signed manifest
  (fp32/int8 accuracy, sizes, latencies; every other figure under "all figures"),
  labels, devices running it, wanting it and failing it; fleet-wide charts per version
  from the time-series API (requests, p95, fallback rate, drift: ``static/models.js``);
  the assignments that can still decide something (unassign); the model's rollouts;
  the forms to set a label and to assign with a rollout plan (target, version or
  label, waves, a shadow stage, gates, failure share, wave timeout), and delete
  buttons (a version, the whole model: the API's 409 names what still uses it).

Every action is a call to the JSON API (role checks, validation, errors and the audit
log are the API's); the forms and buttons show only for roles that may use them.

Threads: handlers on the event loop; queries on the database's reader threads.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from aiohttp import web

from edgefleet.fleet.api import READ, _api, _bus_call, requires
from edgefleet.fleet.console.render import live_page
from edgefleet.fleet.console.rollouts import read_rollout_list

routes = web.RouteTableDef()

# The converter's figures shown as columns (the manifest's ``metrics``; converters
# write these names, edge-convert's report: converters/). Each column takes the first
# key present; every figure is also listed as it is under "all figures".
FIGURES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("acc_fp32", "pct", ("accuracy_fp32",)),
    ("acc_int8", "pct", ("accuracy_int8",)),
    ("drop", "points", ("accuracy_drop_points",)),
    ("size_fp32", "size", ("size_bytes_fp32",)),
    ("size_int8", "size", ("size_bytes_int8",)),
    ("lat_fp32", "ms", ("latency_ms_fp32", "latency_ms_fp32_batch1_1thread")),
    ("lat_int8", "ms", ("latency_ms_int8", "latency_ms_int8_batch1_1thread")),
    ("quant", "text", ("quant_format", "quantization")),
)


def figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The manifest's metrics → the columns of the versions table (None: not given)."""
    out: dict[str, Any] = {}
    for key, _, names in FIGURES:
        out[key] = next((metrics[n] for n in names if metrics.get(n) is not None), None)
    return out


def read_placement(conn: sqlite3.Connection, model: str | None) -> dict[str, Any]:
    """Where versions run (reader thread): per (model, version) the devices that have
    it active (and how many of those are online), want it (desired) and failed it;
    revoked devices are left out. Three grouped queries."""
    where = " AND dm.model = ?" if model is not None else ""
    args: tuple[Any, ...] = (model,) if model is not None else ()
    base = (
        " FROM device_models dm JOIN devices d ON d.id = dm.device_id"
        " WHERE d.revoked_at IS NULL" + where
    )
    out: dict[tuple[str, str], dict[str, int]] = {}

    def slot(m: str, v: str) -> dict[str, int]:
        return out.setdefault((m, v), {"active": 0, "online": 0, "desired": 0, "failed": 0})

    for m, v, n, online in conn.execute(
        "SELECT dm.model, dm.active, count(*), total(d.online)"
        + base
        + " AND dm.active IS NOT NULL GROUP BY 1, 2",
        args,
    ):
        s = slot(m, v)
        s["active"], s["online"] = n, int(online)
    for m, v, n, failed in conn.execute(
        "SELECT dm.model, dm.desired, count(*), total(dm.state = 'failed')"
        + base
        + " AND dm.desired IS NOT NULL GROUP BY 1, 2",
        args,
    ):
        s = slot(m, v)
        s["desired"], s["failed"] = n, int(failed)
    by_model: dict[str, dict[str, dict[str, int]]] = {}
    for (m, v), s in out.items():
        by_model.setdefault(m, {})[v] = s
    return by_model


def read_targets(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """Groups and (up to 500) device ids, for the assign form's suggestions."""
    groups = [r[0] for r in conn.execute("SELECT DISTINCT grp FROM device_groups ORDER BY 1")]
    devices = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM devices WHERE revoked_at IS NULL ORDER BY id LIMIT 500"
        )
    ]
    return {"groups": groups, "devices": devices}


@routes.get("/ui/models")
@requires(READ)
async def models_page(request: web.Request) -> web.Response:
    api = _api(request)
    models = await api.registry.list_models()

    def q(conn: sqlite3.Connection) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return read_placement(conn, None), read_rollout_list(conn, None, None, live_only=True)

    placement, rollouts = await api.registry.db.read(q)
    live: dict[str, dict[str, Any]] = {}
    for r in rollouts:
        if r["state"] in ("running", "paused", "stopped"):
            live.setdefault(r["model"], r)
    # Models that devices run but the registry no longer holds still show (by name).
    for name in sorted(set(placement) - {m["name"] for m in models}):
        models.append({"name": name, "versions": [], "labels": {}, "latest": None})
    return live_page(
        request,
        "models",
        active="models",
        title="Models",
        models=models,
        placement=placement,
        live=live,
    )


@routes.get("/ui/models/{name}")
@requires(READ)
async def model_page(request: web.Request) -> web.Response:
    api = _api(request)
    name = request.match_info["name"]
    model = await api.registry.get_model(name)  # 404 for an unknown model

    def q(conn: sqlite3.Connection) -> tuple[Any, ...]:
        return (
            read_placement(conn, name).get(name, {}),
            read_rollout_list(conn, None, name, limit=20),
            read_targets(conn),
        )

    placement, rollouts, targets = await api.registry.db.read(q)
    assignments: list[dict[str, Any]] = []
    if api.bus is not None:
        bus = api.bus
        assignments = await _bus_call(lambda: bus.desired.list_assignments(name))
    versions = [{**v, "fig": figures(v.get("metrics") or {})} for v in model["versions"]]
    return live_page(
        request,
        "model",
        active="models",
        title=f"Model {name}",
        m=model,
        name=name,
        versions=list(reversed(versions)),  # newest first
        placement=placement,
        rollouts=rollouts,
        assignments=assignments,
        targets=targets,
        unregistered=sorted(set(placement) - {v["version"] for v in versions}),
    )

"""The overview page's figures: one ``read_overview`` call on a reader thread.

Alerts (the first thing a fleet manager looks at) come from what the fleet already
stores; each names what to open next:

- a rollout stopped or rolled back in the last ``ALERT_WINDOW_S`` (its reason);
- a model version whose drift PSI (any input feature) went above ``DRIFT_PSI`` in the
  last hour (the rule of thumb: PSI > 0.25 is a real shift), with how many devices saw it;
- devices offline for longer than ``OFFLINE_ALERT_S``;
- telemetry backlog growing: devices whose records arrive later and later (see
  ``_backlog``), and devices whose newest batch says more than
  ``OUTBOX_BACKLOG_RECORDS`` records wait in their outbox;
- telemetry lost on a store PC: a device whose outbox, full, dropped records (the drop
  counters its newest batch carries, ``_outbox``);
- accelerator fallbacks: a model running on the CPU on a device whose ``reported``
  accelerators offer something faster (see ``fallback_of``).

Cost at 2,000 devices and a week of telemetry (the console bench measures it; about
40 ms here with 3 million telemetry rows): the devices, device_groups and device_models
scans are a few thousand rows; drift reads the per-minute roll-up of the last hour
(``ts_version_minute`` by its bucket index) and, only for a version over the threshold,
that version's last quarter hour of ``drift_stats`` by its (model, version,
received_at) index; the backlog reads the telemetry rows of the last
``BACKLOG_WINDOW_S`` found by rowid (see ``_recent_rowid``), never the whole table.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from edgefleet.core.backends.accelerators import CPU_PROVIDERS

ALERT_WINDOW_S = 7 * 86400.0
OFFLINE_ALERT_S = 3600.0
DRIFT_PSI = 0.25
DRIFT_WINDOW_S = 3600.0
# The devices above the threshold are counted over the last quarter hour only: a whole
# hour of a big fleet's drift records is ~100k rows (tens of ms), a quarter ~25k.
DRIFT_DEVICES_WINDOW_S = 900.0
NO_GROUP = "(no group)"
# Backlog: records received in the last BACKLOG_WINDOW_S, split in two halves. A device
# whose records in the recent half arrive more than BACKLOG_LAG_S after they were made,
# and BACKLOG_GROWTH_S later than in the half before, is falling behind.
BACKLOG_WINDOW_S = 600.0
BACKLOG_LAG_S = 120.0
BACKLOG_GROWTH_S = 60.0
# The providers a LiteRT model runs on without an accelerator (core/backends/litert.py
# XNNPACK and CPU_BUILTIN; "xnnpack" is how agent/sync.py report_accelerators lists it).
LITERT_CPU = frozenset({"XNNPACK", "cpu-builtin"})
MAX_NAMED = 5  # device ids named in one alert


@dataclass
class Overview:
    devices_total: int = 0
    devices_online: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)  # grp, online, offline
    models: list[dict[str, Any]] = field(default_factory=list)  # model, versions: [{v, n}]
    alerts: list[dict[str, Any]] = field(default_factory=list)  # level, kind, text, href
    rollouts_running: int = 0


def read_overview(conn: sqlite3.Connection) -> Overview:
    """Reader thread: the overview's figures and alerts."""
    now = time.time()
    out = Overview()
    row = conn.execute(
        "SELECT count(*), total(online) FROM devices WHERE revoked_at IS NULL"
    ).fetchone()
    out.devices_total, out.devices_online = int(row[0]), int(row[1])
    out.groups = [
        {"grp": r[0], "online": int(r[1]), "offline": int(r[2])}
        for r in conn.execute(
            "SELECT coalesce(g.grp, ?), total(d.online), count(*) - total(d.online)"
            " FROM devices d LEFT JOIN device_groups g ON g.device_id = d.id"
            " WHERE d.revoked_at IS NULL GROUP BY 1 ORDER BY 1",
            (NO_GROUP,),
        )
    ]
    models: dict[str, list[dict[str, Any]]] = {}
    for model, version, n in conn.execute(
        "SELECT m.model, coalesce(m.active, '(none)'), count(*) FROM device_models m"
        " JOIN devices d ON d.id = m.device_id WHERE d.revoked_at IS NULL"
        " GROUP BY 1, 2 ORDER BY 1, 2"
    ):
        models.setdefault(model, []).append({"version": version, "devices": n})
    out.models = [
        {"model": m, "versions": vs, "devices": sum(v["devices"] for v in vs)}
        for m, vs in models.items()
    ]
    out.rollouts_running = conn.execute(
        "SELECT count(*) FROM rollouts WHERE state IN ('running', 'paused')"
    ).fetchone()[0]
    out.alerts = _alerts(conn, now)
    return out


def _names(ids: list[str], total: int) -> str:
    return ", ".join(ids[:MAX_NAMED]) + (" …" if total > MAX_NAMED else "")


def _devices_href(**params: str) -> str:
    return "/ui/devices?" + urlencode(params)


def _alerts(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = []
    for rid, model, version, state, reason in conn.execute(
        "SELECT id, model, version, state, reason FROM rollouts"
        " WHERE state IN ('stopped', 'rolled_back') AND updated_at > ?"
        " ORDER BY updated_at DESC LIMIT 20",
        (now - ALERT_WINDOW_S,),
    ):
        alerts.append(
            {
                "level": "bad",
                "kind": "rollout",
                "text": f"rollout {rid}: {model} {version} {state.replace('_', ' ')}"
                + (f" — {reason}" if reason else ""),
                "href": f"/ui/rollouts/{quote(rid, safe='')}",
            }
        )
    alerts += _drift(conn, now)
    offline = conn.execute(
        "SELECT id FROM devices WHERE revoked_at IS NULL AND online = 0"
        " AND coalesce(last_seen, created_at) < ? ORDER BY last_seen",
        (now - OFFLINE_ALERT_S,),
    ).fetchall()
    if offline:
        alerts.append(
            {
                "level": "warn",
                "kind": "offline",
                "text": f"{len(offline)} device(s) offline for more than"
                f" {OFFLINE_ALERT_S / 3600:.0f} h: {_names([r[0] for r in offline], len(offline))}",
                "href": _devices_href(online="0", sort="last_seen", order="asc"),
            }
        )
    alerts += _backlog(conn, now)
    alerts += _outbox(conn, now)
    alerts += _accelerator_alerts(conn)
    return alerts


def _drift(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """Versions whose drift PSI went over the threshold in the last hour, with the
    devices that saw it (the per-device count only for the versions over it)."""
    since = now - DRIFT_WINDOW_S
    out = []
    for model, version, psi in conn.execute(
        "SELECT model, version, max(psi_max) FROM ts_version_minute"
        " WHERE bucket >= ? AND psi_max > ? GROUP BY model, version ORDER BY 3 DESC LIMIT 20",
        (int(since // 60 * 60), DRIFT_PSI),
    ):
        devices = conn.execute(
            "SELECT count(DISTINCT device_id) FROM drift_stats WHERE model = ? AND version = ?"
            " AND received_at > ? AND psi_max > ?",
            (model, version, now - DRIFT_DEVICES_WINDOW_S, DRIFT_PSI),
        ).fetchone()[0]
        out.append(
            {
                "level": "warn",
                "kind": "drift",
                "text": f"{model} {version}: input drift PSI up to {psi:.2f} in the last hour"
                f" (threshold {DRIFT_PSI}); {devices} device(s) above it in the last"
                f" {DRIFT_DEVICES_WINDOW_S / 60:.0f} min",
                "href": f"/ui/models/{quote(model, safe='')}",
            }
        )
    return out


def _recent_rowid(conn: sqlite3.Connection, since: float) -> int | None:
    """The first telemetry rowid received at ``since`` or later (None: no telemetry).

    ``telemetry`` has no index on ``received_at``, and a week of a big fleet is
    millions of rows; but rows are inserted as they arrive, so ``received_at`` grows
    with the rowid and a binary search over rowids (about 25 keyed reads) finds where
    the recent rows start.
    """
    # Two queries: min() and max() in one SELECT make SQLite scan the whole table.
    lo = conn.execute("SELECT min(rowid) FROM telemetry").fetchone()[0]
    if lo is None:
        return None
    hi = conn.execute("SELECT max(rowid) FROM telemetry").fetchone()[0]
    hi += 1  # the answer lies in [lo, hi]; hi: nothing received since
    while lo < hi:
        mid = (lo + hi) // 2
        row = conn.execute(
            "SELECT rowid, received_at FROM telemetry WHERE rowid >= ? ORDER BY rowid LIMIT 1",
            (mid,),
        ).fetchone()
        if row is None or row[1] >= since:
            hi = mid
        else:
            lo = row[0] + 1
    return int(lo)


OUTBOX_BACKLOG_RECORDS = 1000
OUTBOX_FRESH_S = 3600.0  # a batch older than this says nothing about the outbox now


def _outbox(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """What the devices' newest batches said of their outboxes (fleet/ingest.py keeps
    it in ``devices``): records dropped because the outbox was full (telemetry lost
    for good: a ``bad`` alert), and many records waiting to be sent."""
    alerts: list[dict[str, Any]] = []
    rows = conn.execute(
        "SELECT id, outbox_waiting, outbox_dropped_low, outbox_dropped_high FROM devices"
        " WHERE revoked_at IS NULL AND outbox_at > ?"
        " AND (outbox_dropped_low + outbox_dropped_high > 0 OR outbox_waiting >= ?)"
        " ORDER BY outbox_dropped_high + outbox_dropped_low DESC, outbox_waiting DESC",
        (now - OUTBOX_FRESH_S, OUTBOX_BACKLOG_RECORDS),
    ).fetchall()
    lost = [r for r in rows if r[2] + r[3] > 0]
    if lost:
        low, high = sum(r[2] for r in lost), sum(r[3] for r in lost)
        alerts.append(
            {
                "level": "bad",
                "kind": "outbox_dropped",
                "text": f"telemetry lost on {len(lost)} device(s): a full outbox dropped"
                f" {low:,} low- and {high:,} high-priority records"
                f" ({_names([r[0] for r in lost], len(lost))})",
                "href": f"/ui/devices/{quote(lost[0][0], safe='')}",
            }
        )
    waiting = [r for r in rows if r[1] >= OUTBOX_BACKLOG_RECORDS]
    if waiting:
        alerts.append(
            {
                "level": "warn",
                "kind": "outbox_waiting",
                "text": f"{len(waiting)} device(s) hold {OUTBOX_BACKLOG_RECORDS:,} or more"
                f" unsent telemetry records (most: {waiting[0][1]:,} on {waiting[0][0]})",
                "href": f"/ui/devices/{quote(waiting[0][0], safe='')}",
            }
        )
    return alerts


def _backlog(conn: sqlite3.Connection, now: float) -> list[dict[str, Any]]:
    """Devices whose telemetry backlog grows.

    Growth is read from the records themselves (the outbox's size in the newest batch
    is one number, ``_outbox``; lateness over a window shows the trend): a device
    sends its outbox oldest first (by priority), so ``received_at - ts`` of what
    arrives is how far behind it is. Behind by more than ``BACKLOG_LAG_S`` and by
    ``BACKLOG_GROWTH_S`` more than in the previous half window: the backlog grows.
    (A steady clock difference between device and fleet cancels out of the growth; a
    device that sends nothing at all shows as offline or silent instead.)
    """
    start = _recent_rowid(conn, now - BACKLOG_WINDOW_S)
    if start is None:
        return []
    middle = now - BACKLOG_WINDOW_S / 2
    growing = []
    for device_id, recent, before in conn.execute(
        "SELECT device_id, max(CASE WHEN received_at >= ? THEN received_at - ts END),"
        " max(CASE WHEN received_at < ? THEN received_at - ts END)"
        # "+device_id": grouping by the bare column makes SQLite walk the whole
        # (device_id, seq) index instead of the recent rowid range.
        " FROM telemetry WHERE rowid >= ? AND received_at >= ? GROUP BY +device_id",
        (middle, middle, start, now - BACKLOG_WINDOW_S),
    ):
        if recent is None or before is None:
            continue
        if recent > BACKLOG_LAG_S and recent - before > BACKLOG_GROWTH_S:
            growing.append((recent, device_id, before))
    if not growing:
        return []
    growing.sort(reverse=True)
    worst, _, before = growing[0]
    return [
        {
            "level": "warn",
            "kind": "backlog",
            "text": f"telemetry backlog growing on {len(growing)} device(s):"
            f" {_names([g[1] for g in growing], len(growing))} (records arrive up to"
            f" {worst / 60:.0f} min late, {before / 60:.0f} min five minutes earlier)",
            "href": f"/ui/devices/{quote(growing[0][1], safe='')}",
        }
    ]


def fallback_of(provider: str | None, accelerators: Any) -> str:
    """Why a model on the CPU looks like a fallback, or ''.

    ``provider``: what the model runs on (``device_models.provider``: an ONNX Runtime
    execution provider, or LiteRT's ``delegate:<lib>``, ``XNNPACK``, ``cpu-builtin``);
    ``accelerators``: the device's ``reported`` accelerators, ``{"onnx": [the build's
    providers], "litert": ["xnnpack", delegate libraries found]}`` (agent/sync.py
    report_accelerators). The agent tries the configured accelerators first and the
    CPU last, so a model on the CPU of a box that offers more fell back (or its agent
    is not configured to use it: both are worth a look).
    """
    if not provider or not isinstance(accelerators, dict):
        return ""
    onnx = accelerators.get("onnx") or []
    litert = accelerators.get("litert") or []
    if provider in CPU_PROVIDERS:
        offered = [str(p) for p in onnx if p not in CPU_PROVIDERS]
    elif provider in LITERT_CPU:
        offered = [str(p) for p in litert if p != "xnnpack"]
        if provider == "cpu-builtin" and "xnnpack" in litert:
            offered.insert(0, "XNNPACK")
    else:
        return ""
    if not offered:
        return ""
    return f"runs on {provider} although the device offers {', '.join(offered)}"


def _accelerator_alerts(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """One alert per (model, provider, what is offered), naming the devices."""
    parsed: dict[str, Any] = {}  # most devices report the same JSON: parse it once
    found: dict[tuple[str, str, str], list[str]] = {}
    for device_id, model, provider, accel in conn.execute(
        "SELECT m.device_id, m.model, m.provider, d.accelerators FROM device_models m"
        " JOIN devices d ON d.id = m.device_id WHERE d.revoked_at IS NULL AND d.online = 1"
        " AND d.accelerators IS NOT NULL AND m.provider IN (SELECT value FROM json_each(?))"
        " ORDER BY m.device_id",
        (json.dumps(sorted(CPU_PROVIDERS | LITERT_CPU)),),
    ):
        if accel not in parsed:
            try:
                parsed[accel] = json.loads(accel)
            except ValueError:
                parsed[accel] = None
        why = fallback_of(provider, parsed[accel])
        if why:
            found.setdefault((model, provider, why), []).append(device_id)
    out = []
    for (model, provider, why), ids in sorted(found.items(), key=lambda kv: -len(kv[1]))[:10]:
        out.append(
            {
                "level": "warn",
                "kind": "accelerator",
                "text": f"{model} {why} on {len(ids)} device(s): {_names(ids, len(ids))}",
                "href": _devices_href(model=model, provider=provider, online="1"),
            }
        )
    return out

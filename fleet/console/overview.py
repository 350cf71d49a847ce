"""The overview page's figures, each one query on a reader thread.

Alerts (the first thing a fleet manager looks at) come from what the fleet already
stores; each names what to open next:

- a rollout stopped or rolled back in the last ``ALERT_WINDOW_S`` (its reason);
- a model version whose drift PSI (any input feature) stayed above ``DRIFT_PSI`` in the
  last hour on some device (the rule of thumb: PSI > 0.25 is a real shift);
- devices offline for longer than ``OFFLINE_ALERT_S``;
- devices whose active provider is not the first one they offer (an accelerator
  fell back to the CPU).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

ALERT_WINDOW_S = 7 * 86400.0
OFFLINE_ALERT_S = 3600.0
DRIFT_PSI = 0.25
NO_GROUP = "(no group)"


@dataclass
class Overview:
    devices_total: int = 0
    devices_online: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)  # grp, online, offline
    models: list[dict[str, Any]] = field(default_factory=list)  # model, versions: [{v, n}]
    alerts: list[dict[str, Any]] = field(default_factory=list)  # level, kind, text, href
    rollouts_running: int = 0


def read_overview(conn: sqlite3.Connection) -> Overview:
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
                "href": f"/ui/rollouts/{rid}",
            }
        )
    for model, version, psi, devices in conn.execute(
        "SELECT model, version, max(psi_max), count(DISTINCT device_id) FROM drift_stats"
        " WHERE received_at > ? AND psi_max > ? GROUP BY model, version ORDER BY 3 DESC"
        " LIMIT 20",
        (now - 3600.0, DRIFT_PSI),
    ):
        alerts.append(
            {
                "level": "warn",
                "kind": "drift",
                "text": f"{model} {version}: input drift PSI {psi:.2f} on {devices}"
                f" device(s) in the last hour (threshold {DRIFT_PSI})",
                "href": f"/ui/models/{model}",
            }
        )
    offline = conn.execute(
        "SELECT id FROM devices WHERE revoked_at IS NULL AND online = 0"
        " AND coalesce(last_seen, created_at) < ? ORDER BY last_seen LIMIT 6",
        (now - OFFLINE_ALERT_S,),
    ).fetchall()
    if offline:
        total = conn.execute(
            "SELECT count(*) FROM devices WHERE revoked_at IS NULL AND online = 0"
            " AND coalesce(last_seen, created_at) < ?",
            (now - OFFLINE_ALERT_S,),
        ).fetchone()[0]
        names = ", ".join(r[0] for r in offline[:5]) + (" …" if total > 5 else "")
        alerts.append(
            {
                "level": "warn",
                "kind": "offline",
                "text": f"{total} device(s) offline for more than"
                f" {OFFLINE_ALERT_S / 3600:.0f} h: {names}",
                "href": "/ui/devices?online=0",
            }
        )
    for device_id, accel in conn.execute(
        "SELECT id, accelerators FROM devices WHERE revoked_at IS NULL"
        " AND accelerators IS NOT NULL AND online = 1 LIMIT 5000"
    ):
        fallback = _accelerator_fallback(accel)
        if fallback:
            alerts.append(
                {
                    "level": "warn",
                    "kind": "accelerator",
                    "text": f"{device_id}: {fallback}",
                    "href": f"/ui/devices/{device_id}",
                }
            )
            if sum(a["kind"] == "accelerator" for a in alerts) >= 10:
                break
    return alerts


def _accelerator_fallback(raw: str) -> str:
    """What the device's accelerators report says fell back, or ''."""
    try:
        accel = json.loads(raw)
    except ValueError:
        return ""
    if not isinstance(accel, dict):
        return ""
    fallbacks = accel.get("fallbacks") or accel.get("fallback")
    if isinstance(fallbacks, list) and fallbacks:
        return "accelerator fell back to the CPU for " + ", ".join(map(str, fallbacks))
    if isinstance(fallbacks, str) and fallbacks:
        return f"accelerator fell back: {fallbacks}"
    return ""

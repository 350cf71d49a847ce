"""Console page for fleet fallback policies (``edge-fleet policy``; fleet/policies.py).

One table of every policy (model, target, settings, when set) with a clear button per
row, and a form that sets one (merged into the target's policy, as the API does). The
form posts to ``PUT /v1/policies/{model}``; the target is built by console.js from the
``target_kind``/``target_value`` fields.
"""

from __future__ import annotations

import sqlite3
from typing import Any, get_args

from aiohttp import web

from edgefleet.core.protocol import ConfidenceRule, FallbackMode
from edgefleet.fleet.api import READ, _api, requires
from edgefleet.fleet.console.render import live_page
from edgefleet.fleet.policies import load_policies

routes = web.RouteTableDef()


def _read(conn: sqlite3.Connection) -> dict[str, Any]:
    policies = load_policies(conn)
    models = [r[0] for r in conn.execute("SELECT DISTINCT name FROM model_versions ORDER BY 1")]
    groups = [r[0] for r in conn.execute("SELECT DISTINCT grp FROM device_groups ORDER BY 1")]
    rows = [
        {
            "model": r.model,
            "kind": r.kind,
            "target": r.target,
            "policy": r.policy,
            "updated_at": r.updated_at,
        }
        for name in sorted(policies)
        for r in policies[name]
    ]
    return {"rows": rows, "models": models, "groups": groups}


@routes.get("/ui/policies")
@requires(READ)
async def policies_page(request: web.Request) -> web.Response:
    data = await _api(request).registry.db.read(_read)
    return live_page(
        request,
        "policies",
        active="policies",
        title="Fallback policies",
        modes=get_args(FallbackMode),
        rules=get_args(ConfidenceRule),
        **data,
    )

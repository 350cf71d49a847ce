"""``GET /v1/fleet``: the fleet link and the desired-state sync, as the store sees them.

Registered only when the agent has a ``fleet`` section (agent/server/app.py). Cheap:
in-memory state only, plus the outbox's counters.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from edgefleet.agent.fleet_link import FLEET
from edgefleet.core.http import json_response

routes = web.RouteTableDef()


@routes.get("/v1/fleet")
async def fleet_status(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    link = fleet.link
    doc: dict[str, Any] = {
        "device_id": link.device_id,
        "link": {
            "state": str(link.state),
            "connected": link.connected,
            "last_error": link.last_error,
            "protocol": link.negotiated_protocol,
        },
        "sync": fleet.sync.describe() if fleet.sync is not None else None,
    }
    try:
        stats = await fleet.outbox.stats()
        doc["outbox"] = {
            "records": stats.records,
            "bytes": stats.bytes,
            "in_flight": stats.in_flight,
        }
    except Exception as exc:  # a closed or broken outbox must not break the status page
        doc["outbox"] = {"error": str(exc) or type(exc).__name__}
    return json_response(doc)

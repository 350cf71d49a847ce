"""Console page for the fleet's events, across devices (``edge-fleet events``).

The newest events first (what every device reported it did: activations, failures,
rollbacks, command results), filtered by device and model as the CLI's ``--device``
and ``--model`` do; the device page shows one device's timeline.
"""

from __future__ import annotations

from aiohttp import web

from edgefleet.core.errors import BadRequest
from edgefleet.fleet.api import READ, _api, requires
from edgefleet.fleet.console.render import live_page

routes = web.RouteTableDef()
LIMITS = (50, 100, 200, 500)


@routes.get("/ui/timeline")
@requires(READ)
async def events_page(request: web.Request) -> web.Response:
    device = request.query.get("device", "").strip() or None
    model = request.query.get("model", "").strip() or None
    raw_limit = request.query.get("limit", "100")
    if not raw_limit.isdigit() or int(raw_limit) not in LIMITS:
        raise BadRequest(f"limit must be one of {', '.join(map(str, LIMITS))}")
    limit = int(raw_limit)
    found = await _api(request).need_bus().telemetry.events(device=device, model=model, limit=limit)
    # Every field the template reads, present (an event kind may lack some).
    keys = ("kind", "device_id", "model", "version", "previous", "rollout", "reason")
    rows = [{**{k: e.get(k) for k in keys}, "received_at": e.get("received_at")} for e in found]
    return live_page(
        request,
        "events",
        active="events",
        title="Events",
        events=rows,
        device=device or "",
        model=model or "",
        limit=limit,
        limits=LIMITS,
        query=request.query_string,
    )

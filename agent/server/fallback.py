"""``/v1/fallback`` and ``/v1/hard-examples``: what the cloud fallback is doing."""

from __future__ import annotations

from aiohttp import web

from edgefleet.agent.server.context import data_plane
from edgefleet.core.errors import BadRequest, NotFound
from edgefleet.core.http import json_response

routes = web.RouteTableDef()
_STATUSES = ("pending", "answered", "expired")


@routes.get("/v1/fallback")
async def fallback_status(request: web.Request) -> web.Response:
    """Endpoint state, breakers, budgets, effective policies (``sources``: where each
    setting came from, default | bundle | fleet | local), the fleet's policies, counts,
    hard examples and their upload to the fleet (ledger of the bandwidth budget)."""
    return json_response(await data_plane(request).router.status())


@routes.get("/v1/hard-examples")
async def hard_examples(request: web.Request) -> web.Response:
    """Newest first, without tensors: ``?status=pending|answered|expired&model=&limit=``."""
    store = data_plane(request).router.hard_examples
    if store is None:
        raise NotFound("no hard-example store (no cloud endpoint configured, or disabled)")
    status = request.query.get("status")
    if status is not None and status not in _STATUSES:
        raise BadRequest(f"status must be one of {list(_STATUSES)}")
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError as exc:
        raise BadRequest("limit must be an integer") from exc
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be between 1 and 1000")
    rows = await store.list(status=status, model=request.query.get("model"), limit=limit)
    return json_response({"hard_examples": rows})

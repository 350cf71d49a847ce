"""The fleet's Prometheus ``/metrics`` (issue 12). Placeholder: filled in by the
observability work; ``create_app`` already mounts ``routes`` and ``middleware``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

routes = web.RouteTableDef()


@web.middleware
async def middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    return await handler(request)

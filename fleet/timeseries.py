"""Per-minute and per-hour telemetry roll-ups for charts (issue 12). Placeholder:
filled in by the time-series work; ``create_app`` already mounts ``routes``."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()

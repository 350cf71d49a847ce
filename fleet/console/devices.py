"""Console pages for devices (issue 12). Placeholder: filled in by its page work."""

from __future__ import annotations

from aiohttp import web

routes = web.RouteTableDef()

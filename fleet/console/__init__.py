"""The fleet console (issue 12): server-rendered pages under ``/ui/`` on the API's port.

Modules: ``pages`` (sign-in, overview, audit, static, live stream), one module per
product area (``devices``, ``models``, ``rollouts``, ``hard_examples``), ``render``
(templates, filters, security headers), ``sessions`` (cookie sessions with CSRF
tokens), ``live`` (server-sent change notices), ``overview`` (its queries).
``setup(app)`` mounts them on the fleet API's application (``fleet.api.create_app``).
"""

from __future__ import annotations

from aiohttp import web

__all__ = ["setup"]


def setup(app: web.Application) -> None:
    """Mount the console on the API's app (after ``app[API]`` is set)."""
    from edgefleet.fleet.api import API
    from edgefleet.fleet.console import (
        devices,
        events,
        hard_examples,
        live,
        models,
        pages,
        policies,
        rollouts,
    )

    for module in (pages, devices, models, rollouts, hard_examples, policies, events):
        app.add_routes(module.routes)
    api = app[API]
    feed = live.ChangeFeed(api.registry.db, interval=api.live_interval_s)
    app[live.FEED] = feed

    async def close_feed(_: web.Application) -> None:
        await feed.close()

    app.on_shutdown.append(close_feed)

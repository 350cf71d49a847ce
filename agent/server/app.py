"""The agent's HTTP application: routes, error translation, auth, lifecycle."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from edgefleet.agent.config import AgentConfig, default_threads
from edgefleet.agent.dataplane import DataPlane
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.server import admin, fallback, image, oip, openapi, request_guard
from edgefleet.agent.server.connections import CONNECTIONS, ConnectionGuard, ConnectionLimits
from edgefleet.agent.server.context import DATA_PLANE, SERVICES, Services, services
from edgefleet.agent.server.tls import warn_if_exposed
from edgefleet.agent.serving_registry import ModelRegistry
from edgefleet.agent.store import ModelStore
from edgefleet.core.bundle.signing import TrustStore
from edgefleet.core.http import error_middleware, error_response
from edgefleet.core.processing.image import DecodeLimits, set_decode_limits

if TYPE_CHECKING:
    from edgefleet.agent.fleet_link import FleetConnection

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts every answer by route and status (outermost: errors are answers by now)."""
    response = await handler(request)
    request.app[SERVICES].metrics.http_requests.inc(_route_name(request), str(response.status))
    return response


def _body_limit(request: web.Request) -> int:
    return request.app[SERVICES].config.server.max_body_bytes


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = services(request).config.server.auth_token
    if token and request.path not in _OPEN_PATHS:
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {token}"
        # Constant-time: the comparison must not leak how much of the token matched.
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return error_response("missing or wrong bearer token", 401)
    return await handler(request)


def _log_trust(config: AgentConfig) -> None:
    if config.trust.allow_unsigned:
        log.warning(
            "!!! trust.allow_unsigned is on: UNSIGNED BUNDLES WILL BE ACCEPTED."
            " Development only; never on a store PC."
        )
    if not config.trust.public_keys and not config.trust.allow_unsigned:
        log.warning("no trusted public keys configured: every bundle will be refused")


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    svc = app[SERVICES]
    await svc.registry.start(svc.config.models)
    names = svc.registry.model_names()
    log.info(
        "agent ready in %.2f s serving %s",
        time.monotonic() - svc.started_at,
        names,
    )
    yield
    await svc.registry.close()
    svc.inference_executor.shutdown(wait=True, cancel_futures=True)
    svc.io_executor.shutdown(wait=True, cancel_futures=True)


def create_app(config: AgentConfig) -> web.Application:
    _log_trust(config)
    warn_if_exposed(config)  # e.g. the cloud profile on 0.0.0.0 without TLS
    trust = TrustStore.from_files(config.trust.public_keys, config.trust.allow_unsigned)
    store = ModelStore(
        config.store.path, trust, config.store.keep_versions, config.store.max_member_bytes
    )
    threads = config.runtime.executor_threads or default_threads()
    inference = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="infer")
    io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="io")
    metrics = Metrics()
    registry = ModelRegistry(
        store, config.runtime, inference, io, metrics, config.server.max_queue_per_model
    )
    server = config.server
    # Image decodes share one memory budget in this process (core/processing/image.py).
    set_decode_limits(
        DecodeLimits(
            server.image_decode_memory_mb * 1024 * 1024,
            server.image_decode_concurrency,
            "server.image_decode_memory_mb",
        )
    )
    # Timeouts and the connection cap, applied by the GuardedSite that serves the app
    # (agent/server/connections.py); the middleware tells it which request is running.
    connections = ConnectionGuard(
        ConnectionLimits(server.max_connections, server.header_timeout_s, server.body_timeout_s)
    )
    # Host/Origin/body-type checks first (agent/server/request_guard.py): a request a
    # browser page forged never reaches the auth check or a handler. The token is fixed
    # at start: without one, the auth layer is not installed at all (one coroutine frame
    # less on every request of the hot path).
    middlewares: list[Middleware] = [
        metrics_middleware,
        error_middleware(_body_limit),
        request_guard.middleware(request_guard.RequestGuard(server), connections),
    ]
    if server.auth_token:
        middlewares.append(auth_middleware)
    app = web.Application(client_max_size=server.max_body_bytes, middlewares=middlewares)
    app[CONNECTIONS] = connections
    svc = Services(config, registry, metrics, inference, io)
    app[SERVICES] = svc
    # The optional fleet link first: the data plane counts every inference in its stats
    # (inference_stats records) and queues the fallback's counts in its outbox.
    fleet = _fleet_connection(config, registry)
    # Every inference API's way to the model (agent/dataplane.py): resolution, the
    # model, scoring, the cloud fallback, metrics and fleet statistics.
    app[DATA_PLANE] = DataPlane(
        config,
        registry,
        metrics,
        inference,
        stats=fleet.stats if fleet is not None else None,
        telemetry_sink=fleet.outbox.add_one if fleet is not None else None,
    )
    if fleet is not None and fleet.sync is not None:
        fleet.sync.policies = app[DATA_PLANE].router  # fleet fallback policies (issue 11)
    for table in (oip.routes, image.routes, admin.routes, openapi.routes, fallback.routes):
        app.add_routes(table)
    if config.server.cors_origins:
        app.on_response_prepare.append(_cors(config.server.cors_origins))
    app.cleanup_ctx.append(_lifecycle)
    # After the registry: started once models load, stopped (background cloud work
    # cancelled and awaited) before they unload.
    app.cleanup_ctx.append(app[DATA_PLANE].lifecycle)
    if fleet is not None:
        from edgefleet.agent.fleet_link import FLEET
        from edgefleet.agent.server import fleet_api

        app[FLEET] = fleet
        app.cleanup_ctx.append(fleet.lifecycle)
        app.add_routes(fleet_api.routes)  # GET /v1/fleet: link and sync state
    return app


def _fleet_connection(config: AgentConfig, registry: ModelRegistry) -> FleetConnection | None:
    """The optional MQTT link + telemetry outbox (agent/fleet_link.py). Its start never
    waits for the broker; without a fleet section nothing of it exists, not even paho
    in memory (imported here, not at the top)."""
    if config.fleet is None:
        return None
    from edgefleet.agent.fleet_link import FleetConnection

    return FleetConnection(config, registry)


def _cors(origins: list[str]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and (origin in origins or "*" in origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

    return add_headers

"""The HTTP boundary shared by the agent's and the fleet's APIs: JSON responses (orjson:
the stdlib encoder is 10-20x slower on tensors), JSON bodies, and the one middleware
that turns the exception tree (``edgefleet.core.errors``) into ``{"error": ...}``.

Runs on the event loop, in the request's task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from edgefleet.core.errors import BadRequest, EdgeError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    doc: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    message: str, status: int, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response({"error": message}, status, headers)


async def read_json_object(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    body = await request.read()
    if not body.strip():
        if optional:
            return {}
        raise BadRequest("request body must be a JSON object")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


def error_middleware(
    body_limit: Callable[[web.Request], int],
    extra_headers: Callable[[web.Request, EdgeError], dict[str, str] | None] | None = None,
) -> Middleware:
    """Every failure leaves as ``{"error": ...}`` with the status its class names.

    An ``EdgeError`` gives its own status and ``headers()`` (``Retry-After`` on a 503),
    merged with what ``extra_headers`` adds for this request (e.g. the fleet's
    ``WWW-Authenticate`` on a 401); aiohttp's own 4xx/5xx keep their status; a body
    over ``body_limit(request)`` bytes is a 413; anything else is a bug: logged with
    its traceback, answered 500 naming only the exception's type.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except EdgeError as exc:
            log.info("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
            headers = exc.headers()
            if extra_headers is not None:
                headers = {**(headers or {}), **(extra_headers(request, exc) or {})} or None
            return error_response(exc.message, exc.status, headers)
        except web.HTTPRequestEntityTooLarge:
            limit = body_limit(request)
            log.info("%s %s -> 413: body over %d bytes", request.method, request.path, limit)
            return error_response(f"request body larger than the {limit} byte limit", 413)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(exc.reason, exc.status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("bug while serving %s %s", request.method, request.path)
            return error_response(f"internal error ({type(exc).__name__})", 500)

    return middleware

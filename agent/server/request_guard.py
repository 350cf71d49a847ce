"""Who may call the local API: Host and Origin checks, admin body types, connection slots.

The agent's API listens on 127.0.0.1 with no token by default, which keeps other
machines out but not a web page open in the store PC's browser. Such a page can send
"simple" cross-site requests (a form post, ``text/plain``, no preflight) and, through
DNS rebinding (its own name re-pointed to 127.0.0.1), even read the answers. The rules,
applied to every request before routing reaches a handler:

1. **Host.** Served when the ``Host`` header names an IP address literal (a browser
   only sends one when it connects to that address, and an address cannot be
   rebound), ``localhost``, ``server.host``, or a name in ``server.allowed_hosts``
   (``"*"``: any). Any other name is refused (403): it is how a rebinding page
   reaches us. An agent with a bearer token and an empty ``allowed_hosts`` (the cloud
   profile on 0.0.0.0, reached by DNS names) accepts any name: a page cannot attach
   the token, so rebinding gains it nothing.
2. **Origin.** A request other than GET/HEAD/OPTIONS that carries an ``Origin``
   header (browsers add it to every cross-origin request and to every POST) is served
   only when that origin is the agent's own (scheme, host and port of the request) or
   listed in ``server.cors_origins`` (``"*"``: any). ``Origin: null`` is not an origin.
   Clients that are not browsers (the CLI, tritonclient, the fleet's tools) send none.
3. **Body types.** The admin routes that take a body take exactly one type:
   ``application/octet-stream`` for a bundle upload, ``application/json`` for the
   others (415 otherwise). A cross-site page cannot send either without a CORS
   preflight, which the agent never grants, so this holds even without an Origin.

The bookkeeping for :mod:`edgefleet.agent.server.connections` (which request a guarded
connection is serving, and the health-only connections above the cap) rides on the
same middleware. Event-loop only; the common case (an accepted Host, no Origin) is two
dictionary lookups.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware
from yarl import URL

from edgefleet.agent.config import ServerConfig
from edgefleet.agent.server.connections import HEALTH_PATHS, ConnectionGuard
from edgefleet.core.http import error_response

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_READS = frozenset(("GET", "HEAD", "OPTIONS"))
_OCTET = "application/octet-stream"
_JSON = "application/json"
# The admin routes that change state (or may take a body), by method and route.
BODY_TYPES: dict[tuple[str, str], str] = {
    ("POST", "/v1/bundles"): _OCTET,
    ("POST", "/v1/models/{model}/versions/{version}/activate"): _JSON,
    ("POST", "/v1/models/{model}/rollback"): _JSON,
    ("PUT", "/v1/models/{model}/labels/{label}"): _JSON,
    ("POST", "/v2/repository/index"): _JSON,
    ("POST", "/v2/repository/models/{model}/load"): _JSON,
    ("POST", "/v2/repository/models/{model}/unload"): _JSON,
}
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LOOPBACK = ("127.", "localhost", "::1")
_ACCEPTED_CACHE = 256  # distinct Host values remembered as accepted


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header → (lower-case name without brackets or final dot, port or None).

    None when it is not a host[:port] at all.
    """
    value = value.strip()
    if value.startswith("["):  # [IPv6]:port
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:]
    elif value.count(":") == 1:
        name, _, port_text = value.partition(":")
    else:  # no port (or a bare IPv6 address, which is not valid here but unambiguous)
        name, port_text = value, ""
    if port_text and not port_text.isdigit():
        return None
    name = name.lower().rstrip(".")
    if not name:
        return None
    return name, int(port_text) if port_text else None


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class RequestGuard:
    """The Host, Origin and body-type rules for one agent's server settings."""

    def __init__(self, server: ServerConfig) -> None:
        allowed = set(server.allowed_hosts)
        self._names = {"localhost", server.host.lower().strip("[]").rstrip("."), *allowed}
        self._any_host = "*" in allowed or (not allowed and bool(server.auth_token))
        self._cors = frozenset(server.cors_origins)
        self._cors_any = "*" in self._cors
        self._accepted: set[str] = set()
        if not self._any_host and not allowed and not server.host.startswith(_LOOPBACK):
            log.info(
                "listening on %s without a token: clients reach the agent by IP address or"
                " localhost; list the DNS names they use in server.allowed_hosts",
                server.host,
            )

    def refusal(self, request: web.Request) -> web.Response | None:
        """The error answer for a request the rules refuse, or None to serve it."""
        host = request.headers.get(hdrs.HOST)
        if host is not None and host not in self._accepted:
            problem = self._host_problem(host)
            if problem is not None:
                return error_response(problem, 403)
            if len(self._accepted) < _ACCEPTED_CACHE:
                self._accepted.add(host)
        if request.method in _READS:
            return None
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and not self._origin_allowed(request, origin, host):
            return error_response(
                f"a web page at Origin {origin!r} may not call this agent: only its own"
                " origin and server.cors_origins may send requests that are not GET",
                403,
            )
        if request.body_exists:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else ""
            wanted = BODY_TYPES.get((request.method, route))
            if wanted is not None and request.content_type != wanted:
                given = request.headers.get(hdrs.CONTENT_TYPE, "none")
                return error_response(
                    f"{request.method} {route} takes Content-Type: {wanted}, not {given}", 415
                )
        return None

    def _host_problem(self, host: str) -> str | None:
        parsed = split_host(host)
        if parsed is None:
            return f"malformed Host header {host!r}"
        name = parsed[0]
        if self._any_host or name in self._names or _is_ip_literal(name):
            return None
        return (
            f"Host {name!r} is not a name of this agent (a DNS rebinding page would use"
            " one): call it by IP address or localhost, or add the name to"
            " server.allowed_hosts"
        )

    def _origin_allowed(self, request: web.Request, origin: str, host: str | None) -> bool:
        if self._cors_any or origin in self._cors:
            return True
        if host is None:
            return False
        try:
            url = URL(origin)
        except ValueError:
            return False
        own = split_host(host)
        if own is None or url.host is None or not url.scheme:  # e.g. "null"
            return False
        scheme = request.scheme
        own_port = own[1] if own[1] is not None else _DEFAULT_PORTS.get(scheme)
        origin_host = url.host.lower().strip("[]").rstrip(".")
        return url.scheme == scheme and origin_host == own[0] and url.port == own_port


def middleware(guard: RequestGuard, connections: ConnectionGuard) -> Middleware:
    """The rules above, then the connection bookkeeping, around every handler."""

    @web.middleware
    async def request_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = guard.refusal(request)
        if refusal is not None:
            return refusal
        conn = connections.connection(request) if connections.open_connections else None
        if conn is None:  # not served through a GuardedSite (some tests, the demo)
            return await handler(request)
        if conn.health_only and request.path not in HEALTH_PATHS:
            response = error_response(
                "too many connections: this one answers only /v2/health/*; try again",
                503,
                {"Retry-After": "1"},
            )
            response.force_close()
            return response
        conn.begin(request)
        try:
            return await handler(request)
        finally:
            conn.end()

    return request_guard

"""Console routes that are not one product area's: sign-in, sign-out, the overview,
the audit log, the live stream, static files, and ``/`` → ``/ui/``.

Permissions are the API's (``requires``): a page needs ``read``; every action a page
offers is a call to the JSON API (``static/console.js`` sends it with the session's
CSRF token), so the API's role checks, errors and audit apply unchanged. Templates
hide the buttons a role may not use; the server refuses them anyway.
"""

from __future__ import annotations

import logging
import mimetypes
from urllib.parse import urlsplit

from aiohttp import web

from edgefleet.core.errors import NotFound
from edgefleet.core.http import json_response
from edgefleet.fleet.api import OPEN, PRINCIPAL, READ, VIA, _api, _query_int, requires
from edgefleet.fleet.audit import AuditEntry
from edgefleet.fleet.console import live
from edgefleet.fleet.console.overview import read_overview
from edgefleet.fleet.console.render import STATIC, live_page, page
from edgefleet.fleet.console.sessions import COOKIE

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

# The files under static/ (vendor/ included), read once: nothing else is ever served.
_STATIC_FILES = {
    p.relative_to(STATIC).as_posix(): p
    for p in STATIC.rglob("*")
    if p.is_file() and not p.name.endswith((".md", ".LICENSE"))
}


@routes.get("/")
@requires(OPEN)
async def root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


@routes.get("/ui")
@requires(OPEN)
async def ui_no_slash(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


@routes.get("/ui/static/{path:.+}")
@requires(OPEN)
async def static(request: web.Request) -> web.StreamResponse:
    path = _STATIC_FILES.get(request.match_info["path"])
    if path is None:
        raise NotFound("no such console file")
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return web.FileResponse(
        path,
        headers={
            "Content-Type": ctype,
            "Cache-Control": "public, max-age=3600",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _safe_next(raw: str | None) -> str:
    """Only a path inside the console: never another site (an open redirect)."""
    if not raw:
        return "/ui/"
    parts = urlsplit(raw)
    if parts.scheme or parts.netloc or not parts.path.startswith("/ui/") or "\\" in raw:
        return "/ui/"
    return raw


def _same_origin(request: web.Request) -> bool:
    """A sign-in form posted from another site is refused (login CSRF)."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.host


@routes.get("/ui/login")
@requires(OPEN)
async def login_form(request: web.Request) -> web.Response:
    return page(request, "login.html", next=_safe_next(request.query.get("next")), error="")


@routes.post("/ui/login")
@requires(OPEN)
async def login(request: web.Request) -> web.StreamResponse:
    api = _api(request)
    form = await request.post()
    token = str(form.get("token", "")).strip()
    next_url = _safe_next(str(form.get("next", "")) or None)
    remote = request.remote or ""
    if not _same_origin(request):
        return page(
            request,
            "login.html",
            status=403,
            next=next_url,
            error="sign-in refused: the form was posted from another site",
        )
    principal = api.auth.bearer(f"Bearer {token}") if token else None
    if principal is None or api.sessions is None:
        if api.audit is not None:
            await api.audit.record(
                AuditEntry("?", "", "console", "login_failed", "", 401, remote, "wrong token")
            )
        return page(request, "login.html", status=401, next=next_url, error="Wrong token.")
    raw, _ = await api.sessions.create(principal.name, principal.role, remote)
    if api.audit is not None:
        await api.audit.record(
            AuditEntry(principal.name, principal.role, "console", "login", "", 303, remote)
        )
    response = web.HTTPSeeOther(next_url)
    response.set_cookie(
        COOKIE,
        raw,
        max_age=int(api.sessions.ttl_s),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,  # over HTTPS the cookie never travels in clear
    )
    raise response


@routes.post("/ui/logout")
@requires(READ)
async def logout(request: web.Request) -> web.StreamResponse:
    # The auth middleware has checked the CSRF token (header or form field).
    api = _api(request)
    raw = request.cookies.get(COOKIE)
    if raw and api.sessions is not None:
        await api.sessions.end(raw)
    principal = request[PRINCIPAL]
    if api.audit is not None and request.get(VIA) == "session":
        await api.audit.record(
            AuditEntry(
                principal.name, principal.role, "console", "logout", "", 303, request.remote or ""
            )
        )
    response = web.HTTPSeeOther("/ui/login")
    response.del_cookie(COOKIE, path="/")
    raise response


@routes.get("/ui/")
@requires(READ)
async def overview(request: web.Request) -> web.Response:
    api = _api(request)
    data = await api.registry.db.read(read_overview)
    return live_page(request, "overview", active="overview", title="Overview", o=data)


@routes.get("/ui/audit")
@requires(READ)
async def audit_page(request: web.Request) -> web.Response:
    api = _api(request)
    before_raw = request.query.get("before")
    before = int(before_raw) if before_raw and before_raw.isdigit() else None
    actor = request.query.get("actor") or None
    rows = await api.audit.list(limit=100, before=before, actor=actor) if api.audit else []
    return live_page(
        request, "audit", active="audit", title="Audit log", rows=rows, actor=actor or ""
    )


@routes.get("/v1/audit")
@requires(READ)
async def audit_json(request: web.Request) -> web.Response:
    """The audit log as JSON for scripts (newest first; ``before`` an id to page back;
    ``limit`` 1..1000; ``actor`` one token's name). A bad number is a 400."""
    api = _api(request)
    limit = _query_int(request, "limit", 100, 1, 1000)
    before = _query_int(request, "before", 0, 1, 2**63 - 1) if "before" in request.query else None
    actor = request.query.get("actor") or None
    rows = await api.audit.list(limit=limit, before=before, actor=actor) if api.audit else []
    return json_response({"entries": rows})


@routes.get("/ui/events")
@requires(READ)
async def events(request: web.Request) -> web.StreamResponse:
    return await live.stream(request)


__all__ = ["routes"]

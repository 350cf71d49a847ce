"""The fleet's HTTP API on 8480 (docs/fleet.md, "HTTP API"): aiohttp routes, auth, errors.

- Every failure leaves as ``{"error": "..."}`` with a precise status (the agent's
  style, agent/server/app.py): 400 bad input or bundle, 401 no or wrong credentials,
  403 not allowed, 404 unknown, 409 conflict, 413 too large, 416 bad range, 503 the
  MQTT side is not running.
- Management routes need ``Authorization: Bearer <token>``, compared in constant
  time and never logged. Each route names the permission it needs and each token has
  a role (``ROLE_PERMISSIONS``): ``read`` for dashboards (every GET), ``operator``
  (also uploads, labels, groups, assignments, rollouts, commands, bundle downloads),
  ``admin`` (also enrolment tokens and revocation). 401 for a missing or unknown
  token, 403 for a known one whose role lacks the permission.
- ``GET /v1/health`` and ``POST /v1/enrol`` (the token is the credential) are open.
  Bundle downloads also take a device's HTTP Basic credentials.
- Assignments, rollouts, commands and telemetry go through the MQTT side's
  ``FleetBus`` (fleet/bus.py); handlers only validate and translate.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from edgefleet.core import __version__
from edgefleet.core.errors import BadRequest, EdgeError, NotFound
from edgefleet.core.http import error_middleware, json_response, read_json_object
from edgefleet.core.mqtt.errors import LinkClosed, PublishTimeout
from edgefleet.fleet import gates
from edgefleet.fleet.audit import SAFE_METHODS, Audit, AuditEntry
from edgefleet.fleet.bundle_registry import BundleFile, Registry
from edgefleet.fleet.console.sessions import COOKIE as SESSION_COOKIE
from edgefleet.fleet.console.sessions import CSRF_FIELD, CSRF_HEADER, Session, Sessions
from edgefleet.fleet.desired import resolve_version_in
from edgefleet.fleet.devices import Devices, Unauthorized

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JSON_BODY_LIMIT = 1024 * 1024  # every JSON request is small; bundle uploads stream
_UPLOAD_CHUNK = 256 * 1024
_SEND_CHUNK = 256 * 1024

# --------------------------------------------------------------------------- auth

READ, WRITE, DEVICES, DOWNLOAD = "read", "write", "devices", "download"
# Devices only (HTTP Basic device credentials), no role has it: hard-example uploads.
DEVICE_UPLOAD = "device_upload"
# Who may do what (issue 6). `read`: look (dashboards, monitoring). `operator`: change
# what runs where (uploads are safe to give it: the registry accepts only bundles
# signed by trusted keys, and the signing key is what really decides what may run).
# `admin`: who is in the fleet (enrolment tokens, revocation). Bundle downloads are not
# for `read`: a dashboard token must not be a way to copy the models.
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "read": frozenset({READ}),
    "operator": frozenset({READ, WRITE, DOWNLOAD}),
    "admin": frozenset({READ, WRITE, DEVICES, DOWNLOAD}),
}
OPEN = "open"
_PERMISSION = "edgefleet_permission"


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    device_id: str | None = None  # set for a device (Basic auth on downloads)

    def may(self, permission: str) -> bool:
        return permission in ROLE_PERMISSIONS.get(self.role, frozenset())


class Authenticator:
    """Bearer tokens → principals (a name and a role each)."""

    def __init__(self, tokens: dict[str, Principal]) -> None:
        if not tokens:
            raise ValueError("the fleet API needs at least one token")
        for principal in tokens.values():
            if principal.role not in ROLE_PERMISSIONS:
                raise ValueError(f"unknown role {principal.role!r} for token {principal.name!r}")
        self._tokens = [(t.encode(), p) for t, p in tokens.items()]

    def principals(self) -> set[tuple[str, str]]:
        """Every (name, role) a token stands for (console sessions are checked against it)."""
        return {(p.name, p.role) for _, p in self._tokens}

    @classmethod
    def single_admin(cls, token: str) -> Authenticator:
        return cls({token: Principal("admin", "admin")})

    @classmethod
    def with_roles(cls, admin_token: str, named: list[tuple[str, str, str]]) -> Authenticator:
        """The admin token plus ``(name, role, token)`` entries; tokens must differ
        (one token with two roles would make the role depend on list order)."""
        tokens = {admin_token: Principal("admin", "admin")}
        for name, role, token in named:
            if token in tokens:
                raise ValueError(f"token {name!r} is the same as another token")
            tokens[token] = Principal(name, role)
        return cls(tokens)

    def bearer(self, header: str) -> Principal | None:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        raw = given.strip().encode()
        found: Principal | None = None
        # Every token is compared (constant-time each), so the time taken says nothing
        # about which one, or how much of one, matched.
        for token, principal in self._tokens:
            if hmac.compare_digest(raw, token):
                found = principal
        return found


def requires(permission: str) -> Callable[[Handler], Handler]:
    """Mark a handler with the permission it needs (``OPEN``: none)."""

    def mark(handler: Handler) -> Handler:
        setattr(handler, _PERMISSION, permission)
        return handler

    return mark


def _basic(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        user, sep, password = decoded.partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


# ------------------------------------------------------------------------ context


@dataclass
class FleetApi:
    registry: Registry
    devices: Devices
    auth: Authenticator
    bus: Any | None = None  # fleet.bus.FleetBus; None: the MQTT side is not running
    max_failure_share: float = 0.2
    hard_examples: Any | None = None  # fleet.hard_examples.HardExamples (issue 11)
    sessions: Sessions | None = None  # console sign-ins (issue 12); None: cookies ignored
    audit: Audit | None = None  # the audit log (issue 12); None: nothing written
    live_interval_s: float = 0.5  # console change stamps' period (fleet/console/live.py)

    def need_bus(self) -> Any:
        if self.bus is None:
            raise ServiceUnavailable("the fleet's MQTT side is not running")
        return self.bus


class ServiceUnavailable(EdgeError):
    status = 503


class Forbidden(EdgeError):
    status = 403


class RangeNotSatisfiable(EdgeError):
    status = 416

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size

    def headers(self) -> dict[str, str] | None:
        return {"Content-Range": f"bytes */{self.size}"}


API = web.AppKey("fleet_api", FleetApi)
PRINCIPAL = web.RequestKey("principal", Principal)  # who is calling, for handlers and audit
VIA = web.RequestKey("via", str)  # token | device | session: how the caller proved it
SESSION = web.RequestKey("session", Session)  # a console session, when that is how


def _api(request: web.Request) -> FleetApi:
    return request.app[API]


# -------------------------------------------------------------------- middlewares


def _auth_challenge(request: web.Request, exc: EdgeError) -> dict[str, str] | None:
    """A 401 says which credentials would do: device Basic auth on bundle downloads."""
    if exc.status != 401:
        return None
    if request.path.startswith("/v1/bundles/"):
        return {"WWW-Authenticate": 'Basic realm="edgefleet", charset="UTF-8"'}
    return {"WWW-Authenticate": 'Bearer realm="edgefleet"'}


async def _principal(request: web.Request, api: FleetApi, permission: str) -> Principal | None:
    """Who is calling: a bearer token, a device's Basic credentials (downloads and
    hard-example uploads only), or a console session cookie (with its CSRF token on
    anything but a read). None: nobody known."""
    header = request.headers.get("Authorization", "")
    principal = api.auth.bearer(header)
    if principal is not None:
        request[VIA] = "token"
        return principal
    basic_ok = permission in (DOWNLOAD, DEVICE_UPLOAD)
    if basic_ok and (creds := _basic(header)) is not None:
        if await api.devices.check_secret(*creds):
            request[VIA] = "device"
            return Principal(creds[0], "device", device_id=creds[0])
        raise Unauthorized("wrong device id or secret")
    raw = request.cookies.get(SESSION_COOKIE)
    if header or raw is None or api.sessions is None:
        return None
    session = await api.sessions.lookup(raw)
    if session is None:
        return None
    principal = Principal(session.name, session.role)
    request[PRINCIPAL] = principal  # set first: a refused CSRF token is audited too
    request[VIA] = "session"
    if request.method not in SAFE_METHODS:
        offered = request.headers.get(CSRF_HEADER)
        if offered is None and request.content_type == "application/x-www-form-urlencoded":
            offered = str((await request.post()).get(CSRF_FIELD, "")) or None
        if not session.csrf_ok(offered):
            raise Forbidden("the console's CSRF token is missing or wrong (reload the page)")
    request[SESSION] = session
    return principal


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route_handler = request.match_info.handler
    # Unknown paths need credentials too: an anonymous caller learns nothing of the API.
    permission = getattr(route_handler, _PERMISSION, READ)
    if permission == OPEN:
        return await handler(request)
    api = _api(request)
    principal = await _principal(request, api, permission)
    if principal is None:
        if request.path.startswith("/ui/") and request.method == "GET":
            # A console page without a session: to the sign-in form, then back here.
            raise web.HTTPSeeOther(f"/ui/login?{urlencode({'next': request.path_qs})}")
        if permission == DOWNLOAD:
            raise Unauthorized("a bearer token or the device's Basic credentials are required")
        if permission == DEVICE_UPLOAD:
            raise Unauthorized("the device's Basic credentials are required")
        raise Unauthorized("missing or wrong bearer token")
    request[PRINCIPAL] = principal
    if principal.device_id is None and not principal.may(permission):
        raise Forbidden(f"{principal.name} ({principal.role}) may not {permission}")
    return await handler(request)


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Writes every state-changing request by a token or a session to the audit log,
    with the status it got (refusals included). Outside the auth middleware, so a 403
    for a known caller is logged; inside the error middleware, so errors have a status."""
    if request.method in SAFE_METHODS:
        return await handler(request)
    status, detail = 500, ""
    try:
        response = await handler(request)
        status = response.status
        return response
    except EdgeError as exc:
        status, detail = exc.status, exc.message
        raise
    except web.HTTPException as exc:
        status, detail = exc.status, exc.reason
        raise
    finally:
        principal = request.get(PRINCIPAL)
        api = _api(request)
        if principal is not None and principal.device_id is None and api.audit is not None:
            route = request.match_info.route.resource
            canonical = route.canonical if route is not None else request.path
            target = ",".join(f"{k}={v}" for k, v in request.match_info.items())
            await api.audit.record(
                AuditEntry(
                    actor=principal.name,
                    role=principal.role,
                    via=request.get(VIA, "token"),
                    action=f"{request.method} {canonical}",
                    target=target,
                    status=status,
                    remote=request.remote or "",
                    detail=detail,
                )
            )


# ------------------------------------------------------------------------ helpers


def _str_field(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{key} must be a non-empty string")
    return value


async def _bus_call(call: Callable[[], Any]) -> Any:
    """Run a FleetBus call. Its own errors (EdgeError: 400/404/409) pass as they are;
    any other LookupError is a 404 and ValueError a 400."""
    try:
        result = call()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        return result
    except EdgeError:
        raise
    except LookupError as exc:
        raise NotFound(str(exc.args[0]) if exc.args else "not found") from exc
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def _query_int(request: web.Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{key} must be an integer") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{key} must lie in {lo}..{hi}")
    return value


# ------------------------------------------------------------------------- routes

routes = web.RouteTableDef()


@routes.get("/v1/health")
@requires(OPEN)
async def health(request: web.Request) -> web.Response:
    bus = _api(request).bus
    doc: dict[str, Any] = {"status": "ok", "version": __version__}
    connected = getattr(bus, "connected", None) if bus is not None else None
    doc["mqtt"] = "absent" if bus is None else ("connected" if connected else "disconnected")
    return json_response(doc)


# models


@routes.post("/v1/models")
@requires(WRITE)
async def upload_model(request: web.Request) -> web.Response:
    record, created = await _api(request).registry.upload(
        request.content.iter_chunked(_UPLOAD_CHUNK), request.content_length
    )
    return json_response(record, 201 if created else 200)


@routes.get("/v1/models")
@requires(READ)
async def list_models(request: web.Request) -> web.Response:
    return json_response({"models": await _api(request).registry.list_models()})


@routes.get("/v1/models/{name}")
@requires(READ)
async def get_model(request: web.Request) -> web.Response:
    return json_response(await _api(request).registry.get_model(request.match_info["name"]))


@routes.put("/v1/models/{name}/labels/{label}")
@requires(WRITE)
async def set_label(request: web.Request) -> web.Response:
    api = _api(request)
    doc = await read_json_object(request)
    result = await api.registry.set_label(
        request.match_info["name"], request.match_info["label"], _str_field(doc, "version")
    )
    bus = api.bus
    if bus is not None:
        # Labels travel in the desired documents of devices that run this model.
        await _bus_call(lambda: bus.desired.refresh())
    return json_response(result)


@routes.delete("/v1/models/{name}/labels/{label}")
@requires(WRITE)
async def delete_label(request: web.Request) -> web.Response:
    """Remove a label (404 unknown); the devices' desired documents lose it."""
    api = _api(request)
    name, label = request.match_info["name"], request.match_info["label"]
    result = await api.registry.delete_label(name, label)
    bus = api.bus
    if bus is not None:
        await _bus_call(lambda: bus.desired.refresh())
    return json_response(result)


@routes.delete("/v1/models/{name}/versions/{version}")
@requires(WRITE)
async def delete_version(request: web.Request) -> web.Response:
    """Remove a version and its bundle file; 409 naming what still uses it (devices
    running or reporting it, desired states, assignments, rollouts, labels), 404
    unknown (fleet/bundle_registry.py ``Registry.delete_version``)."""
    name, version = request.match_info["name"], request.match_info["version"]
    return json_response(await _api(request).registry.delete_version(name, version))


@routes.delete("/v1/models/{name}")
@requires(WRITE)
async def delete_model(request: web.Request) -> web.Response:
    """Remove every version of a model, its labels and files; the same 409 rule."""
    return json_response(await _api(request).registry.delete_model(request.match_info["name"]))


# bundles


# A byte position has at most this many digits: 10^18 bytes is beyond any bundle, and
# int() of an unbounded digit string is CPU time an anonymous caller should not get
# (Python refuses over 4300 digits with a ValueError: that was a 500).
MAX_RANGE_DIGITS = 18
_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)", re.ASCII)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(first, last)`` (inclusive) of a single ``bytes=`` range, or None for "all".

    A multi-range header, another unit or an invalid (``5-1``) range is ignored
    (RFC 9110 §14.2 allows serving the whole file). A ``bytes=`` range that is not
    digits-dash-digits, or has a position of more than ``MAX_RANGE_DIGITS`` digits, is
    a ``BadRequest`` (400); one that cannot be satisfied raises ``RangeNotSatisfiable``.
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    m = _RANGE_SPEC.fullmatch(spec.strip())
    if m is None or not (m.group(1) or m.group(2)):
        raise BadRequest(f"Range: {header[:64]!r} is not bytes=FIRST-LAST")
    first_s, last_s = m.groups()
    if len(first_s) > MAX_RANGE_DIGITS or len(last_s) > MAX_RANGE_DIGITS:
        raise BadRequest(f"Range: a byte position has more than {MAX_RANGE_DIGITS} digits")
    if not first_s:  # suffix: the last N bytes
        n = int(last_s)
        if n == 0:
            raise RangeNotSatisfiable("an empty suffix range selects nothing", size)
        return (max(0, size - n), size - 1) if size else None
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None  # invalid: ignored
    if first >= size:
        raise RangeNotSatisfiable(f"range starts at {first}, the bundle has {size} bytes", size)
    return first, min(last, size - 1)


@routes.get("/v1/bundles/{name}/{version}")
@requires(DOWNLOAD)
async def download_bundle(request: web.Request) -> web.StreamResponse:
    """A bundle for an operator token, or for a device whose desired state names it
    (now or before: ``Devices.may_download``); 403 for any other device."""
    api = _api(request)
    name, version = request.match_info["name"], request.match_info["version"]
    bundle = await api.registry.bundle_file(name, version)  # 404 first: nothing to hide
    principal = request[PRINCIPAL]
    if principal.device_id is not None and not await api.devices.may_download(
        principal.device_id, name, version
    ):
        raise Forbidden(f"{name}:{version} is not assigned to device {principal.device_id}")
    return await send_bundle(request, bundle)


async def send_bundle(request: web.Request, bundle: BundleFile) -> web.StreamResponse:
    """The bundle file with ``Range`` (resume), ``ETag`` = sha256 and conditional GETs.

    Not aiohttp's FileResponse: it derives its ETag from mtime and size, and a device
    resuming a download must be able to say "the bytes whose sha256 is X" (If-Range)
    and be sure it is not stitching two different files together.
    """
    etag = f'"{bundle.sha256}"'
    size = bundle.size
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        # A version's bytes never change (the registry refuses that with a 409).
        "Cache-Control": "private, max-age=31536000, immutable",
        "Content-Disposition": f'attachment; filename="{bundle.path.parent.name}-'
        f'{bundle.path.stem}.bundle"',
    }
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and (
        if_none_match.strip() == "*"
        or etag in [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    ):
        return web.Response(status=304, headers={"ETag": etag})
    rng: tuple[int, int] | None = None
    range_header = request.headers.get("Range")
    if range_header is not None:
        if_range = request.headers.get("If-Range")
        # If-Range with another validator: the device holds other bytes; send them all.
        if if_range is None or if_range.strip() == etag:
            rng = parse_range(range_header, size)
    first, last = rng if rng is not None else (0, size - 1)
    length = last - first + 1 if size else 0
    response = web.StreamResponse(status=206 if rng is not None else 200, headers=headers)
    response.content_length = length
    if rng is not None:
        response.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    loop = asyncio.get_running_loop()
    try:
        f = await loop.run_in_executor(None, open, bundle.path, "rb")
    except FileNotFoundError:
        log.error("bundle file %s is missing from the fleet's disk", bundle.path)
        raise EdgeError(
            f"bundle file for {bundle.path.parent.name} is missing on the fleet"
        ) from None
    try:
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        await loop.run_in_executor(None, f.seek, first)
        remaining = length
        while remaining > 0:
            chunk = await loop.run_in_executor(None, f.read, min(_SEND_CHUNK, remaining))
            if not chunk:
                # The file shrank under us: end the response short rather than hang.
                log.error("bundle file %s is shorter than recorded", bundle.path)
                break
            await response.write(chunk)
            remaining -= len(chunk)
        await response.write_eof()
        return response
    finally:
        await loop.run_in_executor(None, f.close)


# devices and enrolment


@routes.post("/v1/enrolment-tokens")
@requires(DEVICES)
async def create_enrolment_token(request: web.Request) -> web.Response:
    doc = await read_json_object(request, optional=True)
    device_id = doc.get("device_id")
    if device_id is not None and not isinstance(device_id, str):
        raise BadRequest("device_id must be a string")
    token = await _api(request).devices.create_token(
        device_id, doc.get("groups", []), doc.get("ttl_s")
    )
    return json_response(token, 201)


@routes.post("/v1/enrol")
@requires(OPEN)
async def enrol(request: web.Request) -> web.Response:
    doc = await read_json_object(request)
    return json_response(await _api(request).devices.enrol(doc.get("token")))


@routes.get("/v1/devices")
@requires(READ)
async def list_devices(request: web.Request) -> web.Response:
    group = request.query.get("group")
    return json_response({"devices": await _api(request).devices.list_devices(group)})


@routes.get("/v1/devices/{id}")
@requires(READ)
async def get_device(request: web.Request) -> web.Response:
    return json_response(await _api(request).devices.get(request.match_info["id"]))


@routes.post("/v1/devices/{id}/revoke")
@requires(DEVICES)
async def revoke_device(request: web.Request) -> web.Response:
    """No more downloads, no broker login (Mosquitto disconnects it), no unused token
    for it. Enrolling the id again (a new token for it) brings it back."""
    api = _api(request)
    result = await api.devices.revoke(request.match_info["id"])
    principal = request.get(PRINCIPAL)
    log.warning(
        "device %s revoked by %s", result["device_id"], principal.name if principal else "?"
    )
    return json_response(result)


@routes.put("/v1/devices/{id}/groups")
@requires(WRITE)
async def set_groups(request: web.Request) -> web.Response:
    doc = await read_json_object(request)
    if "groups" not in doc:
        raise BadRequest("groups is required (a list, [] for none)")
    return json_response(
        await _api(request).devices.set_groups(request.match_info["id"], doc["groups"])
    )


_COMMANDS = {"resync": (), "rollback": ("model",)}


@routes.post("/v1/devices/{id}/commands")
@requires(WRITE)
async def send_command(request: web.Request) -> web.Response:
    api = _api(request)
    device_id = request.match_info["id"]
    doc = await read_json_object(request)
    command = _str_field(doc, "command")
    if command not in _COMMANDS:
        raise BadRequest(f"unknown command {command!r}; known: {sorted(_COMMANDS)}")
    fields: dict[str, Any] = {k: _str_field(doc, k) for k in _COMMANDS[command]}
    device = await api.devices.get(device_id)  # 404 for an unknown device
    bus = api.need_bus()
    if command == "resync":
        # The device's current document goes out again (same revision), and the
        # command names that revision: a device whose processed revision is ahead of
        # it (a desired the fleet never sent) rewinds and applies this one (agent/sync.py).
        fields["revision"] = int(device.get("desired_revision") or 0)
        await _bus_call(lambda: bus.desired.republish([device_id]))
    try:
        command_id = await _bus_call(lambda: bus.send_command(device_id, command, **fields))
    except PublishTimeout as exc:
        raise ServiceUnavailable(
            f"the broker did not confirm the command in time (it may still be delivered): {exc}"
        ) from exc
    except LinkClosed as exc:
        raise ServiceUnavailable("the fleet's MQTT connection is closed") from exc
    return json_response({"id": command_id, "device_id": device_id, "command": command}, 202)


# assignments and rollouts


@routes.post("/v1/assignments")
@requires(WRITE)
async def assign(request: web.Request) -> web.Response:
    api = _api(request)
    doc = await read_json_object(request)
    model, version = _str_field(doc, "model"), _str_field(doc, "version")
    target = doc.get("target")
    if not isinstance(target, dict) or len(target) != 1:
        raise BadRequest('target must be one of {"device": id}, {"group": g}, {"all": true}')
    ((kind, value),) = target.items()
    if kind in ("device", "group"):
        if not isinstance(value, str) or not value:
            raise BadRequest(f"target.{kind} must be a non-empty string")
    elif kind == "all":
        if value is not True:
            raise BadRequest("target.all must be true")
        value = ""
    else:
        raise BadRequest(f"unknown target {kind!r}: use device, group or all")
    unknown = sorted(set(doc) - _ASSIGN_KEYS - _PLAN_KEYS)
    if unknown:
        # A typo ("gate") must not start a rollout without its gates.
        raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}")
    share = doc.get("max_failure_share", api.max_failure_share)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise BadRequest("max_failure_share must be a number in 0..1")
    # Per rollout: how long a wave waits for silent devices (None: for every device).
    timeout = _wave_timeout(doc.get("wave_timeout_s"))
    if timeout is not None and doc.get("waves") is None and "plan" not in doc:
        raise BadRequest("wave_timeout_s applies to a staged rollout: give waves too")
    plan = _plan_of(doc, float(share), timeout)
    bus = api.need_bus()
    if plan is not None:
        if kind == "device":
            raise BadRequest("a rollout plan applies to a group or all devices, not to one device")
        rollout = await _bus_call(
            lambda: bus.rollouts.start(model, version, target_kind=kind, target=value, plan=plan)
        )
        return json_response(_jsonable(rollout), 201)
    if doc.get("waves") is None:
        # A fleet label names the version it points at now (the answer says which).
        version = await bus.db.read(lambda conn: resolve_version_in(conn, model, version))
        assignment_id = await _bus_call(
            lambda: bus.desired.assign(model, version, target_kind=kind, target=value)
        )
        return json_response(
            {"assignment_id": assignment_id, "model": model, "version": version, "target": target},
            201,
        )
    if kind == "device":
        raise BadRequest("waves apply to a group or all devices, not to one device")
    waves = doc["waves"]  # validated by the rollouts (fleet/rollouts.py: parse_waves)
    rollout = await _bus_call(
        lambda: bus.rollouts.start(
            model,
            version,
            target_kind=kind,
            target=value,
            waves=waves,
            max_failure_share=float(share),
            wave_timeout_s=timeout,
        )
    )
    return json_response(_jsonable(rollout), 201)


_ASSIGN_KEYS = frozenset(
    {"model", "version", "target", "waves", "max_failure_share", "wave_timeout_s", "plan"}
)
# Plan fields (fleet/gates.py Plan) that may also be given at the top level. Not
# wave_timeout_s: beside plain waves it keeps the rollout a plain one (no promotion).
_PLAN_KEYS = frozenset(gates.Plan.model_fields) - {"waves", "max_failure_share", "wave_timeout_s"}


def _wave_timeout(value: Any) -> float | None:
    """``wave_timeout_s``: None, or seconds in (0, 7 days]; 400 otherwise."""
    # Imported here, not at the top, to keep fleet.rollouts out of this module's import
    # time (it is only needed on assignments).
    from edgefleet.fleet.rollouts import check_wave_timeout

    return check_wave_timeout(value)


def _plan_of(doc: dict[str, Any], share: float, timeout: float | None) -> gates.Plan | None:
    """The rollout plan of an assignment body: ``plan`` (an object), or plan fields at
    the top level beside ``waves``; None for a plain assignment or a plain waves
    rollout. A top-level ``wave_timeout_s`` goes into the plan (given in both: 400).
    ``BadRequest`` (400) with the first problem: nothing is stored."""
    top = {k: doc[k] for k in _PLAN_KEYS if k in doc}
    if "plan" in doc:
        if top or "waves" in doc:
            raise BadRequest("give the plan either as plan or as top-level fields, not both")
        body = doc["plan"]
        if isinstance(body, dict) and "max_failure_share" not in body:
            body = {**body, "max_failure_share": share}
        if isinstance(body, dict) and timeout is not None:
            if body.get("wave_timeout_s") is not None:
                raise BadRequest("give wave_timeout_s either in plan or at the top level")
            body = {**body, "wave_timeout_s": timeout}
        plan = gates.parse_plan(body)
        _wave_timeout(plan.wave_timeout_s)  # the same bound as at the top level
        return plan
    if not top:
        return None
    if doc.get("waves") is None:
        raise BadRequest("a rollout plan needs waves, e.g. [1, '10%', '100%']")
    extra = {} if timeout is None else {"wave_timeout_s": timeout}
    return gates.parse_plan({**top, **extra, "waves": doc["waves"], "max_failure_share": share})


@routes.get("/v1/assignments")
@requires(READ)
async def list_assignments(request: web.Request) -> web.Response:
    """The assignments that can still decide something (``?model=`` for one model's):
    ``{"assignments": [{assignment_id, model, version, target, rollout_id,
    rollout_state, in_effect, created_at}]}``."""
    bus = _api(request).need_bus()
    model = request.query.get("model") or None
    found = await _bus_call(lambda: bus.desired.list_assignments(model))
    return json_response({"assignments": found})


@routes.delete("/v1/assignments")
@requires(WRITE)
async def unassign(request: web.Request) -> web.Response:
    """Remove a model's assignments to one target: a JSON body ``{"model": m, "target":
    {"device": id} | {"group": g} | {"all": true}}``, or the query ``?model=m&device=id``
    (``group=g``, ``all=true``). Devices fall back to the next more general assignment
    or to none (fleet/desired.py ``DesiredStates.unassign``); 404 nothing to remove,
    409 while a rollout of the model to that target is running, paused or stopped."""
    api = _api(request)
    body = await read_json_object(request, optional=True)
    # A console form's hidden CSRF field may ride along in the query (htmx puts a
    # DELETE's parameters there); the token itself is checked from the header.
    query = {k: v for k, v in request.query.items() if k != CSRF_FIELD}
    if body and query:
        raise BadRequest("name the assignment either in the JSON body or in the query, not both")
    if body:
        unknown = sorted(set(body) - {"model", "target"})
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}")
        model = _str_field(body, "model")
        kind, target = _target_of(body)
    else:
        unknown = sorted(set(query) - {"model", "device", "group", "all"})
        if unknown:
            raise BadRequest(f"unknown query parameter(s) {', '.join(map(repr, unknown))}")
        model = _str_field(query, "model")
        named = [k for k in ("device", "group", "all") if k in query]
        if len(named) != 1:
            raise BadRequest("name one target: device=ID, group=G or all=true")
        kind = named[0]
        if kind == "all" and query["all"] != "true":
            raise BadRequest("all must be true")
        kind, target = _target_of({"target": {kind: True if kind == "all" else query[kind]}})
    bus = api.need_bus()
    result = await _bus_call(lambda: bus.desired.unassign(model, target_kind=kind, target=target))
    return json_response(result)


@routes.get("/v1/rollouts")
@requires(READ)
async def list_rollouts(request: web.Request) -> web.Response:
    bus = _api(request).need_bus()
    return json_response({"rollouts": _jsonable(await _bus_call(lambda: bus.rollouts.list()))})


@routes.get("/v1/rollouts/{id}")
@requires(READ)
async def get_rollout(request: web.Request) -> web.Response:
    bus = _api(request).need_bus()
    rid = request.match_info["id"]
    return json_response(_jsonable(await _bus_call(lambda: bus.rollouts.get(rid))))


def _rollout_action(action: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        bus = _api(request).need_bus()
        rid = request.match_info["id"]
        result = await _bus_call(lambda: getattr(bus.rollouts, action)(rid))
        if result is None:
            result = await _bus_call(lambda: bus.rollouts.get(rid))
        return json_response(_jsonable(result))

    handler.__name__ = f"rollout_{action}"
    return requires(WRITE)(handler)


for _action in ("pause", "resume", "rollback", "advance"):
    routes.post(f"/v1/rollouts/{{id}}/{_action}")(_rollout_action(_action))


# telemetry and events


@routes.get("/v1/telemetry/models")
@requires(READ)
async def telemetry_models(request: web.Request) -> web.Response:
    bus = _api(request).need_bus()
    found = await _bus_call(lambda: bus.telemetry.models())
    return json_response({"models": _jsonable(found)})


@routes.get("/v1/telemetry/devices/{id}")
@requires(READ)
async def telemetry_device(request: web.Request) -> web.Response:
    bus = _api(request).need_bus()
    device_id = request.match_info["id"]
    await _api(request).devices.get(device_id)  # 404 for an unknown device
    found = await _bus_call(lambda: bus.telemetry.device(device_id))
    return json_response({"device_id": device_id, "models": _jsonable(found)})


@routes.get("/v1/events")
@requires(READ)
async def events(request: web.Request) -> web.Response:
    bus = _api(request).need_bus()
    limit = _query_int(request, "limit", 100, 1, 10_000)
    device, model = request.query.get("device"), request.query.get("model")
    found = await _bus_call(lambda: bus.telemetry.events(device=device, model=model, limit=limit))
    return json_response({"events": _jsonable(found)})


# fallback policies (issue 11, part 5: fleet/policies.py)


def _target_of(doc: dict[str, Any]) -> tuple[str, str]:
    """``{"device": id}``, ``{"group": g}`` or ``{"all": true}`` → (kind, target)."""
    target = doc.get("target")
    if not isinstance(target, dict) or len(target) != 1:
        raise BadRequest('target must be one of {"device": id}, {"group": g}, {"all": true}')
    ((kind, value),) = target.items()
    if kind in ("device", "group"):
        if not isinstance(value, str) or not value:
            raise BadRequest(f"target.{kind} must be a non-empty string")
        return kind, value
    if kind == "all":
        if value is not True:
            raise BadRequest("target.all must be true")
        return kind, ""
    raise BadRequest(f"unknown target {kind!r}: use device, group or all")


def _policies(request: web.Request) -> Any:
    from edgefleet.fleet.policies import FallbackPolicies

    return FallbackPolicies(_api(request).need_bus().desired)


@routes.get("/v1/policies")
@requires(READ)
async def list_policies(request: web.Request) -> web.Response:
    """Every fleet fallback policy (``?model=`` for one model's)."""
    found = await _policies(request).list(request.query.get("model"))
    return json_response({"policies": found})


@routes.put("/v1/policies/{model}")
@requires(WRITE)
async def set_policy(request: web.Request) -> web.Response:
    """``{"target": {...}, "fallback": {"mode": ..., "threshold": ...}}``: merged into
    the target's policy (a ``null`` setting is removed), pushed to the devices."""
    doc = await read_json_object(request)
    kind, target = _target_of(doc)
    settings = doc.get("fallback")
    if not isinstance(settings, dict):
        raise BadRequest("fallback must be an object of settings")
    model = request.match_info["model"]
    return json_response(await _policies(request).set(model, kind, target, settings))


@routes.post("/v1/policies/{model}/clear")
@requires(WRITE)
async def clear_policy(request: web.Request) -> web.Response:
    """``{"target": {...}}``: remove that target's policy for the model (404 if none)."""
    kind, target = _target_of(await read_json_object(request))
    model = request.match_info["model"]
    return json_response(await _policies(request).clear(model, kind, target))


# hard examples (issue 11, part 6: fleet/hard_examples.py)

_HE_CHUNK = 64 * 1024


def _hard_examples(request: web.Request) -> Any:
    store = _api(request).hard_examples
    if store is None:
        raise ServiceUnavailable("this fleet keeps no hard examples")
    return store


@routes.put("/v1/hard-examples/{id}")
@requires(DEVICE_UPLOAD)
async def upload_hard_example(request: web.Request) -> web.Response:
    """A device's kept case (body: core.hard_example_wire upload; id: its sha256).
    201 stored, 200 already stored, 400/403/413/507 refused with the reason."""
    store = _hard_examples(request)
    principal = request[PRINCIPAL]
    if principal.device_id is None:
        raise Forbidden("hard examples are uploaded by devices")
    limit = store.max_example_bytes
    if request.content_length is not None and request.content_length > limit:
        from edgefleet.fleet.hard_examples import PayloadTooLarge

        raise PayloadTooLarge(
            f"hard example of {request.content_length} bytes, over the fleet's {limit} byte"
            " limit per example"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_HE_CHUNK):
        size += len(chunk)
        if size > limit:
            from edgefleet.fleet.hard_examples import PayloadTooLarge

            raise PayloadTooLarge(f"hard example over the fleet's {limit} byte limit per example")
        chunks.append(chunk)
    doc = await store.upload(request.match_info["id"], principal.device_id, b"".join(chunks))
    return json_response(doc, 201 if doc["stored"] else 200)


@routes.head("/v1/hard-examples/{id}")
@requires(DEVICE_UPLOAD)
async def has_hard_example(request: web.Request) -> web.Response:
    """200 when this device's example is stored (nothing to send), else 404."""
    from edgefleet.fleet.hard_examples import check_id

    hid = check_id(request.match_info["id"])
    found = await _hard_examples(request).has(hid, request[PRINCIPAL].device_id)
    return web.Response(status=200 if found else 404)


def _query_bool(request: web.Request, key: str) -> bool | None:
    raw = request.query.get(key)
    if raw is None:
        return None
    if raw not in ("true", "false"):
        raise BadRequest(f"{key} must be true or false")
    return raw == "true"


@routes.get("/v1/hard-examples")
@requires(READ)
async def list_hard_examples(request: web.Request) -> web.Response:
    """``?model=&version=&reason=&device=&labelled=true|false&prefix=&limit=``."""
    q = request.query
    found = await _hard_examples(request).list(
        model=q.get("model"),
        version=q.get("version"),
        reason=q.get("reason"),
        device=q.get("device"),
        labelled=_query_bool(request, "labelled"),
        prefix=q.get("prefix"),
        limit=_query_int(request, "limit", 100, 1, 100_000),
    )
    return json_response({"hard_examples": found})


@routes.get("/v1/hard-examples/{id}", allow_head=False)
@requires(READ)
async def get_hard_example(request: web.Request) -> web.Response:
    return json_response(await _hard_examples(request).get(request.match_info["id"]))


@routes.get("/v1/hard-examples/{id}/image")
@requires(READ)
async def hard_example_image(request: web.Request) -> web.Response:
    body, content_type = await _hard_examples(request).image(request.match_info["id"])
    # Device-supplied bytes: the browser must take them for what the type says, never
    # sniff them into HTML (the console shows them in an <img>).
    return web.Response(
        body=body,
        content_type=content_type,
        headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"},
    )


@routes.get("/v1/hard-examples/{id}/tensors")
@requires(READ)
async def hard_example_tensors(request: web.Request) -> web.Response:
    body = await _hard_examples(request).tensors(request.match_info["id"])
    return web.Response(body=body, content_type="application/octet-stream")


@routes.delete("/v1/hard-examples/{id}")
@requires(WRITE)
async def delete_hard_example(request: web.Request) -> web.Response:
    """Remove one example (frees its share of the storage budget)."""
    return json_response(await _hard_examples(request).delete(request.match_info["id"]))


@routes.put("/v1/hard-examples/{id}/label")
@requires(WRITE)
async def label_hard_example(request: web.Request) -> web.Response:
    """``{"label": "7"}`` (one of the model version's labels) or ``{"label": null}``."""
    doc = await read_json_object(request)
    if "label" not in doc:
        raise BadRequest("give label (a string, or null to clear it)")
    store = _hard_examples(request)
    who = request[PRINCIPAL].name
    return json_response(await store.label(request.match_info["id"], doc["label"], who))


def _jsonable(value: Any) -> Any:
    """Dataclasses and pydantic models from the MQTT side, as plain JSON values."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def create_app(api: FleetApi) -> web.Application:
    # Imported here: these modules import this one (routes, ``requires``, ``API``).
    from edgefleet.fleet import console, metrics, timeseries

    app = web.Application(
        client_max_size=JSON_BODY_LIMIT,
        middlewares=[
            metrics.middleware,  # outermost: counts every answer, errors included
            error_middleware(lambda _: JSON_BODY_LIMIT, _auth_challenge),
            audit_middleware,
            auth_middleware,
        ],
    )
    app[API] = api
    app.add_routes(routes)
    app.add_routes(metrics.routes)
    app.add_routes(timeseries.routes)
    console.setup(app)
    return app

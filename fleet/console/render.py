"""Page rendering for the console: one Jinja2 environment, autoescaped, strict.

- Autoescape is on for every template: a device id, group or model name carrying
  ``<script>`` prints as text. Values handed to scripts go through ``|tojson`` into a
  ``<script type="application/json">`` block or a ``data-`` attribute; pages carry no
  inline script at all, so the Content-Security-Policy can forbid inline scripts.
- ``StrictUndefined``: a misspelt variable is an error in tests, not an empty cell.
- Rendering runs on the event loop: templates are small and hold no I/O (handlers
  read the database first, through ``FleetDB.read`` on its reader threads).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from edgefleet.core import __version__
from edgefleet.fleet.api import DEVICES, PRINCIPAL, ROLE_PERMISSIONS, SESSION, WRITE

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"

# No inline script anywhere; styles may be inline (uPlot sizes its canvas that way).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline';"
        " img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none';"
        " form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

NAV = [
    ("overview", "/ui/", "Overview"),
    ("devices", "/ui/devices", "Devices"),
    ("models", "/ui/models", "Models"),
    ("rollouts", "/ui/rollouts", "Rollouts"),
    ("hard_examples", "/ui/hard-examples", "Hard examples"),
    ("events", "/ui/timeline", "Events"),
    ("policies", "/ui/policies", "Policies"),
    ("audit", "/ui/audit", "Audit log"),
]


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = max(0.0, time.time() - ts)
    if s < 60:
        return f"{int(s)} s ago"
    if s < 3600:
        return f"{int(s // 60)} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} d ago"


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pct(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{100 * x:.{digits}f} %"


def _num(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, int) or float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:,.{digits}f}"


def _size(n: int | None) -> str:
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(ago=_ago, when=_when, pct=_pct, num=_num, size=_size)
ENV.globals.update(version=__version__, nav=NAV)


def context(request: web.Request) -> dict[str, Any]:
    """What every page gets: who is signed in, what they may do, their CSRF token."""
    principal = request.get(PRINCIPAL)
    session = request.get(SESSION)
    role = principal.role if principal is not None else ""
    perms = ROLE_PERMISSIONS.get(role, frozenset())
    return {
        "user": principal.name if principal is not None else "",
        "role": role,
        "can_write": WRITE in perms,
        "can_admin": DEVICES in perms,
        "csrf": session.csrf if session is not None else "",
    }


def render_text(template: str, **ctx: Any) -> str:
    return ENV.get_template(template).render(**ctx)


def is_fragment(request: web.Request) -> bool:
    """htmx is refreshing a live part of a page (``HX-Request``), not loading it."""
    return bool(request.headers.get("HX-Request"))


def live_page(request: web.Request, view: str, /, **ctx: Any) -> web.Response:
    """``<view>.html``, or ``<view>_body.html`` alone when htmx refreshes the page's live
    part (the full template includes the body one)."""
    return page(request, f"{view}_body.html" if is_fragment(request) else f"{view}.html", **ctx)


def page(request: web.Request, template: str, *, status: int = 200, **ctx: Any) -> web.Response:
    """A whole page or an htmx fragment (the template decides), with the console's
    security headers."""
    body = render_text(template, **context(request), request_path=request.path, **ctx)
    return web.Response(
        text=body, status=status, content_type="text/html", headers=SECURITY_HEADERS
    )

"""A small real HTTP server for bundle downloads in tests: Basic auth, ``Range``, faults.

It serves ``GET /bundles/{name}`` from memory like the fleet's ``/v1/bundles/...``
(``Accept-Ranges: bytes``, ``ETag`` = sha256, ``206`` + ``Content-Range`` for
``Range: bytes=N-``) and logs every request. Faults are queued per file and consumed
one per request, so a test says exactly what the n-th request gets:

- ``Fault(status=503)``: answer that status;
- ``Fault(cut_after=N)``: send N body bytes, then close the connection;
- ``Fault(hold_after=N)``: send N body bytes, then wait for ``release`` (a download
  deterministically stuck in the middle, e.g. to SIGKILL the agent then), then send
  the rest, or with ``then_cut=True`` close the connection instead (a cut after the
  client has surely read those bytes: the test waits for them on the client's disk);
- ``Fault(ignore_range=True)``: answer 200 with the whole file, like a server
  without range support.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import ssl
from dataclasses import dataclass, field

from aiohttp import web

_RANGE = re.compile(r"^bytes=(\d+)-$")


@dataclass
class Fault:
    status: int | None = None
    cut_after: int | None = None
    hold_after: int | None = None
    then_cut: bool = False
    ignore_range: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    holding: asyncio.Event = field(default_factory=asyncio.Event)  # set once N bytes are out


@dataclass
class Request:
    name: str
    range: str | None
    authorized: bool
    status: int = 0


class BundleServer:
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[Fault]] = {}
        self.requests: list[Request] = []
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.scheme = "http"

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> BundleServer:
        self.scheme = "https" if ssl_context is not None else "http"
        app = web.Application()
        app.router.add_get("/bundles/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        for faults in self.faults.values():
            for f in faults:
                f.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return self.url(name)

    def url(self, name: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/bundles/{name}"

    def fault(self, name: str, fault: Fault) -> Fault:
        self.faults.setdefault(name, []).append(fault)
        return fault

    def requests_for(self, name: str) -> list[Request]:
        return [r for r in self.requests if r.name == name]

    def _authorized(self, request: web.Request) -> bool:
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return request.headers.get("Authorization") == f"Basic {expected}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        log = Request(name, request.headers.get("Range"), self._authorized(request))
        self.requests.append(log)
        if not log.authorized:
            log.status = 401
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="fleet"'})
        data = self.files.get(name)
        if data is None:
            log.status = 404
            return web.Response(status=404, text="no such bundle")
        queue = self.faults.get(name)
        fault = queue.pop(0) if queue else Fault()
        if fault.status is not None:
            log.status = fault.status
            return web.Response(status=fault.status, text="fault")
        start = 0
        m = _RANGE.match(log.range or "")
        if m and not fault.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                log.status = 416
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        resp = web.StreamResponse(status=206 if start else 200)
        resp.content_type = "application/octet-stream"
        resp.content_length = len(body)
        resp.headers["Accept-Ranges"] = "bytes"
        resp.headers["ETag"] = f'"{hashlib.sha256(data).hexdigest()}"'
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        log.status = resp.status
        await resp.prepare(request)
        if fault.cut_after is not None:
            await resp.write(body[: fault.cut_after])
            # close() (not abort()) flushes what was written, then the peer sees EOF
            # before Content-Length bytes: a connection cut mid-body.
            return _cut(request, resp)
        if fault.hold_after is not None:
            await resp.write(body[: fault.hold_after])
            fault.holding.set()
            await fault.release.wait()
            if fault.then_cut:
                return _cut(request, resp)
            body = body[fault.hold_after :]
            if request.transport is None or request.transport.is_closing():
                return resp  # the client went away meanwhile (e.g. it was SIGKILLed)
        await resp.write(body)
        await resp.write_eof()
        return resp


def _cut(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Close the connection mid-body (what was written is flushed first: close, not abort)."""
    assert request.transport is not None
    request.transport.close()
    return resp

"""Connection limits for the agent's HTTP server: slow clients cannot lock anyone out.

aiohttp puts no timeout on reading a request's head or body and no limit on open
connections: a client that opens connections and sends half a request holds a file
descriptor each, until the process has none left (1024 under systemd's default) and
nobody, not even a health probe, gets in. :class:`GuardedSite` serves an
``AppRunner`` like aiohttp's ``TCPSite``, with every connection watched by the app's
:class:`ConnectionGuard`:

- **Header timeout** (``server.header_timeout_s``): a request's head must arrive within
  it, counted from the connection's start or from the first byte after the previous
  answer; otherwise the client gets a 408 and the connection is closed. (An idle
  keep-alive connection, no byte since its last answer, is aiohttp's keep-alive timeout's.)
- **Body timeout** (``server.body_timeout_s``): while a handler waits for the body,
  silence from the client longer than this closes the connection. Silence, not total
  time: a slow line still uploads a big bundle. Time the server itself stopped reading
  (a handler not consuming yet) does not count. A client that stops *reading* an answer
  (the server's writes paused that long) is closed the same way.
- **Connection cap** (``server.max_connections``): at the cap, a new connection evicts
  the one that has waited longest on its client (a head, a body, or a keep-alive
  request still to come). When every connection is busy on a complete request,
  :data:`HEALTH_SLOTS` more are accepted that answer only ``/v2/health/*`` (so a
  probe can tell "busy" from "dead"); past those, a connection gets a 503 and is closed.

The process's open-file limit is raised to fit the cap when the hard limit allows (and
the cap lowered, with a warning, when it does not): running out of descriptors is what
locked everyone out. Everything here runs on the event loop: protocol callbacks, the
request hooks called by the app's middleware, and one sweep task per guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from ssl import SSLContext
from typing import cast

import orjson
from aiohttp import web

log = logging.getLogger(__name__)

HEALTH_PATHS = frozenset(("/v2/health/live", "/v2/health/ready"))
HEALTH_SLOTS = 8
# Descriptors the process needs besides client connections: the listening socket, the
# model store and SQLite files, the MQTT link, ONNX Runtime, logging, the event loop.
_OTHER_FILES = 128


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 512
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0


def _raw_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 error answer, for a connection no handler is serving."""
    body = orjson.dumps({"error": message})
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class Connection(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, the guard's bookkeeping around.

    Every callback is forwarded unchanged; the wrapper only notes when bytes came
    (``last_data``), when the current request head started (``head_since``), which
    request a handler is serving (``request``) and since when the server's writes
    are paused (``write_paused_since``). Event-loop only.
    """

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self._now = guard.loop.time  # bound once: data_received runs for every packet
        now = self._now()
        self.last_data = now
        self.head_since: float | None = now  # the first request's head is due from the start
        self.request: web.BaseRequest | None = None
        self.write_paused_since: float | None = None
        self.health_only = False

    # -- asyncio.Protocol, forwarded ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport, hence a cast).
        self.transport = cast(asyncio.Transport, transport)
        self.inner.connection_made(transport)
        self.guard.admit(self)

    def data_received(self, data: bytes) -> None:
        now = self._now()
        self.last_data = now
        if self.request is None and self.head_since is None:
            self.head_since = now
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused_since = self._now()
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.write_paused_since = None
        self.inner.resume_writing()

    # -- request hooks (the app's middleware) ------------------------------------------

    def begin(self, request: web.BaseRequest) -> None:
        """A handler starts serving ``request``: its head is complete."""
        self.request = request
        self.head_since = None

    def end(self) -> None:
        """The handler returned: until the next byte, the connection is idle."""
        self.request = None
        self.head_since = None
        self.last_data = self._now()

    # -- the guard's view --------------------------------------------------------------

    def waiting_on_client(self) -> bool:
        """True while the next move is the client's: a head, or a body being read."""
        return self.request is None or not self.request.content.is_eof()

    def drop(self, answer: bytes | None = None) -> None:
        """Close now; ``answer`` (a raw HTTP response) is sent first if it fits the buffer.

        ``close()`` would wait for buffered data to reach a client that may never read
        it: a connection with unsent bytes is aborted instead.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if answer is not None:
            transport.write(answer)
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


class ConnectionGuard:
    """Timeouts and the connection cap for the connections of one :class:`GuardedSite`.

    Created with the app (``create_app``), so the middleware finds it; it does nothing
    until a site serves through it (a plain ``TCPSite``, as some tests use, bypasses
    it). Event-loop only.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.max_connections = limits.max_connections
        self._open: dict[asyncio.BaseTransport, Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the guard serves no site"
        return self._loop

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def connection(self, request: web.BaseRequest) -> Connection | None:
        """The guarded connection ``request`` came on; None when not served through one."""
        transport = request.transport
        return self._open.get(transport) if transport is not None else None

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """What ``loop.create_server`` calls per connection: aiohttp's protocol, wrapped."""

        def make() -> asyncio.Protocol:
            return Connection(self, server())

        return make

    # -- admission -------------------------------------------------------------------

    def admit(self, conn: Connection) -> None:
        assert conn.transport is not None
        if len(self._open) >= self.max_connections:
            victim = self._longest_waiting()
            if victim is not None:
                log.debug("connection cap %d reached: evicting an idle one", self.max_connections)
                self._remove(victim)
                victim.drop()
            elif len(self._open) >= self.max_connections + HEALTH_SLOTS:
                log.warning("%d connections, all busy: refusing a new one", len(self._open))
                conn.drop(
                    _raw_response(
                        503, "Service Unavailable", "too many connections: try again shortly"
                    )
                )
                return
            else:
                conn.health_only = True
        self._open[conn.transport] = conn

    def forget(self, conn: Connection) -> None:
        if conn.transport is not None:
            self._remove(conn)

    def _remove(self, conn: Connection) -> None:
        assert conn.transport is not None
        if self._open.get(conn.transport) is conn:
            del self._open[conn.transport]

    def _longest_waiting(self) -> Connection | None:
        waiting = (c for c in self._open.values() if c.waiting_on_client())
        return min(waiting, key=lambda c: c.last_data, default=None)

    # -- timeouts ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the timeout sweep (idempotent); the caller's loop becomes the guard's."""
        if self._sweeper is None:
            self._loop = asyncio.get_running_loop()
            self._sweeper = self._loop.create_task(self._sweep(), name="connection-guard")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep(self) -> None:
        limits = self.limits
        # Often enough that a timeout fires within a quarter of itself.
        every = min(1.0, max(0.05, min(limits.header_timeout_s, limits.body_timeout_s) / 4))
        while True:
            await asyncio.sleep(every)
            self.expire(self.loop.time())

    def expire(self, now: float) -> None:
        """Close the connections whose client has been silent past a timeout."""
        limits = self.limits
        for conn in list(self._open.values()):
            transport = conn.transport
            assert transport is not None
            if conn.request is None:
                if conn.head_since is not None and now - conn.head_since > limits.header_timeout_s:
                    self._remove(conn)
                    conn.drop(
                        _raw_response(
                            408,
                            "Request Timeout",
                            f"request head not received within {limits.header_timeout_s:g} s",
                        )
                    )
                    continue
            elif not conn.request.content.is_eof():
                if not transport.is_reading():
                    conn.last_data = now  # the server is not reading: not the client's silence
                elif now - conn.last_data > limits.body_timeout_s:
                    log.info(
                        "%s %s: closed after %g s without body bytes",
                        conn.request.method,
                        conn.request.path,
                        limits.body_timeout_s,
                    )
                    self._remove(conn)
                    conn.drop()
                    continue
            paused = conn.write_paused_since
            if paused is not None and now - paused > limits.body_timeout_s:
                log.info("closed a connection whose client read nothing for %g s", now - paused)
                self._remove(conn)
                conn.drop()


def fit_open_files(wanted_connections: int) -> int:
    """Make room for ``wanted_connections`` in the open-file limit; the count that fits.

    Raises the soft limit up to the hard one when needed (an unprivileged process may);
    when even the hard limit is too low, fewer connections are allowed, with a warning:
    a cap above the limit would fail exactly the way the cap exists to prevent.
    """
    need = wanted_connections + HEALTH_SLOTS + _OTHER_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit to %d: %s", target, exc)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted_connections
    fits = max(1, soft - HEALTH_SLOTS - _OTHER_FILES)
    log.warning(
        "open-file limit %d leaves room for %d connections, not server.max_connections %d:"
        " raise LimitNOFILE",
        soft,
        fits,
        wanted_connections,
    )
    return fits


class GuardedSite(web.BaseSite):
    """aiohttp's ``TCPSite``, with each connection watched by the app's guard.

    ``runner`` must run an app made by ``create_app`` (which holds the guard under
    :data:`CONNECTIONS`).
    """

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        ssl_context: SSLContext | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = runner.app[CONNECTIONS]

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}"

    @property
    def port(self) -> int:
        """The bound port (the requested one before ``start``; useful with port 0)."""
        sockets = getattr(self._server, "sockets", None)  # asyncio's and uvloop's Server
        if sockets:
            return int(sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        guard = self._guard
        guard.max_connections = fit_open_files(guard.limits.max_connections)
        guard.start()
        # A TLS handshake comes before the guard sees the connection: it gets the head's
        # time limit from the loop instead (asyncio's default is 60 s; None without TLS).
        tls = self._ssl_context is not None
        self._server = await asyncio.get_running_loop().create_server(
            guard.protocol_factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
            ssl_handshake_timeout=guard.limits.header_timeout_s if tls else None,
        )

    async def stop(self) -> None:
        await self._guard.stop()
        await super().stop()


CONNECTIONS = web.AppKey("connections", ConnectionGuard)

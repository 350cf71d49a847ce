"""Live console pages: the database's change stamps, pushed as server-sent events.

Why polling the database and not an in-process signal: with several fleet workers
(PostgreSQL, issue "scale-out") the change may be stored by another process; the
database is the one place every worker sees. The stamps are O(1)-ish aggregates
(``max(rowid)``, a sum over the devices table), read every ``interval`` seconds by
*one* task per fleet process however many browsers watch, and only while at least
one does (no task when nobody is looking).

Each browser holds ``GET /ui/events`` open (``text/event-stream``) and gets
``event: change`` with ``{"topics": [...]}`` when a topic's stamp moved;
``static/console.js`` turns that into htmx refreshes of the parts that show it
(``hx-trigger="ef:devices from:body"``). The delay from a stored change to the
browser is at most ``interval`` plus the page's fragment fetch.

Threads: the feed task runs on the event loop; the stamp query on the database's
reader threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from typing import Any

from aiohttp import web

from edgefleet.fleet.db import FleetDB

log = logging.getLogger(__name__)

# topic → one query returning one row; a change of any column is a change of the topic.
STAMPS: dict[str, str] = {
    "devices": "SELECT count(*), total(online), max(status_at), total(reported_revision),"
    " max(revoked_at) FROM devices",
    "telemetry": "SELECT max(rowid) FROM telemetry",
    "events": "SELECT max(rowid) FROM events",
    "rollouts": "SELECT max(updated_at), count(*),"
    " (SELECT max(updated_at) FROM rollout_devices),"
    " (SELECT max(rowid) FROM rollout_decisions) FROM rollouts",
    "models": "SELECT count(*), max(uploaded_at), (SELECT max(updated_at) FROM model_labels),"
    " (SELECT count(*) || ':' || coalesce(max(id), 0) FROM assignments) FROM model_versions",
    # Not count(label): that reads every row (130 ms at 200,000 examples, every
    # interval). A label set, cleared or deleted is always an API call, and every API
    # change writes an audit row once answered: the audit log's newest id stands in.
    "hard_examples": "SELECT max(rowid), (SELECT max(id) FROM audit_log) FROM hard_examples",
    "audit": "SELECT max(id) FROM audit_log",
}
KEEPALIVE_S = 15.0


def read_stamps(conn: sqlite3.Connection) -> dict[str, tuple[Any, ...]]:
    return {topic: tuple(conn.execute(sql).fetchone()) for topic, sql in STAMPS.items()}


class ChangeFeed:
    """Fans the stamps' changes out to subscribers (one queue per open page)."""

    def __init__(self, db: FleetDB, *, interval: float = 0.5) -> None:
        self.db = db
        self.interval = interval
        self._queues: set[asyncio.Queue[list[str] | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def subscribe(self) -> asyncio.Queue[list[str] | None]:
        if self._closed:
            raise RuntimeError("the change feed is closed")
        queue: asyncio.Queue[list[str] | None] = asyncio.Queue(maxsize=8)
        self._queues.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="console-change-feed")
        return queue

    def unsubscribe(self, queue: asyncio.Queue[list[str] | None]) -> None:
        self._queues.discard(queue)

    async def close(self) -> None:
        """Ends every subscriber's stream (a ``None``) and the feed task."""
        self._closed = True
        for queue in list(self._queues):
            self._offer(queue, None)
        self._queues.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @staticmethod
    def _offer(queue: asyncio.Queue[list[str] | None], item: list[str] | None) -> None:
        # A page that does not read (a frozen tab) loses old notices, not the new one:
        # a notice means "refresh", so the newest is all it needs.
        while queue.full():
            queue.get_nowait()
        queue.put_nowait(item)

    async def _run(self) -> None:
        last: dict[str, tuple[Any, ...]] | None = None
        while self._queues:
            try:
                stamps = await self.db.read(read_stamps)
            except Exception:  # a busy or closing database: try again next tick
                log.debug("console change stamps unreadable", exc_info=True)
            else:
                if last is not None:
                    changed = [t for t in STAMPS if stamps[t] != last[t]]
                    if changed:
                        for queue in list(self._queues):
                            self._offer(queue, changed)
                last = stamps
            await asyncio.sleep(self.interval)


FEED = web.AppKey("console_change_feed", ChangeFeed)


async def stream(request: web.Request) -> web.StreamResponse:
    """``GET /ui/events``: the change notices as server-sent events."""
    feed = request.app[FEED]
    queue = feed.subscribe()
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # a proxy in front must not hold the stream back
        }
    )
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        while True:
            try:
                topics = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if topics is None:  # the fleet is stopping
                break
            data = json.dumps({"topics": topics})
            await response.write(f"event: change\ndata: {data}\n\n".encode())
    except (ConnectionResetError, ConnectionError):
        pass  # the page went away
    finally:
        feed.unsubscribe(queue)
    return response

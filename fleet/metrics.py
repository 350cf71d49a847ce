"""The fleet's Prometheus ``GET /metrics`` (issue 12; docs/fleet.md, "Metrics").

Every metric name the fleet exposes is defined here and nowhere else. The parts that
count keep their own plain counters (``IngestStats`` in fleet/ingest.py, ``LinkStats``
of the MQTT connection) and this module reads them at the scrape; the one figure the
ingest cannot hold as a counter, the ingest lag, it hands over through
``Ingest.lag_observer``. Figures that live in the database (devices, rollouts, gate
decisions) are read at the scrape with ``FleetDB.read`` (a reader thread), *before*
the exposition is generated, so the event loop never waits on SQLite; generating the
text itself is a few hundred lines of string formatting, done on the loop because it
reads counters that only the loop changes.

One ``FleetMetrics`` per HTTP application, each with its own ``CollectorRegistry``
(tests run several fleets in one process; the global registry would mix them or
refuse the second). ``metrics_for(app)`` makes it on first use; ``FleetService``
calls it right after ``create_app`` so the lag histogram counts from the start.

Label cardinality stays bounded: HTTP requests are labelled by the route's canonical
pattern (``/v1/devices/{device_id}``, never the raw path; ``unmatched`` for paths no
route knows), refusals by the ingest's fixed reason keys, devices by state (and by
group: groups are an operator's small vocabulary, not per device).

``GET /metrics`` needs the ``read`` permission like every other GET (a Prometheus
scrape sends ``Authorization: Bearer`` from ``authorization: credentials_file:``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edgefleet.fleet.api import API, READ, FleetApi, requires

PREFIX = "edgefleet_fleet_"
UNMATCHED = "unmatched"  # the route label of a path no route knows (bounded cardinality)
# Any other method a client sends is labelled "other" (a client chooses it freely).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# HTTP answers: the API's reads take milliseconds, bundle uploads and downloads seconds.
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Ingest lag: an agent flushes its outbox every few seconds; an outage leaves hours.
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)
DEVICE_STATES = ("online", "offline", "revoked")

# IngestStats fields → (metric, label value): what the ingest applied and stored.
_APPLIED = {"status": "status", "reported": "reported", "events": "events", "batches": "batches"}
_BAD_RECORDS = {
    "bad_stats": "inference_stats",
    "bad_event_records": "event",
    "bad_fallback_stats": "fallback_stats",
    "bad_drift_stats": "drift_stats",
    "bad_shadow_stats": "shadow_stats",
}


@dataclass
class DbSnapshot:
    """What the scrape read from the database (a reader thread), for the collector."""

    devices: dict[str, int] = field(default_factory=dict)  # state → devices
    group_devices: dict[tuple[str, str], int] = field(default_factory=dict)  # (group, state)
    rollouts: dict[str, int] = field(default_factory=dict)  # state → rollouts
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)  # (stage, outcome)
    # What the devices' newest batches said of their outboxes (fleet/ingest.py).
    outbox_waiting: int = 0
    outbox_dropped: dict[str, int] = field(default_factory=dict)  # priority → records


_DEVICE_STATE_SQL = (
    "CASE WHEN d.revoked_at IS NOT NULL THEN 'revoked'"
    " WHEN d.online = 1 THEN 'online' ELSE 'offline' END"
)


def read_snapshot(conn: sqlite3.Connection) -> DbSnapshot:
    """Reader thread: the database's figures, four grouped counts and the outbox sums."""
    snap = DbSnapshot()
    for state, n in conn.execute(
        f"SELECT {_DEVICE_STATE_SQL} AS s, count(*) FROM devices d GROUP BY s"
    ):
        snap.devices[state] = n
    for grp, state, n in conn.execute(
        f"SELECT g.grp, {_DEVICE_STATE_SQL} AS s, count(*) FROM device_groups g"
        " JOIN devices d ON d.id = g.device_id GROUP BY g.grp, s"
    ):
        snap.group_devices[(grp, state)] = n
    for state, n in conn.execute("SELECT state, count(*) FROM rollouts GROUP BY state"):
        snap.rollouts[state or ""] = n
    for stage, outcome, n in conn.execute(
        "SELECT stage, outcome, count(*) FROM rollout_decisions GROUP BY stage, outcome"
    ):
        snap.decisions[(stage or "", outcome or "")] = n
    waiting, low, high = conn.execute(
        "SELECT total(outbox_waiting), total(outbox_dropped_low), total(outbox_dropped_high)"
        " FROM devices WHERE revoked_at IS NULL"
    ).fetchone()
    snap.outbox_waiting = int(waiting)
    snap.outbox_dropped = {"low": int(low), "high": int(high)}
    return snap


def _family(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    doc: str,
    labels: list[str],
    samples: Iterable[tuple[list[str], float]],
) -> Metric:
    """One labelled family: ``PREFIX + name`` with a sample per (label values, value)."""
    family = kind(PREFIX + name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


class _FleetCollector(Collector):
    """Counters the bus, the ingest and the database writer keep, and the last
    ``DbSnapshot``; read on the event loop at the scrape (``FleetMetrics.exposition``)."""

    def __init__(self, api: FleetApi) -> None:
        self.api = api
        self.snapshot = DbSnapshot()

    def collect(self) -> Iterator[Metric]:
        yield from self._db_figures()
        yield GaugeMetricFamily(
            PREFIX + "db_write_queue_depth",
            "Write jobs waiting for the database's writer thread",
            value=self.api.devices.db.write_queue_depth,
        )
        bus = self.api.bus
        if bus is not None:
            yield from self._bus_figures(bus)

    def _db_figures(self) -> Iterator[Metric]:
        snap = self.snapshot
        yield _family(
            GaugeMetricFamily,
            "devices",
            "Enrolled devices by state (online, offline, revoked); each device once",
            ["state"],
            (([state], snap.devices.get(state, 0)) for state in DEVICE_STATES),
        )
        yield _family(
            GaugeMetricFamily,
            "group_devices",
            "Devices by group and state (a device in two groups counts in both)",
            ["group", "state"],
            (([grp, state], n) for (grp, state), n in sorted(snap.group_devices.items())),
        )
        yield _family(
            GaugeMetricFamily,
            "rollouts",
            "Rollouts by state (running, paused, stopped, completed, rolled_back)",
            ["state"],
            (([state], n) for state, n in sorted(snap.rollouts.items())),
        )
        yield _family(
            CounterMetricFamily,
            "gate_decisions",
            "Rollout gate decisions recorded, by stage (shadow, wave) and outcome (pass, fail)",
            ["stage", "outcome"],
            (([stage, outcome], n) for (stage, outcome), n in sorted(snap.decisions.items())),
        )
        yield GaugeMetricFamily(
            PREFIX + "device_outbox_waiting",
            "Telemetry records waiting in the devices' outboxes, as their newest batches"
            " said (the fleet-wide backlog)",
            value=snap.outbox_waiting,
        )
        yield _family(
            GaugeMetricFamily,
            "device_outbox_dropped",
            "Telemetry records the devices' full outboxes dropped, by priority (the"
            " devices' running totals, as their newest batches said)",
            ["priority"],
            (([priority], n) for priority, n in sorted(snap.outbox_dropped.items())),
        )

    def _bus_figures(self, bus: Any) -> Iterator[Metric]:
        link = bus.link.stats
        s = bus.stats  # fleet.ingest.IngestStats
        yield GaugeMetricFamily(
            PREFIX + "mqtt_connected",
            "1 while the fleet's MQTT connection is up",
            value=1 if bus.connected else 0,
        )
        yield CounterMetricFamily(
            PREFIX + "mqtt_messages_received",
            "MQTT messages the fleet's connection received",
            value=link.messages_in,
        )
        yield CounterMetricFamily(
            PREFIX + "mqtt_messages_dropped",
            "Received MQTT messages dropped before the ingest (oversized, bad topic, a full queue)",
            value=link.messages_dropped,
        )
        yield CounterMetricFamily(
            PREFIX + "mqtt_messages_published",
            "MQTT messages the fleet published (desired documents, acks, commands)",
            value=link.published,
        )
        yield CounterMetricFamily(
            PREFIX + "mqtt_connects",
            "Connections to the broker made (the first one included)",
            value=link.connects,
        )
        yield CounterMetricFamily(
            PREFIX + "ingest_messages",
            "MQTT messages handed to the ingest (status, reported, events, telemetry)",
            value=s.messages,
        )
        yield _family(
            CounterMetricFamily,
            "ingest_refused",
            "Messages the ingest refused, by reason (not_json, schema, invalid, oversized,"
            " device_mismatch, newer_schema, topic, rate_limited, unknown_device)",
            ["reason"],
            (([reason], n) for reason, n in sorted(s.rejected.items())),
        )
        yield _family(
            CounterMetricFamily,
            "ingest_refused_by_leaf",
            "Messages the ingest refused, by topic leaf",
            ["leaf"],
            (([leaf], n) for leaf, n in sorted(s.rejected_by_leaf.items())),
        )
        yield _family(
            CounterMetricFamily,
            "ingest_applied",
            "Messages applied: status, reported, new events, telemetry batches stored and acked",
            ["kind"],
            (([kind], getattr(s, attr)) for attr, kind in _APPLIED.items()),
        )
        yield CounterMetricFamily(
            PREFIX + "telemetry_records_stored",
            "New telemetry records stored (rate(): records stored per second)",
            value=s.records,
        )
        yield CounterMetricFamily(
            PREFIX + "telemetry_records_duplicate",
            "Telemetry records received again (a resend) and not stored twice",
            value=s.duplicate_records,
        )
        yield _family(
            CounterMetricFamily,
            "telemetry_records_invalid",
            "Records stored raw only: their data failed its kind's model",
            ["kind"],
            (([kind], getattr(s, attr)) for attr, kind in _BAD_RECORDS.items()),
        )
        yield CounterMetricFamily(
            PREFIX + "telemetry_acks_sent",
            "Telemetry acks published (after the batch's write committed)",
            value=s.acks_sent,
        )
        yield CounterMetricFamily(
            PREFIX + "ingest_write_errors",
            "Ingest write jobs that failed (nothing of them acked)",
            value=s.write_errors,
        )


class FleetMetrics:
    """One fleet application's metrics: its registry and what feeds it (event loop)."""

    def __init__(self, api: FleetApi) -> None:
        self.api = api
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests by route pattern, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "Time from request to answer, by route pattern and method",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )
        self.ingest_lag = Histogram(
            PREFIX + "ingest_lag_seconds",
            "Seconds from a telemetry record's ts (device clock) to its storing (fleet clock)",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.collector = _FleetCollector(api)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        if api.bus is not None:
            api.bus.ingest.lag_observer = self._observe_lag

    def _observe_lag(self, seconds: float) -> None:
        # A device clock ahead of the fleet's gives a negative lag: none, for buckets.
        self.ingest_lag.observe(max(0.0, seconds))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_duration.labels(route, method).observe(seconds)

    async def exposition(self) -> bytes:
        """Read the database on a reader thread, then format everything (event loop)."""
        self.collector.snapshot = await self.api.devices.db.read(read_snapshot)
        return generate_latest(self.registry)


_BY_APP: weakref.WeakKeyDictionary[web.Application, FleetMetrics] = weakref.WeakKeyDictionary()


def metrics_for(app: web.Application) -> FleetMetrics:
    """The application's ``FleetMetrics``, made on first use (event loop)."""
    m = _BY_APP.get(app)
    if m is None:
        m = _BY_APP[app] = FleetMetrics(app[API])
    return m


def route_label(request: web.Request) -> str:
    """The route's canonical pattern: bounded label values whatever paths arrive."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED


routes = web.RouteTableDef()


@routes.get("/metrics")
@requires(READ)
async def get_metrics(request: web.Request) -> web.Response:
    body = await metrics_for(request.app).exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


@web.middleware
async def middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Outermost: counts every answer, the error middleware's included. An exception
    that still escapes (aiohttp's own HTTP exceptions, or a bug) counts with its
    status, or 500."""
    started = time.perf_counter()
    status: int | None = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = None  # the client went away: no answer to count
        raise
    finally:
        if status is not None:
            method = request.method if request.method in METHODS else "other"
            metrics_for(request.app).observe_request(
                route_label(request), method, status, time.perf_counter() - started
            )

"""The fleet's MQTT ingest: ``status``, ``reported``, ``events``, ``telemetry`` → database.

Contracts: docs/mqtt.md (status, telemetry batches, acks) and docs/fleet.md
(reported, events, record kinds). Every payload is untrusted: anything that is not
valid JSON of schema 1 (wrong types, missing fields, over-size, a ``device_id`` that
is not the topic's) is logged (rate-limited), counted in ``IngestStats.rejected``
and ignored; the next message is processed as usual.

**Unknown devices.** A message from a device id with no ``devices`` row (never
enrolled, or deleted) is dropped and counted as ``unknown_device``; its telemetry is
not acked, so it stays in that device's outbox. Devices exist only through
enrolment: auto-creating rows would let anything that reaches the broker register
itself as a device (the broker's password file and ACL are the first gate, this is
the second). Once enrolled, a device's retained ``status``/``reported`` and its
outbox arrive by themselves.

**Messages.** What each leaf carries, and how it is checked, is core/protocol.py
(``MESSAGES``): ``protocol.decode`` refuses a message with a counter key as
``reason`` (``oversized``, ``not_json``, ``schema``, ``newer_schema``,
``device_mismatch``, ``invalid``), which lands in ``IngestStats.rejected``.

**Telemetry.** A batch is validated as a whole (envelope and every record's
envelope: id, seq, kind, priority, ts): a malformed one is rejected and not acked.
Within a valid batch, records of a known kind whose ``data`` fails its model
(``protocol.InferenceStats``, ``protocol.Event``, ``protocol.FallbackStats``) are
still stored raw in ``telemetry`` and acked (so they do not block the device's outbox
forever) but not unpacked into the views; they are counted in
``bad_stats``/``bad_event_records``/``bad_fallback_stats`` (``bad_drift_stats``:
invalid ``drift_stats``, also logged, rate-limited). Every record is stored
with ``INSERT OR IGNORE`` by id; the ack (``protocol.Ack``: all of the batch's ids,
duplicates included) is published only after the write committed.

**Gate evidence.** ``shadow_stats`` (``protocol.ShadowStats``; invalid ones counted in
``bad_shadow_stats``, as are shadow reports for a candidate no rollout asked that
device to shadow) and the agreement rows of ``fallback_stats`` are also unpacked
into ``signal_counts`` (``k`` of ``n`` per record, device, model, version, signal:
``shadow_agreement``, ``cloud_agreement``) in the same write job. After a batch with
such evidence (or ``inference_stats``, ``drift_stats``) is stored, the rollouts of
its device decide again (``Rollouts.on_telemetry``; fleet/gates.py).

Threads and flow: the link's per-subscription task (event loop) calls ``handle``,
which parses and validates the message on the loop (orjson and pydantic-core: well
under a millisecond for a 256 KiB batch) and puts it on its leaf's lane. One task per lane
takes whatever has queued up (up to a bound) and stores it in **one** write job on
the database's writer thread, then publishes acks and tells the rollouts. So under
load the jobs grow instead of multiplying (ingest is meant to reach >= 5,000
records/s), a slow ``reported`` storm never delays telemetry acks, and each
device's messages of one leaf are applied in the order they arrived.

**Per-device rate limit.** Every device has a token bucket (``device_rate_per_s``
messages per second, bursts up to ``device_burst``), checked in ``handle`` before the
payload is even parsed. A message over it is dropped and counted as
``rate_limited``: a telemetry batch is not acked (so it stays in the device's outbox
and is resent after the agent's ack timeout: nothing is lost, it only arrives later),
an event also travels as an outbox record, and ``status``/``reported`` are retained and
sent again on change. So one device flooding the broker costs the fleet a dictionary
lookup per message, not a parse and a database write, and every other device's
batches are stored and acked as promptly as before. An agent never comes near the
limit: it sends a batch per ``flush_interval_s`` and at most ``max_in_flight`` batches
per ack round trip; the burst covers a catch-up after an outage.

Nothing the ingest holds in memory is precious: a message dropped at a stop (or
past a full queue) is a telemetry batch the device resends (no ack), an event that
also travels through the outbox, or a retained ``status``/``reported`` that the
broker delivers again on the next subscribe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from edgefleet.core import protocol
from edgefleet.core.mqtt import topics
from edgefleet.core.mqtt.messages import Handler, Message
from edgefleet.fleet.db import FleetDB, dumps, now
from edgefleet.fleet.rollouts import Rollouts
from edgefleet.fleet.rollup import Retention, roll_up_in
from edgefleet.fleet.telemetry_math import DRIFT_COLUMNS, drift_rows

log = logging.getLogger(__name__)

LEAVES: tuple[str, ...] = (topics.STATUS, topics.REPORTED, topics.EVENTS, topics.TELEMETRY)
# Largest payload accepted per leaf (the link drops anything over its own
# max_payload_bytes before we see it): the protocol's limits.
MAX_BYTES: dict[str, int] = {leaf: protocol.MAX_BYTES[leaf] for leaf in LEAVES}
# What each leaf carries (core/protocol.py).
MESSAGES: dict[str, type[protocol.Message]] = {
    topics.STATUS: protocol.Status,
    topics.REPORTED: protocol.Reported,
    topics.EVENTS: protocol.Event,
    topics.TELEMETRY: protocol.TelemetryBatch,
}
DEVICE_RATE_PER_S = 20.0  # messages per second and device, sustained (module doc; ingest.*)
DEVICE_BURST = 200  # messages a device may send at once (catching up after an outage)
MAX_BUCKETS = 100_000  # devices tracked at once; past it the fullest buckets are forgotten


Reject = protocol.WireError  # a refused message: ``reason`` is the counter's key


@dataclass
class IngestStats:
    """Counters of this process's ingest (per worker; not shared state)."""

    messages: int = 0  # handed to the ingest
    status: int = 0  # status messages applied
    reported: int = 0  # reported documents applied
    events: int = 0  # new events stored (events leaf and event records)
    duplicate_events: int = 0
    batches: int = 0  # telemetry batches stored and acked
    records: int = 0  # new telemetry records stored
    duplicate_records: int = 0  # records that were already stored (a resend)
    acks_sent: int = 0
    bad_stats: int = 0  # inference_stats records stored raw only: invalid data
    bad_event_records: int = 0  # event records stored raw only: not a valid event
    bad_fallback_stats: int = 0  # fallback_stats records stored raw only: invalid data
    bad_drift_stats: int = 0  # drift_stats records stored raw only: invalid data
    bad_shadow_stats: int = 0  # shadow_stats records stored raw only: invalid data
    write_errors: int = 0  # write jobs that failed (nothing acked)
    rejected: dict[str, int] = field(default_factory=dict)  # reason → messages
    rejected_by_leaf: dict[str, int] = field(default_factory=dict)  # leaf → messages

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


class DeviceRateLimit:
    """A token bucket per device id: ``rate_per_s`` tokens a second, ``burst`` at most.

    Event loop only (no locking). Past ``max_devices`` buckets, the fullest tenth are
    forgotten at once (a full bucket carries no information; forgetting an empty one
    would hand a flooding device a fresh burst), so the cost is amortised.
    """

    def __init__(self, rate_per_s: float, burst: int, *, max_devices: int = MAX_BUCKETS) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("the rate must be positive and the burst at least 1")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self.max_devices = max_devices
        self._buckets: dict[str, tuple[float, float]] = {}  # device → (tokens, at)

    def allow(self, device_id: str, t: float) -> bool:
        """Take one token for ``device_id`` at monotonic time ``t``; False when empty."""
        tokens, at = self._buckets.get(device_id, (self.burst, t))
        tokens = min(self.burst, tokens + (t - at) * self.rate_per_s)
        ok = tokens >= 1.0
        self._buckets[device_id] = (tokens - 1.0 if ok else tokens, t)
        if len(self._buckets) > self.max_devices:
            self._forget_fullest(t)
        return ok

    def _forget_fullest(self, t: float) -> None:
        keep = max(1, self.max_devices * 9 // 10)
        by_tokens = sorted(
            self._buckets.items(),
            key=lambda item: item[1][0] + (t - item[1][1]) * self.rate_per_s,
        )
        self._buckets = dict(by_tokens[:keep])


class _Complaints:
    """Rate-limited warnings: the first of a kind at once, then one summary per interval."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, key: str, msg: str, *args: Any) -> None:
        t = time.monotonic()
        last = self._last.get(key)
        if last is not None and t - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = t
        more = self._suppressed.pop(key, 0)
        if more:
            msg += " (%d similar messages not logged)"
            args = (*args, more)
        log.warning(msg, *args)


# ------------------------------------------------------------------ messages → rows


@dataclass(slots=True)
class StatusMsg:
    device_id: str
    online: bool
    agent_version: str | None
    protocol: str | None
    reason: str | None
    from_device: bool  # the device said it (birth, clean stop), not its Last Will
    received_at: float


def status_msg(m: protocol.Status, retained: bool, t: float) -> StatusMsg:
    # The Will has no timestamp (docs/mqtt.md); a retained message is old news: neither
    # proves the device was just heard from.
    return StatusMsg(
        m.device_id,
        m.state == "online",
        m.agent_version or None,  # "" (not set) is no version
        m.protocol,
        m.reason,
        m.at is not None and not retained,
        t,
    )


@dataclass(slots=True)
class ReportedMsg:
    device_id: str
    text: str  # the whole document, as stored
    revision: int
    agent_version: str | None
    accelerators: str | None  # JSON
    models: dict[str, protocol.ReportedModel]
    received_at: float


def reported_msg(m: protocol.Reported, t: float) -> ReportedMsg:
    return ReportedMsg(
        m.device_id,
        dumps(m.to_wire()),
        m.revision,
        m.agent_version or None,  # "" (not set) is no version
        None if m.accelerators is None else dumps(m.accelerators),
        m.models,
        t,
    )


def event_row(e: protocol.Event, t: float) -> tuple[Any, ...]:
    """An event (events leaf, or an ``event`` record's data) → its ``events`` row."""
    return (
        e.id,
        e.device_id,
        e.at,
        t,
        e.kind,
        e.model,
        e.version,
        e.revision,
        e.rollout,
        e.reason,
        dumps(e.to_wire()),
    )


EVENT_COLUMNS = (
    "id, device_id, at, received_at, kind, model, version, revision, rollout, reason, data"
)


def event_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    return {"kind": row[4], "rollout": row[8], "device_id": row[1], "reason": row[9]}


@dataclass(slots=True)
class BatchMsg:
    device_id: str
    batch_id: str
    record_ids: list[str]
    telemetry: list[tuple[Any, ...]]  # telemetry rows
    stats: list[tuple[Any, ...]]  # inference_stats rows
    events: list[tuple[Any, ...]]  # events rows
    bad_stats: int
    bad_events: int
    bad_fallback: int
    received_at: float
    signals: list[tuple[Any, ...]] = field(default_factory=list)  # signal_counts rows
    bad_shadow: int = 0
    # drift_stats rows and invalid drift records (fleet.telemetry_math.drift_rows)
    drift: list[tuple[Any, ...]] = field(default_factory=list)
    bad_drift: int = 0
    # The batch's word on the device's outbox (waiting, dropped_low, dropped_high: the
    # drop counters are the outbox's running totals); None when the batch has none.
    outbox: tuple[int, int, int] | None = None


def signal_rows(
    record_id: str, device_id: str, data: protocol.FallbackStats | protocol.ShadowStats, t: float
) -> list[tuple[Any, ...]]:
    """The rate signals the rollout gates read (fleet/gates.py), as ``signal_counts``
    rows: cloud agreement per model version from ``fallback_stats``, shadow agreement
    per (model, candidate) from ``shadow_stats``."""
    if isinstance(data, protocol.ShadowStats):
        if not data.compared:
            return []
        return [
            (
                record_id,
                device_id,
                data.model,
                data.candidate,
                data.version,
                "shadow_agreement",
                data.agreed,
                data.compared,
                t,
            )
        ]
    agree: dict[tuple[str, str], list[int]] = {}
    for a in data.agreement:
        kn = agree.setdefault((a.model, a.version), [0, 0])
        kn[1] += a.n
        if a.agree == "true":
            kn[0] += a.n
    return [
        (record_id, device_id, m, v, None, "cloud_agreement", k, n, t)
        for (m, v), (k, n) in agree.items()
        if n
    ]


def batch_msg(b: protocol.TelemetryBatch, t: float) -> BatchMsg:
    """A valid batch → rows. A record whose data fails its kind's model is stored raw
    only (and counted); one whose data is over ``MAX_RECORD_BYTES`` fails the batch."""
    device_id = b.device_id
    ids: list[str] = []
    rows: list[tuple[Any, ...]] = []
    stats: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    bad_stats = bad_events = bad_fallback = bad_shadow = 0
    signals: list[tuple[Any, ...]] = []
    for i, r in enumerate(b.records):
        text = orjson.dumps(r.data).decode()
        if len(text) > protocol.MAX_RECORD_BYTES:
            raise protocol.WireError(
                "invalid", f"records.{i}.data: over {protocol.MAX_RECORD_BYTES} bytes"
            )
        ids.append(r.id)
        rows.append((r.id, device_id, r.seq, r.kind, r.priority, r.ts, t, text))
        if r.kind == "inference_stats":
            try:
                s = protocol.InferenceStats.from_obj(r.data)
            except protocol.WireError:
                bad_stats += 1
                continue
            row = (r.id, device_id, s.model, s.version, s.window_start, s.count, s.errors, t)
            stats.append((*row, dumps(s.to_wire())))
        elif r.kind == "event":
            try:
                events.append(event_row(protocol.Event.from_obj(r.data, device_id), t))
            except protocol.WireError:
                bad_events += 1
        elif r.kind == "fallback_stats":
            try:
                fb = protocol.FallbackStats.from_obj(r.data)
            except protocol.WireError:
                bad_fallback += 1
                continue
            signals.extend(signal_rows(r.id, device_id, fb, t))
        elif r.kind == "shadow_stats":
            try:
                sh = protocol.ShadowStats.from_obj(r.data)
            except protocol.WireError:
                bad_shadow += 1
                continue
            signals.extend(signal_rows(r.id, device_id, sh, t))
    outbox = b.outbox
    return BatchMsg(
        device_id,
        b.batch_id,
        ids,
        rows,
        stats,
        events,
        bad_stats,
        bad_events,
        bad_fallback,
        t,
        signals,
        bad_shadow,
        outbox=None
        if outbox is None
        else (outbox.waiting, outbox.dropped_low, outbox.dropped_high),
    )


# ------------------------------------------------------------------ the ingest


AckPublish = Callable[[str, bytes], None]  # queue a QoS 1 message now (loop thread)


@dataclass(eq=False)
class _Lane:
    leaf: str
    process: Callable[[list[Any]], Awaitable[None]]
    max_items: int
    queue: asyncio.Queue[Any]
    task: asyncio.Task[None] | None = None


_STOP: Any = object()  # put on a lane's queue by stop()


class Ingest:
    """``handler(leaf)`` for the link's subscriptions; ``start()``/``stop()`` the lanes."""

    # How far back the chart roll-ups are filled (fleet/rollup.py); the fleet service
    # sets its configured one (telemetry.retention).
    retention: Retention = Retention()

    def __init__(
        self,
        db: FleetDB,
        publish_ack: AckPublish,
        rollouts: Rollouts | None = None,
        *,
        queue_size: int = 20_000,
        log_interval_s: float = 10.0,
        device_rate_per_s: float = DEVICE_RATE_PER_S,
        device_burst: int = DEVICE_BURST,
    ) -> None:
        self.db = db
        self.rate_limit = DeviceRateLimit(device_rate_per_s, device_burst)
        self.publish_ack = publish_ack
        self.rollouts = rollouts
        self.stats = IngestStats()
        # Set by fleet/metrics.py: called on the loop, after each telemetry write
        # committed, with every stored batch record's seconds from its ``ts`` (device
        # clock) to the commit (fleet clock): the ingest lag.
        self.lag_observer: Callable[[float], None] | None = None
        self._complaints = _Complaints(log_interval_s)
        self._lanes: dict[str, _Lane] = {
            topics.STATUS: _Lane(
                topics.STATUS, self._store_status, 1000, asyncio.Queue(queue_size)
            ),
            topics.REPORTED: _Lane(
                topics.REPORTED, self._store_reported, 500, asyncio.Queue(queue_size)
            ),
            topics.EVENTS: _Lane(
                topics.EVENTS, self._store_events, 1000, asyncio.Queue(queue_size)
            ),
            # Batches are up to hundreds of records each: fewer per job.
            topics.TELEMETRY: _Lane(
                topics.TELEMETRY, self._store_batches, 40, asyncio.Queue(max(100, queue_size // 50))
            ),
        }

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        for lane in self._lanes.values():
            if lane.task is None:
                lane.task = asyncio.create_task(self._run(lane), name=f"fleet-ingest-{lane.leaf}")

    async def stop(self, drain_s: float = 2.0) -> None:
        """Store what is queued (up to ``drain_s``), then end the lane tasks.

        Call it after the link stopped delivering; acks of what is stored now may find
        the link closed, which only means the device resends (and we store nothing
        twice)."""
        tasks = []
        for lane in self._lanes.values():
            if lane.task is None:
                continue
            tasks.append(lane.task)
            with contextlib.suppress(asyncio.QueueFull):
                lane.queue.put_nowait(_STOP)  # the lane ends after what is before it
        if tasks:
            await asyncio.wait(tasks, timeout=drain_s)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in self._lanes.values():
            lane.task = None

    def handler(self, leaf: str) -> Handler:
        async def handle(msg: Message) -> None:
            await self.handle(leaf, msg)

        return handle

    # ------------------------------------------------------------- the loop side

    async def handle(self, leaf: str, msg: Message) -> None:
        """Loop thread (the link's subscription task): validate, then queue for storing."""
        self.stats.messages += 1
        t = now()
        parsed = topics.parse_device_topic(msg.topic)
        if parsed is None or parsed[1] != leaf:
            self._reject(leaf, msg.topic, Reject("topic", "not a device topic of this leaf"))
            return
        device_id = parsed[0]
        if not self.rate_limit.allow(device_id, time.monotonic()):
            self._reject(
                leaf, msg.topic, Reject("rate_limited", f"device {device_id} over its rate")
            )
            return
        try:
            m = protocol.decode(
                MESSAGES[leaf], msg.payload, max_bytes=MAX_BYTES[leaf], device_id=device_id
            )
            item: Any
            if isinstance(m, protocol.Status):
                item = status_msg(m, msg.retain, t)
            elif isinstance(m, protocol.Reported):
                item = reported_msg(m, t)
            elif isinstance(m, protocol.Event):
                item = event_row(m, t)
            else:
                assert isinstance(m, protocol.TelemetryBatch)
                item = batch_msg(m, t)
                item.drift, item.bad_drift, why = drift_rows(m, t)
                if why is not None:
                    self._complaints.warn(
                        "telemetry/drift_stats", "invalid drift_stats from %s: %s", m.device_id, why
                    )
        except Reject as r:
            self._reject(leaf, msg.topic, r)
            return
        # Waits when the lane is full: the link's own queue then fills and drops (and
        # counts) past its bound, which loses nothing precious (module doc).
        await self._lanes[leaf].queue.put(item)

    def _reject(self, leaf: str, topic: str, r: Reject) -> None:
        s = self.stats
        s.rejected[r.reason] = s.rejected.get(r.reason, 0) + 1
        s.rejected_by_leaf[leaf] = s.rejected_by_leaf.get(leaf, 0) + 1
        self._complaints.warn(f"{leaf}/{r.reason}", "ignored a message on %s: %s", topic, r.detail)

    def _unknown(self, leaf: str, device_ids: Iterable[str]) -> None:
        for d in device_ids:
            self._reject(
                leaf,
                topics.device_topic(d, leaf),  # type: ignore[arg-type]
                Reject("unknown_device", f"device {d!r} is not enrolled"),
            )

    async def _run(self, lane: _Lane) -> None:
        """One task per lane: everything queued meanwhile goes into one write job."""
        stopping = False
        while not stopping:
            items = [await lane.queue.get()]
            while len(items) < lane.max_items and not lane.queue.empty():
                items.append(lane.queue.get_nowait())
            if _STOP in items:
                stopping = True
                items = [i for i in items if i is not _STOP]
                if not items:
                    return
            try:
                await lane.process(items)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.stats.write_errors += 1
                log.exception("fleet ingest: storing %d %s messages failed", len(items), lane.leaf)

    # ------------------------------------------------------------- storing

    async def _store_status(self, items: list[StatusMsg]) -> None:
        def job(conn: sqlite3.Connection) -> list[str]:
            unknown = []
            for m in items:
                seen = m.received_at if m.from_device else None
                if m.online:
                    cur = conn.execute(
                        "UPDATE devices SET online = 1, status_at = ?, offline_reason = NULL,"
                        " agent_version = coalesce(?, agent_version),"
                        " protocol = coalesce(?, protocol), last_seen = coalesce(?, last_seen)"
                        " WHERE id = ?",
                        (m.received_at, m.agent_version, m.protocol, seen, m.device_id),
                    )
                else:
                    cur = conn.execute(
                        "UPDATE devices SET online = 0, status_at = ?, offline_reason = ?,"
                        " last_seen = coalesce(?, last_seen) WHERE id = ?",
                        (m.received_at, m.reason or "offline", seen, m.device_id),
                    )
                if cur.rowcount == 0:
                    unknown.append(m.device_id)
            return unknown

        unknown = await self.db.write(job)
        self.stats.status += len(items) - len(unknown)
        self._unknown(topics.STATUS, unknown)

    async def _store_reported(self, items: list[ReportedMsg]) -> None:
        def job(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
            known: list[str] = []
            unknown: list[str] = []
            for m in items:
                cur = conn.execute(
                    "UPDATE devices SET reported = ?, reported_revision = ?,"
                    " accelerators = coalesce(?, accelerators),"
                    " agent_version = coalesce(?, agent_version), last_seen = ? WHERE id = ?",
                    (
                        m.text,
                        m.revision,
                        m.accelerators,
                        m.agent_version,
                        m.received_at,
                        m.device_id,
                    ),
                )
                if cur.rowcount == 0:
                    unknown.append(m.device_id)
                    continue
                known.append(m.device_id)
                conn.execute(
                    "DELETE FROM device_models WHERE device_id = ?"
                    " AND model NOT IN (SELECT value FROM json_each(?))",
                    (m.device_id, dumps(sorted(m.models))),
                )
                conn.executemany(
                    "INSERT INTO device_models (device_id, model, active, previous, desired,"
                    " state, rollout, provider, last_error, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (device_id, model) DO UPDATE SET active = excluded.active,"
                    " previous = excluded.previous, desired = excluded.desired,"
                    " state = excluded.state, rollout = excluded.rollout,"
                    " provider = excluded.provider, last_error = excluded.last_error,"
                    " updated_at = excluded.updated_at",
                    [
                        (
                            m.device_id,
                            name,
                            r.active,
                            r.previous,
                            r.desired,
                            r.state,
                            r.rollout,
                            r.provider,
                            r.last_error,
                            m.received_at,
                        )
                        for name, r in m.models.items()
                    ],
                )
            return known, unknown

        known, unknown = await self.db.write(job)
        self.stats.reported += len(items) - len(unknown)
        self._unknown(topics.REPORTED, unknown)
        if known and self.rollouts is not None:
            await self.rollouts.on_reported(known)

    def _known_in(self, conn: sqlite3.Connection, device_ids: Iterable[str]) -> set[str]:
        return {
            r[0]
            for r in conn.execute(
                "SELECT id FROM devices WHERE id IN (SELECT value FROM json_each(?))",
                (dumps(sorted(set(device_ids))),),
            )
        }

    def _insert_events_in(
        self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        """INSERT OR IGNORE by id; returns the rows that were new."""
        new = []
        for row in rows:
            cur = conn.execute(
                f"INSERT OR IGNORE INTO events ({EVENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                row,
            )
            if cur.rowcount:
                new.append(row)
        return new

    def _outbox_in(self, conn: sqlite3.Connection, stored: list[BatchMsg]) -> None:
        """Each device's outbox as its newest batch told it: records waiting on the store
        PC and its drop counters (the console's backlog and lost-telemetry alerts, the
        fleet's /metrics). A resent older batch never overwrites a newer word."""
        conn.executemany(
            "UPDATE devices SET outbox_waiting = ?, outbox_dropped_low = ?,"
            " outbox_dropped_high = ?, outbox_at = ?"
            " WHERE id = ? AND coalesce(outbox_at, 0) <= ?",
            [
                (*b.outbox, b.received_at, b.device_id, b.received_at)
                for b in stored
                if b.outbox is not None
            ],
        )

    def _touch_in(self, conn: sqlite3.Connection, seen: dict[str, float]) -> None:
        conn.executemany(
            "UPDATE devices SET last_seen = max(coalesce(last_seen, 0), ?) WHERE id = ?",
            [(t, d) for d, t in seen.items()],
        )

    async def _store_events(self, items: list[tuple[Any, ...]]) -> None:
        def job(conn: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], int, list[str]]:
            known = self._known_in(conn, (r[1] for r in items))
            rows = [r for r in items if r[1] in known]
            new = self._insert_events_in(conn, rows)
            self._touch_in(conn, {r[1]: r[3] for r in rows})
            return new, len(rows) - len(new), [r[1] for r in items if r[1] not in known]

        new, dups, unknown = await self.db.write(job)
        self.stats.events += len(new)
        self.stats.duplicate_events += dups
        self._unknown(topics.EVENTS, unknown)
        if new and self.rollouts is not None:
            await self.rollouts.on_event([event_dict(r) for r in new])

    def _unasked_shadows_in(
        self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        """``shadow_agreement`` rows for a candidate the fleet never asked that device to
        shadow (no rollout of that model version had it as a shadow device): refused
        (bad input: "a version the device does not have"), the raw record is kept."""
        asked = {
            (r[0], r[1], r[2])
            for r in conn.execute(
                "SELECT rd.device_id, r.model, r.version FROM rollout_devices rd"
                " JOIN rollouts r ON r.id = rd.rollout_id WHERE rd.shadow = 1"
                " AND rd.device_id IN (SELECT value FROM json_each(?))",
                (dumps(sorted({row[1] for row in rows})),),
            )
        }
        return [
            row
            for row in rows
            if row[5] == "shadow_agreement" and (row[1], row[2], row[3]) not in asked
        ]

    async def _store_batches(self, items: list[BatchMsg]) -> None:
        refused: list[tuple[Any, ...]] = []  # shadow rows refused by the job below

        def job(conn: sqlite3.Connection) -> tuple[set[str], int, list[tuple[Any, ...]]]:
            known = self._known_in(conn, (b.device_id for b in items))
            stored = [b for b in items if b.device_id in known]
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO telemetry"
                " (id, device_id, seq, kind, priority, ts, received_at, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [row for b in stored for row in b.telemetry],
            )
            inserted = conn.total_changes - before
            conn.executemany(
                "INSERT OR IGNORE INTO inference_stats (id, device_id, model, version,"
                " window_start, count, errors, received_at, data)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [row for b in stored for row in b.stats],
            )
            signals = [row for b in stored for row in b.signals]
            refused[:] = self._unasked_shadows_in(conn, signals) if signals else []
            skip = set(refused)
            conn.executemany(
                "INSERT OR IGNORE INTO signal_counts (record_id, device_id, model, version,"
                " other, signal, k, n, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [row for row in signals if row not in skip],
            )
            conn.executemany(
                f"INSERT OR IGNORE INTO drift_stats ({DRIFT_COLUMNS})"
                f" VALUES ({', '.join('?' * len(DRIFT_COLUMNS.split(',')))})",
                [row for b in stored for row in b.drift],
            )
            new_events = self._insert_events_in(conn, [row for b in stored for row in b.events])
            self._touch_in(conn, {b.device_id: b.received_at for b in stored})
            self._outbox_in(conn, stored)
            # Chart roll-ups of the new records, in this same transaction (fleet/rollup.py).
            roll_up_in(conn, stored, refused, self.retention)
            return known, inserted, new_events

        known, inserted, new_events = await self.db.write(job)
        stored = [b for b in items if b.device_id in known]
        if self.lag_observer is not None:
            committed = now()
            for b in stored:
                for row in b.telemetry:
                    self.lag_observer(committed - row[5])  # row[5]: the record's ts
        s = self.stats
        total = sum(len(b.record_ids) for b in stored)
        s.batches += len(stored)
        s.records += inserted
        s.duplicate_records += total - inserted
        s.events += len(new_events)
        s.bad_stats += sum(b.bad_stats for b in stored)
        s.bad_event_records += sum(b.bad_events for b in stored)
        s.bad_fallback_stats += sum(b.bad_fallback for b in stored)
        s.bad_drift_stats += sum(b.bad_drift for b in stored)
        s.bad_shadow_stats += sum(b.bad_shadow for b in stored) + len(refused)
        for row in refused[:1]:
            self._complaints.warn(
                "telemetry/shadow_stats",
                "shadow_stats from %s for %s %s, which the fleet never asked it to shadow",
                row[1],
                row[2],
                row[3],
            )
        self._unknown(topics.TELEMETRY, [b.device_id for b in items if b.device_id not in known])
        # Committed: only now may the device delete these records from its outbox.
        for b in stored:
            ack = protocol.Ack(batch_id=b.batch_id, record_ids=b.record_ids)
            self.publish_ack(topics.device_topic(b.device_id, topics.ACKS), ack.to_json())
            s.acks_sent += 1
        if new_events and self.rollouts is not None:
            await self.rollouts.on_event([event_dict(r) for r in new_events])
        if self.rollouts is not None:
            # Gate evidence (fleet/gates.py): the rollouts of these devices decide now.
            await self.rollouts.on_telemetry(
                b.device_id for b in stored if b.stats or b.signals or b.drift
            )

"""Telemetry roll-ups for charts (issue 12): per minute and per hour, per model version
fleet-wide and per device, filled as records are stored; retention trims them.

**Tables** (fleet/db.py migration 6): ``ts_version_minute``, ``ts_version_hour``
(key: model, version, bucket) and ``ts_device_minute``, ``ts_device_hour`` (key:
device, model, version, bucket). ``bucket`` is the unix second of the minute's or
hour's start, by the device clock of the record's window start (``inference_stats``,
``drift_stats``, ``shadow_stats``) or, for ``fallback_stats`` (no window), of its
envelope ``ts``. A window is attributed whole to the bucket it starts in. Every
figure is a count, a sum or a max, so any range of buckets merges exactly; the
latency and confidence histograms are stored bucket by bucket (``l0..l11``,
``c0..c10``: schema 1's bounds, core/protocol.py), so p50/p95 of a range are read
from the merged histogram as ``fleet.telemetry_math`` does for the views.

**Filling** (``roll_up_in``): called by the ingest inside the write job that stores a
telemetry batch (fleet/ingest.py), so a bucket and the records it sums commit or
roll back together; writer thread. Only records that this job stored for the first
time count (a resend of a stored record id changes nothing; see ``_fresh_ids``), and
only the unpacked, valid ones (the rows the ingest made for ``inference_stats``,
``drift_stats``, the shadow and cloud agreement signals; a shadow report the ingest
refused is skipped). Contributions are summed in memory per table row first, then
written with one ``INSERT ... ON CONFLICT DO UPDATE`` per row: 2,000 devices
reporting one version each is 2,000 device rows but one fleet-wide row per minute.

**Out of range**: a record whose time is older than a table's retention, or more
than ``FUTURE_S`` ahead of the fleet clock, is stored as before (the views and gates
read the records) but not rolled up into that table: an old one would recreate a
bucket the retention job already removed (a chart would show a partial minute that
is deleted again minutes later), and one from a device with a clock far ahead would
sit in buckets no chart of "now" reaches, which only age out when the future
arrives.

**Retention** (``RetentionJob``): every ``interval_s`` on the event loop, a task
deletes buckets older than each table's keep time in write jobs of at most
``batch_rows`` rows each, so the writer thread runs other jobs (ingest, rollouts)
between them and never stalls behind a big delete.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from edgefleet.fleet.db import FleetDB, dumps

log = logging.getLogger(__name__)

LATENCY_BUCKETS = 12  # len(protocol.LATENCY_BOUNDS_MS) + 1
CONFIDENCE_BUCKETS = 11  # len(protocol.CONFIDENCE_BOUNDS) + 1
LATENCY_COLUMNS = tuple(f"l{i}" for i in range(LATENCY_BUCKETS))
CONFIDENCE_COLUMNS = tuple(f"c{i}" for i in range(CONFIDENCE_BUCKETS))
# Summed on merge (migration 6's columns): counts first, then psi_mean_sum (REAL).
SUMS: tuple[str, ...] = (
    "records",  # inference_stats records
    "requests",
    "errors",
    "answered",  # requests - errors
    "cloud",  # answers the cloud gave (sources cloud + mixed)
    "cloud_failed",  # answered by the edge because the cloud did not (sum of fallback)
    *LATENCY_COLUMNS,
    *CONFIDENCE_COLUMNS,
    "drift_records",  # drift_stats records with figures (psi_mean not null)
    "drift_samples",
    "shadow_compared",  # version: the shadow candidate
    "shadow_agreed",
    "cloud_compared",  # fallback_stats agreement (audited and escalated items)
    "cloud_agreed",
    "psi_mean_sum",
)
MAXES: tuple[str, ...] = ("psi_max", "psi_output_max")  # NULL: no figure in the bucket
FIGURES = SUMS + MAXES
_IDX = {c: i for i, c in enumerate(FIGURES)}


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    keys: tuple[str, ...]  # device_id?, model, version
    step: int  # seconds per bucket
    device: bool


TABLES: tuple[Table, ...] = (
    Table("ts_version_minute", ("model", "version"), 60, False),
    Table("ts_version_hour", ("model", "version"), 3600, False),
    Table("ts_device_minute", ("device_id", "model", "version"), 60, True),
    Table("ts_device_hour", ("device_id", "model", "version"), 3600, True),
)
TABLE = {t.name: t for t in TABLES}
FUTURE_S = 300.0  # records further ahead of the fleet clock are not rolled up


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each table keeps buckets (seconds); fleet/config.py
    ``telemetry.retention`` makes one (``TelemetryRetention.rollup()``)."""

    minute_device_s: float = 48 * 3600.0
    minute_version_s: float = 8 * 86400.0
    hour_s: float = 90 * 86400.0
    interval_s: float = 300.0
    batch_rows: int = 5000

    def keep_s(self, table: Table) -> float:
        if table.step >= 3600:
            return self.hour_s
        return self.minute_device_s if table.device else self.minute_version_s


# ------------------------------------------------------------------ filling


class _Batch(Protocol):
    """What ``roll_up_in`` reads of the ingest's ``BatchMsg`` (fleet/ingest.py)."""

    device_id: str
    received_at: float
    telemetry: list[tuple[Any, ...]]  # (id, device, seq, kind, priority, ts, t, data)
    stats: list[tuple[Any, ...]]  # inference_stats rows (id, device, model, version, ws, ...)
    signals: list[tuple[Any, ...]]  # signal_counts rows (id, device, model, version, ...)
    drift: list[tuple[Any, ...]]  # drift_stats rows (DRIFT_COLUMNS)


_NS = len(SUMS)


def _vector(figs: dict[str, Any]) -> list[Any]:
    """A record's figures as a row in FIGURES order (0 / None where it has none)."""
    row: list[Any] = [0] * _NS + [None] * len(MAXES)
    for c, v in figs.items():
        row[_IDX[c]] = v
    return row


# What follows the histograms in an inference_stats record's row: no drift, shadow or
# cloud agreement figures.
_STATS_TAIL: tuple[Any, ...] = tuple(_vector({})[SUMS.index("drift_records") :])
assert SUMS.index("drift_records") == 6 + LATENCY_BUCKETS + CONFIDENCE_BUCKETS


def _merge(vecs: list[list[Any]]) -> list[Any]:
    """Several rows of one bucket as one: sums, then maxes (None: no figure)."""
    if len(vecs) == 1:
        return vecs[0]
    cols = list(zip(*vecs, strict=True))
    return [sum(c) for c in cols[:_NS]] + [
        max((v for v in c if v is not None), default=None) for c in cols[_NS:]
    ]


class _Acc:
    """Contributions per (table, key, bucket) before any SQL. Each record's figures are
    one list, appended to its four table rows and summed column-wise once at the end
    (``rows``): the ingest's writer thread runs this for every record, thousands per
    job, so a record costs four list appends (unrolled, no per-table loop), not four
    element-wise additions."""

    def __init__(self, retention: Retention, t: float) -> None:
        Parts = defaultdict[tuple[Any, ...], list[list[Any]]]
        self.vm: Parts = defaultdict(list)
        self.vh: Parts = defaultdict(list)
        self.dm: Parts = defaultdict(list)
        self.dh: Parts = defaultdict(list)
        self.parts = {
            "ts_version_minute": self.vm,
            "ts_version_hour": self.vh,
            "ts_device_minute": self.dm,
            "ts_device_hour": self.dh,
        }
        lo = {x.name: t - retention.keep_s(x) for x in TABLES}
        self.lo_vm, self.lo_vh = lo["ts_version_minute"], lo["ts_version_hour"]
        self.lo_dm, self.lo_dh = lo["ts_device_minute"], lo["ts_device_hour"]
        self.lo = min(lo.values())
        self.hi = t + FUTURE_S
        self.skipped = 0  # records left out of at least one table (out of its range)

    def add(self, device: str, model: str, version: str, at: float, figs: dict[str, Any]) -> None:
        self.add_vector(device, model, version, at, _vector(figs))

    def add_vector(self, device: str, model: str, version: str, at: float, vec: list[Any]) -> None:
        """``vec``: FIGURES order; kept (not copied), so the caller must not change it."""
        if not self.lo <= at <= self.hi:
            self.skipped += 1
            return
        m = int(at // 60) * 60
        h = m - m % 3600
        if at >= self.lo_vm:
            self.vm[(model, version, m)].append(vec)
        if at >= self.lo_vh:
            self.vh[(model, version, h)].append(vec)
        if at >= self.lo_dm:
            self.dm[(device, model, version, m)].append(vec)
        if at >= self.lo_dh:
            self.dh[(device, model, version, h)].append(vec)

    def rows(self, table: Table) -> list[tuple[Any, ...]]:
        return [(*k, *_merge(vecs)) for k, vecs in self.parts[table.name].items()]


def _upsert_sql(x: Table) -> str:
    cols = (*x.keys, "bucket", *FIGURES)
    lead = x.keys[:-1]
    pk = ", ".join((*lead, "bucket", "version"))
    sets = [f"{c} = {c} + excluded.{c}" for c in SUMS] + [
        # max() of SQLite is NULL when either side is: keep whichever exists.
        f"{c} = max(coalesce({c}, excluded.{c}), coalesce(excluded.{c}, {c}))"
        for c in MAXES
    ]
    return (
        f"INSERT INTO {x.name} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        f" ON CONFLICT ({pk}) DO UPDATE SET {', '.join(sets)}"
    )


_UPSERT = {x.name: _upsert_sql(x) for x in TABLES}


def _stored_at(conn: sqlite3.Connection, batches: Sequence[_Batch]) -> dict[str, float]:
    """Record id → ``received_at`` of its stored row. A record is new in this job when
    that is its batch's own receive time: an id stored earlier keeps its first one
    (``INSERT OR IGNORE``), so a resend is not counted twice."""
    ids = [r[0] for b in batches for r in b.telemetry]
    if not ids:
        return {}
    return dict(
        conn.execute(
            "SELECT id, received_at FROM telemetry WHERE id IN (SELECT value FROM json_each(?))",
            (dumps(ids),),
        ).fetchall()
    )


def roll_up_in(
    conn: sqlite3.Connection,
    batches: Sequence[_Batch],
    refused: Iterable[tuple[Any, ...]] = (),
    retention: Retention | None = None,
    *,
    t: float | None = None,
) -> int:
    """Writer thread, inside the ingest's write job, after the batch's records were
    inserted: add the new records' figures to the four tables. ``refused``: signal
    rows the ingest did not store. Returns the table rows upserted."""
    stored = _stored_at(conn, batches)
    if not stored:
        return 0
    acc = _Acc(retention or Retention(), time.time() if t is None else t)
    skip = set(refused)
    done: set[Any] = set()  # what was counted: two copies of one id in a job count once

    def take(key: Any, rid: str, b: _Batch) -> bool:
        if stored.get(rid) != b.received_at or key in done:
            return False
        done.add(key)
        return True

    for b in batches:
        dev = b.device_id
        for r in b.stats:
            if not take(r[0], r[0], b):
                continue
            data = orjson.loads(r[8])
            src = data["sources"]
            # In SUMS' order (the hot path: one list, no per-figure lookups).
            vec = [
                1,
                r[5],
                r[6],
                r[5] - r[6],
                src.get("cloud", 0) + src.get("mixed", 0),
                sum(data["fallback"].values()),
                *data["latency_ms"]["counts"],
                *data["confidence"]["counts"],
                *_STATS_TAIL,
            ]
            acc.add_vector(dev, r[2], r[3], float(r[4]), vec)
        for r in b.drift:
            # DRIFT_COLUMNS: id, device, model, version, window_start, window_s, samples,
            # psi_max, psi_mean, psi_output, ...
            if not take(r[0], r[0], b):
                continue
            with_mean = r[8] is not None
            acc.add(
                dev,
                r[2],
                r[3],
                float(r[4]),
                {
                    "drift_records": int(with_mean),
                    "drift_samples": r[6] if with_mean else 0,
                    "psi_mean_sum": r[8] if with_mean else 0.0,
                    "psi_max": r[7],
                    "psi_output_max": r[9],
                },
            )
        if b.signals:
            envelopes = {r[0]: r for r in b.telemetry}
            for s in b.signals:
                # (record_id, device, model, version, other, signal, k, n, t); a
                # fallback_stats record gives one row per model version.
                rid = s[0]
                if s in skip or not take((rid, s[2], s[3], s[5]), rid, b):
                    continue
                env = envelopes[rid]
                if s[5] == "shadow_agreement":
                    at = float(orjson.loads(env[7])["window_start"])
                    figs = {"shadow_compared": s[7], "shadow_agreed": s[6]}
                else:
                    at = float(env[5])
                    figs = {"cloud_compared": s[7], "cloud_agreed": s[6]}
                acc.add(dev, s[2], s[3], at, figs)
    n = 0
    for x in TABLES:
        rows = acc.rows(x)
        if rows:
            conn.executemany(_UPSERT[x.name], rows)
            n += len(rows)
    return n


# ------------------------------------------------------------------ retention


def prune_in(conn: sqlite3.Connection, table: Table, before: float, limit: int) -> int:
    """Writer thread: delete at most ``limit`` of ``table``'s buckets older than
    ``before``; the number deleted (fewer than ``limit``: done)."""
    cols = ", ".join((*table.keys, "bucket"))
    cur = conn.execute(
        f"DELETE FROM {table.name} WHERE ({cols}) IN"
        f" (SELECT {cols} FROM {table.name} WHERE bucket < ? LIMIT ?)",
        (int(before), limit),
    )
    return cur.rowcount


async def prune(db: FleetDB, retention: Retention, *, t: float | None = None) -> dict[str, int]:
    """Event loop: every table trimmed to its keep time, one bounded write job at a
    time (other writers' jobs run in between). Returns rows deleted per table."""
    t = time.time() if t is None else t
    deleted: dict[str, int] = {}
    limit = retention.batch_rows
    for x in TABLES:
        before = t - retention.keep_s(x)
        total = 0
        while True:
            n = await db.write(functools.partial(prune_in, table=x, before=before, limit=limit))
            total += n
            if n < limit:
                break
        deleted[x.name] = total
    return deleted


class RetentionJob:
    """``start()`` a task on the event loop that runs ``prune`` now and then every
    ``retention.interval_s``; ``stop()`` cancels it and waits for it (no task is
    left behind; a delete job already on the writer finishes, which is harmless)."""

    def __init__(self, db: FleetDB, retention: Retention) -> None:
        self.db = db
        self.retention = retention
        self.runs = 0
        self.deleted = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="fleet-telemetry-retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                deleted = await prune(self.db, self.retention)
                self.runs += 1
                self.deleted += sum(deleted.values())
                if any(deleted.values()):
                    log.info("telemetry retention: deleted %s", deleted)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("telemetry retention: pruning failed (tried again later)")
            await asyncio.sleep(self.retention.interval_s)

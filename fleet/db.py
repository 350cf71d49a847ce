"""The fleet's state: one SQLite file through sqlite-utils, with numbered migrations.

Everything the fleet knows lives here, never only in a process's memory (DESIGN.md,
Scale): a restarted fleet, or a second fleet worker on the same database, computes
the same desired states and rollout decisions. Writes go through one writer thread
(``edgefleet.core.sqlite_writer``); reads for the API and views run on read-only connections
in a thread pool, so a dashboard never waits behind telemetry ingest.

Migrations: ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``
(``PRAGMA user_version``). Add new ones at the end; never edit a released one.
A database newer than this code is refused rather than misread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from edgefleet.core.errors import EdgefleetError
from edgefleet.core.sqlite_writer import Reader, SqliteWriter

T = TypeVar("T")


def _m1_initial(db: sqlite_utils.Database) -> None:
    db.table("meta").create({"key": str, "value": int}, pk="key")
    # One fleet-wide sequence for desired-state revisions: it only grows, for every
    # device, across restarts and across workers (see next_revision).
    db.table("meta").insert({"key": "revision", "value": 0})

    db.table("model_versions").create(
        {
            "name": str,
            "version": str,
            "sha256": str,
            "size": int,
            "path": str,  # relative to the fleet's bundle directory
            "runtime": str,
            "manifest": str,  # JSON
            "key_id": str,
            "uploaded_at": float,
        },
        pk=("name", "version"),
    )
    db.table("model_labels").create(
        {"name": str, "label": str, "version": str, "updated_at": float},
        pk=("name", "label"),
    )

    db.table("devices").create(
        {
            "id": str,
            "created_at": float,
            # sha256 of the device secret (MQTT password, downloads): 32 random bytes
            # need no slow hash (fleet/devices.py)
            "secret_hash": str,
            "online": int,
            "status_at": float,  # fleet clock when the last status arrived
            "last_seen": float,  # fleet clock of the last message of any kind
            "agent_version": str,
            "protocol": str,
            "offline_reason": str,
            "accelerators": str,  # JSON
            "reported": str,  # JSON: the last reported document
            "reported_revision": int,
            "desired": str,  # JSON: the last desired document published
            "desired_revision": int,
            "last_error": str,
        },
        pk="id",
        not_null={"created_at"},
        defaults={"online": 0, "reported_revision": 0, "desired_revision": 0},
    )
    db.table("device_groups").create({"device_id": str, "grp": str}, pk=("device_id", "grp"))
    db.table("device_groups").create_index(["grp"])
    db.table("device_models").create(
        {
            "device_id": str,
            "model": str,
            "active": str,
            "previous": str,
            "desired": str,
            "state": str,
            "rollout": str,
            "provider": str,
            "last_error": str,
            "updated_at": float,
        },
        pk=("device_id", "model"),
    )

    db.table("enrolment_tokens").create(
        {
            "token_hash": str,  # sha256 of the token: a database leak spends no token
            "device_id": str,
            "groups": str,  # JSON list
            "created_at": float,
            "expires_at": float,
            "used_at": float,
            "used_by": str,
        },
        pk="token_hash",
    )

    db.table("assignments").create(
        {
            "id": int,
            "model": str,
            "version": str,
            "target_kind": str,  # device | group | all
            "target": str,  # device id, group name, or "" for all
            "rollout_id": str,
            "created_at": float,
        },
        pk="id",
    )
    db.table("assignments").create_index(["model", "target_kind", "target"])

    db.table("rollouts").create(
        {
            "id": str,
            "model": str,
            "version": str,
            "target_kind": str,
            "target": str,
            "waves": str,  # JSON list of wave sizes: ints or "10%"
            "max_failure_share": float,
            "state": str,  # running | paused | stopped | completed | rolled_back
            "current_wave": int,
            "wave_started_at": float,  # fleet clock: when current_wave was pushed
            "wave_timeout_s": float,  # NULL: a wave waits for every device
            "reason": str,
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
    )
    db.table("rollout_devices").create(
        {
            "rollout_id": str,
            "device_id": str,
            "wave": int,
            # waiting (not reached yet) | pending (sent) | succeeded | failed | rolled_back
            "state": str,
            "previous_version": str,  # what the device was meant to run before
            "reason": str,
            "updated_at": float,
        },
        pk=("rollout_id", "device_id"),
    )
    db.table("rollout_devices").create_index(["device_id"])

    db.table("events").create(
        {
            "id": str,
            "device_id": str,
            "at": float,  # device clock
            "received_at": float,  # fleet clock
            "kind": str,
            "model": str,
            "version": str,
            "revision": int,
            "rollout": str,
            "reason": str,
            "data": str,  # JSON: the whole event
        },
        pk="id",
    )
    db.table("events").create_index(["device_id", "received_at"])
    db.table("events").create_index(["rollout"])

    db.table("telemetry").create(
        {
            "id": str,
            "device_id": str,
            "seq": int,
            "kind": str,
            "priority": int,
            "ts": float,
            "received_at": float,
            "data": str,  # JSON
        },
        pk="id",
    )
    db.table("telemetry").create_index(["device_id", "seq"])
    # inference_stats records, unpacked for the views (per device, model, version).
    db.table("inference_stats").create(
        {
            "id": str,
            "device_id": str,
            "model": str,
            "version": str,
            "window_start": float,
            "count": int,
            "errors": int,
            "received_at": float,
            "data": str,  # JSON: the record's data
        },
        pk="id",
    )
    db.table("inference_stats").create_index(["model", "version"])
    db.table("inference_stats").create_index(["device_id", "model"])


def _m2_revocation(db: sqlite_utils.Database) -> None:
    # Issue 6: a revoked device keeps its row and history; its secret_hash is cleared
    # (downloads refused) and revoked_at set; enrolling it again clears revoked_at.
    db.execute("ALTER TABLE devices ADD COLUMN revoked_at REAL")


def _m3_rollout_gates(db: sqlite_utils.Database) -> None:
    # Issue 11, gated rollouts (fleet/gates.py, fleet/rollouts.py). A rollout's plan (JSON,
    # NULL for a plain waves rollout), its stage (shadow | serving), when the shadow
    # stage and the first serving wave started, and the evidence of the gate that
    # stopped or rolled it back (JSON).
    for column, kind in (
        ("plan", "TEXT"),
        ("stage", "TEXT"),
        ("stage_started_at", "REAL"),
        ("serving_started_at", "REAL"),
        ("evidence", "TEXT"),
    ):
        db.execute(f"ALTER TABLE rollouts ADD COLUMN {column} {kind}")
    # 1: the device runs the candidate in shadow during the shadow stage.
    db.execute("ALTER TABLE rollout_devices ADD COLUMN shadow INTEGER NOT NULL DEFAULT 0")
    # Every gate decision that passed or failed a stage (not the waits).
    db.table("rollout_decisions").create(
        {
            "id": int,
            "rollout_id": str,
            "stage": str,  # shadow | wave
            "wave": int,
            "outcome": str,  # pass | fail
            "evidence": str,  # JSON list: one fleet.gates.Evidence per gate
            "at": float,
        },
        pk="id",
    )
    db.table("rollout_decisions").create_index(["rollout_id"])
    # Rate signals unpacked from telemetry records for the gates: ``k`` of ``n`` items
    # (agreeing of compared), per record, device, model, version and signal.
    # shadow_agreement: ``version`` is the candidate, ``other`` the active version;
    # cloud_agreement: from fallback_stats agreement rows (audited and escalated).
    db.table("signal_counts").create(
        {
            "record_id": str,
            "device_id": str,
            "model": str,
            "version": str,
            "other": str,
            "signal": str,
            "k": int,
            "n": int,
            "received_at": float,
        },
        pk=("record_id", "model", "version", "signal"),
    )
    db.table("signal_counts").create_index(["model", "version", "signal", "received_at"])


def _m4_policies_and_hard_examples(db: sqlite_utils.Database) -> None:
    # Issue 11, part 5: fallback policies per model for a device, a group or all
    # (fleet/policies.py); merged into each device's desired (fleet/desired.py).
    db.table("fallback_policies").create(
        {
            "model": str,
            "target_kind": str,  # device | group | all
            "target": str,  # device id, group name, or "" for all
            "policy": str,  # JSON: core.protocol.FleetFallback
            "updated_at": float,
        },
        pk=("model", "target_kind", "target"),
    )
    # Issue 11, part 6: hard examples uploaded by devices (fleet/hard_examples.py); the
    # upload's bytes are a file under <data_dir>/hard-examples, named by its sha256.
    db.table("hard_examples").create(
        {
            "id": str,  # sha256 of the uploaded body
            "device_id": str,
            "model": str,
            "version": str,
            "reason": str,  # unsure | escalated | audit | shadow ... (the device's kind)
            "status": str,  # the device's: answered | expired | pending
            "created_at": float,  # device clock
            "received_at": float,
            "bytes": int,
            "has_image": int,
            "edge_class": int,
            "edge_confidence": float,
            "cloud_model": str,
            "cloud_version": str,
            "cloud_class": int,
            "cloud_confidence": float,
            "agree": int,
            "label": str,
            "label_id": int,  # the label's index in the model version's labels
            "labelled_by": str,
            "labelled_at": float,
            "meta": str,  # JSON: the upload's header
        },
        pk="id",
    )
    db.table("hard_examples").create_index(["model", "version", "reason"])
    db.table("hard_examples").create_index(["device_id"])


def _m5_drift_stats(db: sqlite_utils.Database) -> None:
    # Issue 11, part 3: drift_stats records unpacked, one row per (device, model,
    # version, window), for the views (fleet/telemetry.py) and the rollout gates'
    # drift_psi. Figures are NULL (with drift_reason) for a bundle without a reference
    # profile or a window with too few items.
    db.table("drift_stats").create(
        {
            "id": str,  # the telemetry record's id
            "device_id": str,
            "model": str,
            "version": str,
            "window_start": float,  # device clock
            "window_s": float,
            "samples": int,
            "psi_max": float,
            "psi_mean": float,
            "psi_output": float,
            "js_max": float,
            "js_output": float,
            "drift_reason": str,
            "received_at": float,  # fleet clock
            "data": str,  # JSON: the record's data
        },
        pk="id",
    )
    db.table("drift_stats").create_index(["model", "version", "received_at"])
    db.table("drift_stats").create_index(["device_id", "model", "version"])


# Migration 6's figure columns (issue 12, time series for charts; fleet/rollup.py fills
# them). Frozen with the migration: schema-1 histograms have 12 latency and 11
# confidence buckets (core/protocol.py LATENCY_BOUNDS_MS, CONFIDENCE_BOUNDS + overflow).
_M6_COUNTS = (
    "records",  # inference_stats records
    "requests",
    "errors",
    "answered",  # requests - errors
    "cloud",  # answers the cloud gave (sources cloud + mixed)
    "cloud_failed",  # answered by the edge because the cloud did not (sum of fallback)
    *(f"l{i}" for i in range(12)),  # latency histogram counts
    *(f"c{i}" for i in range(11)),  # confidence histogram counts
    "drift_records",  # drift_stats records with figures
    "drift_samples",
    "shadow_compared",  # shadow_stats: version is the candidate
    "shadow_agreed",
    "cloud_compared",  # fallback_stats agreement rows (audited and escalated)
    "cloud_agreed",
)
_M6_REALS = ("psi_mean_sum",)  # sum of psi_mean over drift_records (mean = sum / n)
_M6_MAXES = ("psi_max", "psi_output_max")  # NULL: no figure in the bucket
_M6_TABLES = {  # table: (key columns, bucket seconds)
    "ts_version_minute": (("model", "version"), 60),
    "ts_version_hour": (("model", "version"), 3600),
    "ts_device_minute": (("device_id", "model", "version"), 60),
    "ts_device_hour": (("device_id", "model", "version"), 3600),
}
# What the backfill keeps (the default retention of fleet/config.py at the time;
# a fleet configured otherwise trims or keeps filling from here on).
_M6_BACKFILL_S = {
    "ts_version_minute": 8 * 86400.0,
    "ts_version_hour": 90 * 86400.0,
    "ts_device_minute": 48 * 3600.0,
    "ts_device_hour": 90 * 86400.0,
}


def _m6_telemetry_rollups(db: sqlite_utils.Database) -> None:
    # Issue 12, time series for charts: per-minute and per-hour sums per model version
    # (fleet-wide) and per device, so a chart of a week of a big fleet reads a few
    # thousand rows, not millions of records. Every figure is a count, a sum or a max,
    # so buckets merge by adding (histograms by bucket: p50/p95 of any range). The
    # primary key leads with what a chart filters on, then the time: one range scan
    # per chart; WITHOUT ROWID keeps a chart's rows together. ``bucket``: unix seconds
    # of the minute's or hour's start (device clock of the record's window start).
    figures = (
        [f"{c} INTEGER NOT NULL DEFAULT 0" for c in _M6_COUNTS]
        + [f"{c} REAL NOT NULL DEFAULT 0" for c in _M6_REALS]
        + [f"{c} REAL" for c in _M6_MAXES]
    )
    for table, (keys, _) in _M6_TABLES.items():
        lead = keys[:-1]  # model | device_id, model; then bucket, then version
        cols = [f"{k} TEXT NOT NULL" for k in keys] + ["bucket INTEGER NOT NULL", *figures]
        pk = ", ".join((*lead, "bucket", "version"))
        db.execute(f"CREATE TABLE {table} ({', '.join(cols)}, PRIMARY KEY ({pk})) WITHOUT ROWID")
        db.execute(f"CREATE INDEX {table}_bucket ON {table} (bucket)")  # retention deletes
    _m6_backfill(db)


def _m6_backfill(db: sqlite_utils.Database) -> None:
    # The telemetry stored so far, rolled up once (in SQL, in the migration's
    # transaction). Sources as fleet/rollup.py reads them: inference_stats and
    # drift_stats by window start; shadow agreement by the shadow record's window
    # start; cloud agreement by the fallback_stats record's ts (it has no window).
    zero = {c: "0" for c in (*_M6_COUNTS, *_M6_REALS)} | {c: "NULL" for c in _M6_MAXES}

    def select(keys: str, at: str, src: str, **cols: str) -> str:
        figs = ", ".join(f"{cols.get(c, zero[c])} AS {c}" for c in zero)
        return f"SELECT {keys}, {at} AS at, {figs} FROM {src}"

    lat = {
        f"l{i}": f"coalesce(json_extract(data, '$.latency_ms.counts[{i}]'), 0)" for i in range(12)
    }
    conf = {
        f"c{i}": f"coalesce(json_extract(data, '$.confidence.counts[{i}]'), 0)" for i in range(11)
    }
    parts = [
        select(
            "device_id, model, version",
            "window_start",
            "inference_stats",
            records="1",
            requests="count",
            errors="errors",
            answered="count - errors",
            cloud="coalesce(json_extract(data, '$.sources.cloud'), 0)"
            " + coalesce(json_extract(data, '$.sources.mixed'), 0)",
            cloud_failed="(SELECT coalesce(sum(value), 0) FROM json_each(data, '$.fallback'))",
            **lat,
            **conf,
        ),
        select(
            "device_id, model, version",
            "window_start",
            "drift_stats",
            drift_records="psi_mean IS NOT NULL",
            drift_samples="CASE WHEN psi_mean IS NULL THEN 0 ELSE samples END",
            psi_mean_sum="coalesce(psi_mean, 0)",
            psi_max="psi_max",
            psi_output_max="psi_output",
        ),
        select(
            "s.device_id, s.model, s.version",
            "json_extract(t.data, '$.window_start')",
            "signal_counts s JOIN telemetry t ON t.id = s.record_id"
            " WHERE s.signal = 'shadow_agreement'",
            shadow_compared="s.n",
            shadow_agreed="s.k",
        ),
        select(
            "s.device_id, s.model, s.version",
            "t.ts",
            "signal_counts s JOIN telemetry t ON t.id = s.record_id"
            " WHERE s.signal = 'cloud_agreement'",
            cloud_compared="s.n",
            cloud_agreed="s.k",
        ),
    ]
    db.execute("CREATE TEMP TABLE _m6_src AS " + " UNION ALL ".join(parts))
    t = time.time()
    sums = [f"sum({c})" for c in (*_M6_COUNTS, *_M6_REALS)] + [f"max({c})" for c in _M6_MAXES]
    for table, (keys, step) in _M6_TABLES.items():
        k = ", ".join(keys)
        db.execute(
            f"INSERT INTO {table} ({k}, bucket, {', '.join(zero)})"
            f" SELECT {k}, CAST(at / {step} AS INTEGER) * {step} AS b, {', '.join(sums)}"
            " FROM _m6_src WHERE at IS NOT NULL AND at >= ? AND at <= ?"
            f" GROUP BY {k}, b",
            (t - _M6_BACKFILL_S[table], t + 300.0),
        )
    db.execute("DROP TABLE _m6_src")


def _m7_console(db: sqlite_utils.Database) -> None:
    # Issue 12: console sign-ins (fleet/console/sessions.py) and the audit log
    # (fleet/audit.py). Sessions are kept by the sha256 of the cookie value only.
    db.table("console_sessions").create(
        {
            "id_hash": str,
            "name": str,  # the token's name and role at sign-in
            "role": str,
            "csrf": str,
            "created_at": float,
            "expires_at": float,
            "remote": str,
        },
        pk="id_hash",
    )
    db.execute(
        "CREATE TABLE audit_log (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
        " actor TEXT NOT NULL, role TEXT NOT NULL, via TEXT NOT NULL, action TEXT NOT NULL,"
        " target TEXT NOT NULL, status INTEGER NOT NULL, remote TEXT NOT NULL,"
        " detail TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX audit_log_actor ON audit_log (actor, id)")


def _m8_gate_series(db: sqlite_utils.Database) -> None:
    # Issue 12, the rollout page's gate charts (fleet/console/rollouts.py): each gate's
    # figures over time, written where the gates are evaluated (fleet/rollouts.py
    # ``Rollouts._record_gates_in``). Bounded: one evaluation per rollout every
    # ``Rollouts.series_interval_s`` at most (not one per report or telemetry batch),
    # plus the evaluations that passed, failed or overrode a stage. The full evidence of
    # those stays in ``rollout_decisions``; here only what a chart draws.
    db.execute(
        "CREATE TABLE rollout_gate_evals (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " rollout_id TEXT NOT NULL, at REAL NOT NULL, stage TEXT NOT NULL,"
        " wave INTEGER NOT NULL, gate TEXT NOT NULL, signal TEXT NOT NULL,"
        " outcome TEXT NOT NULL,"  # pass | fail | wait (what the gate said then)
        " canary REAL, canary_low REAL, canary_high REAL, canary_n INTEGER,"
        " baseline REAL, baseline_n INTEGER, threshold REAL)"
    )
    # The throttle's "last written" and the chart's range: both by rollout, then time.
    db.execute("CREATE INDEX rollout_gate_evals_at ON rollout_gate_evals (rollout_id, at)")
    # The console's rollout list counts every listed rollout's devices per wave and state,
    # and each decision counts its wave's (fleet/rollouts.py ``_advance_in``): from this
    # covering index alone, not from the rows (2,000 devices a rollout).
    db.execute("CREATE INDEX rollout_devices_wave ON rollout_devices (rollout_id, wave, state)")


def _m9_device_outbox(db: sqlite_utils.Database) -> None:
    # Issue 12: what each device's newest telemetry batch said of its outbox (records
    # waiting on the store PC, the outbox's running drop counters when full), kept by
    # fleet/ingest.py for the console's backlog and lost-telemetry alerts and /metrics.
    for column, kind in (
        ("outbox_waiting", "INTEGER"),
        ("outbox_dropped_low", "INTEGER"),
        ("outbox_dropped_high", "INTEGER"),
        ("outbox_at", "REAL"),  # fleet clock: when that batch arrived
    ):
        db.execute(f"ALTER TABLE devices ADD COLUMN {column} {kind}")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _m1_initial,
    _m2_revocation,
    _m3_rollout_gates,
    _m4_policies_and_hard_examples,
    _m5_drift_stats,
    _m6_telemetry_rollups,
    _m7_console,
    _m8_gate_series,
    _m9_device_outbox,
]
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(EdgefleetError, RuntimeError):
    pass


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION inside the caller's transaction; return it."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"fleet database has schema {version}, newer than this fleet's {SCHEMA_VERSION}"
        )
    db = sqlite_utils.Database(conn)
    for step in MIGRATIONS[version:]:
        step(db)
    # user_version is transactional in SQLite: a failed migration leaves it unchanged.
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return SCHEMA_VERSION


def next_revision(conn: sqlite3.Connection) -> int:
    """The next desired-state revision, from the database (safe with several workers:
    the writer's BEGIN IMMEDIATE serialises it with any other process's writer)."""
    row = conn.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value"
    ).fetchone()
    return int(row[0])


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def loads(text: str | None, default: Any = None) -> Any:
    return default if text is None else json.loads(text)


def now() -> float:
    return time.time()


class FleetDB:
    """``await FleetDB(path).open()``; ``write(fn)`` on the writer, ``read(fn)`` on readers.

    ``fn`` gets a ``sqlite3.Connection`` (rows as ``sqlite3.Row`` for reads); wrap it
    in ``sqlite_utils.Database(conn)`` where the table helpers read better.
    """

    def __init__(self, path: Path | str, *, read_threads: int = 2) -> None:
        self.path = Path(path)
        self._writer = SqliteWriter(self.path, name="fleet-db-writer")
        self._read_threads = read_threads
        self._reader: Reader | None = None

    async def open(self) -> FleetDB:
        await self._writer.open(migrate)
        self._reader = Reader(self.path, threads=self._read_threads, name="fleet-db-reader")
        return self

    async def close(self) -> None:
        await self._writer.close()
        if self._reader is not None:
            await self._reader.close()
            self._reader = None

    async def __aenter__(self) -> FleetDB:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._writer.submit(fn)

    @property
    def write_queue_depth(self) -> int:
        """Write jobs waiting for the writer thread (fleet/metrics.py)."""
        return self._writer.queue_depth

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            raise RuntimeError("fleet database is not open")
        return await self._reader.run(fn)

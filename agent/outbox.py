"""The offline-first outbox: everything the agent tells the fleet waits here first.

A size-capped SQLite file (WAL) owned by **one writer thread**, as in Datasette's
database.py: coroutines hand a function to the writer through a queue and await an
asyncio future the writer resolves with ``loop.call_soon_threadsafe``. One thread
owns the connection, so there is never a "database is locked", and queued jobs are
committed together (group commit: one transaction, a SAVEPOINT per job, so a failing
job rolls back alone).

Life of a record: ``add`` → waits (free) → ``next_batch`` marks it in flight under a
batch id → the sender publishes the batch → the **fleet** stores it and acks the
batch's record ids on the device's ``acks`` topic → ``ack`` deletes it. A broker
PUBACK is not enough: Mosquitto drops queued QoS 1 messages past its queue limits
(see docs/mqtt.md). A batch that is not acked in time is ``release``d and sent again;
the fleet stores records idempotently by id. After a restart every in-flight batch
is released: the fleet may get those records twice and keeps them once.

Cap and drop policy: the outbox holds at most ``max_bytes`` (payload bytes plus
``RECORD_OVERHEAD`` per record, an estimate of SQLite's row and index cost). When an
add goes over, the oldest LOW-priority records are deleted first (telemetry samples:
a newer aggregate supersedes them), then the oldest HIGH ones (events) only if no low
ones are left. What was dropped is counted per priority in the file itself and sent
with every batch, so the fleet knows what it is missing.

Time: records carry the device's wall clock (``ts``), which on store PCs is often
wrong, and the outbox's ``seq``, a sequence that only grows (SQLite AUTOINCREMENT:
never reused, even after deletes or a restart). Batches carry ``sent_at`` so the fleet
can estimate the clock offset from its own receive time.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from edgefleet.core.errors import EdgefleetError
from edgefleet.core.sqlite_writer import SqliteWriter, WriterClosed

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
RECORD_OVERHEAD = 100  # bytes counted per record on top of its payload

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- grows only: order that survives clock jumps
    id TEXT NOT NULL UNIQUE,                -- the fleet deduplicates by this
    priority INTEGER NOT NULL,
    kind TEXT NOT NULL,
    ts REAL NOT NULL,                       -- device wall clock (may be wrong)
    size INTEGER NOT NULL,                  -- bytes of data
    data BLOB NOT NULL,                     -- JSON, UTF-8
    batch_id TEXT,                          -- in flight in this batch, NULL: waiting
    attempts INTEGER NOT NULL DEFAULT 0
);
-- next_batch: waiting records, events first, oldest first
CREATE INDEX IF NOT EXISTS records_waiting ON records(priority DESC, seq) WHERE batch_id IS NULL;
CREATE INDEX IF NOT EXISTS records_in_flight ON records(batch_id) WHERE batch_id IS NOT NULL;
-- the drop policy: lowest priority, oldest first
CREATE INDEX IF NOT EXISTS records_drop_order ON records(priority, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Priority(enum.IntEnum):
    LOW = 0  # telemetry samples and aggregates: dropped first when the outbox is full
    HIGH = 1  # events (activation failed, rolled back...): sent first, dropped last


def new_record_id() -> str:
    """32 hex digits: 48 bits of milliseconds, then 80 random bits (ULID-like).

    Unique without coordination; the time prefix keeps the fleet's id index
    roughly append-only. It orders nothing: device clocks are wrong (use ``seq``).
    """
    return f"{time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF:012x}{secrets.token_hex(10)}"


@dataclass(frozen=True, slots=True)
class NewRecord:
    """What callers add: a kind (e.g. ``inference_stats``, ``event``) and JSON data."""

    kind: str
    data: Any
    priority: Priority = Priority.LOW


@dataclass(frozen=True, slots=True)
class StoredRecord:
    id: str
    seq: int
    kind: str
    priority: int
    ts: float
    data: bytes  # the JSON text as stored


@dataclass(frozen=True, slots=True)
class Batch:
    id: str
    records: list[StoredRecord]
    size: int  # sum of the records' data bytes
    dropped_low: int = 0  # the outbox's drop counters when the batch was taken
    dropped_high: int = 0

    @property
    def record_ids(self) -> list[str]:
        return [r.id for r in self.records]


@dataclass(frozen=True, slots=True)
class OutboxStats:
    records: int
    bytes: int  # counted against max_bytes
    in_flight: int
    max_bytes: int
    added_total: int
    acked_total: int
    dropped_low: int
    dropped_high: int


class OutboxClosed(EdgefleetError, RuntimeError):
    pass


class Outbox:
    """``await Outbox(path, max_bytes).open()``; every method is a coroutine on one loop."""

    def __init__(
        self,
        path: Path | str,
        max_bytes: int,
        *,
        max_record_bytes: int = 64 * 1024,
        synchronous: str = "NORMAL",
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_record_bytes = min(max_record_bytes, max_bytes)
        # WAL + NORMAL: a committed add survives a crash or SIGKILL of the agent (the
        # WAL is in the OS page cache); a power cut may lose the last commits but never
        # corrupts the file. FULL also survives power cuts, at an fsync per commit.
        self.synchronous = synchronous.upper()
        # Set (on the loop thread) when records arrive; ``urgent`` for HIGH ones.
        self.added = asyncio.Event()
        self.urgent = asyncio.Event()
        self.waiting_hint = 0  # records not in flight, as of the last operation
        self._writer = _OutboxWriter(self)
        # Writer-thread state (touched only by the writer thread).
        self._bytes = 0
        self._records = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> Outbox:
        released = await self._writer.open(self._init, setup=_setup)
        if released:
            log.info("outbox: %d records in flight at the last stop will be sent again", released)
        return self

    async def close(self) -> None:
        await self._writer.close()

    async def __aenter__(self) -> Outbox:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ operations

    async def add(self, records: Iterable[NewRecord]) -> list[str]:
        """Store records (durably, once this returns); their ids, in order."""
        rows = []
        now = time.time()
        urgent = False
        for r in records:
            data = orjson.dumps(r.data)
            if len(data) > self.max_record_bytes:
                raise ValueError(
                    f"{r.kind} record of {len(data)} bytes exceeds {self.max_record_bytes}"
                )
            urgent |= r.priority >= Priority.HIGH
            rows.append((new_record_id(), int(r.priority), r.kind, now, len(data), data))
        if not rows:
            return []
        await self._submit(lambda conn: self._insert(conn, rows))
        self.waiting_hint += len(rows)
        self.added.set()
        if urgent:
            self.urgent.set()
        return [row[0] for row in rows]

    async def add_one(self, kind: str, data: Any, priority: Priority = Priority.LOW) -> str:
        return (await self.add([NewRecord(kind, data, priority)]))[0]

    async def next_batch(self, max_records: int, max_bytes: int) -> Batch | None:
        """Mark the next waiting records in flight (HIGH first, then oldest); None if none.

        A batch holds at least one record (even one over ``max_bytes``: add() caps
        records at ``max_record_bytes``), at most ``max_records`` and ``max_bytes`` of data.
        """
        batch_id = new_record_id()

        def take(conn: sqlite3.Connection) -> Batch | None:
            cur = conn.execute(
                "SELECT seq, id, kind, priority, ts, size, data FROM records"
                " WHERE batch_id IS NULL ORDER BY priority DESC, seq LIMIT ?",
                (max_records,),
            )
            picked: list[StoredRecord] = []
            total = 0
            for seq, rid, kind, prio, ts, size, data in cur:
                if picked and total + size > max_bytes:
                    break
                picked.append(StoredRecord(rid, seq, kind, prio, ts, bytes(data)))
                total += size
            cur.close()
            if not picked:
                return None
            conn.executemany(
                "UPDATE records SET batch_id = ?, attempts = attempts + 1 WHERE seq = ?",
                [(batch_id, r.seq) for r in picked],
            )
            c = self._counters(conn)
            return Batch(batch_id, picked, total, c.get("dropped_low", 0), c.get("dropped_high", 0))

        batch = await self._submit(take)
        self.waiting_hint = max(0, self.waiting_hint - (len(batch.records) if batch else 0))
        if batch is None:
            self.waiting_hint = 0
        return batch

    async def ack(self, record_ids: Sequence[str]) -> int:
        """The fleet stored these: delete them (whatever batch they are in). Count deleted."""
        ids = list(record_ids)
        return await self._submit(lambda conn: self._delete(conn, ids)) if ids else 0

    async def ack_batch(self, batch_id: str) -> int:
        """Delete the records of an in-flight batch (when an ack names no record ids)."""

        def delete(conn: sqlite3.Connection) -> int:
            ids = [
                r[0] for r in conn.execute("SELECT id FROM records WHERE batch_id = ?", (batch_id,))
            ]
            return self._delete(conn, ids)

        return await self._submit(delete)

    async def release(self, batch_id: str) -> int:
        """Put an unacknowledged batch's records back in line, to be sent again."""

        def release(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE records SET batch_id = NULL WHERE batch_id = ?", (batch_id,)
            ).rowcount

        n = await self._submit(release)
        self.waiting_hint += n
        return n

    async def stats(self) -> OutboxStats:
        def read(conn: sqlite3.Connection) -> OutboxStats:
            c = self._counters(conn)
            in_flight = conn.execute(
                "SELECT count(*) FROM records WHERE batch_id IS NOT NULL"
            ).fetchone()[0]
            return OutboxStats(
                records=self._records,
                bytes=self._bytes,
                in_flight=in_flight,
                max_bytes=self.max_bytes,
                added_total=c.get("added", 0),
                acked_total=c.get("acked", 0),
                dropped_low=c.get("dropped_low", 0),
                dropped_high=c.get("dropped_high", 0),
            )

        return await self._submit(read)

    async def record_ids(self) -> list[str]:
        """Every stored id in seq order (tests and diagnostics)."""
        return await self._submit(
            lambda conn: [r[0] for r in conn.execute("SELECT id FROM records ORDER BY seq")]
        )

    # ------------------------------------------------------------- writer thread

    def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        try:
            return self._writer.submit(fn)
        except WriterClosed as exc:
            raise OutboxClosed("outbox is closed") from exc

    def _init(self, conn: sqlite3.Connection) -> int:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"outbox {self.path} has schema {version}, newer than this agent")
        # Statement by statement: executescript() would COMMIT our transaction first.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        released = conn.execute(
            "UPDATE records SET batch_id = NULL WHERE batch_id IS NOT NULL"
        ).rowcount
        self._recount(conn)
        return released

    def _recount(self, conn: sqlite3.Connection | None) -> None:
        if conn is None:
            return
        n, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM records").fetchone()
        self._records, self._bytes = n, size + n * RECORD_OVERHEAD

    @staticmethod
    def _counters(conn: sqlite3.Connection) -> dict[str, int]:
        return dict(conn.execute("SELECT name, value FROM counters").fetchall())

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, by: int) -> None:
        if by:
            conn.execute(
                "INSERT INTO counters(name, value) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, by),
            )

    def _insert(self, conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
        conn.executemany(
            "INSERT INTO records(id, priority, kind, ts, size, data) VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        self._bump(conn, "added", len(rows))
        self._records += len(rows)
        self._bytes += sum(r[4] for r in rows) + len(rows) * RECORD_OVERHEAD
        if self._bytes > self.max_bytes:
            self._enforce_cap(conn)

    def _enforce_cap(self, conn: sqlite3.Connection) -> None:
        """Oldest LOW first, then oldest HIGH, until back under the cap."""
        dropped = {0: 0, 1: 0}
        while self._bytes > self.max_bytes:
            victims = conn.execute(
                "SELECT seq, size, priority FROM records ORDER BY priority, seq LIMIT 512"
            ).fetchall()
            if not victims:
                break
            gone = []
            for seq, size, prio in victims:
                if self._bytes <= self.max_bytes:
                    break
                gone.append((seq,))
                self._bytes -= size + RECORD_OVERHEAD
                self._records -= 1
                dropped[min(prio, 1)] += 1
            conn.executemany("DELETE FROM records WHERE seq = ?", gone)
        self._bump(conn, "dropped_low", dropped[0])
        self._bump(conn, "dropped_high", dropped[1])
        if dropped[0] or dropped[1]:
            log.warning(
                "outbox full (%d bytes): dropped %d low- and %d high-priority records",
                self.max_bytes,
                dropped[0],
                dropped[1],
            )

    def _delete(self, conn: sqlite3.Connection, ids: list[str]) -> int:
        deleted = 0
        size = 0
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"DELETE FROM records WHERE id IN ({marks}) RETURNING size", chunk
            ).fetchall()
            deleted += len(rows)
            size += sum(r[0] for r in rows)
        self._records -= deleted
        self._bytes -= size + deleted * RECORD_OVERHEAD
        self._bump(conn, "acked", deleted)
        if deleted and conn.execute("PRAGMA freelist_count").fetchone()[0] > 2048:
            conn.execute("PRAGMA incremental_vacuum(1024)")
        return deleted


def _setup(conn: sqlite3.Connection) -> None:
    # Let deleted pages go back to the OS bit by bit (must precede the first table,
    # and cannot run inside a transaction).
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")


class _OutboxWriter(SqliteWriter):
    def __init__(self, outbox: Outbox) -> None:
        super().__init__(outbox.path, name="outbox-writer", synchronous=outbox.synchronous)
        self._outbox = outbox

    def on_commit_failed(self, conn: sqlite3.Connection | None) -> None:
        # A rolled-back group may have changed the cached size counters: read them again.
        self._outbox._recount(conn)

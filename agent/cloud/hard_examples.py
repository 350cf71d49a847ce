"""Hard examples: cases that went to the cloud, or should have, kept for retraining.

Each row is one item: its input tensors (and the original image when the image
endpoint received one), the edge answer, and, once known, the cloud answer.
Rows whose cloud call failed are ``pending``: the retry loop sends them again
later, within a retention limit, and records the late cloud answer (the caller
is long gone; the answer is for labelling and for measuring the edge). The store
is capped in bytes and rows; past either the oldest rows go first.

SQLite is touched by exactly one thread, the writer, which owns the connection:
coroutines hand it work through a queue and await a future (Datasette's
``database.py`` pattern). No sqlite call ever runs on the event loop, and there is
no connection sharing to get wrong. Results come back with the row counts per
status so the event loop can update the gauges (metrics are loop-only).

``HardExampleRecorder`` is what the cloud router (``agent/cloud/router.py``) hands its
outcomes to: it picks the rows worth keeping and passes them to the store a moment
after the answer that made them is on its way.

The uploader (``agent/cloud/hard_example_upload.py``) reads the rows that are final
(``answered`` or ``expired``) from here and deletes each one only once the fleet said
it stored it; a row the fleet refused for good is marked (``upload_refused``) and
left to the caps. Tensors are stored with ``core.hard_example_wire.pack``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from edgefleet.agent.cloud.config import HardExamplesConfig
from edgefleet.agent.cloud.fallback import take_rows
from edgefleet.core.hard_example_wire import pack, unpack
from edgefleet.core.processing.scoring import Scored

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1
QUEUE_LIMIT = 4096
# Hard examples reach the writer thread this long after the answer that made them.
STORE_AFTER_S = 0.005
# A failed case waits retry_interval x 2^attempts (at most this many intervals).
MAX_BACKOFF_INTERVALS = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hard_examples (
    id INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    cloud_model TEXT,
    cloud_version TEXT,
    kind TEXT NOT NULL,              -- unsure | escalated | audit
    status TEXT NOT NULL,            -- pending | answered | expired
    reason TEXT,                     -- why the cloud has not answered (last failure)
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    edge_class INTEGER,
    edge_confidence REAL,
    cloud_class INTEGER,
    cloud_confidence REAL,
    agree INTEGER,
    inputs BLOB NOT NULL,            -- the item's input tensors, batch of one (see pack)
    edge_outputs BLOB NOT NULL,      -- same format
    cloud_outputs BLOB,              -- same format
    image BLOB,                      -- the original JPEG/PNG, when small enough
    bytes INTEGER NOT NULL,
    upload_refused TEXT              -- why the fleet refused it for good (not retried)
);
CREATE INDEX IF NOT EXISTS hard_examples_due ON hard_examples (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS hard_examples_created ON hard_examples (created_at);
"""
_LIST_COLUMNS = (
    "id, created_at, updated_at, model, version, cloud_model, cloud_version, kind, status,"
    " reason, attempts, edge_class, edge_confidence, cloud_class, cloud_confidence, agree,"
    " bytes, image IS NOT NULL AS has_image"
)


@dataclass
class NewExample:
    model: str
    version: str
    cloud_model: str | None
    kind: str
    status: str
    inputs: dict[str, np.ndarray]
    edge_outputs: dict[str, np.ndarray]
    edge_class: int | None
    edge_confidence: float
    reason: str | None = None
    attempts: int = 0  # calls already made (1 when the live call failed)
    cloud_version: str | None = None
    cloud_outputs: dict[str, np.ndarray] | None = None
    cloud_class: int | None = None
    cloud_confidence: float | None = None
    image: bytes | None = None
    created_at: float = field(default_factory=time.time)

    @property
    def agree(self) -> int | None:
        if self.cloud_class is None or self.edge_class is None:
            return None
        return int(self.cloud_class == self.edge_class)


@dataclass(frozen=True)
class PendingExample:
    id: int
    model: str
    version: str
    cloud_model: str | None
    kind: str
    attempts: int
    created_at: float
    edge_class: int | None
    inputs: dict[str, np.ndarray]
    edge_outputs: dict[str, np.ndarray]


Counts = dict[str, int]

_UPLOAD_COLUMNS = (
    "id, created_at, model, version, cloud_model, cloud_version, kind, status, edge_class,"
    " edge_confidence, cloud_class, cloud_confidence, agree, inputs, edge_outputs,"
    " cloud_outputs, image"
)


@dataclass(frozen=True)
class UploadRow:
    """One stored hard example as the uploader sends it (blobs as stored)."""

    id: int
    created_at: float
    model: str
    version: str
    cloud_model: str | None
    cloud_version: str | None
    kind: str
    status: str
    edge_class: int | None
    edge_confidence: float | None
    cloud_class: int | None
    cloud_confidence: float | None
    agree: int | None
    inputs: bytes
    edge_outputs: bytes
    cloud_outputs: bytes | None
    image: bytes | None


class HardExampleStore:
    """SQLite behind one writer thread; every method is called from the event loop."""

    def __init__(
        self,
        path: Path,
        config: HardExamplesConfig,
        on_counts: Callable[[Counts], None] | None = None,
        on_dropped: Callable[[str, int], None] | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self._on_counts = on_counts
        self._on_dropped = on_dropped
        self._jobs: queue.Queue[tuple[Callable[[sqlite3.Connection], Any], Any] | None] = (
            queue.Queue(QUEUE_LIMIT)
        )
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._closing = False
        # Owned by the writer thread only.
        self._bytes = 0
        self._rows = 0

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        ready: asyncio.Future[Counts] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="hard-examples-writer", daemon=True
        )
        self._thread.start()
        counts = await ready
        self._publish_counts(counts)
        log.info("hard examples in %s: %s", self.path, counts or "none yet")

    async def close(self) -> None:
        """Finish the queued work, close the connection, end the thread."""
        if self._thread is None or self._closing:
            return
        self._closing = True
        # put() may block only if the queue is full; the writer is draining it.
        await asyncio.get_running_loop().run_in_executor(None, self._jobs.put, None)
        assert self._stopped is not None
        await self._stopped

    def _run(self, ready: asyncio.Future[Counts]) -> None:
        conn: sqlite3.Connection | None = None
        try:
            try:
                conn = self._connect()
                counts = self._counts(conn)
            except Exception as exc:
                self._reply(ready, False, exc)
                return
            self._reply(ready, True, counts)
            while True:
                job = self._jobs.get()
                if job is None:
                    break
                fn, reply = job
                try:
                    result = fn(conn)
                except Exception as exc:  # one bad job must not end the writer
                    log.exception("hard-example store: %s failed", getattr(fn, "__name__", fn))
                    if reply is None:
                        self._call_soon(self._dropped, "error", 1)
                    else:
                        self._reply(reply, False, exc)
                    continue
                if reply is not None:
                    self._reply(reply, True, result)
        finally:
            if conn is not None:
                conn.close()
            if self._loop is not None and self._stopped is not None:
                self._call_soon(_settle, self._stopped, True, None)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode; the writer opens explicit transactions where it needs them.
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        columns = {r[1] for r in conn.execute("PRAGMA table_info(hard_examples)")}
        if "upload_refused" not in columns:  # a store from before uploads (issue 11)
            conn.execute("ALTER TABLE hard_examples ADD COLUMN upload_refused TEXT")
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        row = conn.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM hard_examples").fetchone()
        self._rows, self._bytes = int(row[0]), int(row[1])
        return conn

    # ---- plumbing between the loop and the writer ----------------------------------

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _reply(self, fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
        self._call_soon(_settle, fut, ok, value)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._loop is None or self._closing:
            raise RuntimeError("the hard-example store is closed")
        fut: asyncio.Future[T] = self._loop.create_future()
        try:
            self._jobs.put_nowait((fn, fut))
        except queue.Full:
            raise RuntimeError("the hard-example store is overloaded") from None
        return await fut

    def _submit(self, fn: Callable[[sqlite3.Connection], Any]) -> bool:
        """Fire and forget (the request path must not wait for the disk)."""
        if self._loop is None or self._closing:
            return False
        try:
            self._jobs.put_nowait((fn, None))
            return True
        except queue.Full:
            return False

    def _publish_counts(self, counts: Counts) -> None:
        if self._on_counts is not None:
            self._on_counts(counts)

    def _dropped(self, reason: str, n: int) -> None:
        if self._on_dropped is not None and n:
            self._on_dropped(reason, n)

    # ---- writer-thread work -----------------------------------------------------------

    def _counts(self, conn: sqlite3.Connection) -> Counts:
        rows = conn.execute("SELECT status, COUNT(*) FROM hard_examples GROUP BY status")
        counts = {"pending": 0, "answered": 0, "expired": 0}
        counts.update({str(s): int(n) for s, n in rows})
        return counts

    def _after_change(self, conn: sqlite3.Connection) -> None:
        self._call_soon(self._publish_counts, self._counts(conn))

    def _insert_rows(self, conn: sqlite3.Connection, examples: list[NewExample]) -> None:
        cfg = self.config
        interval = cfg.retry_interval_s
        conn.execute("BEGIN")
        try:
            for ex in examples:
                inputs, edge = pack(ex.inputs), pack(ex.edge_outputs)
                cloud = pack(ex.cloud_outputs) if ex.cloud_outputs is not None else None
                image = ex.image if ex.image and len(ex.image) <= cfg.max_image_bytes else None
                size = len(inputs) + len(edge) + len(cloud or b"") + len(image or b"")
                next_at = ex.created_at + interval if ex.status == "pending" else None
                conn.execute(
                    "INSERT INTO hard_examples (created_at, updated_at, model, version,"
                    " cloud_model, cloud_version, kind, status, reason, attempts,"
                    " next_attempt_at, edge_class, edge_confidence, cloud_class,"
                    " cloud_confidence, agree, inputs, edge_outputs, cloud_outputs, image, bytes)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        ex.created_at,
                        ex.created_at,
                        ex.model,
                        ex.version,
                        ex.cloud_model,
                        ex.cloud_version,
                        ex.kind,
                        ex.status,
                        ex.reason,
                        ex.attempts,
                        next_at,
                        ex.edge_class,
                        ex.edge_confidence,
                        ex.cloud_class,
                        ex.cloud_confidence,
                        ex.agree,
                        inputs,
                        edge,
                        cloud,
                        image,
                        size,
                    ),
                )
                self._rows += 1
                self._bytes += size
            evicted = self._evict(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if evicted:
            self._call_soon(self._dropped, "evicted", evicted)
        self._after_change(conn)

    def _evict(self, conn: sqlite3.Connection) -> int:
        """Oldest rows first until both caps hold again."""
        evicted = 0
        while self._rows > self.config.max_rows or self._bytes > self.config.max_bytes:
            batch = conn.execute(
                "SELECT id, bytes FROM hard_examples ORDER BY created_at, id LIMIT 64"
            ).fetchall()
            if not batch:
                break
            for row_id, size in batch:
                if self._rows <= self.config.max_rows and self._bytes <= self.config.max_bytes:
                    break
                conn.execute("DELETE FROM hard_examples WHERE id = ?", (row_id,))
                self._rows -= 1
                self._bytes -= int(size)
                evicted += 1
        return evicted

    # ---- the API (event loop) ------------------------------------------------------

    def add(self, examples: list[NewExample]) -> bool:
        """Queue ``examples`` for writing; False (and counted) if the writer is swamped."""
        if not examples:
            return True
        if self._submit(lambda conn: self._insert_rows(conn, examples)):
            return True
        self._dropped("queue_full", len(examples))
        return False

    async def due(self, now: float, limit: int) -> list[PendingExample]:
        """Pending cases whose next attempt is due, oldest first."""

        def work(conn: sqlite3.Connection) -> list[PendingExample]:
            rows = conn.execute(
                "SELECT id, model, version, cloud_model, kind, attempts, created_at, edge_class,"
                " inputs, edge_outputs FROM hard_examples"
                " WHERE status = 'pending' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, id LIMIT ?",
                (now, limit),
            ).fetchall()
            return [
                PendingExample(
                    id=r[0],
                    model=r[1],
                    version=r[2],
                    cloud_model=r[3],
                    kind=r[4],
                    attempts=r[5],
                    created_at=r[6],
                    edge_class=r[7],
                    inputs=unpack(r[8]),
                    edge_outputs=unpack(r[9]),
                )
                for r in rows
            ]

        return await self._call(work)

    async def record_answer(
        self,
        row_id: int,
        *,
        cloud_model: str,
        cloud_version: str | None,
        cloud_outputs: dict[str, np.ndarray],
        cloud_class: int | None,
        cloud_confidence: float | None,
        agree: bool | None,
    ) -> None:
        def work(conn: sqlite3.Connection) -> None:
            blob = pack(cloud_outputs)
            old = conn.execute("SELECT bytes FROM hard_examples WHERE id = ?", (row_id,)).fetchone()
            if old is None:
                return  # evicted meanwhile
            conn.execute(
                "UPDATE hard_examples SET status = 'answered', updated_at = ?, reason = NULL,"
                " cloud_model = ?, cloud_version = ?, cloud_outputs = ?, cloud_class = ?,"
                " cloud_confidence = ?, agree = ?, next_attempt_at = NULL,"
                " bytes = bytes + ? WHERE id = ?",
                (
                    time.time(),
                    cloud_model,
                    cloud_version,
                    blob,
                    cloud_class,
                    cloud_confidence,
                    None if agree is None else int(agree),
                    len(blob),
                    row_id,
                ),
            )
            self._bytes += len(blob)
            evicted = self._evict(conn)
            if evicted:
                self._call_soon(self._dropped, "evicted", evicted)
            self._after_change(conn)

        await self._call(work)

    async def record_failure(self, row_id: int, reason: str, attempts: int) -> None:
        interval = self.config.retry_interval_s
        # Jittered exponential back-off per case, so a burst of failures spreads out.
        delay = interval * min(MAX_BACKOFF_INTERVALS, 2 ** max(0, attempts - 1))
        delay *= random.uniform(0.8, 1.2)

        def work(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.execute(
                "UPDATE hard_examples SET attempts = ?, reason = ?, updated_at = ?,"
                " next_attempt_at = ? WHERE id = ?",
                (attempts, reason, now, now + delay, row_id),
            )

        await self._call(work)

    async def expire(self, created_before: float, max_attempts: int) -> int:
        """Give up on pending cases past retention or out of attempts; returns how many."""

        def work(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE hard_examples SET status = 'expired', updated_at = ?,"
                " next_attempt_at = NULL"
                " WHERE status = 'pending' AND (created_at < ? OR attempts >= ?)",
                (time.time(), created_before, max_attempts),
            )
            if cur.rowcount:
                self._after_change(conn)
            return int(cur.rowcount)

        return await self._call(work)

    # ---- uploads (agent/cloud/hard_example_upload.py) -----------------------------

    async def uploadable(self, limit: int, after_id: int = 0) -> list[UploadRow]:
        """Final rows not refused by the fleet, oldest first, from ``after_id`` on."""

        def work(conn: sqlite3.Connection) -> list[UploadRow]:
            rows = conn.execute(
                f"SELECT {_UPLOAD_COLUMNS} FROM hard_examples"
                " WHERE status != 'pending' AND upload_refused IS NULL AND id > ?"
                " ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
            return [UploadRow(*r) for r in rows]

        return await self._call(work)

    async def delete(self, row_ids: Sequence[int]) -> int:
        """Rows the fleet acknowledged; returns how many were still there."""

        def work(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN")
            try:
                gone = 0
                for row_id in row_ids:
                    row = conn.execute(
                        "DELETE FROM hard_examples WHERE id = ? RETURNING bytes", (row_id,)
                    ).fetchone()
                    if row is not None:
                        gone += 1
                        self._rows -= 1
                        self._bytes -= int(row[0])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if gone:
                self._after_change(conn)
            return gone

        return await self._call(work)

    async def refuse_upload(self, row_id: int, reason: str) -> None:
        """The fleet refused this row for good (400/413): never sent again."""

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE hard_examples SET upload_refused = ? WHERE id = ?", (reason[:500], row_id)
            )

        await self._call(work)

    async def counts(self) -> Counts:
        return await self._call(self._counts)

    async def stats(self) -> dict[str, Any]:
        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            return {
                "path": str(self.path),
                "rows": self._rows,
                "bytes": self._bytes,
                "max_rows": self.config.max_rows,
                "max_bytes": self.config.max_bytes,
                "by_status": self._counts(conn),
            }

        return await self._call(work)

    async def list(
        self, *, status: str | None = None, model: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Newest first, without the blobs."""

        def work(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            where, args = [], []
            if status:
                where.append("status = ?")
                args.append(status)
            if model:
                where.append("model = ?")
                args.append(model)
            sql = f"SELECT {_LIST_COLUMNS} FROM hard_examples"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
            cur = conn.execute(sql, (*args, limit))
            names = [d[0] for d in cur.description]
            out = []
            for row in cur.fetchall():
                doc = dict(zip(names, row, strict=True))
                doc["agree"] = None if doc["agree"] is None else bool(doc["agree"])
                doc["has_image"] = bool(doc["has_image"])
                out.append(doc)
            return out

        return await self._call(work)


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # the awaiting coroutine was cancelled meanwhile
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


# ---- capture ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request's items as the edge answered them (``edge``: scored by the policy's
    rule), for keeping some of them as hard examples."""

    model: str
    version: str
    cloud_model: str | None
    inputs: Mapping[str, np.ndarray]
    edge_outputs: Mapping[str, np.ndarray]
    edge: Scored
    image: bytes | None = None

    def edge_class(self, i: int) -> int | None:
        top = self.edge.top_class
        return int(top[i]) if top is not None else None


class HardExampleRecorder:
    """Picks the cases worth keeping from cloud outcomes and queues them for the store.

    Event loop only. Cases both models answered are kept at ``sample_rate``, except
    disagreements, which are always kept (the most useful cases there are); cases the
    cloud should have answered and did not are all kept, ``pending``, for the retry
    loop.
    """

    def __init__(self, store: HardExampleStore, sample_rate: float, rng: random.Random) -> None:
        self.store = store
        self.sample_rate = sample_rate
        self._rng = rng
        self._unstored: list[NewExample] = []
        self._flush_handle: asyncio.TimerHandle | None = None

    def answered(
        self,
        case: Case,
        rows: Sequence[int],
        kind: str,
        *,
        cloud_version: str | None,
        cloud_outputs: Mapping[str, np.ndarray],
        cloud: Scored,
        agree: Sequence[bool | None],
    ) -> None:
        """The cloud answered items ``rows`` of ``case`` (``cloud``: its answer scored by
        the policy's rule, in ``rows`` order; ``agree``: top-1 agreement per item)."""
        keep: list[NewExample] = []
        for j, i in enumerate(rows):
            if agree[j] is not False and self._rng.random() >= self.sample_rate:
                continue
            keep.append(
                NewExample(
                    model=case.model,
                    version=case.version,
                    cloud_model=case.cloud_model,
                    cloud_version=cloud_version,
                    kind=kind,
                    status="answered",
                    inputs=take_rows(case.inputs, [i]),
                    edge_outputs=take_rows(case.edge_outputs, [i]),
                    edge_class=case.edge_class(i),
                    edge_confidence=float(case.edge.confidence[i]),
                    cloud_outputs=take_rows(cloud_outputs, [j]),
                    cloud_class=int(cloud.top_class[j]) if cloud.top_class is not None else None,
                    cloud_confidence=float(cloud.confidence[j]),
                    image=case.image,
                )
            )
        if keep:
            self._keep_soon(keep)

    def failed(
        self, case: Case, rows: Sequence[int], kind: str, *, reason: str | None, sent: bool
    ) -> None:
        """Items ``rows`` should have had a cloud answer: all kept, to retry."""
        self._keep_soon(
            [
                NewExample(
                    model=case.model,
                    version=case.version,
                    cloud_model=case.cloud_model,
                    kind=kind,
                    status="pending",
                    reason=reason,
                    attempts=1 if sent else 0,
                    inputs=take_rows(case.inputs, [i]),
                    edge_outputs=take_rows(case.edge_outputs, [i]),
                    edge_class=case.edge_class(i),
                    edge_confidence=float(case.edge.confidence[i]),
                    image=case.image,
                )
                for i in rows
            ]
        )

    def _keep_soon(self, examples: list[NewExample]) -> None:
        """Hand examples to the writer a moment from now, once this answer is sent:
        the writer thread's work would otherwise compete for the GIL with the
        response (a few ms at p99 when the cloud has just timed out)."""
        self._unstored.extend(examples)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(STORE_AFTER_S, self.flush)

    def flush(self) -> None:
        """Hand what is waiting to the store now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        examples, self._unstored = self._unstored, []
        if examples:
            self.store.add(examples)


# ---- retries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryAnswered:
    cloud_model: str
    cloud_version: str | None
    cloud_outputs: dict[str, np.ndarray]
    cloud_class: int | None
    cloud_confidence: float | None


@dataclass(frozen=True)
class RetryFailed:
    """The call was made and failed: counts as an attempt."""

    reason: str


@dataclass(frozen=True)
class RetryRefused:
    """Not sent (offline, breaker open, no budget, model gone): try again next round."""

    reason: str


RetryOutcome = RetryAnswered | RetryFailed | RetryRefused


class RetryLoop:
    """Sends pending hard examples to the cloud again, a few per round.

    ``attempt`` (the cloud router's) makes one call through the same gate as
    live traffic (breaker, offline state, budget with a reserve for live requests).
    """

    def __init__(
        self,
        store: HardExampleStore,
        config: HardExamplesConfig,
        attempt: Callable[[PendingExample], Awaitable[RetryOutcome]],
    ) -> None:
        self.store = store
        self.config = config
        self.attempt = attempt
        self.rounds = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.retry_interval_s)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad round must not end retries for good
                log.exception("hard-example retry round failed")

    async def run_once(self) -> dict[str, int]:
        now = time.time()
        done = {"answered": 0, "failed": 0, "refused": 0}
        done["expired"] = await self.store.expire(
            now - self.config.retention_s, self.config.max_attempts
        )
        for row in await self.store.due(now, self.config.retry_batch):
            outcome = await self.attempt(row)
            if isinstance(outcome, RetryAnswered):
                edge = row.edge_class
                await self.store.record_answer(
                    row.id,
                    cloud_model=outcome.cloud_model,
                    cloud_version=outcome.cloud_version,
                    cloud_outputs=outcome.cloud_outputs,
                    cloud_class=outcome.cloud_class,
                    cloud_confidence=outcome.cloud_confidence,
                    agree=None
                    if edge is None or outcome.cloud_class is None
                    else edge == outcome.cloud_class,
                )
                done["answered"] += 1
            elif isinstance(outcome, RetryFailed):
                await self.store.record_failure(row.id, outcome.reason, row.attempts + 1)
                done["failed"] += 1
            else:
                # The gate said no: the rest would hear the same; next round.
                done["refused"] += 1
                break
        self.rounds += 1
        return done

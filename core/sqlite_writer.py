"""One thread owns a SQLite write connection; coroutines hand it work through a queue.

The pattern of Datasette's ``database.py`` and sqlite-utils: a job is a plain
function of the connection, queued from the event loop; the writer thread runs it
and resolves an asyncio future with ``loop.call_soon_threadsafe``. Because one
thread owns the connection there is never a "database is locked" between our own
writers, and jobs that queued up meanwhile are committed together (group commit:
one transaction, a SAVEPOINT per job, so a failing job rolls back alone and its
caller gets the exception).

Reads that may take a while (dashboards, views) should not wait behind writes: a
``Reader`` runs them on its own connections in a small thread pool (WAL lets
readers see the last committed state while the writer works).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgefleet.core.errors import EdgefleetError

log = logging.getLogger(__name__)
T = TypeVar("T")

GROUP_COMMIT_MAX = 256  # jobs committed in one transaction at most


class WriterClosed(EdgefleetError, RuntimeError):
    """The writer was closed (or never opened) when a job was submitted."""


@dataclass(slots=True)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _resolve(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    # Loop thread (scheduled by the writer with call_soon_threadsafe).
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def connect(
    path: Path, *, synchronous: str = "NORMAL", readonly: bool = False
) -> sqlite3.Connection:
    """A connection with the pragmas every edgefleet database uses.

    WAL + NORMAL: a committed transaction survives a crash or SIGKILL of the process;
    a power cut may lose the last commits but never corrupts the file.
    ``isolation_level=None``: we issue BEGIN ourselves.
    """
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA journal_size_limit = 8388608")
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class SqliteWriter:
    """``await SqliteWriter(path).open(init)``, then ``await writer.submit(fn)``.

    ``init`` runs first, in its own transaction (schema, migrations). Every method is
    called from the event loop; ``fn`` runs on the writer thread.
    """

    def __init__(
        self, path: Path | str, *, name: str = "sqlite-writer", synchronous: str = "NORMAL"
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.path = Path(path)
        self.name = name
        self.synchronous = synchronous.upper()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = True
        self._setup: Callable[[sqlite3.Connection], None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queue_depth(self) -> int:
        """Jobs queued and not yet taken by the writer thread (approximate: read from any
        thread without a lock; for monitoring, e.g. the fleet's /metrics)."""
        return self._jobs.qsize()

    async def open(
        self,
        init: Callable[[sqlite3.Connection], T] | None = None,
        *,
        setup: Callable[[sqlite3.Connection], None] | None = None,
    ) -> T | None:
        """Start the thread; run ``init`` in the first transaction and return its result.

        ``setup`` runs on every new connection outside any transaction (pragmas that a
        transaction forbids, such as ``auto_vacuum``).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._setup = setup
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if init is None:
            return None
        try:
            return await self.submit(init)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Finish the queued jobs, close the connection, end the thread. Idempotent."""
        if self._thread is None:
            return
        self._closed = True
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn(conn)``; the future resolves once its transaction committed."""
        if self._closed:
            raise WriterClosed(f"{self.name}: database {self.path} is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, loop, fut))
        return fut

    # ------------------------------------------------------------- writer thread

    def on_commit_failed(self, conn: sqlite3.Connection | None) -> None:
        """Hook for subclasses whose thread-local state must be rebuilt after a rollback."""

    def _connect(self) -> sqlite3.Connection:
        conn = connect(self.path, synchronous=self.synchronous)
        if self._setup is not None:
            self._setup(conn)
        return conn

    def _run(self) -> None:
        """The one thread that writes to the database."""
        conn: sqlite3.Connection | None = None
        stop = False
        while not stop:
            job = self._jobs.get()
            if job is None:
                break
            jobs = [job]
            while len(jobs) < GROUP_COMMIT_MAX:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
            results: list[tuple[_Job, Any, BaseException | None]] = []
            try:
                if conn is None:
                    conn = self._connect()
                conn.execute("BEGIN IMMEDIATE")
                for j in jobs:
                    conn.execute("SAVEPOINT job")
                    try:
                        results.append((j, j.fn(conn), None))
                        conn.execute("RELEASE job")
                    except Exception as exc:
                        conn.execute("ROLLBACK TO job")
                        conn.execute("RELEASE job")
                        results.append((j, None, exc))
                conn.execute("COMMIT")
            except Exception as exc:  # the commit itself failed (disk full, I/O error)
                log.exception("%s: transaction failed", self.name)
                if conn is not None and conn.in_transaction:
                    conn.execute("ROLLBACK")
                self.on_commit_failed(conn)
                results = [(j, None, exc) for j in jobs]
            for j, result, error in results:
                try:
                    j.loop.call_soon_threadsafe(_resolve, j.future, result, error)
                except RuntimeError:
                    pass  # the loop is closed: nobody is waiting any more
        if conn is not None:
            conn.close()


class Reader:
    """Read-only connections in a small thread pool, one per thread."""

    def __init__(self, path: Path | str, *, threads: int = 2, name: str = "sqlite-reader") -> None:
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path, readonly=True)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(self._conn()))

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()

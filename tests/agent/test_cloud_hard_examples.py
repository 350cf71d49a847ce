"""The hard-example store: one writer thread, caps, eviction, persistence, retries."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import numpy as np
import pytest

from edgefleet.agent.cloud.config import HardExamplesConfig
from edgefleet.agent.cloud.hard_examples import (
    HardExampleStore,
    NewExample,
    RetryAnswered,
    RetryFailed,
    RetryLoop,
    RetryRefused,
)


def example(i: int, status: str = "pending", created_at: float | None = None) -> NewExample:
    return NewExample(
        model="m",
        version="1",
        cloud_model="big",
        kind="unsure",
        status=status,
        inputs={"x": np.full((1, 16), i, np.float32)},
        edge_outputs={"probs": np.array([[0.6, 0.4]], np.float32)},
        edge_class=0,
        edge_confidence=0.6,
        reason="offline" if status == "pending" else None,
        attempts=1 if status == "pending" else 0,
        image=b"png" * 10,
        created_at=created_at or time.time(),
    )


async def open_store(tmp_path, **cfg) -> tuple[HardExampleStore, dict[str, int], dict[str, int]]:
    counts: dict[str, int] = {}
    dropped: dict[str, int] = {}
    store = HardExampleStore(
        tmp_path / "hard.sqlite",
        HardExamplesConfig(**cfg),
        on_counts=counts.update,
        on_dropped=lambda reason, n: dropped.__setitem__(reason, dropped.get(reason, 0) + n),
    )
    await store.start()
    return store, counts, dropped


async def settle(store: HardExampleStore) -> None:
    await store.counts()  # queued behind every earlier write: they are done when it is


async def test_writes_happen_on_the_one_writer_thread(tmp_path):
    store, counts, _ = await open_store(tmp_path)
    seen: set[str] = set()
    await store._call(lambda conn: seen.add(threading.current_thread().name))
    assert seen == {"hard-examples-writer"}
    assert store.add([example(i) for i in range(3)])
    await settle(store)
    assert counts == {"pending": 3, "answered": 0, "expired": 0}
    rows = await store.list()
    assert [r["id"] for r in rows] == [3, 2, 1] and rows[0]["has_image"] is True
    await store.close()
    await store.close()  # idempotent
    assert not store.add([example(9)])  # closed: refused, never blocks
    # Persisted: a new store over the same file sees the rows.
    again, counts, _ = await open_store(tmp_path)
    assert counts["pending"] == 3
    await again.close()


async def test_caps_evict_the_oldest(tmp_path):
    store, _, dropped = await open_store(tmp_path, max_rows=5)
    now = time.time()
    store.add([example(i, created_at=now + i) for i in range(8)])
    await settle(store)
    stats = await store.stats()
    assert stats["rows"] == 5 and dropped == {"evicted": 3}
    kept = sorted(r["id"] for r in await store.list())
    assert kept == [4, 5, 6, 7, 8]
    await store.close()
    # A byte cap under one row's size keeps nothing (and says so).
    small, _, dropped = await open_store(tmp_path / "c", max_bytes=1)
    small.add([example(1), example(2)])
    await settle(small)
    assert (await small.stats())["rows"] == 0 and dropped == {"evicted": 2}
    await small.close()


async def test_big_images_are_kept_as_tensors_only(tmp_path):
    store, _, _ = await open_store(tmp_path, max_image_bytes=4)
    store.add([example(1)])
    await settle(store)
    (row,) = await store.list()
    assert row["has_image"] is False
    await store.close()


async def test_retry_loop_records_answers_failures_and_expiry(tmp_path):
    store, counts, _ = await open_store(
        tmp_path, retry_interval_s=0.01, retention_s=60, max_attempts=3
    )
    old = time.time() - 120  # past retention already
    store.add([example(1), example(2), example(3), example(4, created_at=old)])
    await settle(store)
    await asyncio.sleep(0.02)  # the first attempt is due retry_interval after creation
    outcomes = {
        1: RetryAnswered("big", "2", {"probs": np.array([[0.1, 0.9]], np.float32)}, 1, 0.9),
        2: RetryFailed("cloud_timeout"),
        3: RetryRefused("circuit_open"),
    }
    tried: list[int] = []

    async def attempt(row):
        tried.append(row.id)
        np.testing.assert_array_equal(row.inputs["x"], np.full((1, 16), row.id, np.float32))
        return outcomes[row.id]

    loop = RetryLoop(store, store.config, attempt)
    done = await loop.run_once()
    assert done == {"expired": 1, "answered": 1, "failed": 1, "refused": 1}
    assert tried == [1, 2, 3]
    rows = {r["id"]: r for r in await store.list()}
    assert (rows[1]["status"], rows[1]["cloud_class"], rows[1]["agree"]) == ("answered", 1, False)
    assert (rows[2]["status"], rows[2]["attempts"], rows[2]["reason"]) == (
        "pending",
        2,
        "cloud_timeout",
    )
    assert rows[3]["attempts"] == 1  # refused: not an attempt
    assert rows[4]["status"] == "expired"
    assert counts == {"pending": 2, "answered": 1, "expired": 1}
    # Row 2 backs off (2 intervals); row 3 is due again at once.
    tried.clear()
    await loop.run_once()
    assert tried == [3]
    await store.close()


async def test_a_failing_job_does_not_end_the_writer(tmp_path):
    store, _, _ = await open_store(tmp_path)

    def broken(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk on fire")

    with pytest.raises(sqlite3.OperationalError):
        await store._call(broken)
    store.add([example(1)])
    assert (await store.counts())["pending"] == 1
    await store.close()


async def test_unopenable_store_leaves_the_agent_running(tmp_path):
    (tmp_path / "dir.sqlite").mkdir()
    store = HardExampleStore(tmp_path / "dir.sqlite", HardExamplesConfig())
    with pytest.raises(sqlite3.Error):
        await store.start()

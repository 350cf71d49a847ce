"""agent.outbox: one writer thread, WAL, size cap with drop policy, durability."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from edgefleet.agent.outbox import RECORD_OVERHEAD, NewRecord, Outbox, OutboxClosed, Priority
from tests.support.brokers import ROOT, eventually


def low(i: int, pad: int = 0) -> NewRecord:
    return NewRecord("sample", {"i": i, "pad": "x" * pad})


def high(i: int) -> NewRecord:
    return NewRecord("event", {"i": i}, Priority.HIGH)


async def test_batches_events_first_then_oldest_and_ack_deletes(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.sqlite", 10_000_000) as ob:
        low_ids = await ob.add([low(i) for i in range(10)])
        high_ids = await ob.add([high(i) for i in range(2)])
        assert len(set(low_ids + high_ids)) == 12 and all(len(i) == 32 for i in low_ids)
        b1 = await ob.next_batch(max_records=5, max_bytes=1_000_000)
        assert b1 is not None
        assert b1.record_ids == high_ids + low_ids[:3]
        assert [r.seq for r in b1.records[2:]] == sorted(r.seq for r in b1.records[2:])
        assert orjson.loads(b1.records[0].data) == {"i": 0}
        b2 = await ob.next_batch(max_records=100, max_bytes=1_000_000)
        assert b2 is not None and b2.record_ids == low_ids[3:]
        assert await ob.next_batch(100, 1_000_000) is None
        st = await ob.stats()
        assert (st.records, st.in_flight, st.added_total) == (12, 12, 12)
        # the fleet acks batch 2 by record ids; batch 1 is released and comes back whole
        assert await ob.ack(b2.record_ids) == 7
        assert await ob.release(b1.id) == 5
        b3 = await ob.next_batch(100, 1_000_000)
        assert b3 is not None and b3.record_ids == b1.record_ids
        assert await ob.ack_batch(b3.id) == 5
        assert await ob.ack(b3.record_ids) == 0  # a duplicate ack is harmless
        st = await ob.stats()
        assert (st.records, st.bytes, st.acked_total) == (0, 0, 12)


async def test_batch_limits(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.sqlite", 10_000_000) as ob:
        await ob.add([low(i, pad=1000) for i in range(10)])
        b = await ob.next_batch(max_records=100, max_bytes=3500)
        assert b is not None and len(b.records) == 3 and b.size <= 3500
        # a batch always holds at least one record, even one over max_bytes
        b = await ob.next_batch(max_records=100, max_bytes=10)
        assert b is not None and len(b.records) == 1
        with pytest.raises(ValueError, match="exceeds"):
            await ob.add([low(0, pad=70_000)])


async def test_cap_drops_oldest_low_priority_first_and_counts_it(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    rec = len(orjson.dumps(low(0, pad=400).data)) + RECORD_OVERHEAD  # ~ 523 bytes
    async with Outbox(path, max_bytes=20 * rec) as ob:
        events = await ob.add([high(i) for i in range(5)])
        samples = [(await ob.add([low(i, pad=400)]))[0] for i in range(30)]
        st = await ob.stats()
        assert st.bytes <= 20 * rec
        kept = await ob.record_ids()
        # every event survived; the oldest samples went, the newest stayed
        assert set(events) <= set(kept)
        kept_samples = [i for i in kept if i in samples]
        assert kept_samples == samples[-len(kept_samples) :]
        assert st.dropped_low == 30 - len(kept_samples) and st.dropped_high == 0
        b = await ob.next_batch(1000, 10_000_000)
        assert b is not None and b.dropped_low == st.dropped_low
        # only events left to drop: then the oldest events go
        await ob.ack(b.record_ids)
        big_events = [
            NewRecord("event", {"pad": "y" * 400, "i": i}, Priority.HIGH) for i in range(25)
        ]
        ids = await ob.add(big_events)
        st = await ob.stats()
        assert st.dropped_high == 25 - len(await ob.record_ids())
        assert await ob.record_ids() == ids[st.dropped_high :]
    # the counters are in the file: they survive a restart
    async with Outbox(path, max_bytes=20 * rec) as ob:
        st2 = await ob.stats()
        assert (st2.dropped_low, st2.dropped_high) == (st.dropped_low, st.dropped_high)
        assert st2.bytes == st.bytes


async def test_restart_releases_in_flight_and_seq_keeps_growing(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    async with Outbox(path, 10_000_000) as ob:
        await ob.add([low(i) for i in range(3)])
        b = await ob.next_batch(2, 1_000_000)
        assert b is not None
        last_seq = b.records[-1].seq
    async with Outbox(path, 10_000_000) as ob:
        # the unacknowledged batch is sent again after a restart
        b2 = await ob.next_batch(10, 1_000_000)
        assert b2 is not None and b2.record_ids[:2] == b.record_ids and len(b2.records) == 3
        await ob.ack(b2.record_ids)
        await ob.add([low(9)])
        b3 = await ob.next_batch(10, 1_000_000)
        assert b3 is not None
        # AUTOINCREMENT: a new record never reuses a deleted record's seq
        assert b3.records[0].seq > b2.records[-1].seq > last_seq
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_a_failing_job_rolls_back_alone(tmp_path: Path) -> None:
    """Group commit: one bad job in a transaction must not take the others with it."""
    async with Outbox(tmp_path / "o.sqlite", 10_000_000) as ob:

        def bad(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM records")
            raise RuntimeError("boom")

        adds = [ob.add([low(i)]) for i in range(20)]
        failing = ob._submit(bad)
        results = await asyncio.gather(*adds, failing, return_exceptions=True)
        assert isinstance(results[-1], RuntimeError)
        assert len(await ob.record_ids()) == 20
    with pytest.raises(OutboxClosed):
        await ob.add([low(0)])


async def test_batched_and_concurrent_adds_all_drain(tmp_path: Path) -> None:
    """Adds in batches and concurrent single adds (group-committed by the writer) all
    come back through next_batch + ack. Speed: ``python -m bench mqtt``."""
    async with Outbox(tmp_path / "o.sqlite", 1_000_000_000) as ob:
        record = {"model": "digits-edge", "version": "3", "count": 120, "p50_ms": 0.8}
        for _ in range(0, 2000, 100):
            await ob.add([NewRecord("inference_stats", record)] * 100)
        singles = await asyncio.gather(
            *(ob.add([NewRecord("inference_stats", record)]) for _ in range(500))
        )
        drained: list[str] = []
        while (b := await ob.next_batch(500, 256 * 1024)) is not None:
            await ob.ack(b.record_ids)
            drained += b.record_ids
        assert len(drained) == len(set(drained)) == 2500
        assert {i for (i,) in singles} <= set(drained)
        assert await ob.record_ids() == []


WRITER = textwrap.dedent("""
    import asyncio, sys
    from edgefleet.agent.outbox import Outbox, NewRecord, Priority

    async def main() -> None:
        ob = await Outbox(sys.argv[1], 50_000_000).open()
        i = 0
        while True:
            ids = await ob.add([NewRecord("sample", {"i": i + k, "pad": "z" * 200},
                                          Priority.HIGH if k == 0 else Priority.LOW)
                                for k in range(20)])
            print("added", *ids, flush=True)   # only after add() returned: it is durable
            i += 20
            if i % 100 == 0:
                batch = await ob.next_batch(30, 1_000_000)
                if batch is not None:
                    if i % 200 == 0:
                        # Announced before, confirmed after: a kill can cut the print of
                        # a long line, so the ids must be known before the ack happens.
                        print("acking", *batch.record_ids, flush=True)
                        await ob.ack(batch.record_ids)
                        print("acked", flush=True)

    asyncio.run(main())
""")


@pytest.mark.parametrize("run_s", [0.1, 0.4])
async def test_sigkill_mid_write_loses_nothing_and_corrupts_nothing(
    tmp_path: Path, run_s: float
) -> None:
    path = tmp_path / "o.sqlite"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        str(path),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[bytes] = []

    async def read() -> None:  # drain the pipe so the writer never blocks on print
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            lines.append(line)

    reader = asyncio.create_task(read())
    try:
        # 12 complete lines hold at least 10 "added" lines (an "acked" line follows every
        # 10th), i.e. >= 200 durable ids, however slowly a loaded box runs the writer.
        await eventually(lambda: len(lines) >= 12 or proc.returncode is not None, within=30)
        await asyncio.sleep(run_s)  # then kill it mid-write, wherever it is
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        await reader
        err = await proc.stderr.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
    out = b"".join(lines)
    added: set[str] = set()
    acking: set[str] = set()  # ack() started: deleted or not, depending on the kill
    acked: set[str] = set()  # ack() returned: must be gone
    last: set[str] = set()
    for line in out.decode().splitlines():
        word, *ids = line.split()
        # A line cut by the kill still names only whole ids (a cut id is shorter than 32).
        whole = {i for i in ids if len(i) == 32}
        if word == "added":
            added |= whole
        elif word == "acking" and len(whole) == len(ids):
            last = whole
            acking |= whole
        elif word == "acked":
            acked |= last
    assert len(added) >= 200, err.decode()[-2000:]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    async with Outbox(path, 50_000_000) as ob:
        stored = set(await ob.record_ids())
        st = await ob.stats()
    # every add() that returned is there, unless the fleet acked it; acked ones never return
    assert added - acking <= stored
    assert not (acked & stored)
    assert st.in_flight == 0 and st.dropped_low == 0
    assert st.records == len(stored)

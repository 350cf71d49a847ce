"""Time series for charts (issue 12): telemetry records sent over a real Mosquitto to a
real fleet service (fleet/ingest.py → fleet/rollup.py, migration 6's tables) come back
from ``GET /v1/series/...`` (fleet/timeseries.py) in the right minute and hour with
exact counts and p50/p95 of the merged histograms; a resent record is counted once;
retention (the service's job and ``prune``) removes old buckets and keeps young ones;
bad queries are refused with 400 saying what is wrong.
"""

from __future__ import annotations

import copy
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from edgefleet.core.errors import BadRequest
from edgefleet.fleet import db as fleet_db
from edgefleet.fleet.db import FleetDB, dumps
from edgefleet.fleet.rollup import FIGURES, TABLE, Retention, prune
from edgefleet.fleet.timeseries import MAX_POINTS, choose_window
from tests.support.brokers import Mosquitto
from tests.support.fleet_sim import SimDevice, add_device, add_version, batch, query, stats_data
from tests.support.quality_fleet import Fleet, fleet_config, running_fleet, until

M = "digits-edge"
NOW = time.time()
M0 = int(NOW // 3600) * 3600 - 2 * 3600 + 1200  # a minute two hours ago, 20 min past the hour
H0 = M0 - M0 % 3600


def lat(**at: int) -> list[int]:
    """Latency counts: ``b2=10`` puts 10 requests in bucket 2 (<= 2 ms)."""
    counts = [0] * 12
    for k, v in at.items():
        counts[int(k[1:])] = v
    return counts


def stats(version: str, start: float, latency: list[int], **extra: Any) -> dict[str, Any]:
    doc = stats_data(M, version, latency)
    doc["window_start"] = start
    doc.update(extra)
    return doc


def drift(version: str, start: float, psi_max: float, psi_mean: float) -> dict[str, Any]:
    return {
        "model": M,
        "version": version,
        "window_start": start,
        "window_s": 60.0,
        "samples": 400,
        "features": 64,
        "psi_max": psi_max,
        "psi_mean": psi_mean,
        "psi_output": 0.01,
        "js_max": None,
        "js_output": None,
        "worst_feature": None,
        "drift_reason": None,
    }


def shadow(active: str, candidate: str, start: float, agreed: int, compared: int) -> dict[str, Any]:
    return {
        "model": M,
        "version": active,
        "candidate": candidate,
        "task": "classification",
        "window_start": start,
        "window_s": 60.0,
        "sampled": compared,
        "compared": compared,
        "agreed": agreed,
        "errors": 0,
        "dropped_queue": 0,
        "dropped_budget": 0,
        "conf_delta_sum": 0.0,
        "conf_delta_sumsq": 0.0,
        "candidate_latency_ms_sum": 1.0,
        "active_latency_ms_sum": 1.0,
    }


@pytest.fixture
async def fleet(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto
) -> AsyncIterator[Fleet]:
    cfg = fleet_config(
        tmp_path,
        keys,
        mosquitto.port,
        # device minutes for 1 h only: a record of two hours ago reaches the hour tables
        # and the fleet-wide minute table, not the device minute table.
        telemetry={"retention": {"minute_device_h": 1, "interval_s": 1, "batch_rows": 100}},
    )
    async with running_fleet(cfg) as client:
        yield client


@pytest.fixture
async def sims(mosquitto: Mosquitto) -> AsyncIterator[Callable[..., Any]]:
    made: list[SimDevice] = []

    async def make(device_id: str) -> SimDevice:
        sim = SimDevice(mosquitto.port, device_id, None)
        made.append(sim)
        await sim.start()
        await sim.connected()
        return sim

    yield make
    for sim in made:
        await sim.stop()


async def send(sim: SimDevice, doc: dict[str, Any]) -> None:
    """Publish a batch and wait for its ack: then it is stored and rolled up."""
    before = len(sim.acks)
    await sim.link.publish(sim.topic("telemetry"), dumps(doc))

    async def acked() -> bool:
        return any(a["batch_id"] == doc["batch_id"] for a in sim.acks[before:])

    await until(acked, bool)


def line(doc: dict[str, Any], version: str) -> int:
    return [ln["version"] for ln in doc["lines"]].index(version)


def at(doc: dict[str, Any], t: int) -> int:
    return int(doc["t"].index(t))


async def test_records_land_in_their_minute_and_hour_with_merged_percentiles(
    fleet: Fleet, sims: Any
) -> None:
    db = fleet.service.db
    await add_version(db, M, "1")
    await add_device(db, "a")
    await add_device(db, "b")
    a, b = await sims("a"), await sims("b")

    def shadow_rollout(conn: sqlite3.Connection) -> None:
        # b was asked to shadow version 2 (a finished rollout's shadow device): its
        # shadow reports count; a's, never asked, are refused by the ingest.
        conn.execute(
            "INSERT INTO rollouts (id, model, version, target_kind, target, waves,"
            " max_failure_share, state, current_wave, created_at, updated_at)"
            " VALUES ('r1', ?, '2', 'all', '', '[1]', 0.2, 'completed', 0, 0, 0)",
            (M,),
        )
        conn.execute(
            "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, shadow)"
            " VALUES ('r1', 'b', 0, 'succeeded', 1)"
        )

    await db.write(shadow_rollout)

    fallback = {
        "schema": 1,
        "items": [],
        "calls": [],
        "agreement": [
            {"model": M, "version": "1", "kind": "audit", "agree": "true", "n": 3},
            {"model": M, "version": "1", "kind": "audit", "agree": "false", "n": 1},
        ],
    }
    doc_a = batch(
        "a",
        [
            ("inference_stats", stats("1", M0 + 5, lat(b2=10))),
            (
                "inference_stats",
                stats("1", M0 + 30, lat(b6=10), sources={"edge": 8, "cloud": 2}),
            ),
            ("drift_stats", drift("1", M0 + 5, 0.3, 0.1)),
            ("drift_stats", drift("1", M0 + 40, 0.2, 0.05)),
            # nobody asked device a to shadow 2: refused by the ingest, not counted
            ("shadow_stats", shadow("1", "2", M0, 9, 10)),
            ("fallback_stats", fallback),
        ],
    )
    for r in doc_a["records"]:
        if r["kind"] == "fallback_stats":
            r["ts"] = M0 + 50  # fallback_stats has no window: bucketed by its ts
    # The same record twice in one batch counts once.
    doc_a["records"].append(copy.deepcopy(doc_a["records"][0]))
    await send(a, doc_a)
    await send(
        b,
        batch(
            "b",
            [
                ("inference_stats", stats("1", M0 + 59, lat(b4=5))),
                ("inference_stats", stats("2", M0 + 60, lat(b11=4))),  # next minute
                ("shadow_stats", shadow("1", "2", M0 + 61, 45, 50)),
                # outside every table's range: stored as a record, not rolled up
                ("inference_stats", stats("1", NOW + 86400, lat(b1=7))),
                ("inference_stats", stats("1", NOW - 200 * 86400, lat(b1=7))),
            ],
        ),
    )
    # A resend of a's batch (lost ack): stored records, nothing counted again.
    dup_before = fleet.service.bus.ingest.stats.duplicate_records
    await send(a, doc_a)
    assert fleet.service.bus.ingest.stats.duplicate_records == dup_before + len(doc_a["records"])
    stored = await query(db, "SELECT count(*) FROM telemetry")
    assert stored == [(11,)]  # 6 distinct of a, 5 of b: the far ones are kept too

    doc = await fleet.call(
        "GET", f"/v1/series/models/{M}?from={M0 - 120}&to={M0 + 180}&step=minute"
    )
    assert doc["step_s"] == 60 and doc["source"] == "minute"
    assert doc["t"] == [M0 - 120 + 60 * i for i in range(5)]  # M0 is a whole minute
    assert doc["lines"] == [{"model": M, "version": "1"}, {"model": M, "version": "2"}]
    v1, v2, i0 = line(doc, "1"), line(doc, "2"), at(doc, M0)
    # 10 (<= 2 ms) + 10 (<= 50 ms) from a, 5 (<= 10 ms) from b: 25 requests.
    assert doc["requests"][v1] == [None, None, 25, None, None]
    assert doc["p50_ms"][v1][i0] == 10.0  # the 13th of 25 is in the <= 10 ms bucket
    assert doc["p95_ms"][v1][i0] == 50.0
    assert doc["fallback_rate"][v1][i0] == 0.08  # 2 of 25 answered by the cloud
    assert doc["psi_max"][v1][i0] == 0.3
    assert doc["psi_mean"][v1][i0] == 0.075
    assert doc["cloud_agreement"][v1][i0] == 0.75
    # a's shadow report was refused; b's counts, for the candidate's line
    assert doc["shadow_compared"][v2] == [None, None, None, 50, None]
    assert doc["shadow_agreement"][v2] == [None, None, None, 0.9, None]
    assert doc["shadow_compared"][v1] == [None] * 5
    assert doc["requests"][v2] == [None, None, None, 4, None]
    assert doc["p95_ms"][v2][i0 + 1] == 1000.0  # overflow: the last bound...
    assert doc["summary"][v2]["p95_above"] is True  # ...flagged in the summary
    assert doc["latency_ms"]["counts"][v1] == lat(b2=10, b4=5, b6=10)
    assert doc["confidence"]["counts"][v1] == [0] * 9 + [25, 0]
    assert doc["summary"][v1]["requests"] == 25

    # One device: only its own records.
    dev = await fleet.call(
        "GET", f"/v1/series/devices/a?from={M0 - 120}&to={M0 + 180}&step=hour&model={M}"
    )
    assert dev["source"] == "hour" and dev["t"] == [H0]
    assert dev["lines"] == [{"model": M, "version": "1"}]
    assert dev["requests"][0] == [20]
    assert (dev["p50_ms"][0][0], dev["p95_ms"][0][0]) == (2.0, 50.0)
    # Two hours ago is past this fleet's 1 h of device minutes: not in that table.
    assert await query(db, "SELECT count(*) FROM ts_device_minute") == [(0,)]
    hours = await query(
        db, "SELECT device_id, version, bucket, requests FROM ts_device_hour ORDER BY 1, 2"
    )
    assert hours == [("a", "1", H0, 20), ("b", "1", H0, 5), ("b", "2", H0, 4)]
    assert await query(db, "SELECT sum(shadow_compared) FROM ts_version_hour") == [(50,)]
    # Versions filter, and auto over a week: 10-minute steps from the minute table.
    week = await fleet.call("GET", f"/v1/series/models/{M}?from=-7d&version=2")
    assert week["step_s"] == 600 and week["source"] == "minute"
    assert len(week["t"]) <= MAX_POINTS
    assert week["lines"] == [{"model": M, "version": "2"}]
    assert sum(x or 0 for x in week["requests"][0]) == 4


async def test_retention_job_deletes_old_buckets_and_keeps_young_ones(fleet: Fleet) -> None:
    db = fleet.service.db
    now = int(time.time())
    old_minute, young_minute = now - 2 * 3600, now - 600  # device minutes kept 1 h here
    old_hour = now - 100 * 86400  # hours kept 90 days

    def seed(conn: sqlite3.Connection) -> None:
        for table, bucket in (
            ("ts_device_minute", old_minute),
            ("ts_device_minute", young_minute),
            ("ts_device_hour", old_hour),
            ("ts_device_hour", now - 3600),
        ):
            for i in range(150):  # more than a delete job's 100 rows
                conn.execute(
                    f"INSERT INTO {table} (device_id, model, version, bucket, requests)"
                    " VALUES (?, ?, '1', ?, 1)",
                    (f"d{i}", M, bucket // 60 * 60),
                )
        conn.execute(
            "INSERT INTO ts_version_minute (model, version, bucket, requests)"
            " VALUES (?, '1', ?, 1)",
            (M, old_minute // 60 * 60),  # the fleet-wide minutes are kept 8 days
        )

    await db.write(seed)

    async def remaining() -> list[tuple[Any, ...]]:
        return await query(
            db,
            "SELECT 'dm', bucket, count(*) FROM ts_device_minute GROUP BY bucket"
            " UNION ALL SELECT 'dh', bucket, count(*) FROM ts_device_hour GROUP BY bucket"
            " UNION ALL SELECT 'vm', bucket, count(*) FROM ts_version_minute GROUP BY bucket"
            " ORDER BY 1, 2",
        )

    want = [
        ("dh", (now - 3600) // 60 * 60, 150),
        ("dm", young_minute // 60 * 60, 150),
        ("vm", old_minute // 60 * 60, 1),
    ]
    # The service's job runs every second here (interval_s 1).
    assert await until(remaining, lambda rows: rows == want, within=15) == want
    assert fleet.service.retention.deleted >= 300


async def test_prune_in_bounded_jobs(tmp_path: Path) -> None:
    async with FleetDB(tmp_path / "f.sqlite") as db:
        t = 1_800_000_000

        def seed(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO ts_version_hour (model, version, bucket, records) VALUES (?, ?, ?, 1)",
                [(M, str(v), t - h * 3600) for v in range(3) for h in range(30)],
            )

        await db.write(seed)
        keep = Retention(hour_s=10 * 3600.0, batch_rows=7)
        deleted = await prune(db, keep, t=t)
        assert deleted["ts_version_hour"] == 3 * 19  # buckets older than 10 h: 11 h .. 29 h
        left = await query(db, "SELECT min(bucket), count(*) FROM ts_version_hour")
        assert left == [(t - 10 * 3600, 3 * 11)]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (f"/v1/series/models/{M}?step=week", "step must be minute, hour or auto; got 'week'"),
        (f"/v1/series/models/{M}?from=yesterday", "from must be unix seconds"),
        (f"/v1/series/models/{M}?from=nan", "from must be unix seconds"),
        (f"/v1/series/models/{M}?to=-5x", "to must be unix seconds"),
        (f"/v1/series/models/{M}?from=200&to=100", "from (200) must be before to (100)"),
        (f"/v1/series/models/{M}?from=-500d", "the range is 500.0 days; at most 400"),
        (f"/v1/series/models/{M}?from=-3d&step=minute", "step=minute over 72.0 h is 432"),
        (f"/v1/series/models/{M}?from=-100d&step=hour", "step=hour over 2400.0 h is 240"),
        (f"/v1/series/models/{M}?version=a/b", "version 'a/b' must match"),
        (f"/v1/series/models/{M}?frm=1", "unknown query parameter 'frm' (known: from, to,"),
        (f"/v1/series/models/{M}?step=hour&step=minute", "step given more than once"),
        ("/v1/series/models/..", None),  # not a model name: 400 or no route, never data
        ("/v1/series/devices/a?model=x%20y", "model name 'x y' must match"),
    ],
)
async def test_bad_queries_are_refused_with_400(
    fleet: Fleet, path: str, message: str | None
) -> None:
    await add_version(fleet.service.db, M, "1")
    await add_device(fleet.service.db, "a")
    status, doc = await fleet.raw("GET", path)
    if message is None:
        assert status in (400, 404), (status, doc)
        return
    assert status == 400, (status, doc)
    assert message in doc["error"]


async def test_unknown_model_or_device_is_404_and_read_needs_a_token(fleet: Fleet) -> None:
    status, doc = await fleet.raw("GET", "/v1/series/models/nothing")
    assert (status, doc["error"]) == (404, "unknown model 'nothing'")
    status, doc = await fleet.raw("GET", "/v1/series/devices/ghost")
    assert (status, doc["error"]) == (404, "unknown device 'ghost'")
    async with fleet.session.get(fleet.base + f"/v1/series/models/{M}") as r:
        assert r.status == 401


def test_auto_step_and_table() -> None:
    day = 86400.0
    t = 1_800_000_000.0
    w = choose_window(t - day, t, "auto", None, None)
    assert (w.step, w.source) == (60, "minute") and w.points <= MAX_POINTS
    w = choose_window(t - 7 * day, t, "auto", int(t - 8 * day), int(t - 90 * day))
    assert (w.step, w.source, w.points) == (600, "minute", 1008)
    # Minute buckets only from 2 days ago, hours from 90: a week reads the hours.
    w = choose_window(t - 7 * day, t, "auto", int(t - 2 * day), int(t - 90 * day))
    assert (w.step, w.source) == (3600, "hour")
    # ...unless the hour table is no older (a young fleet): minutes, with what exists.
    w = choose_window(t - 7 * day, t, "auto", int(t - 2 * day), int(t - 2 * day))
    assert w.source == "minute"
    w = choose_window(t - 90 * day, t, "auto", None, None)
    assert (w.step, w.source) == (7200, "hour") and w.points <= MAX_POINTS
    with pytest.raises(BadRequest, match="more than 2000"):
        choose_window(t - 2 * day, t, "minute", None, None)


def test_migration_backfills_stored_telemetry(tmp_path: Path) -> None:
    """A fleet database of schema 5 with telemetry: migration 6 rolls it up once."""
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    db = sqlite_utils.Database(conn)
    for step in fleet_db.MIGRATIONS[:5]:
        step(db)
    conn.execute("PRAGMA user_version = 5")
    t = time.time()
    m0 = int(t // 60) * 60 - 300
    for i, (start, latency) in enumerate([(m0, lat(b2=10)), (m0 + 30, lat(b6=10))]):
        data = stats("1", start, latency, sources={"edge": 7, "cloud": 3})
        conn.execute(
            "INSERT INTO inference_stats VALUES (?, 'a', ?, '1', ?, ?, 0, ?, ?)",
            (f"r{i}", M, start, 10, t, dumps(data)),
        )
    conn.execute(
        "INSERT INTO drift_stats (id, device_id, model, version, window_start, window_s,"
        " samples, psi_max, psi_mean, psi_output, received_at) VALUES"
        " ('d', 'a', ?, '1', ?, 60, 400, 0.4, 0.1, 0.02, ?)",
        (M, m0, t),
    )
    conn.execute("BEGIN")
    fleet_db.migrate(conn)
    conn.execute("COMMIT")
    cols = ", ".join(("version", "bucket", *FIGURES))
    rows = [dict(r) for r in db.query(f"SELECT {cols} FROM {TABLE['ts_version_minute'].name}")]
    conn.close()
    assert len(rows) == 1
    r = rows[0]
    assert (r["bucket"], r["records"], r["requests"], r["cloud"]) == (m0, 2, 20, 6)
    assert [r[f"l{i}"] for i in range(12)] == lat(b2=10, b6=10)
    assert (r["drift_records"], r["psi_max"], r["psi_mean_sum"]) == (1, 0.4, 0.1)

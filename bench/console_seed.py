"""A fleet database the size of the console's benchmark (issue 12), and the chart
queries timed on it.

``seed(db_path, devices=2000, days=7)`` writes, by direct SQL into a fleet database
at the current schema (made or migrated here): ``devices`` enrolled devices in 4
groups, one model (``digits-edge``) with two versions (5 % of the devices on the
candidate ``2`` for the last two days, the others on ``1``), their ``device_models``
rows, and the chart roll-ups (fleet/rollup.py) as the ingest would have filled them
from one ``inference_stats`` and one ``drift_stats`` record per device and minute:

- ``ts_version_minute``: every minute of ``days`` per version (fleet-wide);
- ``ts_version_hour`` and ``ts_device_hour``: every hour of ``days`` (per device: one
  row per device, version and hour);
- ``ts_device_minute``: the last ``device_minute_h`` hours per device.

The raw records are not written (2,000 devices x a week of minutes is 20 million of
them): what a chart reads is the roll-ups. Figures are deterministic (seeded).

``python -m bench.console_seed [--devices N] [--days D] [--repeat R]`` seeds a
temporary database and prints p50/p95 of the series queries (``model_series`` and
``device_series`` of fleet/timeseries.py on the reader threads, plus the JSON
encoding: the server's time without HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from edgefleet.fleet.db import FleetDB, migrate
from edgefleet.fleet.rollup import FIGURES, MAXES, TABLE, Table

MODEL = "digits-edge"
GROUPS = ("north", "south", "east", "west")
CANDIDATE_SHARE = 0.05
CANDIDATE_DAYS = 2.0


def device_id(i: int) -> str:
    return f"store-{i:05d}"


def _minute_figures(rng: random.Random, requests: int, slow: bool) -> list[Any]:
    """One (device or fleet) minute's figures in FIGURES order."""
    errors = rng.randint(0, max(0, requests // 200))
    answered = requests - errors
    cloud = rng.randint(0, max(0, answered // 20))
    lat = [0] * 12
    # most in 2..10 ms, a tail to 50 ms (slower on the candidate when ``slow``)
    weights: tuple[float, ...] = (0, 0, 0.05, 0.45, 0.35, 0.1, 0.05, 0, 0, 0, 0, 0)
    if slow:
        weights = (0, 0, 0.01, 0.2, 0.4, 0.2, 0.15, 0.04, 0, 0, 0, 0)
    left = requests
    for i, w in enumerate(weights):
        n = min(left, round(requests * w))
        lat[i] += n
        left -= n
    lat[4] += left
    conf = [0] * 11
    conf[9] = int(answered * 0.8)
    conf[8] = answered - conf[9]
    psi_mean = round(rng.uniform(0.005, 0.02), 4)
    figs: dict[str, Any] = {
        "records": 1,
        "requests": requests,
        "errors": errors,
        "answered": answered,
        "cloud": cloud,
        "cloud_failed": 0,
        **{f"l{i}": v for i, v in enumerate(lat)},
        **{f"c{i}": v for i, v in enumerate(conf)},
        "drift_records": 1,
        "drift_samples": answered,
        "shadow_compared": 0,
        "shadow_agreed": 0,
        "cloud_compared": 0,
        "cloud_agreed": 0,
        "psi_mean_sum": psi_mean,
        "psi_max": round(psi_mean * rng.uniform(3, 6), 4),
        "psi_output_max": round(rng.uniform(0.0, 0.01), 4),
    }
    return [figs[c] for c in FIGURES]


def _scaled(figs: list[Any], k: int) -> list[Any]:
    """``k`` devices' worth of one minute: sums times k (psi_mean_sum too: k records)."""
    return [v if c in MAXES else v * k for c, v in zip(FIGURES, figs, strict=True)]


def _insert(conn: sqlite3.Connection, table: Table, rows: Iterator[tuple[Any, ...]]) -> int:
    cols = (*table.keys, "bucket", *FIGURES)
    marks = ", ".join("?" * len(cols))
    sql = f"INSERT OR REPLACE INTO {table.name} ({', '.join(cols)}) VALUES ({marks})"
    n = 0
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= 20_000:
            conn.executemany(sql, chunk)
            n += len(chunk)
            chunk.clear()
    conn.executemany(sql, chunk)
    return n + len(chunk)


def seed(
    db_path: Path | str,
    devices: int = 2000,
    days: float = 7,
    *,
    device_minute_h: float = 2.0,
    now: float | None = None,
    rng_seed: int = 12,
) -> dict[str, Any]:
    """Write the fleet described in the module doc into ``db_path`` (created or
    migrated to the current schema; existing seeded rows are replaced). Returns what
    was written: ``devices``, ``from``/``to`` (unix s) and rows per table."""
    t = time.time() if now is None else now
    end_min = int(t // 60) * 60
    start_min = end_min - int(days * 86400 // 60) * 60
    cand_from = end_min - int(CANDIDATE_DAYS * 86400)
    rng = random.Random(rng_seed)
    n_cand = max(1, int(devices * CANDIDATE_SHARE))
    ids = [device_id(i) for i in range(devices)]
    cand = set(ids[:n_cand])

    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        migrate(conn)
        conn.executemany(
            "INSERT OR REPLACE INTO devices (id, created_at, online, status_at, last_seen,"
            " agent_version, protocol) VALUES (?, ?, 1, ?, ?, '0.12.0', '1')",
            [(d, start_min, t, t) for d in ids],
        )
        conn.executemany(
            "INSERT OR REPLACE INTO device_groups (device_id, grp) VALUES (?, ?)",
            [(d, GROUPS[i % len(GROUPS)]) for i, d in enumerate(ids)],
        )
        for v in ("1", "2"):
            conn.execute(
                "INSERT OR REPLACE INTO model_versions (name, version, sha256, size, path,"
                " runtime, manifest, key_id, uploaded_at) VALUES (?, ?, ?, 1000, ?, 'onnx',"
                " '{}', NULL, ?)",
                (
                    MODEL,
                    v,
                    (MODEL + v).encode().hex().ljust(64, "0")[:64],
                    f"{MODEL}/{v}",
                    start_min,
                ),
            )
        conn.executemany(
            "INSERT OR REPLACE INTO device_models (device_id, model, active, previous,"
            " desired, state, provider, updated_at) VALUES (?, ?, ?, ?, ?, 'active',"
            " 'CPUExecutionProvider', ?)",
            [
                (d, MODEL, "2" if d in cand else "1", "1" if d in cand else None,
                 "2" if d in cand else "1", t)
                for d in ids
            ],
        )  # fmt: skip

        # One device-minute template per version (devices differ by a factor), so a
        # week of 2,000 devices seeds in seconds; fleet-wide rows are their sums.
        def per_device(v: str) -> list[Any]:
            return _minute_figures(rng, 60, slow=v == "2")

        written: dict[str, int] = {}

        def version_minutes() -> Iterator[tuple[Any, ...]]:
            for b in range(start_min, end_min, 60):
                n2 = n_cand if b >= cand_from else 0
                for v, k in (("1", devices - n2), ("2", n2)):
                    if k:
                        yield (MODEL, v, b, *_scaled(per_device(v), k))

        def version_hours() -> Iterator[tuple[Any, ...]]:
            for h in range(start_min - start_min % 3600, end_min, 3600):
                n2 = n_cand if h >= cand_from else 0
                for v, k in (("1", devices - n2), ("2", n2)):
                    if k:
                        yield (MODEL, v, h, *_scaled(per_device(v), 60 * k))

        def device_rows(step: int, since: int) -> Iterator[tuple[Any, ...]]:
            templates = {v: per_device(v) for v in ("1", "2")}
            for b in range(since - since % step, end_min, step):
                for d in ids:
                    v = "2" if d in cand and b >= cand_from else "1"
                    yield (d, MODEL, v, b, *_scaled(templates[v], step // 60))

        written["ts_version_minute"] = _insert(conn, TABLE["ts_version_minute"], version_minutes())
        written["ts_version_hour"] = _insert(conn, TABLE["ts_version_hour"], version_hours())
        written["ts_device_hour"] = _insert(
            conn, TABLE["ts_device_hour"], device_rows(3600, start_min)
        )
        written["ts_device_minute"] = _insert(
            conn,
            TABLE["ts_device_minute"],
            device_rows(60, end_min - int(device_minute_h * 3600)),
        )
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    finally:
        conn.close()
    return {"devices": devices, "from": start_min, "to": end_min, "rows": written}


# ------------------------------------------------------------------ timing


def _pcts(ms: list[float]) -> tuple[float, float]:
    ms = sorted(ms)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]


async def time_queries(db_path: Path, repeat: int = 30) -> dict[str, dict[str, float]]:
    """p50/p95 (ms) of the chart queries on a seeded database (reader threads + JSON)."""
    from edgefleet.fleet.timeseries import device_series, model_series

    t = time.time()
    dev = device_id(0)  # a candidate device: two versions in the last days
    cases: dict[str, Callable[[FleetDB], Awaitable[dict[str, Any]]]] = {
        "model 1h (minute)": lambda db: model_series(db, MODEL, t - 3600, t),
        "model 24h (auto)": lambda db: model_series(db, MODEL, t - 86400, t),
        "model 7d (auto)": lambda db: model_series(db, MODEL, t - 7 * 86400, t),
        "model 7d (hour)": lambda db: model_series(db, MODEL, t - 7 * 86400, t, "hour"),
        "device 2h (minute)": lambda db: device_series(db, dev, t - 7200, t, "minute"),
        "device 24h (auto)": lambda db: device_series(db, dev, t - 86400, t),
        "device 7d (auto)": lambda db: device_series(db, dev, t - 7 * 86400, t),
    }
    out: dict[str, dict[str, float]] = {}
    async with FleetDB(db_path) as db:
        for name, case in cases.items():
            await case(db)  # warm the page cache
            ms = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                doc = await case(db)
                orjson.dumps(doc)
                ms.append((time.perf_counter() - t0) * 1000)
            p50, p95 = _pcts(ms)
            out[name] = {"p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "points": len(doc["t"])}
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.console_seed", description=__doc__)
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--days", type=float, default=7)
    ap.add_argument("--device-minute-h", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--db", type=Path, help="seed this file (kept) instead of a temporary one")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.db or Path(tmp) / "fleet.sqlite"
        t0 = time.perf_counter()
        info = seed(path, args.devices, args.days, device_minute_h=args.device_minute_h)
        print(f"seeded {path} in {time.perf_counter() - t0:.1f} s: {info['rows']}")
        print(f"database size: {path.stat().st_size / 1e6:.0f} MB")
        for name, r in asyncio.run(time_queries(path, args.repeat)).items():
            p50, p95, points = r["p50_ms"], r["p95_ms"], r["points"]
            print(f"{name:22s} p50 {p50:7.2f} ms  p95 {p95:7.2f} ms  {points} points")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Telemetry views: per model version (and per device) from stored ``inference_stats``.

The ingest stores each valid ``inference_stats`` record once (by id) in the
``inference_stats`` table, normalised by ``fleet.telemetry_math.validate_inference_stats``;
here they are merged with ``merge_inference_stats`` (histograms add up; p50/p95 are
bucket upper bounds, see that module). The queries run on the database's reader
threads, streaming rows grouped by model and version, so a view never blocks the
event loop or waits behind ingest writes.

``since`` (fleet clock, seconds) limits a view to records whose window started at or
after it (device clocks: good enough for "the last day"); without it a view reads
every record. Charts over time read the per-minute and per-hour roll-ups instead
(fleet/rollup.py, served by fleet/timeseries.py), which retention keeps bounded.

Each model version's summary also carries ``drift`` (``merge_drift`` over the
``drift_stats`` table: the newest figures of each device, worst device's PSI), with
null figures and a ``reason`` ("no reference profile", "too few samples (...)", "no
drift_stats records") when there are none. ``drift`` lists the per-(device,
version, window) rows, which the rollout gates read for ``drift_psi``.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from typing import Any

from edgefleet.fleet.db import FleetDB, loads
from edgefleet.fleet.telemetry_math import (
    DriftSummary,
    InferenceStatsData,
    merge_drift,
    merge_inference_stats,
)

MAX_EVENTS = 1000


class _Seen:
    """Devices and newest receive time of the rows fed through it."""

    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.last_seen: float | None = None

    def feed(self, rows: Iterator[sqlite3.Row]) -> Iterator[InferenceStatsData]:
        for r in rows:
            self.devices.add(r[2])
            self.last_seen = r[3] if self.last_seen is None else max(self.last_seen, r[3])
            yield loads(r[4])


_DRIFT_SELECT = (
    "SELECT model, version, device_id, window_start, window_s, samples, psi_max, psi_mean,"
    " psi_output, js_max, js_output, drift_reason, received_at FROM drift_stats"
)
_DRIFT_KEYS = (
    "model",
    "version",
    "device_id",
    "window_start",
    "window_s",
    "samples",
    "psi_max",
    "psi_mean",
    "psi_output",
    "js_max",
    "js_output",
    "drift_reason",
    "received_at",
)


def _drift_rows(
    conn: sqlite3.Connection, where: list[str], args: list[Any]
) -> Iterator[dict[str, Any]]:
    sql = _DRIFT_SELECT + (" WHERE " + " AND ".join(where) if where else "")
    for r in conn.execute(sql + " ORDER BY model, version, window_start", args):
        yield dict(zip(_DRIFT_KEYS, r, strict=True))


def _drift_by_version(
    conn: sqlite3.Connection, where: list[str], args: list[Any]
) -> dict[tuple[str, str], DriftSummary]:
    rows = _drift_rows(conn, where, args)
    return {
        key: merge_drift(group)
        for key, group in itertools.groupby(rows, key=lambda r: (r["model"], r["version"]))
    }


def _with_drift(
    summaries: list[dict[str, Any]], drift: dict[tuple[str, str], DriftSummary]
) -> list[dict[str, Any]]:
    for s in summaries:
        s["drift"] = drift.get((s["model"], s["version"])) or merge_drift(())
    return summaries


def _summaries(rows: Iterator[sqlite3.Row]) -> list[dict[str, Any]]:
    """Rows ordered by (model, version) → one merged summary per model version.
    Streams: one model version's records at a time are in memory, never all."""
    out: list[dict[str, Any]] = []
    for (model, version), group in itertools.groupby(rows, key=lambda r: (r[0], r[1])):
        seen = _Seen()
        summary = merge_inference_stats(seen.feed(group))
        out.append(
            {
                "model": model,
                "version": version,
                **summary,
                "devices": len(seen.devices),
                "last_seen": seen.last_seen,
            }
        )
    return out


class TelemetryViews:
    def __init__(self, db: FleetDB) -> None:
        self.db = db

    async def models(self, *, since: float | None = None) -> list[dict[str, Any]]:
        """Per model and version: requests, errors, p50/p95 latency, latency and
        confidence histograms, sources, fallback reasons, devices, last seen (fleet
        clock of the newest record)."""

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = "SELECT model, version, device_id, received_at, data FROM inference_stats"
            args: tuple[Any, ...] = ()
            if since is not None:
                sql += " WHERE window_start >= ?"
                args = (since,)
            out = _summaries(conn.execute(sql + " ORDER BY model, version", args))
            where = ["window_start >= ?"] if since is not None else []
            return _with_drift(out, _drift_by_version(conn, where, list(args)))

        return await self.db.read(q)

    async def device(self, device_id: str, *, since: float | None = None) -> list[dict[str, Any]]:
        """The same per model and version, for one device (``devices`` is 1 or 0)."""

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = (
                "SELECT model, version, device_id, received_at, data FROM inference_stats"
                " WHERE device_id = ?"
            )
            args: tuple[Any, ...] = (device_id,)
            if since is not None:
                sql += " AND window_start >= ?"
                args = (device_id, since)
            out = _summaries(conn.execute(sql + " ORDER BY model, version", args))
            where = ["device_id = ?"] + (["window_start >= ?"] if since is not None else [])
            return _with_drift(out, _drift_by_version(conn, where, list(args)))

        return await self.db.read(q)

    async def drift(
        self,
        model: str,
        version: str | None = None,
        *,
        device_id: str | None = None,
        since: float | None = None,
    ) -> list[dict[str, Any]]:
        """The stored ``drift_stats`` rows of ``model`` (one per device, version and
        window; oldest window first): the figure a ``drift_psi`` gate reads."""

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            where: list[str] = ["model = ?"]
            args: list[Any] = [model]
            for column, value in (("version", version), ("device_id", device_id)):
                if value is not None:
                    where.append(f"{column} = ?")
                    args.append(value)
            if since is not None:
                where.append("window_start >= ?")
                args.append(since)
            return list(_drift_rows(conn, where, args))

        return await self.db.read(q)

    async def events(
        self, device: str | None = None, model: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Newest first (by fleet receive time): the stored event documents, plus
        ``received_at``."""
        limit = max(1, min(int(limit), MAX_EVENTS))

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            where, args = [], []
            if device is not None:
                where.append("device_id = ?")
                args.append(device)
            if model is not None:
                where.append("model = ?")
                args.append(model)
            sql = "SELECT data, received_at FROM events"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY received_at DESC, id DESC LIMIT ?"
            return [{**loads(r[0]), "received_at": r[1]} for r in conn.execute(sql, (*args, limit))]

        return await self.db.read(q)

"""The fleet side of input drift: ``drift_stats`` records through a real Mosquitto into
a real FleetDB (fleet/ingest.py, fleet/db.py's drift_stats table), the telemetry views
and the CLI table per model version (fleet/telemetry.py, fleet/cli.py); impossible
figures refused with a counted reason, nothing of them in the views.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgefleet.agent.fleet_link import FLEET
from edgefleet.fleet.bus import FleetBus
from edgefleet.fleet.cli import print_telemetry
from edgefleet.fleet.db import FleetDB, dumps
from edgefleet.fleet.telemetry_math import merge_drift
from models.digits import load_split
from tests.support.brokers import Mosquitto, agent_fleet_section
from tests.support.drift_bundles import digits_bundle, send_digits
from tests.support.fleet_sim import (
    SimDevice,
    add_device,
    batch,
    bundle_url,
    fleet_config,
    query,
    stats_data,
    until,
)
from tests.support.tiny import agent_config

M = "digits-edge"
FAST = [0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[FleetDB]:
    database = await FleetDB(tmp_path / "fleet.sqlite").open()
    yield database
    await database.close()


@pytest.fixture
async def bus(db: FleetDB, mosquitto: Mosquitto) -> AsyncIterator[FleetBus]:
    b = FleetBus(db, fleet_config(mosquitto.port), bundle_url=bundle_url)
    await b.start()
    async with asyncio.timeout(10):
        await b.wait_connected()
    yield b
    await b.stop()


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


def drift(
    version: str,
    start: float,
    psi_max: float | None,
    psi_mean: float | None,
    psi_output: float | None,
    reason: str | None = None,
    samples: int = 400,
) -> dict[str, Any]:
    return {
        "model": M,
        "version": version,
        "window_start": start,
        "window_s": 60.0,
        "samples": samples,
        "features": 64 if psi_max is not None else 0,
        "psi_max": psi_max,
        "psi_mean": psi_mean,
        "psi_output": psi_output,
        "js_max": None,
        "js_output": None,
        "worst_feature": None,
        "drift_reason": reason,
    }


async def test_drift_is_stored_per_window_and_shown_per_version(
    db: FleetDB,
    bus: FleetBus,
    sims: Any,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    await add_device(db, "a")
    await add_device(db, "b")
    a, b = await sims("a"), await sims("b")
    t0 = time.time() - 600
    wrong_buckets = stats_data(M, "4", FAST)
    wrong_buckets["latency_ms"]["counts"] = wrong_buckets["latency_ms"]["counts"][:-1]
    wrong_buckets["count"] = sum(wrong_buckets["latency_ms"]["counts"])
    await a.link.publish(
        a.topic("telemetry"),
        dumps(
            batch(
                "a",
                [
                    ("inference_stats", stats_data(M, "4", FAST)),
                    ("inference_stats", stats_data(M, "5", FAST)),
                    ("drift_stats", drift("4", t0, 0.09, 0.01, 0.002)),
                    ("drift_stats", drift("4", t0 + 60, 0.12, 0.02, 0.01)),  # a's newest
                    ("drift_stats", drift("5", t0, None, None, None, "no reference profile")),
                    # impossible figures: stored raw only, counted, in no view
                    ("drift_stats", drift("4", t0 + 120, -0.5, 0.01, 0.0)),
                    ("drift_stats", drift("4", t0 + 120, 0.1, 0.4, 0.0)),
                    ("drift_stats", drift("4", t0 + 120, None, None, None)),
                    ("inference_stats", wrong_buckets),
                ],
            )
        ),
    )
    await b.link.publish(
        b.topic("telemetry"),
        dumps(
            batch(
                "b",
                [
                    ("inference_stats", stats_data(M, "4", FAST)),
                    ("drift_stats", drift("4", t0 + 30, 0.35, 0.08, 0.25)),
                ],
            )
        ),
    )
    await until(lambda: len(a.acks) == 1 and len(b.acks) == 1)
    s = bus.stats
    assert (s.bad_drift_stats, s.bad_stats) == (3, 1)
    # Logged once (rate-limited), with the first record's problem.
    logged = [r.getMessage() for r in caplog.records if "invalid drift_stats" in r.getMessage()]
    assert len(logged) == 1 and "from a" in logged[0] and "psi_max" in logged[0], logged
    assert s.rejected_total == 0  # the batches themselves were fine, and acked
    rows = await query(
        db,
        "SELECT device_id, version, psi_max, psi_mean, psi_output, drift_reason, samples"
        " FROM drift_stats ORDER BY device_id, window_start, version",
    )
    assert rows == [
        ("a", "4", 0.09, 0.01, 0.002, None, 400),
        ("a", "5", None, None, None, "no reference profile", 400),
        ("a", "4", 0.12, 0.02, 0.01, None, 400),
        ("b", "4", 0.35, 0.08, 0.25, None, 400),
    ]

    views = {v["version"]: v for v in await bus.telemetry.models()}
    d4 = views["4"]["drift"]
    # Each device's newest window; the worst device's max and output PSI, the mean of means.
    assert (d4["psi_max"], d4["psi_output"], d4["devices"], d4["samples"]) == (0.35, 0.25, 2, 800)
    assert d4["psi_mean"] == pytest.approx((0.02 + 0.08) / 2) and d4["reason"] is None
    d5 = views["5"]["drift"]
    assert d5["psi_max"] is None and d5["reason"] == "no reference profile"
    only_a = {v["version"]: v["drift"] for v in await bus.telemetry.device("a")}
    assert only_a["4"]["psi_max"] == 0.12 and only_a["4"]["devices"] == 1
    # Per (device, version, window): what a drift_psi gate reads.
    windows = await bus.telemetry.drift(M, "4")
    assert [(w["device_id"], w["psi_max"]) for w in windows] == [
        ("a", 0.09),
        ("b", 0.35),
        ("a", 0.12),
    ]
    assert await bus.telemetry.drift(M, "4", device_id="b", since=t0 + 31) == []

    print_telemetry({"models": list(views.values())})
    out = capsys.readouterr().out
    assert "DRIFT-PSI(MAX/MEAN/OUT)" in out and "0.35/0.05/0.25" in out


def test_merge_drift_without_figures_says_why() -> None:
    assert merge_drift(())["reason"] == "no drift_stats records"
    few = {
        "device_id": "a",
        "psi_max": None,
        "psi_output": None,
        "drift_reason": "too few samples (12 < 100)",
        "samples": 12,
    }
    assert merge_drift([few])["reason"] == "too few samples (12 < 100)"


async def test_a_real_agent_drift_reaches_the_fleet_views(
    db: FleetDB,
    bus: FleetBus,
    mosquitto: Mosquitto,
    start_agent: Any,
    digits: Any,
    keys: Any,
    tmp_path: Path,
) -> None:
    """Agent → outbox → sender → Mosquitto → ingest → drift_stats → views: held-out
    digits are no drift, inverted ones are."""
    await add_device(db, "store-9")
    same = digits_bundle(digits, keys, tmp_path, "f1", profile=True)
    shifted = digits_bundle(digits, keys, tmp_path, "f2", profile=True)
    fleet = agent_fleet_section(mosquitto.port, tmp_path)
    fleet["telemetry"]["stats_interval_s"] = 3600  # one window each, written at the stop
    agent = await start_agent(
        agent_config(tmp_path, keys, [same], device_id="store-9", fleet=fleet)
    )
    x = load_split().x_test
    async with aiohttp.ClientSession() as session:
        await send_digits(session, agent.base, x)
        async with session.post(
            f"{agent.base}/v1/bundles?activate=1", data=shifted.read_bytes()
        ) as r:
            assert r.status == 201, await r.text()
        await send_digits(session, agent.base, 16.0 - x[:200])
    stats = agent.app[FLEET].stats
    await stats.flush()  # both windows now, while the link is up; the sender ships them
    await until(lambda: bus.stats.records >= 4)
    views = {v["version"]: v for v in await bus.telemetry.models()}
    f1, f2 = views["f1"]["drift"], views["f2"]["drift"]
    # (a busy box may leave some items unbinned: counted as dropped, not in samples)
    assert 300 <= f1["samples"] <= len(x) and f1["psi_mean"] < 0.05 and f1["psi_output"] < 0.1
    assert 100 <= f2["samples"] <= 200 and f2["psi_mean"] > 1 and f2["psi_max"] > 5
    assert bus.stats.bad_drift_stats == 0
    windows = await bus.telemetry.drift(M, device_id="store-9")
    assert sorted(w["version"] for w in windows) == ["f1", "f2"]

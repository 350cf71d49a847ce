"""What a device's telemetry batches say of its outbox reaches the fleet manager
(issue 12): records waiting and records a full outbox dropped are kept per device from
the newest batch (fleet/ingest.py), shown on the device page, raised as overview
alerts, and summed on the fleet's /metrics. Real batches over a real Mosquitto."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.core import protocol
from edgefleet.core.mqtt import topics
from edgefleet.fleet.console.overview import read_overview
from tests.support.brokers import Mosquitto, Peer
from tests.support.prom import promtool_check, sample
from tests.support.quality_fleet import TOKEN, Fleet, fleet_config, running_fleet, until


@pytest.fixture
async def fleet(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto
) -> AsyncIterator[Fleet]:
    async with running_fleet(fleet_config(tmp_path, keys, mosquitto.port), cookies=True) as f:
        yield f


def batch(device: str, seq: int, waiting: int, dropped_low: int, dropped_high: int) -> bytes:
    now = time.time()
    event = protocol.Event(id=secrets.token_hex(16), device_id=device, at=now, kind="started")
    return protocol.encode_telemetry(
        device,
        f"b{seq}",
        now,
        protocol.OutboxCounts(waiting=waiting, dropped_low=dropped_low, dropped_high=dropped_high),
        [(secrets.token_hex(16), seq, "event", 1, now, event.to_json())],
    )


async def outbox_of(fleet: Fleet, device: str) -> tuple[Any, ...]:
    db = fleet.service.db
    assert db is not None
    row = await db.read(
        lambda conn: conn.execute(
            "SELECT outbox_waiting, outbox_dropped_low, outbox_dropped_high FROM devices"
            " WHERE id = ?",
            (device,),
        ).fetchone()
    )
    return tuple(row)


async def test_outbox_counts_reach_the_device_page_the_alerts_and_metrics(
    fleet: Fleet, mosquitto: Mosquitto
) -> None:
    await fleet.enrol("store-o", ["north"])
    await fleet.enrol("store-q", ["north"])
    peer = Peer(mosquitto.port, "sim-store-o")
    telemetry = topics.device_topic("store-o", topics.TELEMETRY)
    try:
        # Peer.publish waits for the broker's ack: off the loop the fleet runs on.
        await asyncio.to_thread(peer.publish, telemetry, batch("store-o", 1, 1500, 7, 0))
        assert await until(lambda: outbox_of(fleet, "store-o"), lambda r: r == (1500, 7, 0)) == (
            1500,
            7,
            0,
        )
        db = fleet.service.db
        assert db is not None
        alerts = {a["kind"]: a for a in (await db.read(read_overview)).alerts}
        assert alerts["outbox_dropped"]["level"] == "bad"
        assert alerts["outbox_dropped"]["text"] == (
            "telemetry lost on 1 device(s): a full outbox dropped 7 low- and 0"
            " high-priority records (store-o)"
        )
        assert alerts["outbox_waiting"]["text"] == (
            "1 device(s) hold 1,000 or more unsent telemetry records (most: 1,500 on store-o)"
        )
        assert alerts["outbox_waiting"]["href"] == "/ui/devices/store-o"

        async with fleet.session.post(
            fleet.base + "/ui/login", data={"token": TOKEN, "next": "/ui/devices/store-o"}
        ) as r:
            page = await r.text()
        assert r.status == 200 and "1,500 record(s) waiting on the device" in page
        assert "dropped when full: 7 low-, 0 high-priority" in page
        async with fleet.session.get(fleet.base + "/ui/devices/store-q") as r:
            assert '<dd id="outbox"><span class="muted">no batch yet</span>' in await r.text()

        async with fleet.session.get(
            fleet.base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            text = await r.text()
        promtool_check(text)
        assert sample(text, "edgefleet_fleet_device_outbox_waiting") == 1500
        assert sample(text, "edgefleet_fleet_device_outbox_dropped", priority="low") == 7

        # The next batch: the backlog drained; the drop counters are running totals.
        await asyncio.to_thread(peer.publish, telemetry, batch("store-o", 2, 3, 7, 0))
        await until(lambda: outbox_of(fleet, "store-o"), lambda r: r == (3, 7, 0))
        kinds = {a["kind"] for a in (await db.read(read_overview)).alerts}
        assert "outbox_waiting" not in kinds and "outbox_dropped" in kinds
    finally:
        await asyncio.to_thread(peer.close)


async def test_the_ingest_rate_limit_is_a_fleet_config_key(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto
) -> None:
    """``ingest.device_rate_per_s``/``device_burst`` reach the running ingest: a
    device's third quick batch is over a burst of 2 and refused (unacked, counted)."""
    cfg = fleet_config(
        tmp_path, keys, mosquitto.port, ingest={"device_rate_per_s": 0.01, "device_burst": 2}
    )
    async with running_fleet(cfg) as fleet:
        await fleet.enrol("store-r", [])
        peer = Peer(mosquitto.port, "sim-store-r")
        telemetry = topics.device_topic("store-r", topics.TELEMETRY)
        try:
            for seq in range(1, 4):
                await asyncio.to_thread(peer.publish, telemetry, batch("store-r", seq, 0, 0, 0))
            stats = fleet.service.bus.stats
            await until(lambda: asyncio.sleep(0, stats.rejected.get("rate_limited", 0)), bool)
            await until(lambda: asyncio.sleep(0, stats.records), lambda n: n == 2)
            assert stats.rejected["rate_limited"] == 1
        finally:
            await asyncio.to_thread(peer.close)
    with pytest.raises(ValueError, match="device_burst"):
        fleet_config(tmp_path, keys, mosquitto.port, ingest={"device_burst": 0})

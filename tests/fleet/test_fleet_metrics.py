"""The fleet's ``GET /metrics`` (fleet/metrics.py) on a real fleet service over a real
Mosquitto, after real traffic: a device (our MQTT link, as the agent uses it) says it
is online and sends telemetry, a plain paho peer sends garbage, HTTP clients ask for
what does not exist. The figures must have moved by exactly what was sent, and the
whole exposition must pass ``promtool check metrics``."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgefleet.core.mqtt import topics
from tests.support.brokers import Mosquitto, Peer
from tests.support.fleet_sim import SimDevice, batch, stats_data
from tests.support.prom import promtool_check, sample
from tests.support.quality_fleet import TOKEN, Fleet, fleet_config, running_fleet, until

READ_TOKEN = "read-" + secrets.token_hex(16)


@pytest.fixture
async def fleet(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto
) -> AsyncIterator[Fleet]:
    cfg = fleet_config(
        tmp_path,
        keys,
        mosquitto.port,
        auth={"token": TOKEN, "tokens": [{"name": "prom", "role": "read", "token": READ_TOKEN}]},
    )
    async with running_fleet(cfg) as client:
        yield client


async def scrape(fleet: Fleet, token: str = READ_TOKEN) -> str:
    async with fleet.session.get(
        fleet.base + "/metrics", headers={"Authorization": f"Bearer {token}"}
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await r.text()


def value(text: str, name: str, **labels: str) -> float:
    return sample(text, name, **labels)


async def test_metrics_move_with_real_traffic_and_pass_promtool(
    fleet: Fleet, mosquitto: Mosquitto
) -> None:
    await fleet.enrol("store-1", ["north"])
    await fleet.enrol("store-2", ["north", "south"])
    before = await scrape(fleet)
    assert value(before, "edgefleet_fleet_devices", state="offline") == 2
    assert value(before, "edgefleet_fleet_telemetry_records_stored_total") == 0

    # store-1 comes online (its link's birth message) and sends 7 records in 2 batches.
    dev = await SimDevice(mosquitto.port, "store-1").start()
    peer = Peer(mosquitto.port, "metrics-garbage")
    try:
        await dev.connected()
        sent = 0
        for n in (3, 4):
            records: list[tuple[str, Any]] = [
                ("inference_stats", stats_data("tiny", "1", [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]))
            ] * n
            await dev.link.publish(
                topics.device_topic("store-1", "telemetry"),
                orjson.dumps(batch("store-1", records, seq0=sent + 1)),
                qos=1,
            )
            sent += n
        # Garbage on a device's telemetry topic: refused as not_json, nothing stored.
        peer.publish(topics.device_topic("store-2", "telemetry"), b"\x00not json{")
        await until(lambda: asyncio.sleep(0, dev.acks), lambda acks: len(acks) == 2)
        await until(
            lambda: scrape(fleet),
            lambda t: (
                value(t, "edgefleet_fleet_ingest_refused_total", reason="not_json") == 1
                and value(t, "edgefleet_fleet_devices", state="online") == 1
                and value(t, "edgefleet_fleet_group_devices", group="north", state="online") == 1
                and value(t, "edgefleet_fleet_group_devices", group="north", state="offline") == 1
            ),
        )
    finally:
        peer.close()
        await dev.stop()

    # A 404 from a known route, and one from a path no route knows.
    for path in ("/v1/devices/nobody", "/v1/devices/nobody", "/v1/no/such/thing/42"):
        status, _ = await fleet.raw("GET", path)
        assert status == 404

    # store-1's link said goodbye (offline status) when it stopped.
    text = await until(
        lambda: scrape(fleet), lambda t: value(t, "edgefleet_fleet_devices", state="offline") == 2
    )
    assert value(text, "edgefleet_fleet_telemetry_records_stored_total") == sent == 7
    assert value(text, "edgefleet_fleet_ingest_applied_total", kind="batches") == 2
    assert value(text, "edgefleet_fleet_telemetry_acks_sent_total") == 2
    assert value(text, "edgefleet_fleet_ingest_refused_total", reason="not_json") == 1
    assert value(text, "edgefleet_fleet_ingest_refused_by_leaf_total", leaf="telemetry") == 1
    # Ingest lag: one observation per stored record, each well under a minute here.
    assert value(text, "edgefleet_fleet_ingest_lag_seconds_count") == 7
    assert value(text, "edgefleet_fleet_ingest_lag_seconds_bucket", le="60.0") == 7
    # The route's pattern, never the raw path; unknown paths share one label.
    assert (
        value(
            text,
            "edgefleet_fleet_http_requests_total",
            route="/v1/devices/{id}",
            method="GET",
            status="404",
        )
        == 2
    )
    assert (
        value(
            text,
            "edgefleet_fleet_http_requests_total",
            route="unmatched",
            method="GET",
            status="404",
        )
        == 1
    )
    assert "/v1/devices/nobody" not in text and "/v1/no/such" not in text
    assert (
        value(
            text,
            "edgefleet_fleet_http_request_duration_seconds_count",
            route="/v1/devices/{id}",
            method="GET",
        )
        == 2
    )
    # Devices by state and group; the MQTT side.
    assert value(text, "edgefleet_fleet_devices", state="online") == 0
    assert value(text, "edgefleet_fleet_devices", state="revoked") == 0
    assert value(text, "edgefleet_fleet_group_devices", group="north", state="offline") == 2
    assert value(text, "edgefleet_fleet_group_devices", group="south", state="offline") == 1
    assert value(text, "edgefleet_fleet_mqtt_connected") == 1
    assert value(text, "edgefleet_fleet_mqtt_connects_total") == 1
    assert value(text, "edgefleet_fleet_mqtt_messages_received_total") >= 4  # status, 2, garbage
    assert value(text, "edgefleet_fleet_mqtt_messages_published_total") >= 2  # the acks
    assert "edgefleet_fleet_db_write_queue_depth " in text
    assert "edgefleet_fleet_rollouts" in text and "edgefleet_fleet_gate_decisions" in text
    assert value(text, "process_resident_memory_bytes") > 0
    assert "python_info{" in text
    promtool_check(text)


async def test_metrics_need_the_read_permission(fleet: Fleet) -> None:
    async with fleet.session.get(fleet.base + "/metrics") as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    async with fleet.session.get(
        fleet.base + "/metrics", headers={"Authorization": "Bearer wrong-token-0123456789"}
    ) as r:
        assert r.status == 401
    # The read role (a dashboard or Prometheus) and the admin may both scrape.
    await scrape(fleet, READ_TOKEN)
    text = await scrape(fleet, TOKEN)
    # The refused scrapes are counted too (the metrics middleware is outermost).
    assert (
        value(
            text,
            "edgefleet_fleet_http_requests_total",
            route="/metrics",
            method="GET",
            status="401",
        )
        == 2
    )


async def test_database_figures_revoked_devices_rollouts_gate_decisions(fleet: Fleet) -> None:
    await fleet.enrol("kept", ["east"])
    await fleet.enrol("gone", ["east"])
    await fleet.call("POST", "/v1/devices/gone/revoke")
    db = fleet.service.db
    assert db is not None

    def seed(conn: Any) -> None:
        for i, state in enumerate(("running", "stopped", "stopped", "rolled_back")):
            conn.execute(
                "INSERT INTO rollouts (id, model, version, target_kind, target, waves,"
                " max_failure_share, state, current_wave, created_at, updated_at)"
                " VALUES (?, 'm', '1', 'all', '', '[1]', 0.2, ?, 0, 0, 0)",
                (f"r{i}", state),
            )
        for stage, outcome in (("wave", "pass"), ("wave", "pass"), ("shadow", "fail")):
            conn.execute(
                "INSERT INTO rollout_decisions (rollout_id, stage, wave, outcome, evidence, at)"
                " VALUES ('r0', ?, 0, ?, '[]', 0)",
                (stage, outcome),
            )

    await db.write(seed)
    text = await scrape(fleet)
    assert value(text, "edgefleet_fleet_devices", state="revoked") == 1
    assert value(text, "edgefleet_fleet_devices", state="offline") == 1
    assert value(text, "edgefleet_fleet_group_devices", group="east", state="revoked") == 1
    assert value(text, "edgefleet_fleet_rollouts", state="running") == 1
    assert value(text, "edgefleet_fleet_rollouts", state="stopped") == 2
    assert value(text, "edgefleet_fleet_rollouts", state="rolled_back") == 1
    assert value(text, "edgefleet_fleet_gate_decisions_total", stage="wave", outcome="pass") == 2
    assert value(text, "edgefleet_fleet_gate_decisions_total", stage="shadow", outcome="fail") == 1
    promtool_check(text)

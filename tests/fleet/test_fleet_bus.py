"""The fleet's MQTT side (fleet/bus.py, ingest, desired, rollouts, telemetry views)
against a real Mosquitto (and the embedded amqtt broker), a real FleetDB on tmp_path
and simulated devices that use the agent's real MQTT link. No mocks, no timing
asserts: every wait is on a condition, with a generous timeout.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgefleet.agent.mqtt_link import MqttLink
from edgefleet.agent.outbox import NewRecord, Outbox
from edgefleet.agent.telemetry_sender import TelemetrySender
from edgefleet.core.errors import BadRequest
from edgefleet.core.mqtt import topics
from edgefleet.fleet.bus import FleetBus
from edgefleet.fleet.db import FleetDB, dumps
from edgefleet.fleet.desired import UnknownModelVersion
from edgefleet.fleet.embedded_broker import EmbeddedBroker
from edgefleet.fleet.ingest import MAX_BYTES, DeviceRateLimit
from edgefleet.fleet.rollouts import RolloutConflict, parse_waves, wave_sizes
from tests.support.brokers import Mosquitto
from tests.support.fleet_sim import (
    SimDevice,
    add_device,
    add_version,
    batch,
    bundle_url,
    fleet_config,
    link_config,
    new_id,
    query,
    stats_data,
    until,
)

M = "digits-edge"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[FleetDB]:
    database = await FleetDB(tmp_path / "fleet.sqlite").open()
    yield database
    await database.close()


@pytest.fixture
async def buses(db: FleetDB) -> AsyncIterator[Callable[..., Any]]:
    made: list[FleetBus] = []

    async def make(port: int, connect: bool = True, **kw: Any) -> FleetBus:
        bus = FleetBus(db, fleet_config(port), bundle_url=bundle_url, **kw)
        made.append(bus)
        await bus.start()
        if connect:
            async with asyncio.timeout(10):
                await bus.wait_connected()
        return bus

    yield make
    for bus in made:
        await bus.stop()


@pytest.fixture
async def sims() -> AsyncIterator[Callable[..., Any]]:
    made: list[SimDevice] = []

    async def make(port: int, device_id: str, outcome: Any = None, **kw: Any) -> SimDevice:
        sim = SimDevice(port, device_id, outcome, **kw)
        made.append(sim)
        await sim.start()
        await sim.connected()
        return sim

    yield make
    for sim in made:
        await sim.stop()


async def device_row(db: FleetDB, device_id: str) -> dict[str, Any]:
    def q(conn: Any) -> dict[str, Any]:
        row = conn.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
        return dict(row)

    return await db.read(q)


# ------------------------------------------------------------------ pure parts


def test_wave_plans() -> None:
    plan = parse_waves([1, "50%", "100%"])
    assert wave_sizes(plan, 10) == [1, 4, 5]
    assert wave_sizes(plan, 1) == [1]  # empty waves are skipped
    assert wave_sizes(parse_waves([1, "10%", "100%"]), 100) == [1, 9, 90]
    assert wave_sizes(parse_waves([2, 5]), 20) == [2, 18]  # the last wave takes the rest
    assert wave_sizes(parse_waves(["25%"]), 3) == [3]
    for bad in [[], [0], ["0%"], ["150%"], ["ten"], [True], "1,2"]:
        with pytest.raises(BadRequest):
            parse_waves(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ ingest


async def test_telemetry_batch_stored_once_and_acked_each_time(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    await add_device(db, "store-1")
    bus = await buses(mosquitto.port)
    sim = await sims(mosquitto.port, "store-1")
    event = {
        "schema": 1,
        "id": new_id(),
        "device_id": "store-1",
        "at": 1764000001.2,
        "kind": "activated",
        "model": M,
        "version": "4",
        "previous": "3",
        "revision": 7,
        "rollout": None,
        "reason": None,
    }
    doc = batch(
        "store-1",
        [
            ("inference_stats", stats_data(M, "4", [0, 3, 10, 40, 50, 17, 0, 0, 0, 0, 0, 0])),
            ("event", event),
            ("sample", {"anything": [1, 2, 3]}),
        ],
    )
    payload = orjson.dumps(doc)
    await sim.link.publish(sim.topic("telemetry"), payload)
    await until(lambda: len(sim.acks) == 1)
    await sim.link.publish(sim.topic("telemetry"), payload)  # a resend
    await until(lambda: len(sim.acks) == 2)
    ids = [r["id"] for r in doc["records"]]
    for ack in sim.acks:
        assert ack == {"schema": 1, "batch_id": doc["batch_id"], "record_ids": ids}
    assert await query(db, "SELECT id FROM telemetry ORDER BY seq") == [(i,) for i in ids]
    stats = await query(db, "SELECT id, device_id, model, version, count FROM inference_stats")
    assert stats == [(ids[0], "store-1", M, "4", 120)]
    events = await query(db, "SELECT id, device_id, kind, model, version, revision FROM events")
    assert events == [(event["id"], "store-1", "activated", M, "4", 7)]
    s = bus.stats
    assert (s.batches, s.records, s.duplicate_records, s.acks_sent, s.events) == (2, 3, 3, 2, 1)
    assert s.rejected_total == 0
    assert (await device_row(db, "store-1"))["last_seen"] is not None
    assert (await bus.telemetry.events(device="store-1"))[0]["kind"] == "activated"


async def test_garbage_on_every_leaf_is_counted_and_ignored(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, peers: Any, sims: Any
) -> None:
    await add_device(db, "store-1")
    await add_device(db, "store-2")
    bus = await buses(mosquitto.port)
    ackers = await sims(mosquitto.port, "store-2")  # sees the acks on store-2/acks
    peer = await asyncio.to_thread(peers, mosquitto.port, client_id="evil")

    def topic(leaf: str, device: str = "store-2") -> str:
        return topics.device_topic(device, leaf)  # type: ignore[arg-type]

    def pad(leaf: str) -> bytes:
        return b'{"schema":1,"device_id":"store-2","pad":"' + b"x" * MAX_BYTES[leaf] + b'"}'

    status = {
        "schema": 1,
        "state": "online",
        "device_id": "store-2",
        "agent_version": "9",
        "protocol": "3.1.1",
        "at": 1.0,
    }
    reported = {
        "schema": 1,
        "device_id": "store-2",
        "revision": 3,
        "agent_version": "9",
        "models": {
            M: {
                "active": "4",
                "previous": "3",
                "desired": "4",
                "state": "active",
                "rollout": None,
                "provider": "cpu",
                "last_error": None,
            }
        },
    }
    event = {
        "schema": 1,
        "id": new_id(),
        "device_id": "store-2",
        "at": 1.0,
        "kind": "activated",
        "model": M,
        "version": "4",
    }
    good_batch = batch("store-2", [("sample", {"i": 1})])
    bad_record = batch("store-2", [("sample", {"i": 1})])
    bad_record["records"][0]["id"] = "not-hex"
    junk: dict[str, list[tuple[bytes, str]]] = {
        "status": [
            (b"", "not_json"),
            (b"\xff\xfe", "not_json"),
            (b"[1,2]", "schema"),
            (dumps({**status, "schema": 2}).encode(), "newer_schema"),
            (dumps({**status, "device_id": "store-1"}).encode(), "device_mismatch"),
            (dumps({**status, "state": "sleepy"}).encode(), "invalid"),
            (pad("status"), "oversized"),
        ],
        "reported": [
            (b"{", "not_json"),
            (dumps({**reported, "schema": "1"}).encode(), "schema"),
            (dumps({**reported, "schema": 7}).encode(), "newer_schema"),
            (dumps({**reported, "device_id": "store-1"}).encode(), "device_mismatch"),
            (dumps({**reported, "revision": "three"}).encode(), "invalid"),
            (dumps({**reported, "models": {M: {"state": "dancing"}}}).encode(), "invalid"),
            (pad("reported"), "oversized"),
        ],
        "events": [
            (b"null", "schema"),
            (dumps({**event, "schema": 2, "shape": "new"}).encode(), "newer_schema"),
            (dumps({**event, "device_id": "store-1"}).encode(), "device_mismatch"),
            (dumps({**event, "id": "x"}).encode(), "invalid"),
            (dumps({**event, "kind": "DROP TABLE"}).encode(), "invalid"),
            (dumps({**event, "at": "yesterday"}).encode(), "invalid"),
            (pad("events"), "oversized"),
        ],
        "telemetry": [
            (b"\x00", "not_json"),
            (dumps({**good_batch, "schema": 0}).encode(), "schema"),
            (dumps({**good_batch, "schema": 2}).encode(), "newer_schema"),
            (dumps({**good_batch, "device_id": "store-1"}).encode(), "device_mismatch"),
            (dumps({**good_batch, "records": []}).encode(), "invalid"),
            (dumps(bad_record).encode(), "invalid"),
            (pad("telemetry"), "oversized"),
        ],
    }
    expected: dict[str, int] = {}
    for leaf, items in junk.items():
        for payload, reason in items:
            await asyncio.to_thread(peer.publish, topic(leaf), payload)
            expected[reason] = expected.get(reason, 0) + 1
    # A message from a device the fleet does not know: stored nowhere, never acked.
    stranger = batch("stranger", [("sample", {"i": 1})])
    await asyncio.to_thread(peer.publish, topic("telemetry", "stranger"), dumps(stranger))
    expected["unknown_device"] = 1
    # Good messages right after the garbage, on every leaf: all processed.
    await asyncio.to_thread(peer.publish, topic("status"), dumps(status))
    await asyncio.to_thread(peer.publish, topic("reported"), dumps(reported))
    await asyncio.to_thread(peer.publish, topic("events"), dumps(event))
    await asyncio.to_thread(peer.publish, topic("telemetry"), dumps(good_batch))
    await until(lambda: [a["batch_id"] for a in ackers.acks] == [good_batch["batch_id"]])
    await until(lambda: bus.stats.events == 1 and bus.stats.reported >= 1)
    await until(lambda: bus.stats.rejected == expected)
    assert bus.stats.rejected_by_leaf == {
        "status": 7,
        "reported": 7,
        "events": 7,
        "telemetry": 8,
    }
    rows = await query(db, "SELECT device_id, model, active, state FROM device_models")
    assert rows == [("store-2", M, "4", "active")]
    assert await query(db, "SELECT count(*) FROM telemetry") == [(1,)]
    assert await query(db, "SELECT id FROM events") == [(event["id"],)]
    row = await device_row(db, "store-2")
    assert (row["agent_version"], row["reported_revision"]) == ("9", 3)
    assert bus.link.connected and bus.link.stats.handler_errors == 0


async def test_status_online_then_offline_by_last_will(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    await add_device(db, "store-1")
    await add_device(db, "store-2")
    await buses(mosquitto.port)
    sim = await sims(mosquitto.port, "store-1")
    row = await until(
        lambda: _row_if(db, "store-1", lambda r: r["online"] == 1 and r["protocol"] == "3.1.1")
    )
    assert row["agent_version"] == "sim-1" and row["offline_reason"] is None
    # Kill the device's connection without DISCONNECT (what a crash or a pulled cable
    # looks like to the broker): the Will says offline.
    sim.link._abort_socket()
    await sim.link.stop()
    row = await until(lambda: _row_if(db, "store-1", lambda r: r["online"] == 0))
    assert row["offline_reason"] == "connection lost"
    # A clean stop says offline itself, with its reason.
    other = await sims(mosquitto.port, "store-2")
    await until(lambda: _row_if(db, "store-2", lambda r: r["online"] == 1))
    await other.stop()
    row = await until(lambda: _row_if(db, "store-2", lambda r: r["online"] == 0))
    assert row["offline_reason"] == "shutdown"


async def _row_if(db: FleetDB, device_id: str, cond: Callable[[dict[str, Any]], bool]) -> Any:
    row = await device_row(db, device_id)
    return row if cond(row) else None


async def test_a_fleet_started_later_learns_state_from_retained_messages(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    """Devices report while no fleet runs; the fleet that starts gets the retained
    status and reported documents."""
    for d in ("store-1", "store-2"):
        await add_device(db, d)
    a = await sims(mosquitto.port, "store-1")
    await sims(mosquitto.port, "store-2")
    a.revision = 5
    await a.report(
        {
            M: {
                "active": "3",
                "previous": None,
                "desired": "3",
                "state": "active",
                "rollout": None,
                "provider": None,
                "last_error": None,
            }
        }
    )
    await buses(mosquitto.port)
    await until(lambda: _row_if(db, "store-2", lambda r: r["online"] == 1))
    await until(lambda: _row_if(db, "store-1", lambda r: r["reported_revision"] == 5))
    assert await query(db, "SELECT device_id, active FROM device_models") == [("store-1", "3")]


# ------------------------------------------------------------------ desired


async def test_assignments_precedence_revisions_and_late_devices(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    for d, groups in [("d1", ("north",)), ("d2", ("north", "east")), ("d3", ())]:
        await add_device(db, d, groups)
    shas = {v: await add_version(db, M, v, size=1000 + int(v)) for v in ("1", "2", "3")}
    await db.write(
        lambda c: c.execute(
            "INSERT INTO model_labels VALUES (?, 'stable', '3', 0), (?, 'canary', '2', 0)", (M, M)
        )
    )
    bus = await buses(mosquitto.port)
    d1, d2, d3 = [await sims(mosquitto.port, d) for d in ("d1", "d2", "d3")]
    with pytest.raises(UnknownModelVersion):
        await bus.desired.assign(M, "99", target_kind="all")
    with pytest.raises(LookupError):
        await bus.desired.assign(M, "1", target_kind="device", target="nobody")

    await bus.desired.assign(M, "1", target_kind="all")
    await until(lambda: all(s.desired_version(M) == "1" for s in (d1, d2, d3)))
    doc = d1.desired[-1]
    assert doc["schema"] == 1 and doc["device_id"] == "d1" and doc["revision"] >= 1
    assert doc["models"] == {
        M: {"version": "1", "url": bundle_url(M, "1"), "sha256": shas["1"], "size": 1001}
    }

    await bus.desired.assign(M, "2", target_kind="group", target="north")
    await until(lambda: d1.desired_version(M) == "2" and d2.desired_version(M) == "2")
    assert d1.desired[-1]["revision"] > d1.desired[0]["revision"]
    assert d2.desired[-1]["models"][M]["labels"] == {"canary": "2"}

    await bus.desired.assign(M, "3", target_kind="device", target="d1")
    await until(lambda: d1.desired_version(M) == "3")
    assert d1.desired[-1]["models"][M]["labels"] == {"stable": "3"}

    # Newer, but less specific: "all" does not beat the group or the device.
    await bus.desired.assign(M, "3", target_kind="all")
    await until(lambda: d3.desired_version(M) == "3")
    await bus.desired.assign(M, "1", target_kind="group", target="east")  # newest group wins
    await until(lambda: d2.desired_version(M) == "1")
    assert d1.desired_version(M) == "3"
    # Revisions only grow, per device and fleet-wide.
    for s in (d1, d2, d3):
        revs = [d["revision"] for d in s.desired]
        assert revs == sorted(set(revs))
    # No change, no new revision.
    n = len(d1.desired)
    assert await bus.desired.refresh() == 0
    assert len(d1.desired) == n

    # A device enrolled later gets its document as a retained message when it connects.
    await add_device(db, "d4", ("north",))
    assert await bus.desired.refresh(["d4"]) == 1
    d4 = await sims(mosquitto.port, "d4")
    await until(lambda: d4.desired_version(M) == "2")
    stored = await bus.desired.get("d4")
    assert stored == d4.desired[-1]
    # Groups changed: refresh recomputes.
    await db.write(lambda c: c.execute("DELETE FROM device_groups WHERE device_id = 'd4'"))
    await bus.desired.refresh(["d4"])
    await until(lambda: d4.desired_version(M) == "3")
    row = await device_row(db, "d4")
    assert json.loads(row["desired"])["revision"] == row["desired_revision"]


async def test_republish_after_the_broker_lost_its_retained_messages(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    await add_device(db, "d1")
    await add_version(db, M, "1")
    bus = await buses(mosquitto.port)
    await bus.desired.assign(M, "1", target_kind="all")
    # SIGKILL: Mosquitto saves persistence only every 60 s, so the retained desired
    # document and the fleet's session are gone after the restart.
    await asyncio.to_thread(mosquitto.stop, True)
    await asyncio.to_thread(mosquitto.db_path.unlink, True)
    await asyncio.to_thread(mosquitto.start)
    async with asyncio.timeout(15):
        await bus.link.wait_disconnected()
        await bus.wait_connected()
    d1 = await sims(mosquitto.port, "d1")
    await until(lambda: d1.desired_version(M) == "1")
    assert d1.desired[-1]["revision"] == (await device_row(db, "d1"))["desired_revision"]


async def test_send_command(mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any) -> None:
    await add_device(db, "d1")
    bus = await buses(mosquitto.port)
    d1 = await sims(mosquitto.port, "d1")
    cid = await bus.send_command("d1", "rollback", model=M)
    await until(lambda: d1.commands)
    assert d1.commands == [{"schema": 1, "id": cid, "command": "rollback", "model": M}]
    with pytest.raises(ValueError):
        await bus.send_command("d1", "resync", id="mine")


# ------------------------------------------------------------------ rollouts


async def _fleet_of(
    n: int, port: int, db: FleetDB, sims: Any, outcome: Any, group: str = "stores"
) -> list[SimDevice]:
    ids = [f"store-{i:02d}" for i in range(n)]
    for d in ids:
        await add_device(db, d, (group,))
    return [await sims(port, d, outcome) for d in ids]


async def _waves(db: FleetDB, rid: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for d, w in await query(
        db, "SELECT device_id, wave FROM rollout_devices WHERE rollout_id = ?", rid
    ):
        out.setdefault(w, []).append(d)
    return out


async def test_staged_rollout_completes_wave_by_wave(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    for v in ("1", "2"):
        await add_version(db, M, v)
    bus = await buses(mosquitto.port)
    fleet = await _fleet_of(10, mosquitto.port, db, sims, None)
    await bus.desired.assign(M, "1", target_kind="group", target="stores")
    await until(lambda: all(s.active.get(M) == "1" for s in fleet))

    r = await bus.rollouts.start(
        M, "2", target_kind="group", target="stores", waves=[1, "50%", "100%"]
    )
    assert r["state"] in ("running", "completed") and r["wave_count"] == 3
    assert [w["devices"] for w in r["per_wave"]] == [1, 4, 5]
    done = await until(
        lambda: _rollout_if(bus, r["id"], lambda x: x["state"] == "completed"), within=30
    )
    assert done["counts"]["succeeded"] == 10 and done["failures"] == []
    assert all(s.active.get(M) == "2" for s in fleet)
    # Each device got version 2 once, with the rollout's id; wave 1 strictly first.
    waves = await _waves(db, r["id"])
    first = next(s for s in fleet if s.device_id in waves[1])
    assert first.desired[-1]["models"][M]["rollout"] == r["id"]
    prev = await query(db, "SELECT DISTINCT previous_version FROM rollout_devices")
    assert prev == [("1",)]
    assert [x["id"] for x in await bus.rollouts.list()] == [r["id"]]


async def _rollout_if(bus: FleetBus, rid: str, cond: Callable[[dict[str, Any]], bool]) -> Any:
    r = await bus.rollouts.get(rid)
    return r if cond(r) else None


async def test_failing_wave_stops_the_rollout_and_later_waves_never_get_it(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    for v in ("1", "2"):
        await add_version(db, M, v)
    got_v2: list[str] = []

    def outcome(device: str, model: str, version: str) -> str:
        # The first device to get version 2 (the single device of wave 1) succeeds;
        # every later one fails its self-test.
        if version != "2":
            return "active"
        if device not in got_v2:
            got_v2.append(device)
        return "active" if got_v2[0] == device else "failed"

    bus = await buses(mosquitto.port)
    fleet = await _fleet_of(10, mosquitto.port, db, sims, outcome)
    await bus.desired.assign(M, "1", target_kind="all")
    await until(lambda: all(s.active.get(M) == "1" for s in fleet))
    r = await bus.rollouts.start(M, "2", target_kind="all", waves=[1, "50%", "100%"])
    stopped = await until(
        lambda: _rollout_if(bus, r["id"], lambda x: x["state"] == "stopped"), within=30
    )
    waves = await _waves(db, r["id"])
    assert stopped["current_wave"] == 2 and "wave 2" in stopped["reason"]
    w1, w2, w3 = stopped["per_wave"]
    assert w1["succeeded"] == 1
    # Stopped as soon as the outcome was certain: 1 failure of 4 is already > 20 %.
    assert w2["failed"] >= 1 and w2["failed"] + w2["pending"] + w2["succeeded"] == 4
    assert w3["waiting"] == 5
    assert stopped["failures"][0]["reason"].startswith("self-test failed")
    for s in fleet:
        if s.device_id in waves[3]:
            assert "2" not in s.versions_seen(M), s.device_id
    # The remaining wave-2 devices answer; the counts follow, the decision stands.
    await until(lambda: _rollout_if(bus, r["id"], lambda x: x["per_wave"][1]["failed"] == 4))
    assert (await bus.rollouts.get(r["id"]))["state"] == "stopped"

    # The operator overrides the auto-stop: resume pushes wave 3.
    resumed = await bus.rollouts.resume(r["id"])
    assert resumed["state"] == "running" and resumed["current_wave"] == 3
    await until(lambda: all("2" in s.versions_seen(M) for s in fleet))
    # ... whose devices fail too: stopped again.
    await until(lambda: _rollout_if(bus, r["id"], lambda x: x["state"] == "stopped"))


async def test_pause_resume_and_rollback(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    for v in ("1", "2"):
        await add_version(db, M, v)
    # Version 2 is held: the test says when each device has finished with it.
    bus = await buses(mosquitto.port)
    fleet = await _fleet_of(
        10, mosquitto.port, db, sims, lambda d, m, v: "active" if v == "1" else "hold"
    )
    by_id = {s.device_id: s for s in fleet}
    await bus.desired.assign(M, "1", target_kind="group", target="stores")
    await until(lambda: all(s.active.get(M) == "1" for s in fleet))
    r = await bus.rollouts.start(
        M, "2", target_kind="group", target="stores", waves=[1, "50%", "100%"]
    )
    with pytest.raises(RolloutConflict):  # one rollout of a model at a time
        await bus.rollouts.start(M, "2", target_kind="all", waves=["100%"])
    waves = await _waves(db, r["id"])
    first = by_id[waves[1][0]]
    await until(lambda: first.desired_version(M) == "2")
    assert (await bus.rollouts.pause(r["id"]))["state"] == "paused"
    await first.reapply("active")
    await until(lambda: _rollout_if(bus, r["id"], lambda x: x["counts"]["succeeded"] == 1))
    paused = await bus.rollouts.get(r["id"])
    assert paused["state"] == "paused" and paused["current_wave"] == 1
    assert all(by_id[d].versions_seen(M) == ["1"] for d in waves[2] + waves[3])

    resumed = await bus.rollouts.resume(r["id"])
    assert resumed["state"] == "running" and resumed["current_wave"] == 2
    await until(lambda: all(by_id[d].desired_version(M) == "2" for d in waves[2]))
    for d in waves[2]:
        await by_id[d].reapply("active")
    await until(lambda: all(by_id[d].desired_version(M) == "2" for d in waves[3]))

    back = await bus.rollouts.rollback(r["id"])
    assert back["state"] == "rolled_back"
    assert back["counts"]["rolled_back"] == 10
    # Every device that was given version 2 is told version 1 again, a newer revision.
    await until(lambda: all(s.desired_version(M) == "1" for s in fleet))
    for s in fleet:
        assert s.versions_seen(M)[-1] == "1" and s.active[M] == "1"
        assert "rollout" not in s.desired[-1]["models"][M]
    with pytest.raises(RolloutConflict):
        await bus.rollouts.resume(r["id"])
    # The model is free for a new rollout.
    r2 = await bus.rollouts.start(M, "2", target_kind="group", target="stores", waves=[2])
    assert r2["per_wave"][0]["devices"] == 10


async def test_a_restarted_fleet_continues_the_rollout(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    for v in ("1", "2"):
        await add_version(db, M, v)
    fleet_hold = {"on": True}

    def outcome(device: str, model: str, version: str) -> str:
        return "hold" if version == "2" and fleet_hold["on"] else "active"

    bus = await buses(mosquitto.port)
    fleet = await _fleet_of(10, mosquitto.port, db, sims, outcome)
    by_id = {s.device_id: s for s in fleet}
    await bus.desired.assign(M, "1", target_kind="all")
    await until(lambda: all(s.active.get(M) == "1" for s in fleet))
    r = await bus.rollouts.start(M, "2", target_kind="all", waves=[1, "50%", "100%"])
    waves = await _waves(db, r["id"])
    first = by_id[waves[1][0]]
    await until(lambda: first.desired_version(M) == "2")

    await bus.stop()  # the fleet goes down in the middle of wave 1
    fleet_hold["on"] = False
    await first.reapply("active")  # reported (retained) while no fleet runs

    bus2 = await buses(mosquitto.port)
    done = await until(
        lambda: _rollout_if(bus2, r["id"], lambda x: x["state"] == "completed"), within=30
    )
    assert done["counts"]["succeeded"] == 10
    assert all(s.active.get(M) == "2" for s in fleet)


async def test_wave_timeout_counts_silent_devices_as_pending(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    for v in ("1", "2"):
        await add_version(db, M, v)
    for i in range(4):
        await add_device(db, f"store-{i}", ("stores",))
    bus = await buses(mosquitto.port, tick_s=0.1)
    # Only two of the four stores are online; they answer. The others never do.
    online = [await sims(mosquitto.port, f"store-{i}") for i in range(2)]
    for s in online:
        await until(lambda s=s: _row_if(db, s.device_id, lambda r: r["online"] == 1))
    r = await bus.rollouts.start(
        M, "2", target_kind="group", target="stores", waves=["50%", "100%"], wave_timeout_s=0.5
    )
    waves = await _waves(db, r["id"])
    assert sorted(waves[1]) == ["store-0", "store-1"]  # online devices come first
    await until(lambda: _rollout_if(bus, r["id"], lambda x: x["current_wave"] == 2))
    # Wave 2: nobody answers, so even after the timeout it is not passed.
    await asyncio.sleep(1.0)
    r2 = await bus.rollouts.get(r["id"])
    assert r2["state"] == "running" and r2["per_wave"][1]["pending"] == 2
    late = await sims(mosquitto.port, waves[2][0])  # one comes online and succeeds
    await until(lambda: late.active.get(M) == "2")
    done = await until(lambda: _rollout_if(bus, r["id"], lambda x: x["state"] == "completed"))
    assert done["counts"]["succeeded"] == 3 and done["counts"]["pending"] == 1
    assert all(s.active.get(M) == "2" for s in online)


# ------------------------------------------------------------------ telemetry views


async def test_telemetry_views_merge_histograms(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    await add_device(db, "a")
    await add_device(db, "b")
    bus = await buses(mosquitto.port)
    a, b = await sims(mosquitto.port, "a"), await sims(mosquitto.port, "b")
    fast = [0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0]  # 10 requests at <= 2 ms
    slow = [0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 1]  # 9 at <= 50 ms, 1 above 1000 ms
    bad = stats_data(M, "4", fast)
    bad["count"] = 11  # totals that do not add up: stored raw, not in the views
    await a.link.publish(
        a.topic("telemetry"),
        dumps(
            batch(
                "a",
                [
                    ("inference_stats", stats_data(M, "4", fast)),
                    ("inference_stats", stats_data(M, "3", fast)),
                    ("inference_stats", bad),
                ],
            )
        ),
    )
    await b.link.publish(
        b.topic("telemetry"), dumps(batch("b", [("inference_stats", stats_data(M, "4", slow))]))
    )
    await until(lambda: len(a.acks) == 1 and len(b.acks) == 1)
    assert bus.stats.bad_stats == 1 and bus.stats.records == 4
    views = {(v["model"], v["version"]): v for v in await bus.telemetry.models()}
    assert set(views) == {(M, "3"), (M, "4")}
    v4 = views[(M, "4")]
    assert (v4["requests"], v4["errors"], v4["devices"]) == (20, 0, 2)
    # 20 requests: the 10th (50 %) is in the <= 2 ms bucket, the 19th (95 %) in <= 50 ms.
    assert (v4["p50_ms"], v4["p95_ms"], v4["p95_above"]) == (2.0, 50.0, False)
    assert sum(v4["confidence"]["counts"]) == 20 and v4["last_seen"] is not None
    only_b = await bus.telemetry.device("b")
    assert [(v["version"], v["p50_ms"], v["devices"]) for v in only_b] == [("4", 50.0, 1)]
    assert views[(M, "3")]["requests"] == 10


# ------------------------------------------------------------------ scale-out and amqtt


async def test_two_workers_share_the_telemetry(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, sims: Any
) -> None:
    await add_device(db, "d1")
    w1 = await buses(mosquitto.port, client_id="fleet-w1", shared_group="fleet")
    w2 = await buses(mosquitto.port, client_id="fleet-w2", shared_group="fleet")
    d1 = await sims(mosquitto.port, "d1")
    sent = [batch("d1", [("sample", {"i": i})], seq0=i) for i in range(40)]
    for doc in sent:
        await d1.link.publish(d1.topic("telemetry"), dumps(doc))
    await until(lambda: len(d1.acks) >= 40)
    await asyncio.sleep(0.2)  # an extra ack would show up now
    assert sorted(a["batch_id"] for a in d1.acks) == sorted(d["batch_id"] for d in sent)
    assert w1.stats.batches + w2.stats.batches == 40
    assert w1.stats.batches > 0 and w2.stats.batches > 0
    assert await query(db, "SELECT count(*) FROM telemetry") == [(40,)]


async def test_same_behaviour_on_the_embedded_amqtt_broker(
    amqtt_broker: EmbeddedBroker, db: FleetDB, buses: Any, sims: Any
) -> None:
    port = amqtt_broker.port
    await add_device(db, "d1")
    await add_version(db, M, "1")
    bus = await buses(port)
    await bus.desired.assign(M, "1", target_kind="all")
    # The device connects after the assignment: the retained document waits for it.
    d1 = await sims(port, "d1")
    await until(lambda: d1.desired_version(M) == "1")
    await until(lambda: _row_if(db, "d1", lambda r: r["reported_revision"] >= 1))
    doc = batch("d1", [("inference_stats", stats_data(M, "1", [0, 5] + [0] * 10))])
    await d1.link.publish(d1.topic("telemetry"), dumps(doc))
    await d1.link.publish(d1.topic("telemetry"), dumps(doc))
    await until(lambda: len(d1.acks) == 2)
    assert await query(db, "SELECT count(*) FROM telemetry") == [(1,)]
    assert (await bus.telemetry.models())[0]["p50_ms"] == 1.0
    await until(lambda: _row_if(db, "d1", lambda r: r["online"] == 1))
    d1.link._abort_socket()
    await d1.link.stop()
    row = await until(lambda: _row_if(db, "d1", lambda r: r["online"] == 0))
    assert row["offline_reason"] == "connection lost"


async def test_ingest_stores_a_backlog_from_the_real_sender(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, tmp_path: Path
) -> None:
    """A device's backlog through the agent's real sender: outbox → Mosquitto → FleetBus
    → fleet SQLite (telemetry + inference_stats) → ack → delete; every record stored
    once. Speed: ``python -m bench mqtt``."""

    await add_device(db, "d1")
    bus = await buses(mosquitto.port)
    cfg = link_config(
        mosquitto.port,
        outbox={"path": str(tmp_path / "outbox.sqlite"), "max_bytes": 200_000_000},
        telemetry={"flush_interval_s": 0.05, "batch_max_records": 500, "ack_timeout_s": 10},
    )
    outbox = await Outbox(cfg.outbox.path, cfg.outbox.max_bytes).open()
    link = MqttLink(cfg, "d1")
    sender = TelemetrySender(outbox, link, cfg.telemetry)
    try:
        n = 3000
        data = stats_data(M, "4", [0, 3, 10, 40, 50, 17, 0, 0, 0, 0, 0, 0])
        for _ in range(0, n, 1000):
            await outbox.add([NewRecord("inference_stats", data)] * 1000)
        await sender.start()
        await link.start()
        await until(lambda: bus.stats.records == n, within=120)
        assert await query(db, "SELECT count(*) FROM inference_stats") == [(n,)]
    finally:
        await sender.stop()
        await link.stop()
        await outbox.close()


# ------------------------------------------------------------ per-device rate limit


def test_device_rate_limit_is_a_token_bucket_per_device() -> None:
    limit = DeviceRateLimit(rate_per_s=2.0, burst=3, max_devices=4)
    assert [limit.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.allow("b", 0.0)  # another device has its own bucket
    assert not limit.allow("a", 0.4)  # 0.8 of a token back: not yet
    assert limit.allow("a", 0.5) and not limit.allow("a", 0.5)
    assert [limit.allow("a", 100.0) for _ in range(4)] == [True, True, True, False]  # capped
    for d in "cdefg":  # past max_devices the fullest buckets are forgotten
        limit.allow(d, 100.0)
    assert len(limit._buckets) <= 4
    assert not limit.allow("a", 100.0)  # the busy one is still remembered
    with pytest.raises(ValueError):
        DeviceRateLimit(rate_per_s=0, burst=1)


async def test_a_rate_limited_device_loses_nothing(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, tmp_path: Path
) -> None:
    """Over its rate, a device's batches are dropped unacked (counted); the agent's
    outbox sends them again after its ack timeout, and every record arrives once."""
    await add_device(db, "d1")
    bus = await buses(mosquitto.port)
    bus.ingest.rate_limit = DeviceRateLimit(rate_per_s=5.0, burst=2)
    cfg = link_config(
        mosquitto.port,
        outbox={"path": str(tmp_path / "outbox.sqlite")},
        telemetry={
            "flush_interval_s": 0.02,
            "batch_max_records": 10,
            "ack_timeout_s": 0.5,
            "max_in_flight": 4,
        },
    )
    outbox = await Outbox(cfg.outbox.path, cfg.outbox.max_bytes).open()
    link = MqttLink(cfg, "d1")
    sender = TelemetrySender(outbox, link, cfg.telemetry)
    try:
        n = 300
        await outbox.add([NewRecord("sample", {"i": i}) for i in range(n)])
        await sender.start()
        await link.start()
        await until(lambda: bus.stats.records == n, within=60)
        await until(lambda: sender.stats.records_acked == n, within=30)
        assert bus.stats.rejected.get("rate_limited", 0) > 0
        assert sender.stats.resends > 0
        assert await query(db, "SELECT count(*), count(DISTINCT id) FROM telemetry") == [(n, n)]
        assert (await outbox.stats()).records == 0
    finally:
        await sender.stop()
        await link.stop()
        await outbox.close()

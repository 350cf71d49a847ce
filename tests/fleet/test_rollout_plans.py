"""Rollout plans and gates (fleet/rollouts.py, fleet/gates.py) on the fleet's real MQTT
side: a real Mosquitto, a real FleetDB and FleetBus, simulated devices on the agent's
real MQTT link. The gates' evidence is real telemetry: ``inference_stats`` and
``shadow_stats`` records in batches the devices publish, stored by the real ingest.
No timing asserts: every wait is on a condition.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgefleet.core.errors import BadRequest
from edgefleet.fleet.bus import FleetBus
from edgefleet.fleet.db import FleetDB
from edgefleet.fleet.gates import parse_plan
from edgefleet.fleet.rollouts import RolloutConflict
from tests.support.brokers import Mosquitto
from tests.support.fleet_sim import (
    SimDevice,
    add_device,
    add_version,
    batch,
    bundle_url,
    fleet_config,
    query,
    stats_data,
    until,
)

M = "digits-edge"
GATES = ["error_rate <= baseline + 0.02"]


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[FleetDB]:
    database = await FleetDB(tmp_path / "fleet.sqlite").open()
    yield database
    await database.close()


@pytest.fixture
async def buses(db: FleetDB) -> AsyncIterator[Callable[..., Any]]:
    made: list[FleetBus] = []

    async def make(port: int) -> FleetBus:
        # A fast ticker: the gates are re-decided on every tick.
        bus = FleetBus(db, fleet_config(port), bundle_url=bundle_url, tick_s=0.1)
        made.append(bus)
        await bus.start()
        async with asyncio.timeout(10):
            await bus.wait_connected()
        return bus

    yield make
    for bus in made:
        await bus.stop()


@pytest.fixture
async def fleet_of(mosquitto: Mosquitto, db: FleetDB) -> AsyncIterator[Callable[..., Any]]:
    made: list[SimDevice] = []

    async def make(n: int, outcome: Any = None) -> list[SimDevice]:
        out = []
        for i in range(n):
            d = f"store-{i:02d}"
            await add_device(db, d, ("stores",))
            sim = SimDevice(mosquitto.port, d, outcome)
            made.append(sim)
            await sim.start()
            await sim.connected()
            out.append(sim)
        return out

    yield make
    for sim in made:
        await sim.stop()


def plan(**kw: Any) -> Any:
    return parse_plan({"waves": [2, "100%"], "min_requests": 200, **kw})


async def send(sim: SimDevice, records: list[tuple[str, Any]]) -> None:
    """One telemetry batch, as the agent's sender publishes it; waits for its ack."""
    acks = len(sim.acks)
    await sim.link.publish(sim.topic("telemetry"), orjson.dumps(batch(sim.device_id, records)))
    await until(lambda: len(sim.acks) > acks)


def requests(version: str, n: int, errors: int) -> dict[str, Any]:
    data = stats_data(M, version, [0, 0, 0, 0, n, 0, 0, 0, 0, 0, 0, 0])
    data["errors"] = errors
    data["sources"] = {"edge": n - errors}
    data["confidence"]["counts"] = [0] * 9 + [n - errors, 0]
    return data


def shadow(candidate: str, compared: int, agreed: int) -> dict[str, Any]:
    return {
        "model": M,
        "version": "1",
        "candidate": candidate,
        "task": "classification",
        "window_start": 1764000000.0,
        "window_s": 60.0,
        "sampled": compared,
        "compared": compared,
        "agreed": agreed,
        "errors": 0,
        "dropped_queue": 0,
        "dropped_budget": 0,
        "conf_delta_sum": 0.0,
        "conf_delta_sumsq": 0.0,
        "candidate_latency_ms_sum": 1.0 * compared,
        "active_latency_ms_sum": 1.0 * compared,
    }


async def on_v1(bus: FleetBus, fleet: list[SimDevice]) -> None:
    for v in ("1", "2"):
        await add_version(bus.db, M, v)
    await bus.desired.assign(M, "1", target_kind="group", target="stores")
    await until(lambda: all(s.active.get(M) == "1" for s in fleet))


async def state_is(bus: FleetBus, rid: str, *states: str) -> Any:
    r = await bus.rollouts.get(rid)
    return r if r["state"] in states else None


async def wave_devices(db: FleetDB, rid: str, wave: int) -> list[str]:
    rows = await query(
        db, "SELECT device_id FROM rollout_devices WHERE rollout_id = ? AND wave = ?", rid, wave
    )
    return sorted(r[0] for r in rows)


# ------------------------------------------------------------------ serving waves


async def test_passing_gates_advance_every_wave_and_promote_stable(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(6)
    by_id = {s.device_id: s for s in fleet}
    await on_v1(bus, fleet)
    gates = [*GATES, "p95_ms <= 1.5 * baseline", "fallback_rate <= baseline + 0.05"]
    r = await bus.rollouts.start(
        M, "2", target_kind="group", target="stores", plan=plan(gates=gates)
    )
    rid = r["id"]
    first = await wave_devices(bus.db, rid, 1)
    await until(lambda: all(by_id[d].active.get(M) == "2" for d in first))
    # Devices answered: no evidence yet, so wave 2 waits for the gates.
    await asyncio.sleep(0.5)
    r = await bus.rollouts.get(rid)
    assert r["current_wave"] == 1 and r["state"] == "running" and r["decisions"] == []
    for s in fleet:  # the same error rate on both versions (1 %)
        v = s.active[M]
        await send(s, [("inference_stats", requests(v, 200, 2))])
    await until(lambda: all(s.active.get(M) == "2" for s in fleet))
    for d in first:
        await send(by_id[d], [("inference_stats", requests("2", 150, 1))])
    done = await until(lambda: state_is(bus, rid, "completed"), within=20)
    assert [d["outcome"] for d in done["decisions"]] == ["pass", "pass"]
    assert done["decisions"][0]["gates"][0]["canary"]["n"] >= 200
    assert [g["signal"] for g in done["decisions"][0]["gates"]] == [
        "error_rate",
        "p95_ms",
        "fallback_rate",
    ]
    assert done["evidence"] is None
    labels = await query(bus.db, "SELECT label, version FROM model_labels WHERE name = ?", M)
    assert labels == [("stable", "2")]
    # The label travels in the desired documents.
    await until(
        lambda: all(s.desired[-1]["models"][M].get("labels") == {"stable": "2"} for s in fleet)
    )


async def test_a_failing_gate_rolls_back_by_itself_with_the_evidence(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(6)
    by_id = {s.device_id: s for s in fleet}
    await on_v1(bus, fleet)
    r = await bus.rollouts.start(
        M, "2", target_kind="group", target="stores", plan=plan(gates=GATES)
    )
    rid = r["id"]
    first = await wave_devices(bus.db, rid, 1)
    await until(lambda: all(by_id[d].active.get(M) == "2" for d in first))
    for s in fleet:  # version 2 fails 25 % of its requests, version 1 1 %
        v = s.active[M]
        await send(s, [("inference_stats", requests(v, 200, 50 if v == "2" else 2))])
    done = await until(lambda: state_is(bus, rid, "rolled_back", "stopped"), within=20)
    assert done["state"] == "rolled_back"
    assert "error_rate <= baseline + 0.02" in done["reason"] and "wave 1" in done["reason"]
    ev = done["evidence"]
    assert ev["gate"] == "error_rate <= baseline + 0.02" and ev["action"] == "rollback"
    failed = ev["failed"][0]
    # Decided as soon as the evidence sufficed (the telemetry triggers the decision):
    # each cohort has at least the minimum sample, not necessarily every batch.
    assert failed["canary"]["n"] >= 200 and failed["canary"]["value"] == 0.25
    assert failed["canary"]["low"] > 0.15 and failed["baseline"]["n"] >= 200
    assert failed["baseline"]["value"] == pytest.approx(0.01)
    assert ev["devices_served"] == first
    assert [d["outcome"] for d in done["decisions"]] == ["fail"]
    # The wave-1 devices go back to version 1; the others never saw version 2.
    await until(lambda: all(by_id[d].desired_version(M) == "1" for d in first))
    for s in fleet:
        if s.device_id not in first:
            assert "2" not in s.versions_seen(M)
    assert (await bus.rollouts.get(rid))["state"] == "rolled_back"  # decided once, in the DB


async def test_stop_withdraws_the_version_from_devices_that_had_not_activated_it(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    held: set[str] = set()

    def outcome(device: str, model: str, version: str) -> str:
        return "hold" if version == "2" and device in held else "active"

    bus = await buses(mosquitto.port)
    fleet = await fleet_of(6, outcome)
    by_id = {s.device_id: s for s in fleet}
    await on_v1(bus, fleet)
    # Which devices wave 1 takes is decided at start: hold all but one of version 2.
    held.update(s.device_id for s in fleet)
    r = await bus.rollouts.start(
        M,
        "2",
        target_kind="group",
        target="stores",
        plan=plan(gates=["error_rate <= 0.05"], on_fail="stop", min_requests=100),
    )
    rid = r["id"]
    first = await wave_devices(bus.db, rid, 1)
    active, slow = first
    held.discard(active)
    await by_id[active].reapply("active")
    await until(lambda: by_id[active].active.get(M) == "2")
    await until(
        lambda: query(
            bus.db,
            "SELECT 1 FROM rollout_devices WHERE device_id = ? AND state = 'succeeded'",
            active,
        )
    )
    await send(by_id[active], [("inference_stats", requests("2", 200, 60))])
    done = await until(lambda: state_is(bus, rid, "stopped", "rolled_back"), within=20)
    assert done["state"] == "stopped" and done["evidence"]["action"] == "stop"
    assert done["evidence"]["devices_served"] == [active]
    # The device that had not activated it is withdrawn: back to version 1...
    await until(lambda: by_id[slow].desired_version(M) == "1")
    # ... and the one that serves it keeps it (stop, not rollback).
    assert by_id[active].desired_version(M) == "2"
    rows = dict(await query(bus.db, "SELECT device_id, state FROM rollout_devices"))
    assert rows[slow] == "rolled_back" and rows[active] == "succeeded"


async def test_a_device_reporting_an_aborted_version_gets_the_corrected_desired(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    """A device back from days offline still wants the rolled-back version (its stale
    desired): the fleet sends it the stored, corrected document again."""
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(3, lambda d, m, v: "active" if v == "1" else "hold")
    await on_v1(bus, fleet)
    r = await bus.rollouts.start(M, "2", target_kind="group", target="stores", waves=["100%"])
    await until(lambda: all(s.desired_version(M) == "2" for s in fleet))
    await bus.rollouts.rollback(r["id"])
    await until(lambda: all(s.desired_version(M) == "1" for s in fleet))
    stale = fleet[0]
    seen = len(stale.desired)
    # It reports the stale desired (version 2, downloading).
    await stale.report(
        {M: {"desired": "2", "active": "1", "state": "downloading", "rollout": r["id"]}}
    )
    await until(lambda: len(stale.desired) > seen)
    assert stale.desired[-1]["models"][M]["version"] == "1"


async def test_gated_rollout_survives_a_fleet_restart(
    mosquitto: Mosquitto, db: FleetDB, buses: Any, fleet_of: Any
) -> None:
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(4)
    by_id = {s.device_id: s for s in fleet}
    await on_v1(bus, fleet)
    r = await bus.rollouts.start(
        M, "2", target_kind="group", target="stores", plan=plan(gates=GATES, on_fail="rollback")
    )
    first = await wave_devices(db, r["id"], 1)
    await until(lambda: all(by_id[d].active.get(M) == "2" for d in first))
    await bus.stop()
    bus2 = await buses(mosquitto.port)
    for s in fleet:
        v = s.active[M]
        await send(s, [("inference_stats", requests(v, 200, 80 if v == "2" else 0))])
    done = await until(lambda: state_is(bus2, r["id"], "rolled_back"), within=20)
    assert done["plan"]["gates"] == GATES and done["evidence"]["wave"] == 1


# ------------------------------------------------------------------ shadow stage


async def test_a_shadow_stage_gates_on_shadow_agreement_then_serves(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(4)
    by_id = {s.device_id: s for s in fleet}
    await on_v1(bus, fleet)
    p = plan(
        waves=[1, "100%"],
        shadow={"devices": 2, "min_items": 300, "gates": ["shadow_agreement >= 0.9"]},
    )
    r = await bus.rollouts.start(M, "2", target_kind="group", target="stores", plan=p)
    assert r["stage"] == "shadow" and r["current_wave"] == 0 and len(r["shadow_devices"]) == 2
    shadows = [by_id[d] for d in r["shadow_devices"]]
    # The candidate travels as the shadow of the active version.
    await until(lambda: all(s.desired[-1]["models"][M].get("shadow") for s in shadows))
    for s in shadows:
        doc = s.desired[-1]["models"][M]
        assert doc["version"] == "1" and doc["shadow"]["version"] == "2"
        assert doc["shadow"]["sample_rate"] == 1.0
    for s in fleet:
        assert "2" not in s.versions_seen(M)  # nobody serves it during the shadow stage
    # Bad input, refused and counted (the raw records are kept and acked): a store
    # that was not asked to shadow version 2, and agreement above the compared items.
    other = next(s for s in fleet if s not in shadows)
    impossible = {**shadow("2", 100, 99), "agreed": 101}
    await send(other, [("shadow_stats", shadow("2", 500, 500))])
    await send(shadows[0], [("shadow_stats", impossible)])
    assert bus.stats.bad_shadow_stats == 2
    assert await query(bus.db, "SELECT count(*) FROM signal_counts") == [(0,)]
    await send(shadows[0], [("shadow_stats", shadow("2", 100, 99))])
    await asyncio.sleep(0.4)
    assert (await bus.rollouts.get(r["id"]))["stage"] == "shadow"  # 100 of 300 items
    await send(shadows[1], [("shadow_stats", shadow("2", 250, 245))])
    done = await until(lambda: state_is(bus, r["id"], "completed"), within=20)
    assert done["decisions"][0]["stage"] == "shadow"
    assert done["decisions"][0]["gates"][0]["canary"]["n"] == 350
    await until(lambda: all(s.active.get(M) == "2" for s in fleet))
    for s in shadows:  # the shadow is gone once the stage ended
        assert "shadow" not in s.desired[-1]["models"][M]


async def test_a_shadow_stage_stops_a_bad_version_before_any_device_serves_it(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(4)
    by_id = {s.device_id: s for s in fleet}
    await on_v1(bus, fleet)
    p = plan(shadow={"devices": "50%", "min_items": 200, "gates": ["shadow_agreement >= 0.95"]})
    r = await bus.rollouts.start(M, "2", target_kind="group", target="stores", plan=p)
    shadows = [by_id[d] for d in r["shadow_devices"]]
    await until(lambda: all(s.desired[-1]["models"][M].get("shadow") for s in shadows))
    await send(shadows[0], [("shadow_stats", shadow("2", 300, 210))])  # 70 % agreement
    done = await until(lambda: state_is(bus, r["id"], "rolled_back"), within=20)
    assert done["evidence"]["stage"] == "shadow" and done["evidence"]["devices_served"] == []
    assert "shadow_agreement >= 0.95" in done["reason"]
    await until(lambda: all("shadow" not in s.desired[-1]["models"][M] for s in shadows))
    for s in fleet:
        assert "2" not in s.versions_seen(M) and s.active[M] == "1"


async def test_bad_plans_are_refused_and_nothing_is_stored(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    bus = await buses(mosquitto.port)
    await fleet_of(2)
    for v in ("1", "2"):
        await add_version(bus.db, M, v)
    # No device runs digits-edge yet: a shadow stage has no baseline.
    p = plan(shadow={"devices": 1})
    with pytest.raises(BadRequest, match="shadow stage needs a baseline"):
        await bus.rollouts.start(M, "2", target_kind="group", target="stores", plan=p)
    for table in ("rollouts", "rollout_devices", "assignments", "rollout_decisions"):
        assert await query(bus.db, f"SELECT count(*) FROM {table}") == [(0,)], table


async def test_assign_by_fleet_label(mosquitto: Mosquitto, buses: Any, fleet_of: Any) -> None:
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(2)
    for v in ("1", "2"):
        await add_version(bus.db, M, v)
    await bus.db.write(
        lambda c: c.execute(
            "INSERT INTO model_labels (name, label, version, updated_at) VALUES (?, ?, ?, 0)",
            (M, "staging", "2"),
        )
    )
    await bus.desired.assign(M, "staging", target_kind="group", target="stores")
    await until(lambda: all(s.active.get(M) == "2" for s in fleet))
    assert await query(bus.db, "SELECT version FROM assignments") == [("2",)]


def drift(version: str, psi_max: float | None) -> dict[str, Any]:
    if psi_max is None:
        return {
            "model": M,
            "version": version,
            "window_start": 1764000000.0,
            "window_s": 60.0,
            "samples": 0,
            "drift_reason": "no reference profile in the bundle",
        }
    return {
        "model": M,
        "version": version,
        "window_start": 1764000000.0,
        "window_s": 60.0,
        "samples": 500,
        "features": 64,
        "psi_max": psi_max,
        "psi_mean": psi_max / 2,
        "psi_output": 0.01,
    }


async def test_a_drift_gate_waits_without_figures_and_rolls_back_on_drift(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(4)
    by_id = {s.device_id: s for s in fleet}
    await on_v1(bus, fleet)
    r = await bus.rollouts.start(
        M, "2", target_kind="group", target="stores", plan=plan(gates=["drift_psi <= 0.2"])
    )
    rid = r["id"]
    first = await wave_devices(bus.db, rid, 1)
    await until(lambda: all(by_id[d].active.get(M) == "2" for d in first))
    # A bundle without a reference profile: no figure, so no evidence either way.
    await send(by_id[first[0]], [("drift_stats", drift("2", None))])
    await asyncio.sleep(0.5)
    assert (await bus.rollouts.get(rid))["state"] == "running"
    await send(by_id[first[0]], [("drift_stats", drift("2", 0.45))])
    done = await until(lambda: state_is(bus, rid, "rolled_back"), within=20)
    gate = done["evidence"]["failed"][0]
    assert gate["signal"] == "drift_psi" and gate["canary"]["value"] == 0.45
    assert gate["threshold"] == 0.2


def noisy(rng: random.Random, version: str, n: int) -> dict[str, Any]:
    """A window of a good version: 5 % errors and 20 % of the answers from the cloud,
    binomial noise on both (the same for every version)."""
    errors = sum(rng.random() < 0.05 for _ in range(n))
    cloud = sum(rng.random() < 0.20 for _ in range(n - errors))
    data = requests(version, n, errors)
    data["sources"] = {"edge": n - errors - cloud, "cloud": cloud}
    return data


async def test_noise_does_not_stop_a_good_version_through_the_ingest(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    """Seeded repetitions, small enough for CI: five gated rollouts of versions exactly
    as good as the one they replace, the evidence sent as devices send it (windows of
    100 requests, binomial noise); every one is promoted, none stopped."""
    rng = random.Random(2026)
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(6)
    for v in range(3, 7):
        await add_version(bus.db, M, str(v))
    await on_v1(bus, fleet)
    gates = ["error_rate <= baseline + 0.02", "fallback_rate <= baseline + 0.05"]
    for version in ("2", "3", "4", "5", "6"):
        r = await bus.rollouts.start(
            M, version, target_kind="group", target="stores", plan=plan(gates=gates)
        )
        for _ in range(40):
            state = (await bus.rollouts.get(r["id"]))["state"]
            if state != "running":
                break
            for s in fleet:
                await send(s, [("inference_stats", noisy(rng, s.active[M], 100))])
        done = await until(lambda rid=r["id"]: state_is(bus, rid, "completed", "rolled_back"))
        assert done["state"] == "completed", done["evidence"]
        assert all(d["outcome"] == "pass" for d in done["decisions"])
        await until(lambda v=version: all(s.active.get(M) == v for s in fleet))


async def test_resuming_a_rollout_stopped_in_its_shadow_stage_serves_it(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    """The operator overrides a shadow-stage stop: the shadow stage ends, wave 1 goes."""
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(2)
    by_id = {s.device_id: s for s in fleet}
    await on_v1(bus, fleet)
    p = plan(waves=["100%"], on_fail="stop", shadow={"devices": 1, "min_items": 100})
    r = await bus.rollouts.start(M, "2", target_kind="group", target="stores", plan=p)
    await send(by_id[r["shadow_devices"][0]], [("shadow_stats", shadow("2", 200, 100))])
    stopped = await until(lambda: state_is(bus, r["id"], "stopped"), within=20)
    assert stopped["stage"] == "shadow" and stopped["evidence"]["stage"] == "shadow"
    resumed = await bus.rollouts.resume(r["id"])
    assert resumed["stage"] == "serving" and resumed["current_wave"] == 1
    await until(lambda: state_is(bus, r["id"], "completed"), within=20)
    await until(lambda: all(s.active.get(M) == "2" for s in fleet))


def agreement(version: str, agree: int, disagree: int) -> dict[str, Any]:
    """fallback_stats data: audited items the cloud also answered, by top-1 agreement."""
    rows = [
        {"model": M, "version": version, "kind": "audited", "agree": "true", "n": agree},
        {"model": M, "version": version, "kind": "audited", "agree": "false", "n": disagree},
    ]
    return {"schema": 1, "agreement": rows, "breakers": {}, "offline": False}


async def test_cloud_agreement_gate_compares_with_the_baseline_cohort(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(4)
    by_id = {s.device_id: s for s in fleet}
    await on_v1(bus, fleet)
    p = plan(gates=["cloud_agreement >= baseline - 0.05"], min_audited=100)
    r = await bus.rollouts.start(M, "2", target_kind="group", target="stores", plan=p)
    first = await wave_devices(bus.db, r["id"], 1)
    await until(lambda: all(by_id[d].active.get(M) == "2" for d in first))
    for s in fleet:  # the cloud agrees with version 1 on 95 %, with version 2 on 70 %
        v = s.active[M]
        counts = (70, 30) if v == "2" else (95, 5)
        await send(s, [("fallback_stats", agreement(v, *counts))])
    done = await until(lambda: state_is(bus, r["id"], "rolled_back"), within=20)
    gate = done["evidence"]["failed"][0]
    assert gate["signal"] == "cloud_agreement"
    assert gate["canary"]["value"] == 0.7 and gate["baseline"]["value"] == 0.95
    assert gate["threshold"] == pytest.approx(0.90)


async def test_the_operator_advances_past_gates_that_keep_waiting(
    mosquitto: Mosquitto, buses: Any, fleet_of: Any
) -> None:
    """Too little traffic: the gates never decide; ``advance`` pushes on (an override,
    recorded with the figures of the moment)."""
    bus = await buses(mosquitto.port)
    fleet = await fleet_of(3)
    await on_v1(bus, fleet)
    p = plan(gates=GATES, shadow={"devices": 1, "min_items": 100})
    r = await bus.rollouts.start(M, "2", target_kind="group", target="stores", plan=p)
    r = await bus.rollouts.advance(r["id"])  # past the shadow stage
    assert r["stage"] == "serving" and r["current_wave"] == 1
    first = await wave_devices(bus.db, r["id"], 1)
    by_id = {s.device_id: s for s in fleet}
    await until(lambda: all(by_id[d].active.get(M) == "2" for d in first))
    await asyncio.sleep(0.3)
    assert (await bus.rollouts.get(r["id"]))["current_wave"] == 1  # no evidence: waits
    await bus.rollouts.advance(r["id"])  # wave 2, the last one
    await until(lambda: all(s.active.get(M) == "2" for s in fleet))
    await bus.rollouts.advance(r["id"])
    done = await until(lambda: state_is(bus, r["id"], "completed"))
    assert [(d["stage"], d["outcome"]) for d in done["decisions"]] == [
        ("shadow", "override"),
        ("wave", "override"),
        ("wave", "override"),
    ]
    assert "0 of the 100" in done["decisions"][0]["gates"][0]["why"]
    with pytest.raises(RolloutConflict):
        await bus.rollouts.advance(r["id"])

"""Gated rollouts end to end: the fleet service (HTTP API, ingest, rollouts) on a real
Mosquitto, real agents (one in this process, one a separate ``edge-agent serve``
process that goes offline), and ``edge-fleet rollout status`` as a script runs it.

The failing evidence is telemetry the canary store publishes as its agent would
(an ``inference_stats`` batch from the store's own MQTT account): the tiny test
model cannot be made to fail requests while passing its self-test, and the point
here is what the fleet and the agents do with a failed gate.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from edgefleet.agent.config import parse_config
from edgefleet.fleet.config import FleetServiceConfig
from edgefleet.fleet.service import FleetService
from tests.support.agent_process import AgentProcess
from tests.support.brokers import Mosquitto, Peer, free_port
from tests.support.quality_fleet import TOKEN
from tests.support.quality_fleet import Fleet as QualityFleet
from tests.support.quality_fleet import until as _until
from tests.support.tiny import TEST_X, W2


class Fleet(QualityFleet):
    """The support module's fleet client, plus one model's reported state."""

    async def model_state(self, device_id: str, model: str = "tiny") -> dict[str, Any]:
        doc = await self.call("GET", f"/v1/devices/{device_id}")
        return dict((doc.get("models") or {}).get(model) or {})


async def until(fetch: Callable[[], Any], check: Callable[[Any], bool], within: float = 20) -> Any:
    return await _until(fetch, check, within)


@pytest.fixture
async def fleet(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto, start_agent: Any
) -> AsyncIterator[Fleet]:
    cfg = FleetServiceConfig.model_validate(
        {
            "data_dir": str(tmp_path / "fleet"),
            "http": {"host": "127.0.0.1", "port": 0},
            "auth": {"token": TOKEN},
            "trust": {"public_keys": [str(keys[1])]},
            "broker": {
                "host": "127.0.0.1",
                "port": mosquitto.port,
                "client_id": "gates-fleet",
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.5,
            },
        }
    )
    svc = await FleetService(cfg).start()
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(10):
            await svc.bus.wait_connected()
        yield Fleet(svc, session)
    await svc.stop()


def agent_doc(
    tmp: Path, keys: tuple[Path, Path], enrolled: dict[str, Any], bootstrap: Path
) -> dict[str, Any]:
    name = enrolled["device_id"]
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": {"path": str(tmp / name / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(bootstrap)}],
        # The shadow runner may take what it needs: no item dropped in a test.
        "runtime": {"executor_threads": 1, "shadow": {"queue_size": 10_000, "cpu_budget": 64}},
        "device_id": name,
        "fleet": {
            "host": enrolled["mqtt"]["host"],
            "port": enrolled["mqtt"]["port"],
            "username": enrolled["mqtt"]["username"],
            "password": enrolled["mqtt"]["password"],
            "keepalive_s": 5,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            "outbox": {"path": str(tmp / name / "outbox.sqlite")},
            "telemetry": {"flush_interval_s": 0.2, "stats_interval_s": 0.3, "ack_timeout_s": 2},
        },
    }


def bad_stats_batch(device_id: str) -> bytes:
    """What the canary store's telemetry sender would publish for a version that
    fails 40 of 100 requests (format: core/protocol.py InferenceStats)."""
    now = time.time()
    data = {
        "model": "tiny",
        "version": "2",
        "window_start": now - 5,
        "window_s": 5.0,
        "count": 100,
        "errors": 40,
        "latency_ms": {
            "le": [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
            "counts": [100] + [0] * 11,
        },
        "confidence": {
            "le": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
            "counts": [0] * 9 + [60, 0],
        },
        "sources": {"edge": 60},
        "fallback": {},
    }
    return json.dumps(
        {
            "schema": 1,
            "device_id": device_id,
            "batch_id": secrets.token_hex(8),
            "sent_at": now,
            "records": [
                {
                    "id": secrets.token_hex(16),
                    "seq": 1_000_000,
                    "kind": "inference_stats",
                    "priority": 0,
                    "ts": now,
                    "data": data,
                }
            ],
        }
    ).encode()


def cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEFLEET_URL": fleet.base, "EDGEFLEET_TOKEN": TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.fleet", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


async def test_bad_plans_get_precise_400s_and_nothing_is_stored(
    fleet: Fleet, make_tiny_bundle: Any
) -> None:
    for b in (make_tiny_bundle("1"), make_tiny_bundle("2", W2)):
        await fleet.call("POST", "/v1/models", data=b.read_bytes())
    await fleet.enrol("store-0", ["north"])
    base = {"model": "tiny", "version": "2", "target": {"group": "north"}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"waves": [1], "gates": ["error_rate <= baseline +"]}, "does not parse"),
        ({"waves": [1], "gates": ["accuracy >= 0.9"]}, "unknown signal 'accuracy'"),
        ({"waves": [1], "gate": ["error_rate <= 0.1"]}, "unknown field(s) 'gate'"),
        ({"plan": {"waves": [1], "on_fail": "explode"}}, "on_fail"),
        ({"plan": {"waves": [1]}, "gates": ["error_rate <= 0.1"]}, "not both"),
        ({"plan": {"waves": [1], "gates": ["p95_ms <= 1.5 * baseline"], "extra": 1}}, "extra"),
        ({"gates": ["error_rate <= 0.1"]}, "needs waves"),
        ({"plan": {"waves": [1], "shadow": {"devices": 1}}}, "shadow stage needs a baseline"),
        (
            {"plan": {"waves": [1]}, "target": {"device": "store-0"}},
            "not to one device",
        ),
    ]
    for extra, fragment in cases:
        status, doc = await fleet.raw("POST", "/v1/assignments", json={**base, **extra})
        assert status == 400 and fragment in doc["error"], (extra, status, doc)
    assert (await fleet.call("GET", "/v1/rollouts"))["rollouts"] == []
    device = await fleet.call("GET", "/v1/devices/store-0")
    assert not (device.get("desired") or {}).get("models")


async def test_failed_gate_rolls_back_and_a_store_offline_meanwhile_never_installs_it(
    fleet: Fleet,
    start_agent: Any,
    make_tiny_bundle: Any,
    keys: tuple[Path, Path],
    tmp_path: Path,
    mosquitto: Mosquitto,
) -> None:
    v1, v2 = make_tiny_bundle("1"), make_tiny_bundle("2", W2)
    for b in (v1, v2):
        await fleet.call("POST", "/v1/models", data=b.read_bytes())
    canary = await fleet.enrol("store-0", ["north"])
    late = await fleet.enrol("store-1", ["north"])
    await start_agent(parse_config(yaml.safe_dump(agent_doc(tmp_path, keys, canary, v1))))
    (tmp_path / "store-1").mkdir()
    late_doc = agent_doc(tmp_path, keys, late, v1)
    late_port = free_port()
    process = await asyncio.to_thread(AgentProcess, late_doc, tmp_path / "store-1", late_port)
    try:
        await fleet.call(
            "POST",
            "/v1/assignments",
            json={"model": "tiny", "version": "1", "target": {"group": "north"}},
        )
        for d in ("store-0", "store-1"):
            await until(lambda d=d: fleet.model_state(d), lambda m: m.get("active") == "1")
        # store-1 goes offline (a store closed for the night).
        await asyncio.to_thread(process.stop)
        await until(lambda: fleet.call("GET", "/v1/devices/store-1"), lambda d: not d["online"])

        rollout = await fleet.call(
            "POST",
            "/v1/assignments",
            json={
                "model": "tiny",
                "version": "2",
                "target": {"group": "north"},
                "plan": {
                    "waves": ["100%"],
                    "gates": ["error_rate <= 0.05"],
                    "min_requests": 50,
                    "on_fail": "rollback",
                },
            },
        )
        rid = rollout["id"]
        await until(lambda: fleet.model_state("store-0"), lambda m: m.get("active") == "2")
        # The canary's figures reach the fleet as its telemetry: 40 % errors.
        peer = Peer(
            mosquitto.port,
            "store-0-telemetry",
            username=canary["mqtt"]["username"],
            password=canary["mqtt"]["password"],
        )
        try:
            peer.publish("edgefleet/v1/devices/store-0/telemetry", bad_stats_batch("store-0"))
            done = await until(
                lambda: fleet.call("GET", f"/v1/rollouts/{rid}"),
                lambda r: r["state"] != "running",
            )
        finally:
            peer.close()
        assert done["state"] == "rolled_back", done
        ev = done["evidence"]
        assert ev["gate"] == "error_rate <= 0.05" and ev["devices_served"] == ["store-0"]
        assert ev["failed"][0]["canary"]["n"] >= 100 and ev["failed"][0]["canary"]["low"] > 0.05
        # By itself, the canary goes back to version 1.
        await until(lambda: fleet.model_state("store-0"), lambda m: m.get("active") == "1")

        # The script's view: the evidence, and a non-zero exit.
        r = await asyncio.to_thread(cli, fleet, "rollout", "status", rid)
        assert r.returncode == 4, (r.stdout, r.stderr)
        assert "rolled_back" in r.stdout and "error_rate <= 0.05" in r.stdout
        assert "served by 1 device(s): store-0" in r.stdout

        # store-1 comes back: it gets the corrected desired and never installs 2.
        process = await asyncio.to_thread(AgentProcess, late_doc, tmp_path / "store-1", late_port)
        await until(lambda: fleet.call("GET", "/v1/devices/store-1"), lambda d: d["online"])
        state = await until(
            lambda: fleet.model_state("store-1"),
            lambda m: m.get("desired") == "1" and m.get("state") == "active",
        )
        assert state["active"] == "1"
        await asyncio.sleep(1.0)  # anything queued for it while offline has arrived
        events = (await fleet.call("GET", "/v1/events?device=store-1"))["events"]
        assert not [e for e in events if e.get("version") == "2"], events
        assert not (tmp_path / "store-1" / "store" / "tiny" / "2").exists()
        assert (await fleet.model_state("store-1"))["active"] == "1"
        async with aiohttp.ClientSession() as s:
            body = {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": TEST_X[0].tolist()}
                ]
            }
            async with s.post(f"{process.base}/v2/models/tiny/infer", json=body) as resp:
                assert resp.status == 200 and (await resp.json())["model_version"] == "1"
    finally:
        await asyncio.to_thread(process.stop)


async def traffic(bases: list[str], stop: asyncio.Event) -> dict[str, int]:
    """A local app per store: the test inputs, one request at a time; counts who
    answered (``v1``, ``v2``... or ``HTTP nnn``)."""
    seen: dict[str, int] = {}

    async def one(session: aiohttp.ClientSession, base: str) -> None:
        i = 0
        while not stop.is_set():
            x = TEST_X[i % len(TEST_X)].tolist()
            body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x}]}
            async with session.post(f"{base}/v2/models/tiny/infer", json=body) as r:
                doc = await r.json()
                key = f"v{doc['model_version']}" if r.status == 200 else f"HTTP {r.status}"
                seen[key] = seen.get(key, 0) + 1
            i += 1
            await asyncio.sleep(0.005)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, b) for b in bases))
    return seen


async def test_a_shadow_stage_on_real_agents_stops_a_bad_version_and_passes_a_good_one(
    fleet: Fleet, start_agent: Any, make_tiny_bundle: Any, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """Real agents run the candidate in shadow on their live traffic and report
    shadow_stats: version 2 answers differently (shadow agreement far below the gate)
    and is rolled back before any store serves it; version 3 answers like version 1,
    passes the shadow stage, is served and promoted to stable."""
    bundles = [make_tiny_bundle("1"), make_tiny_bundle("2", W2), make_tiny_bundle("3")]
    for b in bundles:
        await fleet.call("POST", "/v1/models", data=b.read_bytes())
    agents = []
    for i in range(2):
        enrolled = await fleet.enrol(f"store-{i}", ["north"])
        doc = agent_doc(tmp_path, keys, enrolled, bundles[0])
        agents.append(await start_agent(parse_config(yaml.safe_dump(doc))))
    await fleet.call(
        "POST", "/v1/assignments", json={"model": "tiny", "version": "1", "target": {"all": True}}
    )
    for i in range(2):
        await until(lambda i=i: fleet.model_state(f"store-{i}"), lambda m: m.get("active") == "1")
    plan = {
        "shadow": {"devices": 1, "min_items": 40, "gates": ["shadow_agreement >= 0.9"]},
        "waves": [1, "100%"],
    }
    stop = asyncio.Event()
    load = asyncio.create_task(traffic([a.base for a in agents], stop))
    try:
        bad = await fleet.call(
            "POST",
            "/v1/assignments",
            json={"model": "tiny", "version": "2", "target": {"all": True}, "plan": plan},
        )
        assert bad["stage"] == "shadow" and len(bad["shadow_devices"]) == 1
        done = await until(
            lambda: fleet.call("GET", f"/v1/rollouts/{bad['id']}"),
            lambda r: r["state"] != "running",
            within=60,
        )
        assert done["state"] == "rolled_back", done
        ev = done["evidence"]
        assert ev["stage"] == "shadow" and ev["devices_served"] == []
        assert ev["failed"][0]["canary"]["n"] >= 40 and ev["failed"][0]["canary"]["high"] < 0.9

        good = await fleet.call(
            "POST",
            "/v1/assignments",
            json={"model": "tiny", "version": "3", "target": {"all": True}, "plan": plan},
        )
        done = await until(
            lambda: fleet.call("GET", f"/v1/rollouts/{good['id']}"),
            lambda r: r["state"] != "running",
            within=60,
        )
        assert done["state"] == "completed", done
        assert done["decisions"][0]["stage"] == "shadow"
        assert done["decisions"][0]["gates"][0]["canary"]["value"] == 1.0
        for i in range(2):
            await until(
                lambda i=i: fleet.model_state(f"store-{i}"), lambda m: m.get("active") == "3"
            )
        model = await fleet.call("GET", "/v1/models/tiny")
        assert model["labels"]["stable"] == "3"
    finally:
        stop.set()
        seen = await load
    # Every request answered; version 2 never answered one (it only ran in shadow).
    assert set(seen) <= {"v1", "v3"} and seen.get("v1") and seen.get("v3"), seen


async def test_the_cli_takes_a_plan_file_and_flags_and_assigns_by_label(
    fleet: Fleet, make_tiny_bundle: Any, tmp_path: Path
) -> None:
    for b in (make_tiny_bundle("1"), make_tiny_bundle("2", W2)):
        await fleet.call("POST", "/v1/models", data=b.read_bytes())
    await fleet.enrol("store-0", ["north"])
    await fleet.enrol("store-1", ["south"])
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "waves: [1, '100%']\n"
        "gates: ['error_rate <= baseline + 0.01']\n"
        "on_fail: stop\n"
        "min_requests: 300\n"
    )
    # A flag on top of the file: the gates come from --gate.
    r = await asyncio.to_thread(
        cli, fleet, "assign", "tiny", "2", "--group", "north", "--plan", str(plan),
        "--gate", "p95_ms <= 1.5 * baseline", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["plan"]["gates"] == ["p95_ms <= 1.5 * baseline"]
    assert doc["plan"]["on_fail"] == "stop" and doc["plan"]["min_requests"] == 300
    r = await asyncio.to_thread(cli, fleet, "rollout", "status", doc["id"])
    assert r.returncode == 0 and "stage: serving; on a failed gate: stop" in r.stdout
    # A bad gate: the fleet's 400, exit 1, nothing started.
    r = await asyncio.to_thread(
        cli, fleet, "assign", "tiny", "2", "--group", "south", "--waves", "1",
        "--gate", "accuracy >= 0.9",
    )  # fmt: skip
    assert r.returncode == 1 and "unknown signal 'accuracy'" in r.stderr, r.stderr
    r = await asyncio.to_thread(
        cli, fleet, "assign", "tiny", "2", "--group", "south", "--shadow-devices", "1"
    )
    assert r.returncode == 2 and "needs waves" in r.stderr, r.stderr
    assert len((await fleet.call("GET", "/v1/rollouts"))["rollouts"]) == 1
    # Assigning by fleet label.
    r = await asyncio.to_thread(cli, fleet, "models", "label", "tiny", "staging", "1")
    assert r.returncode == 0, r.stderr
    r = await asyncio.to_thread(
        cli, fleet, "assign", "tiny", "staging", "--group", "south", "--json"
    )
    assert r.returncode == 0, r.stderr
    assigned = json.loads(r.stdout)
    assert assigned["assignment_id"] > 0 and assigned["version"] == "1"
    device = await fleet.call("GET", "/v1/devices/store-1")
    assert device["desired"]["models"]["tiny"]["version"] == "1"

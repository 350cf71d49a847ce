"""The whole loop, with nothing simulated: the fleet service (HTTP API, registry,
MQTT side) and real agents (sync, model store, outbox) over a real Mosquitto.

A fleet manager uploads signed bundles, enrols stores with one-time tokens, assigns
versions and runs staged rollouts through the HTTP API; the agents download, verify,
self-test and switch, or refuse and keep serving, and the fleet shows the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgefleet.fleet.config import FleetServiceConfig
from edgefleet.fleet.service import FleetService
from tests.support.brokers import Mosquitto
from tests.support.quality_fleet import TOKEN, until
from tests.support.quality_fleet import Fleet as QualityFleet
from tests.support.tiny import TEST_X, W2, agent_config, broken_bundle


class Fleet(QualityFleet):
    """The support module's fleet client, plus one model's reported state."""

    async def model_state(self, device_id: str, model: str = "tiny") -> dict[str, Any]:
        return dict(((await self.device(device_id)).get("models") or {}).get(model) or {})


def fleet_config(tmp: Path, keys: tuple[Path, Path], mqtt_port: int) -> FleetServiceConfig:
    return FleetServiceConfig.model_validate(
        {
            "data_dir": str(tmp / "fleet"),
            "http": {"host": "127.0.0.1", "port": 0},
            "auth": {"token": TOKEN},
            "trust": {"public_keys": [str(keys[1])]},
            "broker": {
                "host": "127.0.0.1",
                "port": mqtt_port,
                "client_id": "e2e-fleet",
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.5,
            },
        }
    )


@pytest.fixture
async def fleets(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto, start_agent: Any
) -> AsyncIterator[Callable[..., Any]]:
    """Start fleet services (a second one on the same data dir = a fleet restart).

    Depends on ``start_agent`` so that the fleets stop before the agents (whatever
    either leaves running fails the test: tests/support/leaks.py)."""
    services: list[FleetService] = []
    async with aiohttp.ClientSession() as session:

        async def start() -> Fleet:
            svc = await FleetService(fleet_config(tmp_path, keys, mosquitto.port)).start()
            services.append(svc)
            async with asyncio.timeout(10):
                await svc.bus.wait_connected()
            return Fleet(svc, session)

        yield start
        for svc in reversed(services):
            await svc.stop()


def agent_for(tmp: Path, keys: tuple[Path, Path], enrolled: dict[str, Any], bootstrap: Path) -> Any:
    name = enrolled["device_id"]
    return agent_config(
        tmp / name,
        keys,
        [bootstrap],
        device_id=name,
        fleet={
            "host": enrolled["mqtt"]["host"],
            "port": enrolled["mqtt"]["port"],
            "username": enrolled["mqtt"]["username"],
            "password": enrolled["mqtt"]["password"],
            "keepalive_s": 5,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            "outbox": {"path": str(tmp / name / "outbox.sqlite")},
            # A batch published while the fleet was not subscribed (it reconnects after
            # the device) is never acked: resend it soon rather than after 30 s.
            "telemetry": {"flush_interval_s": 0.2, "stats_interval_s": 0.3, "ack_timeout_s": 2},
        },
    )


async def traffic(
    session: aiohttp.ClientSession, bases: list[str], stop: asyncio.Event
) -> Counter[str]:
    """A local app per store: OIP requests back to back; counts who answered."""
    seen: Counter[str] = Counter()
    body = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": TEST_X[0].tolist()}]
    }

    async def one(base: str) -> None:
        while not stop.is_set():
            async with session.post(f"{base}/v2/models/tiny/infer", json=body) as r:
                doc = await r.json()
                seen[f"v{doc['model_version']}" if r.status == 200 else f"HTTP {r.status}"] += 1
            await asyncio.sleep(0.002)

    await asyncio.gather(*(one(b) for b in bases))
    return seen


async def test_fleet_pushes_a_new_version_to_running_agents_without_a_failed_request(
    fleets: Any, start_agent: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path
) -> None:
    fleet = await fleets()
    v1, v2 = make_tiny_bundle("1"), make_tiny_bundle("2", W2)
    for b in (v1, v2):
        await fleet.call("POST", "/v1/models", data=b.read_bytes())
    agents = []
    for i in range(2):
        enrolled = await fleet.enrol(f"store-{i}", ["north"])
        agents.append(await start_agent(agent_for(tmp_path, keys, enrolled, v1)))
    for i in range(2):
        await until(lambda i=i: fleet.device(f"store-{i}"), check=lambda d: d["online"])

    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        load = asyncio.create_task(traffic(session, [a.base for a in agents], stop))
        await asyncio.sleep(0.3)
        await fleet.call(
            "POST",
            "/v1/assignments",
            json={"model": "tiny", "version": "2", "target": {"group": "north"}},
        )
        for i in range(2):
            await until(
                lambda i=i: fleet.model_state(f"store-{i}"),
                within=20,
                check=lambda m: m.get("state") == "active" and m.get("active") == "2",
            )
        await asyncio.sleep(0.3)
        stop.set()
        seen = await load
    assert seen["v1"] > 0 and seen["v2"] > 0
    assert set(seen) == {"v1", "v2"}, f"failed requests during the switch: {seen}"
    state = await fleet.model_state("store-0")
    assert state["previous"] == "1" and state["last_error"] is None
    events = (await fleet.call("GET", "/v1/events?device=store-0"))["events"]
    assert any(e["kind"] == "activated" and e["version"] == "2" for e in events)
    # The agents' per-model aggregates reach the fleet's telemetry views.
    rows = await until(
        lambda: fleet.call("GET", "/v1/telemetry/models"),
        within=15,
        check=lambda d: any(r["version"] == "2" and r["requests"] > 0 for r in d["models"]),
    )
    assert {r["version"] for r in rows["models"]} >= {"1", "2"}


async def test_a_staged_rollout_of_a_failing_version_stops_and_every_store_keeps_serving(
    fleets: Any, start_agent: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path
) -> None:
    """A correctly signed bundle whose self-test fails: the first wave's store refuses
    it and says why, the rollout stops by itself, later waves never get it."""
    fleet = await fleets()
    v1 = make_tiny_bundle("1")
    bad = broken_bundle(tmp_path, keys, "9", "selftest")
    for b in (v1, bad):
        await fleet.call("POST", "/v1/models", data=b.read_bytes())
    agents = {}
    for i in range(3):
        enrolled = await fleet.enrol(f"shop-{i}", ["south"])
        agents[enrolled["device_id"]] = await start_agent(agent_for(tmp_path, keys, enrolled, v1))
    for name in agents:
        await until(lambda n=name: fleet.device(n), check=lambda d: d["online"])

    rollout = await fleet.call(
        "POST",
        "/v1/assignments",
        json={
            "model": "tiny",
            "version": "9",
            "target": {"group": "south"},
            "waves": [1, "100%"],
            "max_failure_share": 0.0,
        },
    )
    rid = rollout.get("id") or rollout.get("rollout", {}).get("id")
    assert rid
    doc = await until(
        lambda: fleet.call("GET", f"/v1/rollouts/{rid}"),
        within=20,
        check=lambda d: d.get("state") == "stopped",
    )
    assert "fail" in str(doc).lower()
    tried = [n for n in agents if (await fleet.model_state(n)).get("desired") == "9"]
    assert len(tried) == 1, "only the first wave may have received version 9"
    failed = await fleet.model_state(tried[0])
    assert failed["state"] == "failed" and "self-test" in failed["last_error"]
    assert failed["active"] == "1"
    async with aiohttp.ClientSession() as session:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]}
        for agent in agents.values():
            async with session.post(f"{agent.base}/v2/models/tiny/infer", json=body) as r:
                assert r.status == 200 and (await r.json())["model_version"] == "1"


async def test_fleet_restart_while_devices_are_connected_loses_nothing(
    fleets: Any, start_agent: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path
) -> None:
    """Telemetry made while the fleet is down waits in the outbox and arrives after;
    the restarted fleet sees the device online and can push to it."""
    fleet = await fleets()
    v1, v2 = make_tiny_bundle("1"), make_tiny_bundle("2", W2)
    for b in (v1, v2):
        await fleet.call("POST", "/v1/models", data=b.read_bytes())
    enrolled = await fleet.enrol("store-r", [])
    agent = await start_agent(agent_for(tmp_path, keys, enrolled, v1))
    await until(lambda: fleet.device("store-r"), check=lambda d: d["online"])

    await fleet.service.stop()
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4}]}
    async with aiohttp.ClientSession() as session:
        for _ in range(25):  # served while the fleet is away
            async with session.post(f"{agent.base}/v2/models/tiny/infer", json=body) as r:
                assert r.status == 200
    await asyncio.sleep(0.5)  # a stats window closes into the outbox

    fleet = await fleets()  # same database, new process state
    await until(lambda: fleet.device("store-r"), check=lambda d: d["online"])
    rows = await until(
        lambda: fleet.call("GET", "/v1/telemetry/devices/store-r"),
        within=15,
        check=lambda d: sum(r["requests"] for r in d["models"]) >= 25,
    )
    assert sum(r["requests"] for r in rows["models"]) == 25
    await fleet.call(
        "POST",
        "/v1/assignments",
        json={"model": "tiny", "version": "2", "target": {"device": "store-r"}},
    )
    await until(
        lambda: fleet.model_state("store-r"),
        within=20,
        check=lambda m: m.get("state") == "active" and m.get("active") == "2",
    )
    with contextlib.suppress(Exception):
        await fleet.service.stop()


# ------------------------------------------------------------------ the same on amqtt


@pytest.fixture
async def embedded_fleet(
    tmp_path: Path, keys: tuple[Path, Path], start_agent: Any
) -> AsyncIterator[Fleet]:
    """The fleet with no broker configured: it starts its embedded amqtt broker."""
    cfg = FleetServiceConfig.model_validate(
        {
            "data_dir": str(tmp_path / "fleet"),
            "http": {"host": "127.0.0.1", "port": 0},
            "auth": {"token": TOKEN},
            "trust": {"public_keys": [str(keys[1])]},
            "embedded_broker": {"host": "127.0.0.1", "port": 0},
        }
    )
    svc = await FleetService(cfg).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(10):
                await svc.bus.wait_connected()
            yield Fleet(svc, session)
    finally:
        await svc.stop()


async def test_the_same_push_and_telemetry_on_the_embedded_broker(
    embedded_fleet: Fleet, start_agent: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path
) -> None:
    """amqtt speaks only MQTT 3.1.1 and handles sessions its own way: the agent and
    the fleet must behave as they do on Mosquitto (enrol, online, push, telemetry)."""
    fleet = embedded_fleet
    v1, v2 = make_tiny_bundle("1"), make_tiny_bundle("2", W2)
    for b in (v1, v2):
        await fleet.call("POST", "/v1/models", data=b.read_bytes())
    enrolled = await fleet.enrol("store-a", ["east"])
    agent = await start_agent(agent_for(tmp_path, keys, enrolled, v1))
    await until(lambda: fleet.device("store-a"), check=lambda d: d["online"])
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        load = asyncio.create_task(traffic(session, [agent.base], stop))
        await fleet.call(
            "POST",
            "/v1/assignments",
            json={"model": "tiny", "version": "2", "target": {"all": True}},
        )
        await until(
            lambda: fleet.model_state("store-a"),
            within=20,
            check=lambda m: m.get("state") == "active" and m.get("active") == "2",
        )
        await asyncio.sleep(0.2)
        stop.set()
        seen = await load
    assert set(seen) <= {"v1", "v2"} and seen["v2"] > 0, seen
    await until(
        lambda: fleet.call("GET", "/v1/telemetry/devices/store-a"),
        within=15,
        check=lambda d: sum(r["requests"] for r in d["models"]) == sum(seen.values()),
    )


# ------------------------------------------------- SIGKILL while a version goes in


async def test_sigkill_while_verifying_or_activating_ends_on_a_verified_version(
    fleets: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path
) -> None:
    """The agent process is killed as soon as it reports it is verifying or activating
    the new version. After a restart it must end on version 2, self-tested, serving —
    never on a half-installed version — and the fleet must see it."""
    import os
    import signal

    from tests.support.agent_process import AgentProcess
    from tests.support.brokers import free_port

    fleet = await fleets()
    v1, v2 = make_tiny_bundle("1"), make_tiny_bundle("2", W2)
    for b in (v1, v2):
        await fleet.call("POST", "/v1/models", data=b.read_bytes())
    enrolled = await fleet.enrol("store-k", [])
    config = agent_for(tmp_path, keys, enrolled, v1).model_dump(mode="json", exclude_none=True)
    port = free_port()
    (tmp_path / "store-k").mkdir(exist_ok=True)
    proc = await asyncio.to_thread(AgentProcess, config, tmp_path / "store-k", port)
    try:
        await until(lambda: fleet.device("store-k"), check=lambda d: d["online"])
        await fleet.call(
            "POST",
            "/v1/assignments",
            json={"model": "tiny", "version": "2", "target": {"device": "store-k"}},
        )
        caught = None
        async with aiohttp.ClientSession() as session, asyncio.timeout(20):
            while caught is None:
                async with session.get(f"{proc.base}/v1/fleet") as r:
                    doc = await r.json()
                state = ((doc.get("sync") or {}).get("models") or {}).get("tiny", {})
                if state.get("state") in ("verifying", "activating"):
                    os.kill(proc.proc.pid, signal.SIGKILL)
                    caught = state["state"]
                elif state.get("state") == "active" and state.get("active") == "2":
                    caught = "too late"  # the swap won the race; the restart check still holds
        await asyncio.to_thread(proc.proc.wait, 30)
        proc.log.close()
        proc = await asyncio.to_thread(AgentProcess, config, tmp_path / "store-k", port)
        await until(
            lambda: fleet.model_state("store-k"),
            within=20,
            check=lambda m: m.get("state") == "active" and m.get("active") == "2",
        )
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proc.base}/v2/models/tiny") as r:
                meta = await r.json()
            body = {
                "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 4}]
            }
            async with session.post(f"{proc.base}/v2/models/tiny/infer", json=body) as r:
                assert r.status == 200 and (await r.json())["model_version"] == "2"
        assert "pass" in str(meta).lower(), meta
        print(f"\nkilled while {caught}")
    finally:
        await asyncio.to_thread(proc.stop)


# ------------------------------------------- broker outage under steady inference load


@pytest.mark.parametrize("kill", [True, False], ids=["broker-sigkill", "broker-sigterm"])
async def test_broker_outage_under_inference_load_fails_no_request_and_loses_no_count(
    fleets: Any,
    start_agent: Any,
    make_tiny_bundle: Any,
    keys: Any,
    tmp_path: Path,
    mosquitto: Mosquitto,
    kill: bool,
) -> None:
    """Local apps keep calling while the broker is down; afterwards the fleet's
    telemetry counts exactly the requests the apps made, none twice."""
    fleet = await fleets()
    v1 = make_tiny_bundle("1")
    await fleet.call("POST", "/v1/models", data=v1.read_bytes())
    enrolled = await fleet.enrol("store-o", [])
    agent = await start_agent(agent_for(tmp_path, keys, enrolled, v1))
    await until(lambda: fleet.device("store-o"), check=lambda d: d["online"])

    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        load = asyncio.create_task(traffic(session, [agent.base], stop))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(mosquitto.stop, kill)
        await until(lambda: fleet.device("store-o"), check=lambda d: True)  # API still up
        await asyncio.sleep(1.0)  # outage: answers keep coming, counts go to the outbox
        await asyncio.to_thread(mosquitto.start)
        await asyncio.sleep(0.5)
        stop.set()
        seen = await load
    assert set(seen) == {"v1"}, f"requests failed during the outage: {seen}"
    await until(
        lambda: fleet.call("GET", "/v1/telemetry/devices/store-o"),
        within=20,
        check=lambda d: sum(r["requests"] for r in d["models"]) >= seen["v1"],
    )
    doc = await fleet.call("GET", "/v1/telemetry/devices/store-o")
    assert sum(r["requests"] for r in doc["models"]) == seen["v1"]
    assert sum(r["errors"] for r in doc["models"]) == 0

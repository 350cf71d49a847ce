"""Hard examples from a real agent to a real fleet (issue 11, part 6), nothing simulated:
the fleet service (HTTP API, SQLite, files) on a real Mosquitto, an edge agent enrolled
with it, and a real cloud agent answering the edge's unsure items on loopback.

The edge bundle's threshold is 1.0, so every request asks the cloud and becomes a hard
example in the agent's store; the uploader (agent/cloud/hard_example_upload.py) then
sends it to the fleet with the device's credentials, and deletes it only once the
fleet acknowledged it.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgefleet.agent.server.context import DATA_PLANE, SERVICES
from edgefleet.fleet.service import FleetService
from tests.support.brokers import Mosquitto, free_port
from tests.support.cloud_helpers import TOKEN as CLOUD_TOKEN
from tests.support.cloud_helpers import cloud_config, infer, wait_for
from tests.support.quality_fleet import Fleet, fleet_config, fleet_section
from tests.support.tiny import TEST_X, W2, agent_config, tiny_reference


@pytest.fixture
def fleet_port() -> int:
    return free_port()


@pytest.fixture
async def fleets(
    tmp_path: Path,
    keys: tuple[Path, Path],
    mosquitto: Mosquitto,
    start_agent: Any,
    fleet_port: int,
) -> AsyncIterator[Callable[[], Any]]:
    """Start the fleet (again: a restart on the same data dir and port). Depends on
    ``start_agent`` so that the fleets stop before the agents."""
    running: list[FleetService] = []
    async with aiohttp.ClientSession() as session:

        async def start(**extra: Any) -> Fleet:
            svc = await FleetService(
                fleet_config(tmp_path, keys, mosquitto.port, http_port=fleet_port, **extra)
            ).start()
            running.append(svc)
            async with asyncio.timeout(10):
                await svc.bus.wait_connected()
            return Fleet(svc, session)

        try:
            yield start
        finally:
            for svc in running:
                await svc.stop()


@pytest.fixture
async def cloud(servers: Any, cloud_bundles: dict[str, Path], keys: Any, tmp_path: Path) -> Any:
    return await servers.agent(cloud_config(tmp_path / "cloud", keys, cloud_bundles["cloud"]))


@pytest.fixture
def edge(
    cloud: Any,
    start_agent: Any,
    cloud_bundles: dict[str, Path],
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> Callable[..., Any]:
    async def make(fleet: Fleet, name: str = "shop-1", **upload: Any) -> Any:
        enrolled = await fleet.enrol(name, ["north"])
        config = agent_config(
            tmp_path / name,
            keys,
            [cloud_bundles["edge"]],
            device_id=name,
            fleet=fleet_section(enrolled, tmp_path),
            fallback={
                "cloud": {"url": cloud.base, "token": CLOUD_TOKEN, "timeout_ms": 5000},
                "hard_examples": {
                    "sample_rate": 1.0,
                    "retry_interval_s": 3600,
                    "upload": {"interval_s": 3600, **upload},
                },
            },
        )
        return await start_agent(config)

    return make


def router(agent: Any) -> Any:
    return agent.app[DATA_PLANE].router


async def local_rows(agent: Any) -> list[dict[str, Any]]:
    return list(await router(agent).hard_examples.list(limit=1000))


async def fleet_rows(fleet: Fleet) -> list[dict[str, Any]]:
    return list((await fleet.call("GET", "/v1/hard-examples"))["hard_examples"])


async def make_hard_examples(agent: Any, n: int) -> None:
    """``n`` unsure requests, the cloud answering each: ``n`` rows in the store."""
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            status, doc, _ = await infer(session, agent.base, TEST_X[i % 8 : i % 8 + 1])
            assert status == 200 and doc["parameters"]["source"] == "cloud"
    await router(agent).idle()
    await wait_for(lambda: _at_least(agent, n))


async def _at_least(agent: Any, n: int) -> bool:
    router(agent).recorder.flush()
    return len(await local_rows(agent)) >= n


async def test_a_hard_example_reaches_the_fleet_and_is_deleted_only_after_the_ack(
    fleets: Any, edge: Any
) -> None:
    fleet = await fleets()
    agent = await edge(fleet)
    await make_hard_examples(agent, 1)
    (row,) = await local_rows(agent)
    assert row["kind"] == "unsure" and row["status"] == "answered"

    uploader = router(agent).uploader
    uploader.wake()
    (stored,) = await _eventually(lambda: fleet_rows(fleet), lambda rows: len(rows) == 1)
    assert (stored["device_id"], stored["model"], stored["version"]) == ("shop-1", "tiny", "1")
    assert stored["reason"] == "unsure" and stored["status"] == "answered"
    assert stored["edge_class"] == row["edge_class"] and stored["cloud_class"] == row["cloud_class"]
    await _eventually(lambda: local_rows(agent), lambda rows: rows == [])
    assert uploader.stats.uploaded == 1
    detail = await fleet.call("GET", f"/v1/hard-examples/{stored['id']}")
    assert detail["cloud_outputs"]["probs"]["shape"] == [1, 3]


async def test_a_resend_after_a_lost_ack_is_deduplicated(fleets: Any, edge: Any) -> None:
    """The fleet stored the case but the device never heard (the ack was lost): the
    device sends it again, the fleet says it has it, the device deletes its copy."""
    fleet = await fleets()
    agent = await edge(fleet)
    await make_hard_examples(agent, 1)
    uploader = router(agent).uploader
    store = router(agent).hard_examples
    (row,) = await store.uploadable(10)
    hid, body = await asyncio.to_thread(uploader._encode, row)
    auth = base64.b64encode(f"shop-1:{agent_secret(agent)}".encode()).decode()
    async with fleet.session.put(
        f"{fleet.base}/v1/hard-examples/{hid}",
        data=body,
        headers={"Authorization": f"Basic {auth}"},
    ) as r:
        assert r.status == 201  # "the first attempt": stored, its answer never read
    assert await local_rows(agent) != []

    uploader.wake()
    await _eventually(lambda: local_rows(agent), lambda rows: rows == [])
    assert (uploader.stats.already, uploader.stats.uploaded) == (1, 0)
    assert [r["id"] for r in await fleet_rows(fleet)] == [hid]


async def test_uploads_wait_out_a_fleet_that_is_down_and_resume(fleets: Any, edge: Any) -> None:
    fleet = await fleets()
    agent = await edge(fleet, interval_s=0.2, max_backoff_s=0.4)
    await fleet.service.stop()  # the fleet goes down

    await make_hard_examples(agent, 3)
    uploader = router(agent).uploader
    await wait_for(lambda: uploader.stats.failures >= 2, within_s=10)
    assert len(await local_rows(agent)) == 3, "nothing may be deleted without the fleet's ack"
    assert uploader.stats.uploaded == 0

    fleet = await fleets()  # back, same data dir and port
    await _eventually(lambda: fleet_rows(fleet), lambda rows: len(rows) == 3, within=20)
    await _eventually(lambda: local_rows(agent), lambda rows: rows == [])
    assert uploader.stats.uploaded == 3


async def test_the_bandwidth_budget_holds_in_every_window(fleets: Any, edge: Any) -> None:
    fleet = await fleets()
    # About 3 cases per window: each body is a few hundred bytes.
    agent = await edge(fleet, max_bytes_per_s=2000, window_s=0.5)
    await make_hard_examples(agent, 12)
    uploader = router(agent).uploader
    uploader.wake()
    await _eventually(lambda: local_rows(agent), lambda rows: rows == [], within=30)
    rows = await fleet_rows(fleet)
    assert len(rows) == 12
    budget = uploader.budget
    assert budget.allowance == 1000
    ledger = dict(budget.ledger)
    assert sum(ledger.values()) == uploader.stats.bytes_sent == sum(r["bytes"] for r in rows)
    assert max(ledger.values()) <= budget.allowance, ledger
    windows = -(-uploader.stats.bytes_sent // budget.allowance)
    assert windows >= 4 and len(ledger) >= windows
    # Independently of the ledger, seen from the fleet: bytes spread over at least the
    # windows they need (a lower bound only: a slow box makes it longer, never shorter).
    received = sorted(r["received_at"] for r in rows)
    assert received[-1] - received[0] >= (windows - 2) * budget.window_s


async def test_shadow_disagreements_reach_the_fleet_without_a_cloud(
    fleets: Any,
    start_agent: Any,
    make_tiny_bundle: Any,
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """No cloud configured: the shadow runner keeps its disagreements in its own store
    (agent/shadow.py), and the router uploads that store's cases too."""
    fleet = await fleets()
    await fleet.call("POST", "/v1/models", data=make_tiny_bundle("1").read_bytes())
    enrolled = await fleet.enrol("shop-9", ["north"])
    config = agent_config(
        tmp_path / "shop-9",
        keys,
        [make_tiny_bundle("1")],
        device_id="shop-9",
        fleet=fleet_section(enrolled, tmp_path),
        runtime={"shadow": {"queue_size": 10_000, "cpu_budget": 64}},
        fallback={"hard_examples": {"upload": {"interval_s": 0.2}}},
    )
    agent = await start_agent(config)
    registry = agent.app[SERVICES].registry
    await registry.install(make_tiny_bundle("s2", weights=W2))
    await registry.load_shadow("tiny", "s2", 1.0)
    x = TEST_X
    differ = tiny_reference(x).argmax(axis=1) != tiny_reference(x, W2).argmax(axis=1)
    assert differ.any()
    async with aiohttp.ClientSession() as session:
        for i in range(len(x)):
            body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                "data": x[i].tolist()}]}  # fmt: skip
            async with session.post(f"{agent.base}/v2/models/tiny/infer", json=body) as r:
                assert r.status == 200
    rows = await _eventually(
        lambda: fleet_rows(fleet), lambda rows: len(rows) == int(differ.sum()), within=30
    )
    assert {(r["device_id"], r["reason"], r["version"], r["cloud_version"]) for r in rows} == {
        ("shop-9", "shadow_disagreement", "1", "s2")
    }
    assert router(agent).uploader is not None
    store = router(agent).uploader.store
    await _eventually(lambda: store.list(limit=100), lambda left: left == [])


def big_case(image_bytes: int, i: int = 0) -> Any:
    """A hard example with a PNG of about ``image_bytes`` (the image endpoint keeps the
    original up to fallback.hard_examples.max_image_bytes)."""
    from edgefleet.agent.cloud.hard_examples import NewExample

    x = TEST_X[i : i + 1]
    probs = tiny_reference(x)
    return NewExample(
        model="tiny",
        version="1",
        cloud_model="tiny-cloud",
        kind="unsure",
        status="answered",
        inputs={"x": x},
        edge_outputs={"probs": probs},
        edge_class=int(probs.argmax()),
        edge_confidence=float(probs.max()),
        cloud_version="1",
        cloud_outputs={"probs": probs},
        cloud_class=int(probs.argmax()),
        cloud_confidence=float(probs.max()),
        image=b"\x89PNG\r\n\x1a\n" + bytes([i]) * image_bytes,
    )


async def test_a_big_case_the_fleet_has_is_not_sent_again(fleets: Any, edge: Any) -> None:
    """Bodies of 64 KiB or more are asked for with HEAD first: after a lost ack, the
    device deletes its copy without sending the bytes again."""
    fleet = await fleets()
    agent = await edge(fleet)
    store = router(agent).hard_examples
    store.add([big_case(70_000)])
    await _eventually(lambda: local_rows(agent), lambda rows: len(rows) == 1)
    uploader = router(agent).uploader
    (row,) = await store.uploadable(10)
    hid, body = await asyncio.to_thread(uploader._encode, row)
    assert len(body) > 70_000
    auth = base64.b64encode(f"shop-1:{agent_secret(agent)}".encode()).decode()
    async with fleet.session.put(
        f"{fleet.base}/v1/hard-examples/{hid}",
        data=body,
        headers={"Authorization": f"Basic {auth}"},
    ) as r:
        assert r.status == 201
    uploader.wake()
    await _eventually(lambda: local_rows(agent), lambda rows: rows == [])
    assert (uploader.stats.skipped_by_head, uploader.stats.bytes_sent) == (1, 0)
    assert [r["id"] for r in await fleet_rows(fleet)] == [hid]


async def test_a_case_the_fleet_refuses_for_good_is_kept_and_not_resent(
    fleets: Any, edge: Any
) -> None:
    fleet = await fleets(hard_examples={"max_example_bytes": 3000})
    agent = await edge(fleet)
    store = router(agent).hard_examples
    store.add([big_case(5000, 0), big_case(10, 1)])
    await _eventually(lambda: local_rows(agent), lambda rows: len(rows) == 2)
    uploader = router(agent).uploader
    uploader.wake()
    (stored,) = await _eventually(lambda: fleet_rows(fleet), lambda rows: len(rows) == 1)
    left = await _eventually(lambda: local_rows(agent), lambda rows: len(rows) == 1)
    assert uploader.stats.refused == {"413": 1} and uploader.stats.uploaded == 1
    assert stored["bytes"] < 3000 and left[0]["bytes"] > 5000
    sent = uploader.stats.bytes_sent
    await uploader.run_once()  # nothing left to send: the refused one stays home
    assert uploader.stats.bytes_sent == sent and uploader.stats.refused == {"413": 1}
    assert await store.uploadable(10) == []


def agent_secret(agent: Any) -> str:
    return str(router(agent).config.fleet.secret())


async def _eventually(
    fetch: Callable[[], Any], check: Callable[[Any], bool], within: float = 10.0
) -> Any:
    doc = None
    try:
        async with asyncio.timeout(within):
            while True:
                doc = await fetch()
                if check(doc):
                    return doc
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not reached within {within} s; last: {doc}") from None


def test_the_budget_arithmetic_per_window() -> None:
    """The ledger rule on its own, with a clock the test moves (no sleeping)."""
    from edgefleet.agent.cloud.hard_example_upload import BandwidthBudget

    t = [100.0]
    budget = BandwidthBudget(1000, 1.0, clock=lambda: t[0])
    assert budget.delay(600) == 0.0
    budget.spend(600)
    assert budget.delay(400) == 0.0
    budget.spend(400)
    assert budget.delay(1) == pytest.approx(1.0)  # this window is full: the next one
    t[0] = 101.2
    assert budget.delay(1) == 0.0
    # A case larger than a window goes alone, and the windows it overran stay empty.
    t[0] = 103.0
    assert budget.delay(2500) == 0.0
    budget.spend(2500)
    t[0] = 104.5
    assert budget.delay(1) == pytest.approx(1.5)
    t[0] = 106.0
    assert budget.delay(1000) == 0.0
    assert budget.ledger == {100: 1000, 103: 2500}


async def test_credentials_go_only_to_the_enrolled_fleet_over_https(tmp_path: Path) -> None:
    """The download module's rule (agent/download.py CredentialScope): the enrolled
    fleet, and over https unless on loopback; otherwise the uploader sends nothing at
    all and says why."""
    from edgefleet.agent.cloud.config import HardExamplesConfig
    from edgefleet.agent.cloud.hard_example_upload import HardExampleUploader
    from edgefleet.agent.cloud.hard_examples import HardExampleStore
    from edgefleet.agent.config import FleetConfig

    cfg = HardExamplesConfig()
    fleet = FleetConfig.model_validate(
        {
            "host": "mqtt.example.com",
            "password": "s3cret-s3cret",
            "sync": {"fleet_url": "http://fleet.example.com:8480"},
        }
    )
    store = HardExampleStore(tmp_path / "he.sqlite", cfg)
    await store.start()
    try:
        uploader = HardExampleUploader(store, cfg.upload, "shop-1", fleet)
        async with asyncio.timeout(5):
            await uploader.run()  # returns at once: disabled
        assert uploader.stats.disabled == "not uploading: plain http outside loopback"
        assert uploader._session is None and uploader.stats.bytes_sent == 0
    finally:
        await store.close()

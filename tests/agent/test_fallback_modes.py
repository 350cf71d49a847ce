"""Fallback modes, audits, hard examples and their retries, the image endpoint's
provenance, and the status endpoints: real edge and cloud agents on loopback."""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp
import cv2
import numpy as np
import pytest

from tests.support.brokers import free_port
from tests.support.cloud_helpers import (
    cloud_config,
    cloud_reference,
    edge_config,
    infer,
    probs_of,
    wait_for,
)
from tests.support.tiny import TEST_X, tiny_reference

X1 = TEST_X[:1]


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def cloud(servers, cloud_bundles, keys, tmp_path):
    return await servers.agent(cloud_config(tmp_path / "cloud", keys, cloud_bundles["cloud"]))


async def test_edge_first_escalate_answers_at_once_and_keeps_both_answers(
    servers, session, cloud, cloud_bundles, keys, tmp_path
):
    edge = await servers.agent(
        edge_config(
            tmp_path,
            keys,
            cloud_bundles["edge"],
            cloud.base,
            tiny={"mode": "edge_first_escalate"},
            hard_examples={"sample_rate": 1.0},
        )
    )
    status, doc, _ = await infer(session, edge.base, TEST_X[:2])
    assert status == 200
    p = doc["parameters"]
    assert (p["source"], p["escalated"]) == ("edge", True)
    assert "fallback" not in p and "cloud_ms" not in p
    np.testing.assert_allclose(probs_of(doc), tiny_reference(TEST_X[:2]), rtol=1e-5)
    await edge.router.idle()
    store = edge.router.hard_examples
    await wait_for(lambda: _count(store, "answered", 2))
    rows = await store.list(status="answered")
    assert {r["kind"] for r in rows} == {"escalated"}
    want_cloud = cloud_reference(TEST_X[:2]).argmax(axis=1)
    want_edge = tiny_reference(TEST_X[:2]).argmax(axis=1)
    assert sorted(r["cloud_class"] for r in rows) == sorted(want_cloud.tolist())
    assert sorted(r["edge_class"] for r in rows) == sorted(want_edge.tolist())
    assert all(r["cloud_version"] == "1" for r in rows)
    async with session.get(f"{edge.base}/metrics") as r:
        text = await r.text()
    assert 'source="edge",reason="escalated"} 2' in text
    agree = int((want_cloud == want_edge).sum())
    if agree:
        assert f'kind="escalated",agree="true"}} {agree}' in text


async def test_audits_sample_confident_answers(
    servers, session, cloud, cloud_bundles, keys, tmp_path
):
    edge = await servers.agent(
        edge_config(
            tmp_path,
            keys,
            cloud_bundles["edge"],
            cloud.base,
            tiny={"threshold": 0.0, "audit_rate": 1.0},
            hard_examples={"sample_rate": 0.0},
        )
    )
    status, doc, _ = await infer(session, edge.base, TEST_X)
    assert status == 200
    assert doc["parameters"]["source"] == "edge" and doc["parameters"]["audited"] is True
    await edge.router.idle()
    async with session.get(f"{edge.base}/metrics") as r:
        text = await r.text()
    edge_cls = tiny_reference(TEST_X).argmax(axis=1)
    cloud_cls = cloud_reference(TEST_X).argmax(axis=1)
    disagree = int((edge_cls != cloud_cls).sum())
    assert disagree > 0  # the two tiny models differ: otherwise this test proves little
    assert f'kind="audited",agree="false"}} {disagree}' in text
    # sample_rate 0 keeps no agreement, but every disagreement: confidently wrong cases.
    store = edge.router.hard_examples
    await wait_for(lambda: _count(store, "answered", disagree))
    rows = await store.list()
    assert all(r["kind"] == "audit" and r["agree"] is False for r in rows)


async def _count(store, status, n):
    return (await store.counts())[status] == n


async def test_failed_cases_are_retried_and_their_late_answers_recorded(
    servers, session, cloud_bundles, keys, tmp_path
):
    port = free_port()
    edge = await servers.agent(
        edge_config(
            tmp_path,
            keys,
            cloud_bundles["edge"],
            f"http://127.0.0.1:{port}",
            hard_examples={"retry_interval_s": 0.1},
        )
    )
    for i in range(3):
        status, doc, _ = await infer(session, edge.base, TEST_X[i : i + 1])
        assert status == 200 and doc["parameters"]["fallback"] == "offline"
    store = edge.router.hard_examples
    await wait_for(lambda: _count(store, "pending", 3))
    pending = await store.list(status="pending")
    assert {r["reason"] for r in pending} == {"offline"}
    # The cloud comes back: the retry loop gets every late answer (the callers are gone).
    await servers.agent(cloud_config(tmp_path / "cloud", keys, cloud_bundles["cloud"]), port=port)
    await wait_for(lambda: _count(store, "answered", 3), within_s=10)
    rows = await store.list(status="answered")
    want = cloud_reference(TEST_X[:3]).argmax(axis=1)
    assert sorted(r["cloud_class"] for r in rows) == sorted(want.tolist())
    async with session.get(f"{edge.base}/metrics") as r:
        text = await r.text()
    assert 'kind="retry",outcome="ok"} 3' in text
    assert 'edgefleet_hard_examples{status="answered"} 3' in text
    # The blobs hold the exact inputs, readable without the agent.
    with sqlite3.connect(store.path) as db:
        (blob,) = db.execute("SELECT inputs FROM hard_examples ORDER BY id LIMIT 1").fetchone()
    from edgefleet.agent.cloud.hard_examples import unpack

    np.testing.assert_array_equal(unpack(blob)["x"], TEST_X[:1])


async def test_failed_cases_expire_after_retention(servers, session, cloud_bundles, keys, tmp_path):
    edge = await servers.agent(
        edge_config(
            tmp_path,
            keys,
            cloud_bundles["edge"],
            f"http://127.0.0.1:{free_port()}",
            hard_examples={"retry_interval_s": 0.1, "retention_s": 0.2},
        )
    )
    await infer(session, edge.base, X1)
    store = edge.router.hard_examples
    await wait_for(lambda: _count(store, "expired", 1), within_s=5)
    async with session.get(f"{edge.base}/v1/hard-examples?status=expired") as r:
        doc = await r.json()
    (row,) = doc["hard_examples"]
    assert row["model"] == "tiny" and row["reason"] == "offline" and row["cloud_class"] is None


async def test_image_endpoint_says_who_answered(
    servers, session, cloud, keys, tmp_path, make_tiny_bundle
):
    pre = {
        "type": "image",
        "input": "x",
        "width": 2,
        "height": 2,
        "color": "GRAY",
        "layout": "NC",
        "scale": 1 / 255,
        "interpolation": "area",
    }
    bundle = make_tiny_bundle(
        "img-fb",
        preprocessing=pre,
        fallback={"mode": "cloud_when_unsure", "threshold": 1.0, "cloud_model": "tiny-cloud"},
    )
    edge = await servers.agent(edge_config(tmp_path, keys, bundle, cloud.base))
    img = cv2.resize(
        np.array([[0, 255], [128, 64]], np.uint8), (40, 40), interpolation=cv2.INTER_NEAREST
    )
    png = cv2.imencode(".png", img)[1].tobytes()
    x = np.array([[0, 255, 128, 64]], np.float32) / 255
    async with session.post(f"{edge.base}/v1/predict/tiny", data=png) as r:
        doc = await r.json()
    assert r.status == 200, doc
    labels = ["a", "b", "c"]
    assert doc["source"] == "cloud" and doc["fallback"] is None
    assert doc["edge"]["label"] == labels[int(tiny_reference(x).argmax())]
    assert doc["edge"]["confidence"] == pytest.approx(tiny_reference(x).max(), rel=1e-3)
    assert doc["cloud"]["model"] == "tiny-cloud" and doc["cloud"]["version"] == "1"
    assert doc["cloud"]["label"] == labels[int(cloud_reference(x).argmax())]
    assert doc["predictions"][0]["label"] == doc["cloud"]["label"]
    assert doc["confidence"] == pytest.approx(cloud_reference(x).max(), rel=1e-3)
    assert doc["edge"]["latency_ms"] > 0 and doc["cloud"]["latency_ms"] > 0
    # ?cloud=0: this one stays on the box.
    async with session.post(f"{edge.base}/v1/predict/tiny?cloud=0", data=png) as r:
        local = await r.json()
    assert local["source"] == "edge" and "cloud" not in local
    # The cloud goes away: the edge answers, says why, and keeps the image.
    await servers.stop(cloud)
    async with session.post(f"{edge.base}/v1/predict/tiny", data=png) as r:
        doc = await r.json()
    assert r.status == 200
    assert (doc["source"], doc["fallback"]) == ("edge", "offline")
    assert doc["predictions"][0]["label"] == doc["edge"]["label"]
    store = edge.router.hard_examples
    await wait_for(lambda: _count(store, "pending", 1))
    (row,) = await store.list(status="pending")
    assert row["has_image"] is True


async def test_status_endpoints(servers, session, cloud, cloud_bundles, keys, tmp_path):
    edge = await servers.agent(
        edge_config(
            tmp_path, keys, cloud_bundles["edge"], cloud.base, tiny={"class_thresholds": {"b": 0.5}}
        )
    )
    await infer(session, edge.base, X1)
    async with session.get(f"{edge.base}/v1/fallback") as r:
        doc = await r.json()
    assert doc["cloud"]["url"] == cloud.base and doc["cloud"]["offline"] is False
    policy = doc["policies"]["tiny:1"]
    assert policy["mode"] == "cloud_when_unsure" and policy["cloud_model"] == "tiny-cloud"
    assert policy["class_thresholds"] == {"b": 0.5}
    assert doc["items"]["tiny:1"]["cloud_share"] == 1.0
    assert doc["hard_examples"]["max_rows"] > 0
    async with session.get(f"{edge.base}/v2/models/tiny") as r:
        meta = await r.json()
    assert meta["parameters"]["fallback_effective"]["threshold"] == 1.0
    async with session.get(f"{edge.base}/v1/hard-examples?status=nope") as r:
        assert r.status == 400
    # An agent without a cloud: no store, every model local.
    local = await servers.agent(edge_config(tmp_path / "l", keys, cloud_bundles["edge"], None))
    async with session.get(f"{local.base}/v1/hard-examples") as r:
        assert r.status == 404
    async with session.get(f"{local.base}/v1/fallback") as r:
        doc = await r.json()
    assert doc["cloud"] is None
    assert doc["policies"]["tiny:1"]["mode"] == "edge_only"
    assert "no cloud endpoint" in doc["policies"]["tiny:1"]["inactive"]
    status, answer, _ = await infer(session, local.base, X1)
    assert status == 200 and answer["parameters"]["source"] == "edge"
    assert "fallback" not in answer["parameters"]


async def test_shutdown_cancels_background_work(servers, session, cloud_bundles, keys, tmp_path):
    proxy = await servers.proxy(free_port())  # upstream never answers: connects fail
    proxy.mode = "hang"
    edge = await servers.agent(
        edge_config(
            tmp_path,
            keys,
            cloud_bundles["edge"],
            proxy.base,
            timeout_ms=5000,
            tiny={"mode": "edge_first_escalate"},
        )
    )
    status, _, ms = await infer(session, edge.base, X1)
    assert status == 200 and ms < 1000  # not the 5 s cloud timeout
    assert any(t.get_name().startswith("escalation") for t in edge.router._tasks)
    await asyncio.wait_for(servers.stop(edge), 5)  # does not wait out the 5 s timeout
    assert not edge.router._tasks


async def test_fallback_counts_go_to_telemetry(
    servers, session, cloud, cloud_bundles, keys, tmp_path
):
    edge = await servers.agent(edge_config(tmp_path, keys, cloud_bundles["edge"], cloud.base))
    sent: list[tuple[str, dict]] = []

    async def sink(kind, data):  # what the fleet link's outbox.add_one receives
        sent.append((kind, data))

    assert edge.router.telemetry is not None
    edge.router.telemetry.sink = sink
    assert await edge.router.telemetry.report() is None  # nothing happened yet
    await infer(session, edge.base, TEST_X[:3])
    doc = await edge.router.telemetry.report()
    assert sent == [("fallback_stats", doc)]
    assert doc["items"] == [
        {"model": "tiny", "version": "1", "source": "cloud", "reason": "unsure", "n": 3}
    ]
    assert doc["calls"] == [
        {"model": "tiny", "version": "1", "kind": "unsure", "outcome": "ok", "n": 1}
    ]
    assert doc["breakers"] == {"tiny": "closed"} and doc["offline"] is False
    # Deltas: the next report carries only what happened since.
    await infer(session, edge.base, X1, cloud=False)
    doc = await edge.router.telemetry.report()
    assert doc["items"] == [
        {"model": "tiny", "version": "1", "source": "edge", "reason": "edge_only", "n": 1}
    ]
    assert "calls" not in doc

"""Shadow candidates on the device (agent/shadow.py, issue 11 part 1), with real agents,
real ONNX models and, end to end, a real Mosquitto and real bundle downloads.

The candidates answer differently from the active version for real: ``W2`` (the tiny
model with its classes reversed), a model 40 layers deep (slow: the shadow queue
drops), and one that takes five features (ONNX Runtime refuses the active version's
four: the shadow raises). Figures are checked against what the test computes itself
from the two models' weights on the same inputs. Waits are on conditions; nothing is
timed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.agent.fleet_link import FLEET
from edgefleet.agent.server.context import DATA_PLANE, SERVICES
from edgefleet.agent.shadow import ShadowRunner, box_iou, boxes_agree
from edgefleet.converters.bundler import build_bundle
from edgefleet.core import protocol
from edgefleet.core.bundle.signing import load_private_key
from edgefleet.core.mqtt import topics
from edgefleet.core.processing.detection import Detection
from tests.support.brokers import Mosquitto, Peer, eventually
from tests.support.bundle_server import BundleServer
from tests.support.tiny import TEST_X, TINY_MANIFEST, TINY_W, W2, agent_config, tiny_reference

DEV = "store-0042"
SECRET = "s3cret-device-password"
WITHIN = 60.0
ROOMY = {"queue_size": 10_000, "cpu_budget": 64, "hard_examples_per_minute": 100_000}


# ----------------------------------------------------------------- models


def _heavy_onnx(path: Path, layers: int = 40, width: int = 1024) -> Path:
    """softmax of a deep tanh MLP: tiny's inputs and outputs, ~40 M MACs per row."""
    rng = np.random.default_rng(3)
    w_in = (rng.normal(size=(4, width)) / 2).astype(np.float32)
    w_mid = (rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32)
    w_out = (rng.normal(size=(width, 3)) / np.sqrt(width)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "Win"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "Wmid"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "Wout"], ["z"]))
    nodes.append(helper.make_node("Softmax", ["z"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor("Win", TensorProto.FLOAT, w_in.shape, w_in.flatten().tolist()),
            helper.make_tensor("Wmid", TensorProto.FLOAT, w_mid.shape, w_mid.tobytes(), raw=True),
            helper.make_tensor("Wout", TensorProto.FLOAT, w_out.shape, w_out.flatten().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _five_features_onnx(path: Path) -> Path:
    """A classifier over five features: fed tiny's four, ONNX Runtime raises."""
    w = np.vstack([TINY_W, np.ones((1, 3), np.float32)])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        ],
        "five",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.flatten().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def odd_bundles(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]
) -> dict[str, Path]:
    """``heavy`` (slow) and ``five`` (refuses tiny's inputs), signed like any bundle."""
    work = tmp_path_factory.mktemp("odd")
    private = load_private_key(keys[0])
    out: dict[str, Path] = {}
    heavy = _heavy_onnx(work / "heavy.onnx")
    out["heavy"] = work / "tiny-heavy.bundle"
    build_bundle(
        out=out["heavy"],
        model_file=heavy,
        manifest={**TINY_MANIFEST, "version": "heavy"},
        test_inputs={"x": TEST_X[:2]},
        private_key=private,
        self_test={"atol": 1e-4},
    )
    five = _five_features_onnx(work / "five.onnx")
    out["five"] = work / "tiny-five.bundle"
    five_x = np.random.default_rng(5).normal(size=(4, 5)).astype(np.float32)
    build_bundle(
        out=out["five"],
        model_file=five,
        manifest={
            **TINY_MANIFEST,
            "version": "five",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 5]}],
        },
        test_inputs={"x": five_x},
        private_key=private,
        self_test={"atol": 1e-5},
    )
    return out


# ----------------------------------------------------------------- helpers


def oip_body(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }


async def infer(
    session: aiohttp.ClientSession, base: str, x: np.ndarray, version: str | None = None
) -> tuple[int, dict[str, Any]]:
    path = f"/v2/models/tiny/versions/{version}/infer" if version else "/v2/models/tiny/infer"
    async with session.post(base + path, json=oip_body(x)) as r:
        return r.status, await r.json()


def runner_of(agent: Any) -> ShadowRunner:
    runner: ShadowRunner = agent.app[DATA_PLANE].shadow
    return runner


def totals(agent: Any, active: str = "1") -> dict[str, Any]:
    doc = runner_of(agent).describe("tiny")
    assert doc is not None
    return dict(doc["compared_with"].get(active, {}))


def settled(t: dict[str, Any]) -> int:
    return int(
        t.get("compared", 0)
        + t.get("errors", 0)
        + t.get("dropped_queue", 0)
        + t.get("dropped_budget", 0)
    )


async def shadowed_agent(
    start_agent: Any,
    tmp_path: Path,
    keys: Any,
    active: Path,
    candidate: Path,
    version: str,
    shadow: dict[str, Any],
    sample_rate: float = 1.0,
) -> Any:
    """An agent serving ``active`` (tiny:1) with ``candidate`` installed (not active) and
    loaded by the registry as the shadow, as the sync does it."""
    agent = await start_agent(agent_config(tmp_path, keys, [active], runtime={"shadow": shadow}))
    registry = agent.app[SERVICES].registry
    await registry.install(candidate)
    assert registry.known_state("tiny").active == "1"
    await registry.load_shadow("tiny", version, sample_rate)
    return agent


def inputs(n: int, seed: int) -> list[np.ndarray]:
    """``n`` requests of 1-3 rows each."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(n)]


# ------------------------------------------------------------------- tests


async def test_agreement_figures_are_what_the_two_models_say(
    start_agent: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path
) -> None:
    agent = await shadowed_agent(
        start_agent,
        tmp_path,
        keys,
        make_tiny_bundle("1"),
        make_tiny_bundle("s2", weights=W2),
        "s2",
        ROOMY,
    )
    requests = inputs(60, seed=11)
    async with aiohttp.ClientSession() as session:
        for x in requests:
            status, doc = await infer(session, agent.base, x)
            assert (status, doc["model_version"]) == (200, "1")  # the shadow answers nothing
        # Not served, not activated: asking for it by name finds it installed, unloaded.
        status, doc = await infer(session, agent.base, requests[0], version="s2")
        assert status == 503 and "not loaded" in doc["error"]
        x = np.vstack(requests)
        await eventually(lambda: totals(agent).get("compared") == len(x), within=WITHIN)

        # Independently: the two models' softmax on the same rows.
        active, cand = tiny_reference(x, TINY_W), tiny_reference(x, W2)
        agree = active.argmax(axis=1) == cand.argmax(axis=1)
        delta = cand.max(axis=1) - active.max(axis=1)
        assert 0 < agree.sum() < len(x)  # the test means something either way

        (doc,) = runner_of(agent).take()
        record = protocol.ShadowStats.from_obj(doc)
        assert (record.model, record.version, record.candidate) == ("tiny", "1", "s2")
        assert record.task == "classification"
        assert (record.sampled, record.compared) == (len(x), len(x))
        assert record.agreed == int(agree.sum())
        assert (record.errors, record.dropped_queue, record.dropped_budget) == (0, 0, 0)
        assert record.conf_delta_sum == pytest.approx(float(delta.sum()), abs=1e-4)
        assert record.conf_delta_sumsq == pytest.approx(float((delta**2).sum()), abs=1e-4)
        assert record.candidate_latency_ms_sum > 0 and record.active_latency_ms_sum > 0
        assert runner_of(agent).take() == []  # a quiet window sends nothing

        async with session.get(f"{agent.base}/metrics") as r:
            text = await r.text()
        labels = 'model="tiny",version="1",candidate="s2"'
        assert f'edgefleet_shadow_items_total{{{labels},outcome="agreed"}} {agree.sum()}' in text
        disagreed = len(x) - int(agree.sum())
        assert f'edgefleet_shadow_items_total{{{labels},outcome="disagreed"}} {disagreed}' in text
        assert f"edgefleet_shadow_latency_ratio{{{labels}}}" in text

        async with session.get(f"{agent.base}/v1/models/tiny") as r:
            status_doc = await r.json()
        shadow = status_doc["shadow"]
        assert shadow["version"] == "s2" and shadow["sample_rate"] == 1.0
        seen = shadow["compared_with"]["1"]
        assert (seen["compared"], seen["agreed"]) == (len(x), int(agree.sum()))
        assert seen["agreement"] == pytest.approx(agree.mean(), abs=1e-6)
        row = {v["version"]: v for v in status_doc["versions"]}["s2"]
        assert (row["active"], row["loaded"], row["labels"]) == (False, False, [])


async def test_sample_rate_zero_runs_nothing_and_unload_stops_it(
    start_agent: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path
) -> None:
    agent = await shadowed_agent(
        start_agent,
        tmp_path,
        keys,
        make_tiny_bundle("1"),
        make_tiny_bundle("s2", weights=W2),
        "s2",
        ROOMY,
        sample_rate=0.0,
    )
    registry = agent.app[SERVICES].registry
    async with aiohttp.ClientSession() as session:
        for x in inputs(5, seed=1):
            assert (await infer(session, agent.base, x))[0] == 200
        await asyncio.sleep(0)
        assert totals(agent) == {}
        assert await registry.unload_shadow("tiny") is True
        assert registry.shadow_for("tiny") is None and runner_of(agent).describe("tiny") is None
        for x in inputs(3, seed=2):
            assert (await infer(session, agent.base, x))[0] == 200
        assert runner_of(agent).take() == []


async def test_disagreements_land_in_the_hard_example_store(
    start_agent: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path
) -> None:
    """No cloud configured: the runner opens the hard-example store itself."""
    agent = await shadowed_agent(
        start_agent,
        tmp_path,
        keys,
        make_tiny_bundle("1"),
        make_tiny_bundle("s2", weights=W2),
        "s2",
        ROOMY,
    )
    requests = inputs(30, seed=12)
    x = np.vstack(requests)
    active, cand = tiny_reference(x, TINY_W), tiny_reference(x, W2)
    differ = active.argmax(axis=1) != cand.argmax(axis=1)
    async with aiohttp.ClientSession() as session:
        for req in requests:
            assert (await infer(session, agent.base, req))[0] == 200
    await eventually(lambda: totals(agent).get("compared") == len(x), within=WITHIN)
    runner = runner_of(agent)
    await eventually(lambda: runner.hard_example_store is not None, within=WITHIN)
    store = runner.hard_example_store
    assert store is not None

    async def rows() -> list[dict[str, Any]]:
        return await store.list(model="tiny", limit=10_000)

    for _ in range(int(WITHIN / 0.05)):
        if len(await rows()) >= int(differ.sum()):
            break
        await asyncio.sleep(0.05)
    kept = await rows()
    assert len(kept) == int(differ.sum())
    assert {r["kind"] for r in kept} == {"shadow_disagreement"}
    assert {(r["version"], r["cloud_version"], r["status"]) for r in kept} == {
        ("1", "s2", "answered")
    }
    want = sorted(
        (int(a), int(c))
        for a, c in zip(active.argmax(axis=1)[differ], cand.argmax(axis=1)[differ], strict=True)
    )
    assert sorted((r["edge_class"], r["cloud_class"]) for r in kept) == want
    assert all(r["agree"] is False for r in kept)
    assert (tmp_path / "hard-examples.sqlite").exists()


async def test_a_slow_shadow_drops_and_counts_and_never_holds_an_answer(
    start_agent: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path, odd_bundles: Any
) -> None:
    """A candidate ~1000x the active's work, a queue of two: every answer comes back
    (from the active version) while the shadow drops what it cannot take."""
    agent = await shadowed_agent(
        start_agent,
        tmp_path,
        keys,
        make_tiny_bundle("1"),
        odd_bundles["heavy"],
        "heavy",
        {"queue_size": 2, "cpu_budget": 64},
    )
    n = 60
    rng = np.random.default_rng(4)
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(
            *(
                infer(session, agent.base, rng.normal(size=(1, 4)).astype(np.float32))
                for _ in range(n)
            )
        )
        assert [(s, d["model_version"]) for s, d in answers] == [(200, "1")] * n
        at_last_answer = totals(agent)
        # Every request was sampled when its answer left; the queue of two could not
        # hold them: the shadow dropped (and counted) the rest instead of holding up.
        assert at_last_answer["sampled"] == n
        assert at_last_answer["dropped_queue"] > 0
        assert at_last_answer["compared"] < n
        await eventually(lambda: settled(totals(agent)) == n, within=WITHIN)
        final = totals(agent)
        assert final["errors"] == 0 and final["compared"] >= 1
        async with session.get(f"{agent.base}/metrics") as r:
            text = await r.text()
        labels = 'model="tiny",version="1",candidate="heavy"'
        dropped = f'edgefleet_shadow_items_total{{{labels},outcome="dropped"}}'
        assert f"{dropped} {final['dropped_queue']}" in text
        assert 'edgefleet_shadow_cpu_seconds_total{model="tiny",candidate="heavy"}' in text


async def test_over_its_cpu_budget_the_shadow_drops_and_counts(
    start_agent: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path, odd_bundles: Any
) -> None:
    """A budget of 0.1% of a core over a one-minute window: the first item spends it
    (the heavy model takes milliseconds of CPU), the next ones are dropped."""
    agent = await shadowed_agent(
        start_agent,
        tmp_path,
        keys,
        make_tiny_bundle("1"),
        odd_bundles["heavy"],
        "heavy",
        {"queue_size": 1000, "cpu_budget": 0.0001, "budget_window_s": 60},
    )
    n = 20
    async with aiohttp.ClientSession() as session:
        for x in inputs(n, seed=9):
            status, doc = await infer(session, agent.base, x[:1])
            assert (status, doc["model_version"]) == (200, "1")
    await eventually(lambda: settled(totals(agent)) == n, within=WITHIN)
    t = totals(agent)
    assert t["compared"] >= 1 and t["dropped_budget"] >= 1
    assert t["compared"] + t["dropped_budget"] == n and t["dropped_queue"] == 0
    (doc,) = runner_of(agent).take()
    assert protocol.ShadowStats.from_obj(doc).dropped_budget == t["dropped_budget"]


async def test_a_shadow_that_raises_never_fails_an_answer(
    start_agent: Any,
    make_tiny_bundle: Any,
    keys: Any,
    tmp_path: Path,
    odd_bundles: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = await shadowed_agent(
        start_agent, tmp_path, keys, make_tiny_bundle("1"), odd_bundles["five"], "five", ROOMY
    )
    requests = inputs(12, seed=13)
    rows = sum(len(x) for x in requests)
    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.shadow"):
        async with aiohttp.ClientSession() as session:
            for x in requests:
                status, doc = await infer(session, agent.base, x)
                assert (status, doc["model_version"]) == (200, "1")
                want = tiny_reference(x, TINY_W)
                got = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(want.shape)
                np.testing.assert_allclose(got, want, atol=1e-5)
        await eventually(lambda: totals(agent).get("errors") == rows, within=WITHIN)
    assert totals(agent)["compared"] == 0
    failures = [r for r in caplog.records if "shadow tiny:five failed" in r.getMessage()]
    assert len(failures) == 1  # logged once, counted always
    (doc,) = runner_of(agent).take()
    assert protocol.ShadowStats.from_obj(doc).errors == rows


def test_detector_boxes_agree_by_count_and_iou() -> None:
    def det(box: tuple[float, float, float, float], cls: int = 0) -> Detection:
        return Detection(box=box, score=0.9, class_id=cls, keypoints=())

    a = [det((0.1, 0.1, 0.5, 0.5)), det((0.6, 0.6, 0.9, 0.9), 1)]
    moved = [det((0.6, 0.62, 0.9, 0.92), 1), det((0.12, 0.1, 0.52, 0.5))]
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3)
    assert boxes_agree(a, moved)  # order does not matter, small shifts do not either
    assert not boxes_agree(a, moved[:1])  # a box missing
    assert not boxes_agree(a, [moved[0], det((0.3, 0.3, 0.7, 0.7))])  # IoU under 0.5
    assert not boxes_agree(a, [det((0.6, 0.62, 0.9, 0.92), 0), moved[1]])  # another class
    assert boxes_agree([], [])


# ------------------------------------------------------- via the desired state


def fleet_section(port: int, tmp: Path) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "password": SECRET,
        "keepalive_s": 5,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "outbox": {"path": str(tmp / "outbox.sqlite")},
        "telemetry": {"flush_interval_s": 0.2, "ack_timeout_s": 5, "stats_interval_s": 0.3},
        "sync": {"retry_min_s": 0.05, "retry_max_s": 0.2, "download_attempts": 3},
    }


def bundle_entry(server: BundleServer, data: bytes, version: str, **extra: Any) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    return {
        "version": version,
        "url": server.add(f"tiny-{version}-{digest[:8]}.bundle", data),
        "sha256": digest,
        "size": len(data),
        **extra,
    }


def desired(revision: int, models: dict[str, Any]) -> bytes:
    doc = {"schema": 1, "device_id": DEV, "revision": revision, "models": models}
    return json.dumps(doc).encode()


@pytest.fixture
async def bundles(start_agent: Any) -> AsyncIterator[BundleServer]:
    server = await BundleServer(DEV, SECRET).start()
    yield server
    await server.stop()


@pytest.fixture
def peer(mosquitto: Mosquitto) -> Iterator[Peer]:
    p = Peer(mosquitto.port, "fleet-peer")
    for leaf in ("reported", "telemetry"):
        p.subscribe(topics.device_topic(DEV, leaf))
    yield p
    p.close()


def last_tiny(peer: Peer) -> dict[str, Any]:
    got = peer.received(topics.device_topic(DEV, "reported"))
    return json.loads(got[-1][1])["models"].get("tiny", {}) if got else {}


def shadow_records(peer: Peer) -> list[dict[str, Any]]:
    out = []
    for _, payload, _ in peer.received(topics.device_topic(DEV, "telemetry")):
        batch = json.loads(payload)
        out += [r["data"] for r in batch["records"] if r["kind"] == "shadow_stats"]
    return out


async def wait_for(check: Callable[[], bool], what: Callable[[], object]) -> None:
    try:
        await eventually(check, within=WITHIN)
    except TimeoutError:
        raise AssertionError(f"never happened; last: {what()}") from None


async def test_shadow_and_split_from_the_desired_state_end_to_end(
    mosquitto: Mosquitto,
    peer: Peer,
    start_agent: Any,
    bundles: BundleServer,
    make_tiny_bundle: Any,
    keys: Any,
    tmp_path: Path,
) -> None:
    """The fleet names a shadow candidate and a split; the agent downloads, verifies
    and loads both, reports them, compares live traffic, sends ``shadow_stats``; a
    desired without them unloads the shadow and ends the split."""
    v1 = make_tiny_bundle("1")
    s2 = make_tiny_bundle("s2", weights=W2).read_bytes()
    c3 = make_tiny_bundle("c3", weights=W2).read_bytes()
    cfg = agent_config(
        tmp_path,
        keys,
        [v1],
        device_id=DEV,
        fleet=fleet_section(mosquitto.port, tmp_path),
        runtime={"shadow": ROOMY},
    )
    agent = await start_agent(cfg)
    await wait_for(lambda: last_tiny(peer).get("active") == "1", lambda: last_tiny(peer))
    active = bundle_entry(bundles, v1.read_bytes(), "1")
    shadow = bundle_entry(bundles, s2, "s2", sample_rate=1.0)
    split = bundle_entry(bundles, c3, "c3", weight=0.5)
    peer.publish(
        topics.device_topic(DEV, "desired"),
        desired(1, {"tiny": {**active, "shadow": shadow, "split": split}}),
        retain=True,
    )
    await wait_for(
        lambda: (
            last_tiny(peer).get("shadow", {}).get("state") == "ready"
            and last_tiny(peer).get("split", {}).get("state") == "serving"
        ),
        lambda: last_tiny(peer),
    )
    report = last_tiny(peer)
    assert report["shadow"] == {"version": "s2", "state": "ready"}
    assert report["split"] == {
        "version": "c3",
        "weight": 0.5,
        "source": "fleet",
        "state": "serving",
    }
    assert report["active"] == "1" and report["state"] == "active"
    registry = agent.app[SERVICES].registry
    assert registry.known_state("tiny").active == "1"
    assert "s2" not in registry.loaded_versions("tiny")  # loaded as shadow only

    seen: set[str] = set()
    async with aiohttp.ClientSession() as session:
        for x in inputs(40, seed=21):
            status, doc = await infer(session, agent.base, x)
            assert status == 200
            seen.add(doc["model_version"])
        assert seen == {"1", "c3"}  # the split serves both
        await wait_for(lambda: totals(agent).get("compared", 0) > 0, lambda: totals(agent))
        await wait_for(lambda: bool(shadow_records(peer)), lambda: totals(agent))
        for rec in shadow_records(peer):
            ok = protocol.ShadowStats.from_obj(rec)
            assert (ok.model, ok.version, ok.candidate) == ("tiny", "1", "s2")
        async with session.get(f"{agent.base}/v1/fleet") as r:
            entry = (await r.json())["sync"]["models"]["tiny"]
        assert (entry["shadow"]["version"], entry["shadow_state"]) == ("s2", "ready")
        assert (entry["split"]["version"], entry["split_state"]) == ("c3", "serving")

        # The fleet drops both: the shadow unloads, every answer is the active one's.
        peer.publish(topics.device_topic(DEV, "desired"), desired(2, {"tiny": active}), True)
        await wait_for(
            lambda: "shadow" not in last_tiny(peer) and "split" not in last_tiny(peer),
            lambda: last_tiny(peer),
        )
        assert registry.shadow_for("tiny") is None and registry.split_for("tiny") is None
        for x in inputs(10, seed=22):
            status, doc = await infer(session, agent.base, x)
            assert (status, doc["model_version"]) == (200, "1")
    assert agent.app[FLEET].sync is not None


async def test_the_local_api_starts_and_ends_a_shadow(
    start_agent: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path
) -> None:
    agent = await start_agent(
        agent_config(tmp_path, keys, [make_tiny_bundle("1")], runtime={"shadow": ROOMY})
    )
    await agent.app[SERVICES].registry.install(make_tiny_bundle("s2", weights=W2))
    url = f"{agent.base}/v1/models/tiny/shadow"
    async with aiohttp.ClientSession() as session:
        for bad, status, message in (
            ({"version": "s2", "sample_rate": 2}, 400, "sample_rate"),
            ({"version": "s2", "sample_rate": True}, 400, "sample_rate"),
            ({"sample_rate": 0.5}, 400, "version"),
            ({"version": "1"}, 400, "active version"),
            ({"version": "9"}, 404, "9"),
        ):
            async with session.put(url, json=bad) as r:
                assert r.status == status and message in (await r.json())["error"]
        assert runner_of(agent).describe("tiny") is None
        async with session.put(url, json={"version": "s2", "sample_rate": 1}) as r:
            assert (r.status, await r.json()) == (
                200,
                {"name": "tiny", "version": "s2", "sample_rate": 1.0},
            )
        x = TEST_X[:3]
        assert (await infer(session, agent.base, x))[0] == 200
        await eventually(lambda: totals(agent).get("compared") == 3, within=WITHIN)
        async with session.delete(url) as r:
            assert (r.status, (await r.json())["ended"]) == (200, True)
        assert runner_of(agent).describe("tiny") is None


async def test_shadow_and_split_come_back_after_a_restart(
    mosquitto: Mosquitto,
    peer: Peer,
    start_agent: Any,
    bundles: BundleServer,
    make_tiny_bundle: Any,
    keys: Any,
    tmp_path: Path,
) -> None:
    """The retained desired is not applied again after a restart (its revision was
    processed): the sync's state file brings the candidates back, without a download."""
    v1 = make_tiny_bundle("1")
    s2 = make_tiny_bundle("s2", weights=W2).read_bytes()
    cfg = agent_config(
        tmp_path,
        keys,
        [v1],
        device_id=DEV,
        fleet=fleet_section(mosquitto.port, tmp_path),
        runtime={"shadow": ROOMY},
    )
    first = await start_agent(cfg)
    await wait_for(lambda: last_tiny(peer).get("active") == "1", lambda: last_tiny(peer))
    active = bundle_entry(bundles, v1.read_bytes(), "1")
    candidate = bundle_entry(bundles, s2, "s2")
    model = {
        **active,
        "shadow": {**candidate, "sample_rate": 1.0},
        "split": {**candidate, "weight": 1.0},
    }
    peer.publish(topics.device_topic(DEV, "desired"), desired(1, {"tiny": model}), retain=True)
    await wait_for(
        lambda: (
            last_tiny(peer).get("shadow", {}).get("state") == "ready"
            and last_tiny(peer).get("split", {}).get("state") == "serving"
        ),
        lambda: last_tiny(peer),
    )
    downloads = len(bundles.requests)
    await first.runner.cleanup()

    second = await start_agent(cfg)
    registry = second.app[SERVICES].registry
    await wait_for(
        lambda: registry.shadow_for("tiny") is not None and registry.split_for("tiny") is not None,
        lambda: last_tiny(peer),
    )
    assert len(bundles.requests) == downloads  # installed already: nothing fetched again
    async with aiohttp.ClientSession() as session:
        status, doc = await infer(session, second.base, TEST_X[:2])
        assert (status, doc["model_version"]) == (200, "s2")  # weight 1: the canary
        status, doc = await infer(session, second.base, TEST_X[:2], version="1")
        assert (status, doc["model_version"]) == (200, "1")
    await wait_for(lambda: totals(second).get("compared") == 2, lambda: totals(second))
    await wait_for(
        lambda: (
            last_tiny(peer).get("shadow", {}).get("state") == "ready"
            and last_tiny(peer).get("split", {}).get("weight") == 1.0
        ),
        lambda: last_tiny(peer),
    )


# ------------------------------------------------------------- a real detector

CACHE = Path(__file__).resolve().parents[2] / "models" / ".cache"


@pytest.fixture(scope="module")
def face_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, tuple[Path, Path]]:
    """The real face-detect bundle (BlazeFace, LiteRT) and a candidate of the same model
    that keeps only boxes scored 0.9999 or more, both signed with the build's keys."""
    from edgefleet.core.bundle.archive import read_bundle
    from edgefleet.core.bundle.selftest import load_vectors
    from edgefleet.core.bundle.signing import TrustStore
    from models import face_detect
    from models.recipe import BuildContext

    ctx = BuildContext.create(tmp_path_factory.mktemp("face") / "build", cache_dir=CACHE)
    [bundle] = face_detect.build(ctx)
    keys = (ctx.private_key_path, ctx.public_key_path)
    where = tmp_path_factory.mktemp("face-strict") / "x"
    got = read_bundle(bundle, where, TrustStore.from_files([keys[1]], False))
    doc = json.loads((got.directory / "manifest.json").read_text())
    assert doc["self_test"] is not None
    inputs, _ = load_vectors(got.directory / doc["self_test"]["file"])
    for key in ("model_file", "files", "self_test", "created_at", "created_by"):
        doc.pop(key, None)
    doc["version"] = "strict"
    doc["postprocessing"]["min_score"] = 0.9999
    strict = where.parent / "face-strict.bundle"
    build_bundle(
        out=strict,
        model_file=got.directory / got.manifest.model_file,
        manifest=doc,
        test_inputs=inputs,
        private_key=load_private_key(keys[0]),
        self_test={"atol": 1e-4},
    )
    return bundle, strict, keys


async def test_a_detector_candidate_is_compared_by_its_boxes(
    start_agent: Any, face_bundles: Any, tmp_path: Path
) -> None:
    """Same model, stricter score: on a photo with one face the candidate finds none
    (unless the face scores 0.9999), on a blank image both find none: the agreement is
    what the active version's own answer says it must be."""
    import cv2

    from models.sample_images import astronaut_rgb

    active, strict, keys = face_bundles
    agent = await start_agent(agent_config(tmp_path, keys, [active], runtime={"shadow": ROOMY}))
    registry = agent.app[SERVICES].registry
    await registry.install(strict)
    version = registry.known_state("face-detect").active
    assert version is not None
    await registry.load_shadow("face-detect", "strict", 1.0)
    photo = cv2.imencode(".png", cv2.cvtColor(astronaut_rgb(CACHE), cv2.COLOR_RGB2BGR))[1]
    blank = cv2.imencode(".png", np.full((128, 128, 3), 127, np.uint8))[1]
    answers = []
    async with aiohttp.ClientSession() as session:
        for image in (photo, blank):
            url = f"{agent.base}/v1/predict/face-detect"
            async with session.post(url, data=image.tobytes()) as r:
                assert r.status == 200, await r.text()
                answers.append(await r.json())
    faces, none = answers
    assert len(faces["detections"]) == 1 and none["detections"] == []
    strict_keeps_it = faces["detections"][0]["confidence"] >= 0.9999
    runner = runner_of(agent)

    def seen() -> dict[str, Any]:
        doc = runner.describe("face-detect")
        assert doc is not None
        return dict(doc["compared_with"].get(version, {}))

    await eventually(lambda: seen().get("compared") == 2, within=WITHIN)
    assert seen()["agreed"] == 1 + int(strict_keeps_it)
    assert seen()["task"] == "detection" and seen()["errors"] == 0

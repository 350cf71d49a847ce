"""Activation, self-test swap, labels, rollback, pruning and restarts — real ONNX models,
real store on disk, real HTTP."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests.support.tiny import (
    TEST_X,
    W2,
    agent_config,
    broken_bundle,
    tiny_reference,
)


async def infer(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    body = {
        "inputs": [
            {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": TEST_X[:2].ravel().tolist()}
        ]
    }
    async with session.post(url, json=body) as r:
        return r.status, await r.json()


async def upload(session, base, bundle: Path, activate: bool = True) -> tuple[int, dict]:
    params = {"activate": "1"} if activate else {}
    async with session.post(f"{base}/v1/bundles", data=bundle.read_bytes(), params=params) as r:
        return r.status, await r.json()


async def test_new_version_swaps_in_and_old_one_retires(
    start_agent, make_tiny_bundle, keys, tmp_path
):
    agent = await start_agent(agent_config(tmp_path, keys, [make_tiny_bundle("1")]))
    async with aiohttp.ClientSession() as s:
        url = f"{agent.base}/v2/models/tiny/infer"
        status, doc = await infer(s, url)
        assert (status, doc["model_version"]) == (200, "1")
        np.testing.assert_allclose(
            doc["outputs"][0]["data"], tiny_reference(TEST_X[:2]).ravel(), rtol=1e-5
        )

        # Requests keep flowing while version 2 is installed, loaded and self-tested.
        async def hammer() -> list[int]:
            return [(await infer(s, url))[0] for _ in range(30)]

        traffic = asyncio.create_task(hammer())
        status, doc = await upload(s, agent.base, make_tiny_bundle("2", weights=W2))
        assert status == 201 and doc["active"] is True
        assert set(await traffic) == {200}

        status, doc = await infer(s, url)
        assert doc["model_version"] == "2"
        np.testing.assert_allclose(
            doc["outputs"][0]["data"], tiny_reference(TEST_X[:2], W2).ravel(), rtol=1e-5
        )
        async with s.get(f"{agent.base}/v1/models/tiny") as r:
            model = await r.json()
        assert (model["active"], model["previous"]) == ("2", "1")
        assert [v["loaded"] for v in model["versions"]] == [False, True]


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("selftest", "self-test: output 'probs' differs"),
        ("unloadable", "cannot load model.onnx"),
    ],
)
async def test_failed_activation_keeps_the_old_version(
    start_agent, make_tiny_bundle, keys, tmp_path, kind, reason
):
    agent = await start_agent(agent_config(tmp_path, keys, [make_tiny_bundle("1")]))
    async with aiohttp.ClientSession() as s:
        status, doc = await upload(s, agent.base, broken_bundle(tmp_path, keys, "9", kind))
        assert status == 503, doc
        assert reason in doc["error"]
        status, doc = await infer(s, f"{agent.base}/v2/models/tiny/infer")
        assert (status, doc["model_version"]) == (200, "1")
        async with s.get(f"{agent.base}/v1/models/tiny") as r:
            model = await r.json()
        assert model["active"] == "1"
        assert reason in model["last_error"]
        async with s.get(f"{agent.base}/metrics") as r:
            assert 'edgefleet_activations_total{model="tiny",result="failed"} 1' in await r.text()


async def test_restart_keeps_active_version_labels_and_rollback(
    start_agent, make_tiny_bundle, keys, tmp_path
):
    config = agent_config(tmp_path, keys, [make_tiny_bundle("1")])
    agent = await start_agent(config)
    async with aiohttp.ClientSession() as s:
        await upload(s, agent.base, make_tiny_bundle("2", weights=W2))
        await upload(s, agent.base, make_tiny_bundle("3"), activate=False)
        async with s.put(f"{agent.base}/v1/models/tiny/labels/canary", json={"version": "3"}) as r:
            assert r.status == 200
        status, doc = await infer(s, f"{agent.base}/v2/models/tiny/versions/canary/infer")
        assert doc["model_version"] == "3"
        status, doc = await infer(s, f"{agent.base}/v2/models/tiny/versions/1/infer")
        assert status == 503 and "installed but not loaded" in doc["error"]
        status, doc = await infer(s, f"{agent.base}/v2/models/tiny/versions/nope/infer")
        assert status == 404
    await agent.runner.cleanup()

    # Same store, fresh process state: version 2 still active, canary still 3.
    again = await start_agent(config)
    async with aiohttp.ClientSession() as s:
        assert (await infer(s, f"{again.base}/v2/models/tiny/infer"))[1]["model_version"] == "2"
        assert (await infer(s, f"{again.base}/v2/models/tiny/versions/canary/infer"))[1][
            "model_version"
        ] == "3"
        async with s.post(f"{again.base}/v1/models/tiny/rollback") as r:
            assert (await r.json())["active"] == "1"
        assert (await infer(s, f"{again.base}/v2/models/tiny/infer"))[1]["model_version"] == "1"
    state = json.loads((tmp_path / "store" / "tiny" / ".state.json").read_text())
    assert (state["active"], state["previous"], state["labels"]) == ("1", "2", {"canary": "3"})


async def test_only_the_last_versions_are_kept(start_agent, make_tiny_bundle, keys, tmp_path):
    config = agent_config(tmp_path, keys, [make_tiny_bundle("1")], store={"keep_versions": 2})
    agent = await start_agent(config)
    async with aiohttp.ClientSession() as s:
        for v in ("2", "3", "4"):
            assert (await upload(s, agent.base, make_tiny_bundle(v)))[0] == 201
    on_disk = sorted(p.name for p in (tmp_path / "store" / "tiny").iterdir() if p.is_dir())
    assert on_disk == ["3", "4"]  # 4 active, 3 previous (for rollback)


async def test_a_bad_configured_bundle_does_not_stop_the_others(
    start_agent, make_tiny_bundle, keys, tmp_path
):
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"garbage")
    agent = await start_agent(agent_config(tmp_path, keys, [junk, make_tiny_bundle("1")]))
    async with aiohttp.ClientSession() as s:
        assert (await infer(s, f"{agent.base}/v2/models/tiny/infer"))[0] == 200
        async with s.get(f"{agent.base}/v2/health/ready") as r:
            assert r.status == 200


async def test_versions_are_immutable(start_agent, make_tiny_bundle, keys, tmp_path):
    first = make_tiny_bundle("1")
    same = tmp_path / "same.bundle"  # byte-identical copy (a rebuild has a new created_at)
    same.write_bytes(first.read_bytes())
    agent = await start_agent(agent_config(tmp_path, keys, [first]))
    async with aiohttp.ClientSession() as s:
        status, doc = await upload(s, agent.base, same, activate=False)
        assert status == 201  # the same bundle again: a no-op
        status, doc = await upload(s, agent.base, make_tiny_bundle("1", weights=W2))
        assert status == 400 and "already installed with different contents" in doc["error"]
        status, doc = await infer(s, f"{agent.base}/v2/models/tiny/infer")
        np.testing.assert_allclose(
            doc["outputs"][0]["data"], tiny_reference(TEST_X[:2]).ravel(), rtol=1e-5
        )

"""The model store after crashes and upgrades, and readiness with models that do not
serve: real agent processes (tests/support/agent_process.py) or real in-process agents
on loopback, real stores on disk, real ONNX models.

- crash leftovers: upload spool files and orphan version directories (a kill during
  pruning) are cleaned when the store opens; reinstalling such a version registers it;
- store metadata lives under a dot-name: a version named ``state.json`` is just a
  version, and a store of the old layout is migrated;
- readiness: a model without an active version (never activated, or refused) is
  reported, not fatal, also after a restart; bad configured bundles are skipped.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from edgefleet.agent.server.context import SERVICES
from edgefleet.agent.store import STATE_FILE, ModelStore
from edgefleet.core.bundle.archive import write_bundle
from edgefleet.core.bundle.selftest import save_vectors
from edgefleet.core.bundle.signing import TrustStore, load_private_key
from tests.support.agent_process import AgentProcess
from tests.support.brokers import free_port
from tests.support.hostile_bundles import MALFORMED_SIGNATURES, with_members
from tests.support.tiny import (
    TEST_X,
    TINY_MANIFEST,
    W2,
    agent_config,
    tiny_reference,
    write_tiny_onnx,
)


def other_bundle(tmp: Path, keys: tuple[Path, Path], version: str, broken: bool = False) -> Path:
    """Model ``other`` (the tiny network under another name); ``broken``: its
    self-test expects other answers, so every activation of it is refused."""
    work = tmp / f"other-{version}-{broken}"
    work.mkdir()
    model = write_tiny_onnx(work / "model.onnx")
    expected = tiny_reference(TEST_X)
    if broken:
        expected = expected[:, ::-1].copy()
    save_vectors(work / "selftest.npz", {"x": TEST_X}, {"probs": expected})
    out = tmp / f"other-{version}{'-broken' if broken else ''}.bundle"
    doc = {
        **TINY_MANIFEST,
        "name": "other",
        "version": version,
        "model_file": "model.onnx",
        "self_test": {"file": "selftest.npz", "atol": 1e-5},
    }
    files = {"model.onnx": model, "selftest.npz": work / "selftest.npz"}
    write_bundle(out, doc, files, load_private_key(keys[0]))
    return out


def process_config(tmp: Path, keys: tuple[Path, Path], bundles: list[Path], **store: Any) -> dict:
    return {
        "store": {"path": str(tmp / "store"), **store},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(b)} for b in bundles],
        "runtime": {"executor_threads": 1},
    }


def call(method: str, url: str, body: bytes | None = None) -> tuple[int, Any]:
    kind = "application/octet-stream" if "/v1/bundles" in url else "application/json"
    headers = {"Content-Type": kind} if body is not None else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def infer_version(base: str, model: str = "tiny") -> tuple[int, Any]:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    status, doc = call("POST", f"{base}/v2/models/{model}/infer", json.dumps(body).encode())
    return status, doc.get("model_version", doc)


def state_file(store: Path, model: str = "tiny") -> Path:
    return store / model / STATE_FILE


# ---- crash leftovers (finding 10) ------------------------------------------------


def test_upload_spool_leftovers_are_removed_on_start(tmp_path, keys, make_tiny_bundle):
    spool = tmp_path / "store" / ".uploads"
    spool.mkdir(parents=True)
    for i in range(3):  # what three uploads cut by a kill leave behind
        (spool / f"tmp{i}.bundle").write_bytes(b"\0" * 100_000)
    agent = AgentProcess(
        process_config(tmp_path, keys, [make_tiny_bundle("1")]), tmp_path, free_port()
    )
    try:
        assert not spool.exists() or not any(spool.iterdir())
        assert infer_version(agent.base) == (200, "1")
    finally:
        agent.stop()


def kill_during_prune(store: Path, version: str) -> None:
    """What a kill between prune's two steps leaves: the state no longer lists
    ``version`` (written first), its directory is still there, half deleted."""
    path = state_file(store)
    state = json.loads(path.read_text())
    state["installed"].remove(version)
    path.write_text(json.dumps(state))
    (store / "tiny" / version / "model.onnx").unlink()


def test_an_orphan_left_by_a_kill_during_pruning_is_removed_and_can_be_reinstalled(
    tmp_path, keys, make_tiny_bundle
):
    store = tmp_path / "store"
    v1, v2, v3 = make_tiny_bundle("1"), make_tiny_bundle("2", weights=W2), make_tiny_bundle("3")
    config = process_config(tmp_path, keys, [v1])
    agent = AgentProcess(config, tmp_path, free_port())
    try:
        for v in (v2, v3):  # 3 active, 2 previous: 1 is the one a prune would delete
            assert call("POST", f"{agent.base}/v1/bundles?activate=1", v.read_bytes())[0] == 201
    finally:
        agent.stop()
    kill_during_prune(store, "1")

    config["models"] = []  # the agent does not reinstall version 1 by itself
    agent = AgentProcess(config, tmp_path, free_port())
    try:
        assert not (store / "tiny" / "1").exists()  # removed when the store opened
        assert infer_version(agent.base) == (200, "3")
        status, doc = call("POST", f"{agent.base}/v1/bundles", v1.read_bytes())
        assert (status, doc["version"]) == (201, "1")
        status, model = call("GET", f"{agent.base}/v1/models/tiny")
        assert [v["version"] for v in model["versions"]] == ["2", "3", "1"]
        status, doc = call("POST", f"{agent.base}/v1/models/tiny/versions/1/activate")
        assert status == 200, doc
        assert infer_version(agent.base) == (200, "1")
    finally:
        agent.stop()


def test_install_replaces_an_orphan_instead_of_answering_installed(
    make_tiny_bundle, keys, tmp_path
):
    """In a running agent too (no reopen in between): a version directory no state
    lists is not an installed version."""
    store = ModelStore(tmp_path / "store", TrustStore.from_files([keys[1]]))
    store.install(make_tiny_bundle("1"))
    store.install(make_tiny_bundle("2", weights=W2))
    kill_during_prune(tmp_path / "store", "1")
    manifest = store.install(make_tiny_bundle("1"))
    assert manifest.version == "1"
    assert store.state("tiny").installed == ["2", "1"]
    assert (store.version_dir("tiny", "1") / "model.onnx").is_file()


def test_a_version_listed_in_the_state_is_never_removed_on_start(make_tiny_bundle, keys, tmp_path):
    trust = TrustStore.from_files([keys[1]])
    store = ModelStore(tmp_path / "store", trust)
    for v in ("1", "2", "3"):
        store.install(make_tiny_bundle(v))
    state = store.state("tiny")
    state.installed.remove("1")
    state.labels["old"] = "1"  # pinned by a label only: still the state's
    store.save_state("tiny", state)
    (tmp_path / "store" / "tiny" / ".scratch").mkdir()  # dot-names are the store's own
    ModelStore(tmp_path / "store", trust)
    assert sorted(p.name for p in (tmp_path / "store" / "tiny").iterdir()) == [
        ".scratch",
        ".state.json",
        "1",
        "2",
        "3",
    ]


# ---- store metadata out of the version namespace (finding 12) --------------------


async def test_a_version_named_state_json_is_just_a_version(
    start_agent, make_tiny_bundle, keys, tmp_path
):
    config = agent_config(tmp_path, keys, [make_tiny_bundle("1")])
    agent = await start_agent(config)
    odd = make_tiny_bundle("state.json", weights=W2)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{agent.base}/v1/bundles", data=odd.read_bytes(), params={"activate": "1"}
        ) as r:
            assert r.status == 201, await r.text()
        async with s.get(f"{agent.base}/v1/models/tiny") as r:
            model = await r.json()
        assert (model["active"], model["previous"]) == ("state.json", "1")
    await agent.runner.cleanup()

    again = await start_agent(config)  # the model survives a restart whole
    async with aiohttp.ClientSession() as s:
        body = {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "data": TEST_X[:2].ravel().tolist(),
                }
            ]
        }
        async with s.post(f"{again.base}/v2/models/tiny/infer", json=body) as r:
            doc = await r.json()
        assert doc["model_version"] == "state.json"
        np.testing.assert_allclose(
            doc["outputs"][0]["data"], tiny_reference(TEST_X[:2], W2).ravel(), rtol=1e-5
        )
        async with s.post(f"{again.base}/v1/models/tiny/rollback") as r:
            assert (await r.json())["active"] == "1"


async def test_a_store_of_the_old_layout_is_migrated(start_agent, make_tiny_bundle, keys, tmp_path):
    store = tmp_path / "store"
    config = agent_config(tmp_path, keys, [make_tiny_bundle("1")])
    agent = await start_agent(config)
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{agent.base}/v1/bundles",
            data=make_tiny_bundle("2", weights=W2).read_bytes(),
            params={"activate": "1"},
        ) as r:
            assert r.status == 201
        async with s.put(f"{agent.base}/v1/models/tiny/labels/stable", json={"version": "1"}) as r:
            assert r.status == 200
    await agent.runner.cleanup()
    # The layout every store had before: <model>/state.json.
    for model in ("tiny",):
        new = store / model / ".state.json"
        if new.exists():
            new.rename(store / model / "state.json")
    old_state = json.loads((store / "tiny" / "state.json").read_text())

    again = await start_agent(config)
    assert not (store / "tiny" / "state.json").exists()
    assert json.loads((store / "tiny" / ".state.json").read_text()) == old_state
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{again.base}/v1/models/tiny") as r:
            model = await r.json()
    assert (model["active"], model["previous"], model["labels"]) == ("2", "1", {"stable": "1"})
    assert [v["version"] for v in model["versions"]] == ["1", "2"]


# ---- readiness (finding 9) -------------------------------------------------------


async def ready(s: aiohttp.ClientSession, base: str) -> tuple[int, dict]:
    async with s.get(f"{base}/v2/health/ready") as r:
        return r.status, await r.json()


async def test_a_model_installed_but_not_activated_does_not_make_the_agent_unready(
    start_agent, make_tiny_bundle, keys, tmp_path
):
    agent = await start_agent(agent_config(tmp_path, keys, [make_tiny_bundle("1")]))
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{agent.base}/v1/bundles", data=other_bundle(tmp_path, keys, "1").read_bytes()
        ) as r:
            assert r.status == 201
        assert (await ready(s, agent.base))[0] == 200
        async with s.get(f"{agent.base}/v1/models/other") as r:
            other = await r.json()
        assert other["active"] is None and [v["version"] for v in other["versions"]] == ["1"]
        registry = agent.app[SERVICES].registry
        assert registry.ready() and registry.unready_models() == []


def test_a_refused_new_model_does_not_make_the_agent_unready_even_after_a_restart(
    tmp_path, keys, make_tiny_bundle
):
    config = process_config(
        tmp_path, keys, [make_tiny_bundle("1"), other_bundle(tmp_path, keys, "1", broken=True)]
    )
    for _ in range(2):  # first start, then a restart on the same store
        agent = AgentProcess(config, tmp_path, free_port())  # waits for /v2/health/ready
        try:
            assert infer_version(agent.base) == (200, "1")
            status, other = call("GET", f"{agent.base}/v1/models/other")
            assert status == 200 and other["active"] is None
            assert "self-test" in other["last_error"]
            assert call("POST", f"{agent.base}/v2/models/other/infer", b"{}")[0] in (400, 503)
        finally:
            agent.stop()


async def test_an_active_version_that_no_longer_loads_still_makes_the_agent_unready(
    start_agent, make_tiny_bundle, keys, tmp_path
):
    """The rule's other half: a model that has an active version must serve it."""
    config = agent_config(tmp_path, keys, [make_tiny_bundle("1")])
    agent = await start_agent(config)
    await agent.runner.cleanup()
    (tmp_path / "store" / "tiny" / "1" / "model.onnx").write_bytes(b"not a model")
    again = await start_agent(config)
    async with aiohttp.ClientSession() as s:
        status, doc = await ready(s, again.base)
    assert status == 503 and "tiny" in doc["error"]
    assert again.app[SERVICES].registry.unready_models() == ["tiny"]


# ---- bad configured bundles (finding 8) ------------------------------------------


@pytest.fixture
def bad_signature_bundles(make_tiny_bundle, tmp_path) -> list[Path]:
    good = make_tiny_bundle("1")
    return [
        with_members(
            good, tmp_path / f"bad-sig-{i}.bundle", {"manifest.sig": MALFORMED_SIGNATURES[kind]}
        )
        for i, kind in enumerate(("key_id a list", "deeply nested", "not an object"))
    ]


def test_bad_configured_bundles_are_skipped_and_the_others_serve(
    tmp_path, keys, make_tiny_bundle, bad_signature_bundles
):
    config = process_config(tmp_path, keys, [*bad_signature_bundles, make_tiny_bundle("1")])
    agent = AgentProcess(config, tmp_path, free_port())  # waits for /v2/health/ready
    try:
        assert infer_version(agent.base) == (200, "1")
    finally:
        agent.stop()
    log = (tmp_path / "agent.log").read_text()
    for bundle in bad_signature_bundles:
        assert f"configured bundle {bundle} skipped: manifest.sig is malformed" in log
    assert "Traceback" not in log


async def test_bad_configured_bundles_are_reported(
    start_agent, make_tiny_bundle, keys, tmp_path, bad_signature_bundles
):
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"garbage")
    missing = tmp_path / "missing.bundle"
    bundles = [*bad_signature_bundles, junk, missing, make_tiny_bundle("1")]
    agent = await start_agent(agent_config(tmp_path, keys, bundles))
    errors = agent.app[SERVICES].registry.config_errors
    assert sorted(errors) == sorted(str(b) for b in [*bad_signature_bundles, junk, missing])
    assert all("manifest.sig is malformed" in errors[str(b)] for b in bad_signature_bundles)
    assert "not a readable bundle" in errors[str(junk)]
    assert "not a readable bundle" in errors[str(missing)]
    async with aiohttp.ClientSession() as s:
        assert (await ready(s, agent.base))[0] == 200
        # ...and says so to whoever manages the box, not only in its log.
        async with s.get(f"{agent.base}/v1/models") as r:
            assert (await r.json())["config_errors"] == errors

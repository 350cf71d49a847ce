"""Traffic split on the device (agent/split.py, issue 11 part 2), with a real agent,
real ONNX models (tiny:1 and a canary that answers differently) and real HTTP.

The fleet's desired ``split`` end to end over Mosquitto is in tests/agent/test_shadow.py
(``test_shadow_and_split_from_the_desired_state_end_to_end``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from edgefleet.agent.server.context import SERVICES
from edgefleet.agent.split import MAX_ROUTING_KEY, Split, key_point, to_canary
from tests.support.tiny import W2, agent_config

X = [0.5, -1.0, 0.25, 2.0]


def body(routing_key: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X}]
    }
    if routing_key is not None:
        doc["parameters"] = {"routing_key": routing_key}
    return doc


async def version_of(
    session: aiohttp.ClientSession,
    base: str,
    *,
    param: str | None = None,
    header: str | None = None,
    query: str | None = None,
    version: str | None = None,
) -> str:
    path = f"/v2/models/tiny/versions/{version}/infer" if version else "/v2/models/tiny/infer"
    headers = {"X-Routing-Key": header} if header is not None else None
    params = {"routing_key": query} if query is not None else None
    async with session.post(base + path, json=body(param), headers=headers, params=params) as r:
        doc = await r.json()
        assert r.status == 200, doc
        return str(doc["model_version"])


@pytest.fixture
async def agent(start_agent: Any, make_tiny_bundle: Any, keys: Any, tmp_path: Path) -> Any:
    """tiny:1 active, tiny:c2 (answers differently) installed."""
    running = await start_agent(agent_config(tmp_path, keys, [make_tiny_bundle("1")]))
    await running.app[SERVICES].registry.install(make_tiny_bundle("c2", weights=W2))
    return running


async def put_split(session: aiohttp.ClientSession, base: str, doc: Any) -> tuple[int, Any]:
    async with session.put(f"{base}/v1/models/tiny/split", json=doc) as r:
        return r.status, await r.json()


def within_binomial(k: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


async def test_weight_lands_within_a_binomial_bound(agent: Any) -> None:
    n, weight = 2000, 0.3
    async with aiohttp.ClientSession() as session:
        status, doc = await put_split(session, agent.base, {"version": "c2", "weight": weight})
        assert (status, doc) == (
            200,
            {"name": "tiny", "version": "c2", "weight": weight, "source": "local"},
        )
        versions: list[str] = []
        for _ in range(n // 50):
            versions += await asyncio.gather(*(version_of(session, agent.base) for _ in range(50)))
        canary = versions.count("c2")
        assert versions.count("1") + canary == n
        assert within_binomial(canary, n, weight), canary

        # A request that names a version gets it, whatever the split.
        assert await version_of(session, agent.base, version="1") == "1"
        assert await version_of(session, agent.base, version="c2") == "c2"

        async with session.get(f"{agent.base}/v1/models/tiny") as r:
            shown = (await r.json())["split"]
        assert shown == {"version": "c2", "weight": weight, "source": "local"}

        # Ended: every answer is the active version's again, the canary unloads.
        async with session.delete(f"{agent.base}/v1/models/tiny/split") as r:
            assert (r.status, (await r.json())["ended"]) == (200, True)
        after = await asyncio.gather(*(version_of(session, agent.base) for _ in range(30)))
        assert set(after) == {"1"}
        assert "c2" not in agent.app[SERVICES].registry.loaded_versions("tiny")


async def test_the_same_routing_key_always_gets_the_same_version(agent: Any) -> None:
    weight = 0.4
    keys = [f"camera-{i}" for i in range(150)]
    async with aiohttp.ClientSession() as session:
        assert (await put_split(session, agent.base, {"version": "c2", "weight": weight}))[0] == 200
        by_key: dict[str, set[str]] = {}
        for key in keys:
            # The same key three ways: OIP parameter, header, query string; twice each.
            got = await asyncio.gather(
                version_of(session, agent.base, param=key),
                version_of(session, agent.base, header=key),
                version_of(session, agent.base, query=key),
                version_of(session, agent.base, param=key),
                version_of(session, agent.base, header=key),
            )
            by_key[key] = set(got)
    assert all(len(v) == 1 for v in by_key.values()), by_key
    # Independently: blake2b-64 of "<model>\0<key>" as a fraction of 2^64, under the weight.
    for key, (version,) in by_key.items():
        digest = hashlib.blake2b(f"tiny\x00{key}".encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") / 2**64
        assert version == ("c2" if point < weight else "1"), key
    canary = sum(1 for v in by_key.values() if v == {"c2"})
    assert 0 < canary < len(keys) and within_binomial(canary, len(keys), weight)


async def test_the_image_endpoint_routes_by_key_too(agent: Any, tmp_path: Path) -> None:
    """The routing key is read (and checked) before the image is: a bad one is a 400
    that names it, whatever the body."""
    image = b"\x89PNG\r\n\x1a\n not really an image"
    async with aiohttp.ClientSession() as session:
        assert (await put_split(session, agent.base, {"version": "c2", "weight": 0.5}))[0] == 200
        url = f"{agent.base}/v1/predict/tiny"
        async with session.post(url, data=image, params={"routing_key": ""}) as r:
            assert r.status == 400
            assert "routing_key" in (await r.json())["error"]
        long_key = "k" * (MAX_ROUTING_KEY + 1)
        async with session.post(url, data=image, headers={"X-Routing-Key": long_key}) as r:
            assert r.status == 400
            assert "X-Routing-Key" in (await r.json())["error"]


@pytest.mark.parametrize(
    ("doc", "status", "message"),
    [
        ({"version": "c2", "weight": 1.5}, 400, "not in 0..1"),
        ({"version": "c2", "weight": -0.1}, 400, "not in 0..1"),
        ({"version": "c2", "weight": True}, 400, "number 'weight'"),
        ({"version": "c2", "weight": "0.5"}, 400, "number 'weight'"),
        ({"version": "c2"}, 400, "number 'weight'"),
        ({"weight": 0.5}, 400, "string 'version'"),
        ({"version": "1", "weight": 0.5}, 400, "is the active version"),
        ({"version": "9", "weight": 0.5}, 404, "9"),
        ([1, 2], 400, "object"),
    ],
)
async def test_bad_split_requests_are_refused_precisely(
    agent: Any, doc: Any, status: int, message: str
) -> None:
    async with aiohttp.ClientSession() as session:
        got, answer = await put_split(session, agent.base, doc)
        assert got == status and message in answer["error"], answer
        # Nothing changed: every answer is still the active version's.
        assert {await version_of(session, agent.base) for _ in range(10)} == {"1"}
    assert agent.app[SERVICES].registry.split_for("tiny") is None


async def test_bad_routing_keys_are_refused_only_while_a_split_is_on(agent: Any) -> None:
    async with aiohttp.ClientSession() as session:
        url = f"{agent.base}/v2/models/tiny/infer"
        bad = {**body(), "parameters": {"routing_key": 17}}
        async with session.post(url, json=bad) as r:
            assert r.status == 200  # no split: the key is never read
        assert (await put_split(session, agent.base, {"version": "c2", "weight": 0.5}))[0] == 200
        async with session.post(url, json=bad) as r:
            assert r.status == 400
            assert "routing_key" in (await r.json())["error"]


def test_split_points_are_fixed_per_key_and_monotone_in_the_weight() -> None:
    rng = np.random.default_rng(0)
    r = random.Random(1)
    for key in (f"till-{i}" for i in range(200)):
        u = key_point("m", key)
        assert 0.0 <= u < 1.0 and u == key_point("m", key)
        low, high = Split("2", 0.1), Split("2", 0.5)
        # Raising the weight only moves keys to the canary.
        assert not to_canary(low, "m", key, r) or to_canary(high, "m", key, r)
    assert not to_canary(Split("2", 0.0), "m", None, r)
    assert to_canary(Split("2", 1.0), "m", None, r)
    with pytest.raises(ValueError):
        Split("2", float(rng.uniform(1.01, 2)))

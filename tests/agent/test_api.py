"""The local API over real HTTP: OIP JSON and binary, repository extension, metrics,
and every kind of bad input, each followed by proof that the agent still serves."""

from __future__ import annotations

import asyncio
import struct

import aiohttp
import numpy as np
import orjson
import pytest

from tests.support.tiny import TEST_X, agent_config, tiny_reference

HL = "Inference-Header-Content-Length"


@pytest.fixture
async def agent(start_agent, make_tiny_bundle, keys, tmp_path):
    return await start_agent(
        agent_config(tmp_path, keys, [make_tiny_bundle("1")], server={"max_body_bytes": 64 * 1024})
    )


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def tensor(data: np.ndarray, name: str = "x", datatype: str = "FP32") -> dict:
    return {
        "name": name,
        "shape": list(data.shape),
        "datatype": datatype,
        "data": data.ravel().tolist(),
    }


async def still_serves(session, agent) -> None:
    body = {"inputs": [tensor(TEST_X[:1])]}
    async with session.post(f"{agent.base}/v2/models/tiny/infer", json=body) as r:
        assert r.status == 200, await r.text()


async def test_health_server_and_model_metadata(session, agent):
    async with session.get(f"{agent.base}/v2/health/live") as r:
        assert r.status == 200
    async with session.get(f"{agent.base}/v2") as r:
        doc = await r.json()
    assert "binary_tensor_data" in doc["extensions"]
    async with session.get(f"{agent.base}/v2/models/tiny/versions/1") as r:
        meta = await r.json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["parameters"]["provider"] == "CPUExecutionProvider"
    assert meta["parameters"]["self_test"] == "passed 8 vectors"
    async with session.get(f"{agent.base}/v2/models/tiny/ready") as r:
        assert (await r.json())["ready"] is True
    async with session.get(f"{agent.base}/openapi.json") as r:
        spec = await r.json()
    assert "/v2/models/{model}/infer" in spec["paths"]


async def test_json_inference_says_who_answered(session, agent):
    body = {"id": "req-7", "inputs": [tensor(TEST_X)]}
    async with session.post(f"{agent.base}/v2/models/tiny/infer", json=body) as r:
        doc = await r.json()
    assert doc["id"] == "req-7"
    assert (doc["model_name"], doc["model_version"]) == ("tiny", "1")
    assert doc["parameters"]["source"] == "edge"
    assert doc["parameters"]["latency_ms"] > 0
    out = doc["outputs"][0]
    assert out["shape"] == [8, 3]
    np.testing.assert_allclose(
        np.array(out["data"]).reshape(8, 3), tiny_reference(TEST_X), rtol=1e-5
    )


async def test_binary_tensor_extension_both_ways(session, agent):
    raw = TEST_X.tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [8, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [{"name": "probs", "parameters": {"binary_data": True}}],
        }
    )
    async with session.post(
        f"{agent.base}/v2/models/tiny/infer",
        data=header + raw,
        headers={HL: str(len(header)), "Content-Type": "application/octet-stream"},
    ) as r:
        assert r.status == 200
        n = int(r.headers[HL])
        body = await r.read()
    head = orjson.loads(body[:n])
    out = head["outputs"][0]
    assert out["parameters"]["binary_data_size"] == 8 * 3 * 4
    probs = np.frombuffer(body[n:], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(probs, tiny_reference(TEST_X), rtol=1e-5)


async def test_repository_extension(session, agent):
    async with session.post(f"{agent.base}/v2/repository/index") as r:
        assert await r.json() == [
            {"name": "tiny", "version": "1", "state": "READY", "reason": "", "active": True}
        ]
    async with session.post(f"{agent.base}/v2/repository/models/tiny/unload") as r:
        assert r.status == 200
    async with session.post(
        f"{agent.base}/v2/models/tiny/infer", json={"inputs": [tensor(TEST_X)]}
    ) as r:
        assert r.status == 503
    async with session.get(f"{agent.base}/v2/health/ready") as r:
        assert r.status == 503
    async with session.post(f"{agent.base}/v2/repository/models/tiny/load") as r:
        assert (await r.json())["state"] == "READY"
    await still_serves(session, agent)
    async with session.post(f"{agent.base}/v2/repository/models/nope/load") as r:
        assert r.status == 404


async def test_metrics_count_requests_and_latency(session, agent):
    await still_serves(session, agent)
    async with session.post(f"{agent.base}/v2/models/tiny/infer", data=b"{") as r:
        assert r.status == 400
    async with session.get(f"{agent.base}/metrics") as r:
        text = await r.text()
    assert (
        'edgefleet_inference_requests_total{model="tiny",version="1",outcome="success"} 1' in text
    )
    assert 'edgefleet_request_duration_seconds_count{model="tiny",version="1"} 1' in text
    assert 'edgefleet_http_requests_total{route="/v2/models/{model}/infer",status="400"} 1' in text
    assert 'edgefleet_model_ready{model="tiny",version="1",active="true"} 1' in text


def _json(doc) -> bytes:
    return orjson.dumps(doc)


BAD_REQUESTS = [
    ("malformed JSON", b'{"inputs": [', None, 400, "malformed JSON"),
    ("not an object", b"[1, 2]", None, 400, "JSON object"),
    ("no inputs", _json({"inputs": []}), None, 400, "non-empty 'inputs'"),
    (
        "wrong datatype",
        _json({"inputs": [tensor(TEST_X[:1].astype(np.int32), datatype="INT32")]}),
        None,
        400,
        "datatype INT32, the model takes FP32",
    ),
    (
        "unknown datatype",
        _json({"inputs": [{**tensor(TEST_X[:1]), "datatype": "FP8"}]}),
        None,
        400,
        "unsupported datatype",
    ),
    (
        "wrong shape",
        _json({"inputs": [tensor(np.zeros((1, 5), np.float32))]}),
        None,
        400,
        "does not fit the model's [-1, 4]",
    ),
    (
        "length vs shape",
        _json({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1.0] * 7}]}),
        None,
        400,
        "7 values given",
    ),
    (
        "strings as data",
        _json(
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}
                ]
            }
        ),
        None,
        400,
        "numbers",
    ),
    ("unknown input", _json({"inputs": [tensor(TEST_X[:1], name="y")]}), None, 400, "no input 'y'"),
    (
        "unknown output",
        _json({"inputs": [tensor(TEST_X[:1])], "outputs": [{"name": "z"}]}),
        None,
        400,
        "no output 'z'",
    ),
    (
        "negative dims",
        _json({"inputs": [{"name": "x", "shape": [-1, 4], "datatype": "FP32", "data": [1.0] * 4}]}),
        None,
        400,
        "non-negative",
    ),
    ("empty body", b"", None, 400, "empty"),
    ("header longer than body", b'{"inputs": []}', "500", 400, "body holds 14 bytes"),
    ("header not a number", b'{"inputs": []}', "abc", 400, "not an integer"),
]


@pytest.mark.parametrize(
    ("what", "body", "header", "status", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
async def test_bad_requests_get_precise_errors(session, agent, what, body, header, status, message):
    headers = {HL: header} if header is not None else {}
    async with session.post(f"{agent.base}/v2/models/tiny/infer", data=body, headers=headers) as r:
        assert r.status == status
        doc = await r.json()
    assert message in doc["error"], doc
    await still_serves(session, agent)


def binary_request(declared: int, actual: bytes, shape=(2, 4)) -> tuple[bytes, dict]:
    header = _json(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": declared},
                }
            ]
        }
    )
    return header + actual, {HL: str(len(header))}


@pytest.mark.parametrize(
    ("declared", "actual", "message"),
    [
        (32, b"\0" * 16, "binary data ends after 16 of 32 bytes"),
        (32, b"\0" * 40, "8 bytes of binary data left over"),
        (28, b"\0" * 28, "binary_data_size 28 but shape [2, 4] of FP32 needs 32 bytes"),
        (-4, b"", "non-negative"),
    ],
)
async def test_binary_headers_that_lie(session, agent, declared, actual, message):
    body, headers = binary_request(declared, actual)
    async with session.post(f"{agent.base}/v2/models/tiny/infer", data=body, headers=headers) as r:
        assert r.status == 400
        assert message in (await r.json())["error"]
    await still_serves(session, agent)


async def test_unknown_model_and_version_are_404(session, agent):
    body = {"inputs": [tensor(TEST_X[:1])]}
    for path in (
        "/v2/models/nope/infer",
        "/v2/models/tiny/versions/7/infer",
        "/v2/models/tiny/versions/..%2F..%2Fetc/infer",
        "/v1/predict/nope",
    ):
        async with session.post(f"{agent.base}{path}", json=body) as r:
            assert r.status == 404, path
            assert "error" in await r.json()
    async with session.get(f"{agent.base}/no/such/route") as r:
        assert r.status == 404
        assert (await r.json())["error"]
    await still_serves(session, agent)


async def test_huge_body_is_413(session, agent):
    big = np.zeros((5000, 4), np.float32)
    body = {"inputs": [tensor(big)]}  # ~100 kB of JSON, over the 64 kB limit
    async with session.post(f"{agent.base}/v2/models/tiny/infer", json=body) as r:
        assert r.status == 413
        assert "limit" in (await r.json())["error"]
    await still_serves(session, agent)


async def test_image_endpoint_refuses_a_tensor_model_and_junk(session, agent):
    async with session.post(f"{agent.base}/v1/predict/tiny", data=b"\x89PNG\r\n\x1a\n") as r:
        assert r.status == 400
        assert "takes tensors, not images" in (await r.json())["error"]


async def test_full_queue_answers_503_with_retry_after(
    start_agent, make_tiny_bundle, keys, tmp_path, session
):
    agent = await start_agent(
        agent_config(
            tmp_path,
            keys,
            [make_tiny_bundle("1")],
            server={"max_queue_per_model": 2},
            runtime={"executor_threads": 1},
        )
    )
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(20000, 4)).astype(np.float32).tobytes()
    body, headers = binary_request(len(raw), raw, shape=(20000, 4))

    async def one() -> tuple[int, str | None]:
        async with session.post(
            f"{agent.base}/v2/models/tiny/infer", data=body, headers=headers
        ) as r:
            await r.read()
            return r.status, r.headers.get("Retry-After")

    results = await asyncio.gather(*(one() for _ in range(24)))
    statuses = [s for s, _ in results]
    assert statuses.count(200) >= 2
    assert statuses.count(503) >= 1, statuses
    assert all(ra is not None and int(ra) >= 1 for s, ra in results if s == 503)
    await still_serves(session, agent)


async def test_bearer_token(start_agent, make_tiny_bundle, keys, tmp_path, session):
    agent = await start_agent(
        agent_config(tmp_path, keys, [make_tiny_bundle("1")], server={"auth_token": "s3cret"})
    )
    async with session.get(f"{agent.base}/v2/models/tiny") as r:
        assert r.status == 401
    async with session.get(
        f"{agent.base}/v2/models/tiny", headers={"Authorization": "Bearer wrong"}
    ) as r:
        assert r.status == 401
    async with session.get(
        f"{agent.base}/v2/models/tiny", headers={"Authorization": "Bearer s3cret"}
    ) as r:
        assert r.status == 200
    async with session.get(f"{agent.base}/v2/health/live") as r:
        assert r.status == 200


def test_struct_is_little_endian_float32():
    # The binary extension is little-endian row-major; numpy's float32 here must match.
    assert np.frombuffer(struct.pack("<f", 1.5), np.float32)[0] == 1.5

"""The serving benchmark's own parts: its models, its load generator, its bookkeeping.

The full benchmark (MLServer, FastAPI, minutes of load) is not run here; these keep
the pieces it is built from honest, in a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from aiohttp import web

from bench.cnn import CNN_CLASSES, random_images, write_mobilenet_onnx, write_tiny_onnx
from bench.common import KeepAliveClient
from bench.serving import (
    CNN_FP32,
    SERVERS,
    TINY,
    _select,
    evaluate_goals,
    plan,
    run_cell,
)


def test_mobilenet_is_mobilenet_size_and_batches(tmp_path: Path) -> None:
    info = write_mobilenet_onnx(tmp_path / "cnn.onnx")
    assert info.parameters >= 3_000_000
    session = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": random_images(2, seed=0)})[0]
    assert out.shape == (2, CNN_CLASSES)
    assert np.isfinite(out).all() and out.std() > 0  # He init: activations did not vanish


def test_tiny_model_is_a_softmax(tmp_path: Path) -> None:
    path = write_tiny_onnx(tmp_path / "tiny.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs = session.run(None, {"x": np.ones((3, 4), dtype=np.float32)})[0]
    assert probs.shape == (3, 3)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)


@pytest.fixture
def flaky_server() -> Iterator[int]:
    """An aiohttp server on its own thread: every third request answers 503."""
    seen = 0

    async def infer(request: web.Request) -> web.Response:
        nonlocal seen
        await request.read()
        seen += 1
        status = 503 if seen % 3 == 0 else 200
        return web.Response(body=orjson.dumps({"n": seen}), status=status)

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v2/models/{m}/infer", infer)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_load_generator_records_answers_and_errors(flaky_server: int) -> None:
    with KeepAliveClient("127.0.0.1", flaky_server) as c:
        request = c.prepare("POST", "/v2/models/m/infer", b"{}", {})
    run = run_cell(flaky_server, request, 4, 0.1, 0.5, os.getpid())
    assert len(run.latencies_ns) > 10
    assert all(ns > 0 for ns in run.latencies_ns)
    # Every third answer is a 503: counted as an error, not as a latency.
    assert run.errors["HTTP 503"] > 0
    share = run.errors["HTTP 503"] / (run.errors["HTTP 503"] + len(run.latencies_ns))
    assert 0.2 < share < 0.45
    assert run.drained and run.window_s >= 0.5


def test_selection_and_plan() -> None:
    specs, models = _select(["agent*", "tiny"])
    assert [s.key for s in specs] == ["agent", "agent-batching"]
    assert models == [TINY]
    cells = plan(SERVERS, [TINY, CNN_FP32], (1, 16), agent_json_cnn=True)
    agent = cells["agent"]
    # The agent gets the CNN as binary, plus one JSON row at c16; MLServer adds adaptive rows.
    assert [(c.model, c.concurrency, c.request_format) for c in agent] == [
        (TINY, 1, "JSON"),
        (TINY, 16, "JSON"),
        (CNN_FP32, 1, "binary"),
        (CNN_FP32, 16, "binary"),
        (CNN_FP32, 16, "JSON"),
    ]
    assert sum(c.batching == "adaptive" for c in cells["mlserver-pw0"]) == 2
    assert all(c.request_format == "JSON" for c in cells["fastapi"])
    with pytest.raises(SystemExit):
        _select(["nonesuch"])


def test_goals_say_by_how_much() -> None:
    def row(server: str, rps: float, p99: float) -> dict[str, object]:
        return {
            "server": server,
            "model": TINY,
            "concurrency": 16,
            "request": "JSON",
            "batching": "off",
            "throughput_rps": rps,
            "p50_ms": 1.0,
            "p99_ms": p99,
        }

    rows = [row("agent", 1000, 5), row("mlserver-pw0", 400, 9), row("fastapi", 800, 4)]
    goals = {g["goal"]: g for g in evaluate_goals(rows, None)}
    vs_ml = goals["tiny c16: agent, batching off ≥ 2× MLServer pw=0 throughput, lower p99"]
    vs_fa = goals["tiny c16: agent, batching off ≥ 1.5× FastAPI throughput, lower p99"]
    assert vs_ml["met"] is True
    assert vs_fa["met"] is False
    assert "missed by 17%" in vs_fa["detail"] and "p99 not lower" in vs_fa["detail"]

"""Shared fixtures: real keys, real ONNX models, real agents on loopback ports."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from aiohttp import web
from onnx import TensorProto, helper

from agent.bundle.signing import generate_keypair, load_private_key
from agent.config import parse_config
from agent.server.app import create_app
from converters.bundler import build_bundle
from tests.brokers import free_port  # noqa: F401 (the tests import it from here too)

TINY_W = np.array(
    [[1.0, -1.0, 0.5], [0.5, 2.0, -1.0], [-1.0, 0.5, 1.5], [2.0, 0.0, -0.5]], dtype=np.float32
)
TINY_B = np.array([0.1, -0.2, 0.05], dtype=np.float32)


def tiny_reference(x: np.ndarray, w: np.ndarray = TINY_W) -> np.ndarray:
    z = x.astype(np.float32) @ w + TINY_B
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def write_tiny_onnx(path: Path, w: np.ndarray = TINY_W) -> Path:
    """softmax(x @ W + b): four features, three classes, dynamic batch."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["z0"]),
            helper.make_node("Add", ["z0", "B"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.flatten().tolist()),
            helper.make_tensor("B", TensorProto.FLOAT, TINY_B.shape, TINY_B.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


TINY_MANIFEST: dict[str, Any] = {
    "name": "tiny",
    "runtime": "onnx",
    "description": "4 features -> 3 classes, for tests",
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 3]}],
    "labels": ["a", "b", "c"],
    "postprocessing": {"type": "classification", "output": "probs"},
}


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("other-keys"), "other")


TEST_X = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)


@pytest.fixture(scope="session")
def make_tiny_bundle(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]
) -> Callable[..., Path]:
    """Build ``tiny-<version>.bundle``; ``weights`` changes the model, ``key`` the signer."""
    out_dir = tmp_path_factory.mktemp("bundles")
    private = load_private_key(keys[0])

    def make(version: str = "1", weights: np.ndarray = TINY_W, **manifest: Any) -> Path:
        work = tmp_path_factory.mktemp(f"tiny-{version}")
        model = write_tiny_onnx(work / "tiny.onnx", weights)
        out = out_dir / f"tiny-{version}.bundle"
        build_bundle(
            out=out,
            model_file=model,
            manifest={**TINY_MANIFEST, "version": version, **manifest},
            test_inputs={"x": TEST_X},
            private_key=private,
            self_test={"atol": 1e-5},
        )
        return out

    return make


def agent_config(tmp: Path, keys: tuple[Path, Path], bundles: list[Path], **extra: Any) -> Any:
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": {"path": str(tmp / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(b)} for b in bundles],
        "runtime": {"executor_threads": 2},
    }
    for section, values in extra.items():
        if isinstance(values, dict):
            doc.setdefault(section, {}).update(values)
        else:
            doc[section] = values
    return parse_config(yaml.safe_dump(doc))


class RunningAgent:
    def __init__(self, runner: web.AppRunner, base: str, app: web.Application) -> None:
        self.runner, self.base, self.app = runner, base, app


@pytest.fixture
async def start_agent() -> AsyncIterator[Callable[..., Any]]:
    """Start real agents on loopback ports in this test's loop; all stopped at the end."""
    runners: list[web.AppRunner] = []

    async def start(config: Any) -> RunningAgent:
        app = create_app(config)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return RunningAgent(runner, f"http://127.0.0.1:{port}", app)

    yield start
    for r in reversed(runners):
        await r.cleanup()
    # Fail on tasks a test (or the agent) left running.
    current = asyncio.current_task()
    lingering = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert not lingering, f"lingering tasks: {lingering}"


if os.environ.get("EDGEFLEET_TEST_LOOP") == "uvloop":

    @pytest.fixture(scope="session")
    def event_loop_policy():  # pytest-asyncio hook: every async test runs on uvloop
        import uvloop

        return uvloop.EventLoopPolicy()

"""The tiny test model (softmax(x @ W + b), four features, three classes) and agent configs.

Shared by the test packages; fixtures that build on these live in ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from aiohttp import web
from onnx import TensorProto, helper

from edgefleet.agent.config import parse_config
from edgefleet.core.bundle.archive import write_bundle
from edgefleet.core.bundle.selftest import save_vectors
from edgefleet.core.bundle.signing import load_private_key

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


TEST_X = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)


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


W2 = TINY_W[:, ::-1].copy()  # version 2 answers differently, so we can tell who answered


def broken_bundle(tmp: Path, keys: tuple[Path, Path], version: str, kind: str) -> Path:
    """A correctly signed bundle whose model is broken in the way ``kind`` says."""
    work = tmp / f"broken-{version}"
    work.mkdir()
    model = write_tiny_onnx(work / "model.onnx")
    if kind == "unloadable":
        model.write_bytes(b"this is not an onnx protobuf" * 20)
    expected = tiny_reference(TEST_X)
    if kind == "selftest":
        expected = expected[:, ::-1].copy()  # what a different model would say
    save_vectors(work / "selftest.npz", {"x": TEST_X}, {"probs": expected})
    out = tmp / f"tiny-{version}.bundle"
    doc = {
        **TINY_MANIFEST,
        "version": version,
        "model_file": "model.onnx",
        "self_test": {"file": "selftest.npz", "atol": 1e-5},
    }
    write_bundle(
        out,
        doc,
        {"model.onnx": model, "selftest.npz": work / "selftest.npz"},
        load_private_key(keys[0]),
    )
    return out

"""ONNX Runtime backend: provider preference and fallback, signature checks, threads."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest

from edgefleet.core.backends.config import OnnxConfig
from edgefleet.core.backends.onnx import OnnxBackend
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.errors import ModelLoadError
from tests.support.tiny import TEST_X, TINY_MANIFEST, tiny_reference, write_tiny_onnx


def manifest(**changes) -> Manifest:
    doc = {
        **TINY_MANIFEST,
        "version": "1",
        "model_file": "model.onnx",
        "files": {"model.onnx": {"sha256": "0" * 64, "size": 1}},
        **changes,
    }
    return Manifest.model_validate(doc)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_onnx(tmp_path / "model.onnx")


def test_missing_accelerators_fall_back_to_cpu(model, caplog):
    config = OnnxConfig(
        providers=["OpenVINOExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    backend = OnnxBackend(model, manifest(), config)
    backend.load()
    assert backend.info.provider == "CPUExecutionProvider"
    assert "OpenVINOExecutionProvider: not available" in backend.info.fallback_reason
    assert "CUDAExecutionProvider: not available" in backend.info.fallback_reason
    assert backend.info.providers_tried == [
        "OpenVINOExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert sum("runs on CPUExecutionProvider" in r.message for r in caplog.records) == 1
    np.testing.assert_allclose(
        backend.infer({"x": TEST_X})["probs"], tiny_reference(TEST_X), rtol=1e-5
    )


def test_cpu_only_has_no_fallback_reason(model):
    backend = OnnxBackend(model, manifest(), OnnxConfig())
    backend.load()
    assert backend.info.fallback_reason is None
    backend.unload()
    with pytest.raises(ModelLoadError, match="not loaded"):
        backend.infer({"x": TEST_X})


def test_manifest_that_does_not_describe_the_model(model):
    bad = manifest(inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 4]}])
    with pytest.raises(ModelLoadError, match="'pixels' is not an input"):
        OnnxBackend(model, bad, OnnxConfig()).load()


def test_corrupt_model_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ModelLoadError, match="cannot load model.onnx"):
        OnnxBackend(path, manifest(), OnnxConfig()).load()


def test_concurrent_sessions_give_correct_answers(model):
    backend = OnnxBackend(model, manifest(), OnnxConfig(sessions=4, intra_op_threads=1))
    backend.load()
    assert backend.max_concurrency == 4
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(64)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: backend.infer({"x": x})["probs"], xs))
    for x, got in zip(xs, results, strict=True):
        np.testing.assert_allclose(got, tiny_reference(x), rtol=1e-5)

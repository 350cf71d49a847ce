"""Accelerator detection, CPU fallback when an accelerator fails at run time, and
thread defaults. No accelerator exists on this box: detection is checked against
what this onnxruntime build really has, and run-time failures are injected by real
backend subclasses at the boundary where a provider's failure would show."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnxruntime as ort
import pytest

import edgefleet.agent.serving_registry as registry_module
from edgefleet.agent.config import ExternalDelegate, LiteRTConfig, OnnxConfig, RuntimeConfig
from edgefleet.agent.server.context import SERVICES
from edgefleet.converters.tflite_int8 import Dense, write_mlp_tflite
from edgefleet.core.backends import create_backend
from edgefleet.core.backends.accelerators import detect, summary
from edgefleet.core.backends.litert import XNNPACK, LiteRTBackend, _Candidate, _Slot
from edgefleet.core.backends.onnx import CPU, OnnxBackend
from edgefleet.core.backends.threads import auto_threads, physical_cores
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.errors import BadRequest
from tests.support.tiny import TEST_X, TINY_B, TINY_MANIFEST, TINY_W, agent_config, tiny_reference

FAKE = "FakeAcceleratorExecutionProvider"
FAKE_DELEGATE = "delegate:libfake-npu.so"
SENTINEL = 999.0


class FlakyAccelerator(OnnxBackend):
    """The real model, as if its session ran on an accelerator that breaks after loading.

    ``broken``: every run on the "accelerator" session fails, as a lost device would.
    A run holding the sentinel value fails on any session, as a bad input would.
    """

    broken = True

    def load(self) -> None:
        super().load()
        self.accelerated = self._session
        self.info.provider = FAKE
        self.accelerator_runs = 0

    def _run(self, session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> Any:
        if any((v == SENTINEL).any() for v in feed.values()):
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad value")
        if session is self.accelerated:
            self.accelerator_runs += 1
            if self.broken:
                raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : device lost")
        return super()._run(session, feed)


def tiny_manifest(**changes: Any) -> Manifest:
    doc = {
        **TINY_MANIFEST,
        "version": "1",
        "model_file": "model.onnx",
        "files": {"model.onnx": {"sha256": "0" * 64, "size": 1}},
        **changes,
    }
    return Manifest.model_validate(doc)


@pytest.fixture
def onnx_model(tmp_path: Path) -> Path:
    from tests.support.tiny import write_tiny_onnx

    return write_tiny_onnx(tmp_path / "model.onnx")


# ---- detection ----------------------------------------------------------------------


def test_detection_reports_this_onnxruntime_build_and_missing_delegates(tmp_path):
    runtime = RuntimeConfig(
        onnx=OnnxConfig(providers=["OpenVINOExecutionProvider", "CUDAExecutionProvider", CPU]),
        litert=LiteRTConfig(delegates=[ExternalDelegate(library=tmp_path / "libedgetpu.so.1")]),
    )
    found = detect(runtime)
    onnx = found["onnx"]
    assert onnx["checked"] and onnx["available"] == ort.get_available_providers()
    assert CPU in onnx["available"] and CPU not in onnx["accelerators"]
    assert set(onnx["accelerators"]) <= set(onnx["available"])
    for wanted in ("OpenVINOExecutionProvider", "CUDAExecutionProvider"):
        assert (wanted in onnx["preferred_missing"]) == (wanted not in onnx["available"])
    (delegate,) = found["litert"]["delegates"]
    assert delegate["found"] is None and "libedgetpu.so.1" in delegate["error"]
    assert found["litert"]["package"] == "ai-edge-litert"
    assert found["cpu"]["physical"] == physical_cores() >= 1
    assert found["accelerators"] == [f"onnx:{p}" for p in onnx["accelerators"]]
    line = summary(found)
    assert "libedgetpu.so.1 missing" in line and f"onnxruntime {ort.__version__}" in line


def test_detection_does_not_import_a_runtime_no_model_uses():
    """onnxruntime costs ~19 MB resident: a LiteRT-only box must not pay it to look."""
    code = (
        "import json, sys\n"
        "from edgefleet.core.backends.accelerators import detect\n"
        "from edgefleet.core.backends.config import BackendConfig as RuntimeConfig\n"
        "found = detect(RuntimeConfig())\n"
        "print(json.dumps([found['onnx'], 'onnxruntime' in sys.modules,"
        " 'ai_edge_litert' in sys.modules]))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    ).stdout
    onnx, ort_imported, litert_imported = json.loads(out)
    assert onnx["checked"] is False and "not imported" in onnx["why"]
    assert not ort_imported and not litert_imported


# ---- ONNX Runtime: an accelerator failing at run time --------------------------------


def test_an_accelerator_failing_at_run_time_moves_the_model_to_the_cpu(onnx_model, caplog):
    backend = FlakyAccelerator(onnx_model, tiny_manifest(), OnnxConfig())
    backend.load()
    assert backend.info.provider == FAKE
    # Several threads hit the failure at once: every caller still gets its answer.
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: backend.infer({"x": TEST_X[i : i + 1]}), range(8)))
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out["probs"], tiny_reference(TEST_X[i : i + 1]), rtol=1e-5)
    assert backend.info.provider == CPU
    assert FAKE in backend.info.runtime_fallback and "device lost" in backend.info.runtime_fallback
    assert backend.info.fallback_reason == backend.info.runtime_fallback
    assert backend.info.as_dict()["runtime_fallback"] == backend.info.runtime_fallback
    runs = backend.accelerator_runs
    for _ in range(5):
        backend.infer({"x": TEST_X})
    assert backend.accelerator_runs == runs  # the broken accelerator is not tried again
    assert sum("failed at run time" in r.message for r in caplog.records) == 1


def test_an_input_failing_on_the_cpu_too_does_not_move_the_model(onnx_model):
    backend = FlakyAccelerator(onnx_model, tiny_manifest(), OnnxConfig())
    backend.broken = False
    backend.load()
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        backend.infer({"x": np.full((1, 4), SENTINEL, dtype=np.float32)})
    assert backend.info.provider == FAKE and backend.info.runtime_fallback is None
    np.testing.assert_allclose(
        backend.infer({"x": TEST_X})["probs"], tiny_reference(TEST_X), rtol=1e-5
    )
    assert backend.accelerator_runs == 1  # that good request ran on the accelerator


def test_a_cpu_model_has_nothing_to_fall_back_to(onnx_model):
    backend = OnnxBackend(onnx_model, tiny_manifest(), OnnxConfig())
    backend.load()
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        backend.infer({"x": np.zeros((1, 5), dtype=np.float32)})
    assert backend._cpu_session is None and backend.info.runtime_fallback is None


# ---- LiteRT: a delegate failing at invoke ---------------------------------------------


class FlakyDelegate(LiteRTBackend):
    """As if an external delegate (an NPU) loaded, then failed at invoke.

    The delegate candidate builds an ordinary interpreter (no delegate library exists
    here); its slots carry the delegate's provider name, and invoking on them fails.
    """

    broken = True

    def _candidates(self) -> list[_Candidate]:
        return [_Candidate(FAKE_DELEGATE, None, True), *super()._candidates()]

    def _run(self, slot: _Slot, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        if any((v == SENTINEL).any() for v in feed.values()):
            raise RuntimeError("bad value")
        if self.broken and slot.provider == FAKE_DELEGATE:
            raise RuntimeError("Node number 3 (TfLiteNpuDelegate) failed to invoke.")
        return super()._run(slot, feed)


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tflite") / "tiny.tflite"
    write_mlp_tflite(
        path, [Dense(TINY_W, TINY_B)], precision="fp32", input_name="x", output_name="probs"
    )
    return path


def litert_manifest(model: Path) -> Manifest:
    return Manifest.model_validate(
        {
            **TINY_MANIFEST,
            "version": "1",
            "runtime": "litert",
            "model_file": model.name,
            "files": {model.name: {"sha256": "0" * 64, "size": 1}},
        }
    )


def test_a_delegate_failing_at_invoke_moves_the_model_to_the_cpu(tiny_tflite, caplog):
    backend = FlakyDelegate(
        tiny_tflite, litert_manifest(tiny_tflite), LiteRTConfig(num_threads=1), instances=2
    )
    backend.load()
    assert backend.info.provider == FAKE_DELEGATE and backend.max_concurrency == 2
    barrier = threading.Barrier(4)

    def call(i: int) -> np.ndarray:
        barrier.wait()
        return backend.infer({"x": TEST_X[i : i + 2]})["probs"]

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(call, range(4)))
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out, tiny_reference(TEST_X[i : i + 2]), rtol=1e-5, atol=1e-6)
    assert backend.info.provider == XNNPACK
    assert "failed to invoke" in backend.info.runtime_fallback
    assert sum("failed at run time" in r.message for r in caplog.records) == 1
    assert all(s.provider == XNNPACK for s in backend._slots) and len(backend._slots) == 2


def test_an_input_failing_on_the_cpu_too_keeps_the_delegate(tiny_tflite):
    backend = FlakyDelegate(tiny_tflite, litert_manifest(tiny_tflite), LiteRTConfig(num_threads=1))
    backend.broken = False
    backend.load()
    for _ in range(3):  # the CPU pool to compare with is built once, not per bad input
        with pytest.raises(RuntimeError, match="bad value"):
            backend.infer({"x": np.full((1, 4), SENTINEL, dtype=np.float32)})
    assert backend.info.providers_tried == [FAKE_DELEGATE, XNNPACK]
    assert backend.info.provider == FAKE_DELEGATE and backend.info.runtime_fallback is None
    with pytest.raises(BadRequest):  # the agent's own input checks never trigger a fallback
        backend.infer({"y": TEST_X})
    assert backend.info.provider == FAKE_DELEGATE


# ---- threads ---------------------------------------------------------------------------


def test_thread_defaults_split_the_physical_cores_between_instances(onnx_model, tiny_tflite):
    cores = physical_cores()
    assert auto_threads(1) == cores and auto_threads(2) == max(1, cores // 2)
    assert auto_threads(1000) == 1
    one = OnnxBackend(onnx_model, tiny_manifest(), OnnxConfig())
    two = create_backend(onnx_model, tiny_manifest(), RuntimeConfig(), instances=2)
    assert (one.intra_op_threads, one.max_concurrency) == (cores, 1)
    assert (two.intra_op_threads, two.max_concurrency) == (auto_threads(2), 2)
    assert two.instance_limit is None  # one ONNX session runs any number of calls
    assert (
        OnnxBackend(onnx_model, tiny_manifest(), OnnxConfig(intra_op_threads=3)).intra_op_threads
        == 3
    )
    lite = LiteRTBackend(tiny_tflite, litert_manifest(tiny_tflite), LiteRTConfig(), instances=2)
    assert (lite.num_threads, lite.max_concurrency, lite.instance_limit) == (auto_threads(2), 2, 2)
    assert lite.warmup_repeats == 2


# ---- in the agent --------------------------------------------------------------------


async def test_the_agent_reports_accelerators_and_a_run_time_fallback(
    tmp_path, keys, make_tiny_bundle, start_agent, monkeypatch
):
    def flaky(model_path: Path, m: Manifest, runtime: RuntimeConfig, instances: int | None = None):
        return FlakyAccelerator(model_path, m, runtime.onnx, instances)

    monkeypatch.setattr(registry_module, "create_backend", flaky)
    # The accelerator breaks after load, self-test and warm-up: make it healthy until then.
    monkeypatch.setattr(FlakyAccelerator, "broken", False)
    config = agent_config(tmp_path, keys, [make_tiny_bundle("1")])
    agent_ = await start_agent(config)
    registry = agent_.app[SERVICES].registry
    assert registry.accelerators["onnx"]["checked"]  # detected at start
    lv = registry.resolve("tiny")
    assert lv.backend.info.provider == FAKE
    monkeypatch.setattr(FlakyAccelerator, "broken", True)
    body = {
        "inputs": [
            {"name": "x", "shape": [8, 4], "datatype": "FP32", "data": TEST_X.ravel().tolist()}
        ]
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{agent_.base}/v2/models/tiny/infer", json=body) as r:
            assert r.status == 200
            doc = await r.json()
        out = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(8, 3)
        np.testing.assert_allclose(out, tiny_reference(TEST_X), rtol=1e-5)
        assert doc["parameters"]["provider"] == CPU
        async with session.get(f"{agent_.base}/v1/models/tiny") as r:
            row = (await r.json())["versions"][0]
        assert row["provider"] == CPU and "device lost" in row["runtime_fallback"]
        assert row["batching"]["enabled"] and row["batching"]["batched"]
        async with session.get(f"{agent_.base}/v1/system") as r:
            system = await r.json()
        assert system["accelerators"]["onnx"]["available"] == ort.get_available_providers()
        assert "device lost" in system["models"]["tiny"]["1"]["runtime_fallback"]
        async with session.get(f"{agent_.base}/metrics") as r:
            text = await r.text()
    assert (
        'edgefleet_provider_fallbacks_total{model="tiny",version="1",'
        'provider="CPUExecutionProvider"} 1'
    ) in text
    report = registry.provider_report()
    assert report["models"]["tiny"]["1"]["provider"] == CPU

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgefleet.agent",
        "models",
        "--url",
        agent_.base,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    stdout, stderr = await proc.communicate()
    table = stdout.decode()
    assert proc.returncode == 0, stderr.decode()
    assert "BATCHING" in table and "max 8" in table
    assert "CPUExecutionProvider (accelerator failed)" in table
    assert "accelerators: none (CPU only)" in table or "accelerators: onnx:" in table


def test_warnings_name_the_model(caplog, onnx_model):
    caplog.set_level(logging.INFO)
    backend = OnnxBackend(onnx_model, tiny_manifest(), OnnxConfig(), instances=2)
    backend.load()
    assert any(
        "tiny:1 loaded on CPUExecutionProvider (2 run(s) at once" in r.message
        for r in caplog.records
    )

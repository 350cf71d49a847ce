"""The LiteRT backend with the real runtime: digits MLPs (int8 and fp32) and BlazeFace."""

from __future__ import annotations

import ctypes.util
import hashlib
import logging
import subprocess
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.config import ExternalDelegate, LiteRTConfig, RuntimeConfig
from edgefleet.converters.tflite_int8 import write_mlp_tflite
from edgefleet.core.backends import create_backend
from edgefleet.core.backends.litert import CPU_BUILTIN, XNNPACK, LiteRTBackend, quantize_input
from edgefleet.core.bundle.archive import read_bundle
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.bundle.selftest import run_self_test
from edgefleet.core.bundle.signing import TrustStore
from edgefleet.core.errors import BadRequest, ModelLoadError
from models import digits_litert
from models.digits_litert import PIXEL_MAX, load_split, mlp_layers, train_mlp
from models.recipe import BuildContext

BLAZEFACE_WHEEL = ("mediapipe", "0.10.14")
BLAZEFACE_MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
BLAZEFACE_SHA256 = "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"

DIGITS_IO: dict[str, Any] = {
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
}
BLAZEFACE_IO: dict[str, Any] = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 128, 128, 3]}],
    "outputs": [
        {"name": "regressors", "datatype": "FP32", "shape": [1, 896, 16]},
        {"name": "classificators", "datatype": "FP32", "shape": [1, 896, 1]},
    ],
}


def manifest_for(model: Path, io: dict[str, Any]) -> Manifest:
    return Manifest.model_validate(
        {
            "name": "test-model",
            "version": "1",
            "runtime": "litert",
            "model_file": model.name,
            "files": {model.name: {"sha256": "0" * 64, "size": 0}},
            **io,
        }
    )


def backend_for(model: Path, io: dict[str, Any] = DIGITS_IO, **config: Any) -> LiteRTBackend:
    backend = LiteRTBackend(model, manifest_for(model, io), LiteRTConfig(**config))
    backend.load()
    return backend


@dataclass
class Digits:
    x_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    sklearn_proba: np.ndarray
    sklearn_accuracy: float
    int8: Path
    fp32: Path
    int8_fixed_batch: Path
    int8_float_io: Path


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    split = load_split()
    clf = train_mlp(split)
    layers = mlp_layers(clf)
    d = tmp_path_factory.mktemp("digits")
    names = {"input_name": "pixels", "output_name": "probabilities"}
    cal = split.x_train
    write_mlp_tflite(d / "int8.tflite", layers, precision="int8", calibration=cal, **names)
    write_mlp_tflite(d / "fp32.tflite", layers, precision="fp32", **names)
    write_mlp_tflite(
        d / "int8-fio.tflite", layers, precision="int8", calibration=cal, float_io=True, **names
    )
    write_mlp_tflite(
        d / "int8-b1.tflite",
        layers,
        precision="int8",
        calibration=cal,
        dynamic_batch=False,
        **names,
    )
    return Digits(
        split.x_train,
        split.x_test,
        split.y_test,
        clf.predict_proba(split.x_test / PIXEL_MAX),
        float(clf.score(split.x_test / PIXEL_MAX, split.y_test)),
        d / "int8.tflite",
        d / "fp32.tflite",
        d / "int8-b1.tflite",
        d / "int8-fio.tflite",
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_blazeface(cache: Path, also_look_in: list[Path]) -> Path:
    """The real BlazeFace model, from the mediapipe 0.10.14 wheel, cached in ``cache``."""
    name = Path(BLAZEFACE_MEMBER).name
    for candidate in (cache / name, *also_look_in):
        if candidate.is_file() and _sha256(candidate) == BLAZEFACE_SHA256:
            return candidate
    wheel_dir = cache / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--python-version", "3.11",
        "--platform", "manylinux2014_x86_64", "-d", str(wheel_dir),
        "{}=={}".format(*BLAZEFACE_WHEEL),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot download the mediapipe wheel: {proc.stderr.strip()[-300:]}")
    (wheel,) = wheel_dir.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(BLAZEFACE_MEMBER)
    assert hashlib.sha256(data).hexdigest() == BLAZEFACE_SHA256
    (cache / name).write_bytes(data)
    wheel.unlink()  # 35 MB we no longer need
    return cache / name


@pytest.fixture(scope="session")
def blazeface(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The face-detect recipe may already have fetched it into models/.cache.
    repo_copy = (
        Path(__file__).resolve().parents[2]
        / "models"
        / ".cache"
        / "-".join(BLAZEFACE_WHEEL)
        / BLAZEFACE_MEMBER
    )
    pytest_cache = getattr(request.config, "cache", None)
    cache = (
        Path(pytest_cache.mkdir("litert-blazeface"))
        if pytest_cache is not None
        else tmp_path_factory.mktemp("litert-blazeface")
    )
    return fetch_blazeface(cache, [repo_copy])


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == y))


# ---- int8 is transparent ---------------------------------------------------------------


def test_int8_model_takes_and_returns_floats_with_sklearn_accuracy(digits):
    backend = backend_for(digits.int8)
    assert backend.info.provider == XNNPACK
    assert backend.info.fallback_reason is None
    out = backend.infer({"pixels": digits.x_test})["probabilities"]
    assert out.dtype == np.float32 and out.shape == (len(digits.x_test), 10)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=0.05)
    assert accuracy(out, digits.y_test) >= digits.sklearn_accuracy - 0.01


def test_fp32_and_int8_agree(digits):
    int8 = backend_for(digits.int8).infer({"pixels": digits.x_test})["probabilities"]
    fp32 = backend_for(digits.fp32).infer({"pixels": digits.x_test})["probabilities"]
    np.testing.assert_allclose(fp32, digits.sklearn_proba, atol=1e-5)
    assert float(np.mean(int8.argmax(axis=1) == fp32.argmax(axis=1))) >= 0.99
    assert float(np.abs(int8 - fp32).max()) < 0.1


def test_int8_input_passes_through_unchanged(digits):
    backend = backend_for(digits.int8)
    (binding,) = backend._inputs.values()
    x = digits.x_test[:20]
    q = quantize_input(x, np.dtype(np.int8), binding.scale, binding.zero_point)
    from_float = backend.infer({"pixels": x})["probabilities"]
    from_int8 = backend.infer({"pixels": q})["probabilities"]
    np.testing.assert_array_equal(from_float, from_int8)
    # Also float64 and integer-valued int64 input: quantized, not reinterpreted.
    np.testing.assert_array_equal(
        backend.infer({"pixels": x.astype(np.float64)})["probabilities"], from_float
    )
    np.testing.assert_array_equal(
        backend.infer({"pixels": x.astype(np.int64)})["probabilities"], from_float
    )


def test_quantize_input_rounds_to_nearest_even_and_saturates():
    got = quantize_input(
        np.array([-2.5, -0.5, 0.5, 1.5, 2.6, -1000.0, 1000.0]), np.dtype(np.int8), 1.0, 0
    )
    assert got.tolist() == [-2, 0, 0, 2, 3, -128, 127] and got.dtype == np.int8
    u8 = quantize_input(np.array([-1.0, 0.0, 1.0, 9.0]), np.dtype(np.uint8), 0.5, 10)
    assert u8.tolist() == [8, 10, 12, 28] and u8.dtype == np.uint8


def test_a_float_io_int8_model_needs_no_help_from_the_backend(digits):
    backend = backend_for(digits.int8_float_io)
    assert not any(b.quantized for b in backend._inputs.values())
    got = backend.infer({"pixels": digits.x_test})["probabilities"]
    # The in-graph QUANTIZE (XNNPACK) and quantize_input compute the same thing; at
    # most a 1/scale rounded differently could move one step.
    want = backend_for(digits.int8).infer({"pixels": digits.x_test})["probabilities"]
    np.testing.assert_allclose(got, want, atol=1.0 / 256 + 1e-6)
    assert float(np.mean(got.argmax(axis=1) == want.argmax(axis=1))) >= 0.99


def test_outputs_are_copies_not_views_of_the_interpreter(digits):
    backend = backend_for(digits.fp32)
    first = backend.infer({"pixels": digits.x_test[:1]})["probabilities"]
    kept = first.copy()
    backend.infer({"pixels": digits.x_test[1:2]})
    np.testing.assert_array_equal(first, kept)


# ---- delegates and fallbacks -----------------------------------------------------------


def test_missing_delegate_falls_back_to_the_cpu(digits, caplog):
    caplog.set_level(logging.WARNING, logger="agent.backends.litert")
    backend = backend_for(
        digits.int8,
        delegates=[ExternalDelegate(library=Path("/nonexistent/libedgetpu.so.1"))],
    )
    assert backend.info.provider == XNNPACK
    assert backend.info.providers_tried == ["delegate:libedgetpu.so.1", XNNPACK]
    assert "libedgetpu.so.1" in (backend.info.fallback_reason or "")
    warnings = [r for r in caplog.records if "libedgetpu" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not per interpreter or per call
    out = backend.infer({"pixels": digits.x_test})["probabilities"]
    assert accuracy(out, digits.y_test) >= digits.sklearn_accuracy - 0.01


def test_a_library_that_is_no_delegate_is_skipped_too(digits):
    libm = ctypes.util.find_library("m")
    assert libm is not None
    backend = backend_for(
        digits.fp32,
        xnnpack=False,
        delegates=[
            ExternalDelegate(library=Path("/nonexistent/libvx_delegate.so")),
            ExternalDelegate(library=Path(libm), options={"device": "usb"}),
        ],
    )
    assert backend.info.provider == CPU_BUILTIN
    assert backend.info.providers_tried == [
        "delegate:libvx_delegate.so",
        f"delegate:{Path(libm).name}",
        CPU_BUILTIN,
    ]
    reason = backend.info.fallback_reason or ""
    assert "libvx_delegate.so" in reason and "not a TFLite external delegate" in reason
    out = backend.infer({"pixels": digits.x_test[:5]})["probabilities"]
    np.testing.assert_allclose(out, digits.sklearn_proba[:5], atol=1e-5)


def test_xnnpack_off_uses_the_builtin_kernels(digits):
    for model, tol in ((digits.fp32, 1e-5), (digits.int8, 1.0 / 256 + 1e-6)):
        builtin = backend_for(model, xnnpack=False, num_threads=1)
        xnn = backend_for(model, num_threads=1)
        assert builtin.info.provider == CPU_BUILTIN
        assert builtin.info.providers_tried == [CPU_BUILTIN]
        a = builtin.infer({"pixels": digits.x_test})["probabilities"]
        b = xnn.infer({"pixels": digits.x_test})["probabilities"]
        # Integer kernels may round one step apart; that is all.
        np.testing.assert_allclose(a, b, atol=tol)


# ---- concurrency and batching ----------------------------------------------------------


def test_pool_serves_concurrent_callers_correctly(digits):
    backend = backend_for(digits.int8, interpreters=3, num_threads=1)
    assert backend.max_concurrency == 3
    assert len(backend._slots) == 3
    x = digits.x_test
    expected = backend.infer({"pixels": x})["probabilities"]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            start.wait()
            for _ in range(40):
                # Different batch sizes too, so interpreters get resized under load.
                idx = rng.choice(len(x), size=int(rng.integers(1, 9)), replace=False)
                got = backend.infer({"pixels": x[idx]})["probabilities"]
                np.testing.assert_array_equal(got, expected[idx])
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]


@pytest.mark.parametrize("model", ["int8", "int8_fixed_batch", "fp32"])
def test_any_batch_size_works(digits, model):
    backend = backend_for(getattr(digits, model))
    x = digits.x_test
    singles = np.concatenate(
        [backend.infer({"pixels": x[i : i + 1]})["probabilities"] for i in range(len(x))]
    )
    # Growing and shrinking batches: resized (or chunked) each time, same answers.
    for n in (1, 9, 2, len(x), 1, 33):
        out = backend.infer({"pixels": x[:n]})["probabilities"]
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out, singles[:n], atol=1e-6)
    assert accuracy(singles, digits.y_test) >= digits.sklearn_accuracy - 0.01


def test_fixed_batch_model_is_run_item_by_item(digits):
    backend = backend_for(digits.int8_fixed_batch)
    (binding,) = backend._inputs.values()
    assert binding.signature == (1, 64)
    assert backend._chunk_batch({"pixels": np.zeros((5, 64), np.int8)}) == 5
    assert backend._chunk_batch({"pixels": np.zeros((1, 64), np.int8)}) is None


def test_wrong_input_shape_or_names_are_bad_requests(digits):
    backend = backend_for(digits.int8)
    with pytest.raises(BadRequest, match="shape"):
        backend.infer({"pixels": np.zeros((2, 63), np.float32)})
    with pytest.raises(BadRequest, match="shape"):
        backend.infer({"pixels": np.zeros((64,), np.float32)})
    with pytest.raises(BadRequest, match="missing"):
        backend.infer({"image": np.zeros((1, 64), np.float32)})
    with pytest.raises(BadRequest, match="NaN"):
        backend.infer({"pixels": np.full((1, 64), np.nan, np.float32)})


@pytest.mark.parametrize("model", ["int8", "int8_fixed_batch"])
def test_an_empty_batch_gives_empty_outputs(digits, model):
    backend = backend_for(getattr(digits, model))
    out = backend.infer({"pixels": np.zeros((0, 64), np.float32)})["probabilities"]
    assert out.shape == (0, 10) and out.dtype == np.float32


# ---- refusing broken models ------------------------------------------------------------


def test_corrupt_model_file_is_a_model_load_error(digits, tmp_path):
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"this is not a flatbuffer" * 10)
    with pytest.raises(ModelLoadError, match=r"LiteRT cannot load garbage\.tflite"):
        backend_for(garbage)
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(digits.int8.read_bytes()[:2000])
    with pytest.raises(ModelLoadError):
        backend_for(truncated)
    with pytest.raises(ModelLoadError, match="does not exist"):
        backend_for(tmp_path / "absent.tflite")


def test_manifest_must_name_the_models_tensors(digits):
    wrong_input = {
        **DIGITS_IO,
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 64]}],
    }
    with pytest.raises(ModelLoadError, match=r"'image' is not an input.*pixels"):
        backend_for(digits.int8, wrong_input)
    wrong_output = {
        **DIGITS_IO,
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    with pytest.raises(ModelLoadError, match="'logits' is not an output"):
        backend_for(digits.int8, wrong_output)
    wrong_shape = {
        **DIGITS_IO,
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 32]}],
    }
    with pytest.raises(ModelLoadError, match="shape"):
        backend_for(digits.int8, wrong_shape)


def test_unload_is_idempotent_and_stops_inference(digits):
    backend = backend_for(digits.int8, interpreters=2)
    backend.unload()
    backend.unload()
    assert backend.info.provider == "unloaded"
    with pytest.raises(ModelLoadError, match="not loaded"):
        backend.infer({"pixels": digits.x_test[:1]})


def test_create_backend_picks_litert(digits):
    backend = create_backend(digits.int8, manifest_for(digits.int8, DIGITS_IO), RuntimeConfig())
    assert isinstance(backend, LiteRTBackend)


# ---- a real pretrained model -----------------------------------------------------------


def test_blazeface_runs_batched_on_xnnpack_and_builtin(blazeface):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.0, 1.0, size=(3, 128, 128, 3)).astype(np.float32)
    xnn = backend_for(blazeface, BLAZEFACE_IO, interpreters=2)
    assert xnn.info.provider == XNNPACK
    out = xnn.infer({"input": images})
    assert out["regressors"].shape == (3, 896, 16)
    assert out["classificators"].shape == (3, 896, 1)
    # A fixed-batch graph: three images are three runs, stacked.
    one = xnn.infer({"input": images[1:2]})
    np.testing.assert_allclose(out["regressors"][1:2], one["regressors"], atol=1e-4)
    builtin = backend_for(blazeface, BLAZEFACE_IO, xnnpack=False)
    ref = builtin.infer({"input": images})
    np.testing.assert_allclose(out["classificators"], ref["classificators"], atol=1e-2)


def test_blazeface_manifest_is_checked(blazeface):
    io = {
        **BLAZEFACE_IO,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64, 64, 3]}],
    }
    with pytest.raises(ModelLoadError, match="shape"):
        backend_for(blazeface, io)


# ---- the recipe --------------------------------------------------------------------------


def test_recipe_builds_a_signed_bundle_that_passes_its_self_test(tmp_path):
    ctx = BuildContext.create(tmp_path / "build", tmp_path / "cache", version="1")
    (bundle,) = digits_litert.build(ctx)
    assert bundle.name == "digits-edge-litert-1.bundle"
    assert bundle.parent == ctx.build_dir
    work = ctx.build_dir / "work" / "digits_litert"
    assert {p.name for p in work.iterdir()} == {"digits-int8.tflite", "digits-fp32.tflite"}
    trust = TrustStore.from_files([ctx.public_key_path])
    contents = read_bundle(bundle, tmp_path / "installed", trust)
    m = contents.manifest
    assert (m.name, m.version, m.runtime, m.model_file) == (
        "digits-edge-litert",
        "1",
        "litert",
        "model.tflite",
    )
    assert [t.name for t in m.inputs] == ["pixels"] and m.inputs[0].datatype == "FP32"
    assert m.outputs[0].shape == [-1, 10] and m.labels == [str(i) for i in range(10)]
    pre = m.preprocessing
    assert pre is not None and (pre.color, pre.layout, pre.invert) == ("GRAY", "NC", True)
    assert pre.input_quantization is not None and pre.input_quantization.zero_point == -128
    assert m.metrics["accuracy_int8"] >= m.metrics["accuracy_fp32"] - 0.01
    assert m.metrics["size_bytes_int8"] < m.metrics["size_bytes_fp32"]
    assert m.fallback.cloud_model == "digits-cloud" and m.confidence.rule == "top1"
    assert m.self_test is not None and m.self_test.argmax_output == "probabilities"
    backend = create_backend(contents.directory / m.model_file, m, RuntimeConfig())
    backend.load()
    assert run_self_test(backend, m, contents.directory).startswith("passed")
    # The self-test also holds with the builtin kernels (a box with xnnpack off).
    builtin = LiteRTBackend(contents.directory / m.model_file, m, LiteRTConfig(xnnpack=False))
    builtin.load()
    run_self_test(builtin, m, contents.directory)

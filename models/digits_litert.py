"""Recipe: the 8x8 handwritten-digits classifier as a full-integer (int8) LiteRT bundle.

The LiteRT twin of the ONNX ``digits-edge`` model: same input (``pixels``, FP32
[-1, 64], values 0..16 as in sklearn's ``load_digits``), same output
(``probabilities``, FP32 [-1, 10]), same preprocessing, so a caller can switch
between them. Inside, the model is int8 end to end (int8 input and output tensors
with quantization parameters); the agent's LiteRT backend quantizes the float
input and dequantizes the output.

The MLP is trained here (sklearn, fixed seeds) rather than shared with the ONNX
recipe so the two recipes build independently, and written with our own TFLite
writer (``converters.tflite_int8``) because LiteRT has no converter without
TensorFlow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.core.bundle.manifest import ClassificationPost, ImagePreprocessing, QuantParams
from models.digits import DigitsSplit, load_split  # the same held-out split as digits-edge

if TYPE_CHECKING:  # the recipe runner passes it; importing it is not needed at run time
    from sklearn.neural_network import MLPClassifier

    from edgefleet.converters.tflite_int8 import Dense, TFLiteModelInfo
    from models.recipe import BuildContext

NAME = "digits-edge-litert"
INPUT = "pixels"
OUTPUT = "probabilities"
N_FEATURES = 64
LABELS = [str(i) for i in range(10)]
HIDDEN_LAYERS = (128, 64)
SEED = 0
# load_digits pixels are counts 0..16 of an 8x8 grid; the network trains on x/16 and
# the 1/16 is folded into the first layer, so the model takes the raw 0..16 values.
PIXEL_MAX = 16.0
FALLBACK_THRESHOLD = 0.9
CLOUD_MODEL = "digits-cloud"
SELFTEST_VECTORS = 64
SELFTEST_MIN_MARGIN = 8.0 / 256.0
# False: the model's input and output tensors are int8 and the agent's backend
# quantizes the caller's floats (the full-integer contract of this bundle). True
# would put QUANTIZE/DEQUANTIZE in the graph instead: same answers, and measured
# faster at large batches, because numpy's quantization passes cost more than the
# model (see converters/tflite_int8.py).
FLOAT_IO = False
# Refuse to ship an int8 model that lost more than this much accuracy to quantization.
MAX_INT8_ACCURACY_LOSS = 0.01


def train_mlp(split: DigitsSplit) -> MLPClassifier:
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    clf = MLPClassifier(hidden_layer_sizes=HIDDEN_LAYERS, max_iter=600, random_state=SEED)
    # One BLAS thread: threads only add contention for matrices this small, and a
    # different reduction order would change the weights' last bits (and the
    # bundle's sha256) from machine to machine.
    with threadpool_limits(limits=1):
        return clf.fit(split.x_train / PIXEL_MAX, split.y_train)


def mlp_layers(clf: MLPClassifier) -> list[Dense]:
    """The classifier's layers, taking raw 0..16 pixels (the 1/16 folded into layer 0)."""
    from edgefleet.converters.tflite_int8 import Dense, dense_layers_from_sklearn

    layers = dense_layers_from_sklearn(clf)
    first = layers[0]
    return [Dense(first.weight / PIXEL_MAX, first.bias), *layers[1:]]


def preprocessing(input_quant: QuantParams | None) -> ImagePreprocessing:
    # A photo of a dark digit on light paper: invert, shrink to 8x8 with area
    # averaging, and map 0..255 to load_digits' 0..16.
    return ImagePreprocessing(
        input=INPUT,
        width=8,
        height=8,
        color="GRAY",
        layout="NC",
        interpolation="area",
        invert=True,
        scale=PIXEL_MAX / 255.0,
        mean=[0.0],
        std=[1.0],
        input_quantization=input_quant,
    )


def manifest_fields(
    version: str, input_quant: QuantParams | None, metrics: dict[str, Any]
) -> dict[str, Any]:
    return {
        "name": NAME,
        "version": version,
        "runtime": "litert",
        "description": (
            "Handwritten digit (0-9) classifier for 8x8 grey images with pixel counts"
            " 0..16 (sklearn digits), an MLP quantized to full int8 for LiteRT."
        ),
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, N_FEATURES]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(LABELS)]}],
        "labels": LABELS,
        "preprocessing": preprocessing(input_quant).model_dump(),
        "postprocessing": ClassificationPost(output=OUTPUT, top_k=3).model_dump(),
        "confidence": {"rule": "top1"},
        # As digits-edge (ONNX): unsure answers go to the more accurate cloud model.
        "fallback": {
            "mode": "cloud_when_unsure",
            "threshold": FALLBACK_THRESHOLD,
            "cloud_model": CLOUD_MODEL,
        },
        "metrics": metrics,
    }


def _write_models(
    layers: list[Dense], split: DigitsSplit, directory: Path
) -> tuple[Path, TFLiteModelInfo, Path, TFLiteModelInfo]:
    from edgefleet.converters.tflite_int8 import write_mlp_tflite

    common: dict[str, Any] = {"input_name": INPUT, "output_name": OUTPUT}
    int8_path, fp32_path = directory / "digits-int8.tflite", directory / "digits-fp32.tflite"
    # Calibrate on the training split only: the test split stays unseen.
    int8 = write_mlp_tflite(
        int8_path, layers, precision="int8", calibration=split.x_train, float_io=FLOAT_IO, **common
    )
    fp32 = write_mlp_tflite(fp32_path, layers, precision="fp32", **common)
    return int8_path, int8, fp32_path, fp32


def _run_backend(
    model_path: Path, fields: dict[str, Any], x: np.ndarray, repeats: int = 0
) -> tuple[np.ndarray, float | None]:
    """Probabilities from the agent's own LiteRT backend, and the batch-1 latency (ms)."""
    from edgefleet.core.backends.config import LiteRTConfig
    from edgefleet.core.backends.litert import LiteRTBackend
    from edgefleet.core.bundle.archive import sha256_file
    from edgefleet.core.bundle.manifest import Manifest

    doc = dict(fields)
    doc["model_file"] = model_path.name
    doc["files"] = {model_path.name: {"sha256": sha256_file(model_path), "size": 0}}
    backend = LiteRTBackend(model_path, Manifest.model_validate(doc), LiteRTConfig(num_threads=1))
    backend.load()
    try:
        probs = backend.infer({INPUT: x})[OUTPUT]
        if not repeats:
            return probs, None
        one = {INPUT: x[:1]}
        backend.infer(one)  # warm-up: the first call after a resize reallocates
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            backend.infer(one)
            times.append(time.perf_counter() - t0)
        return probs, float(np.median(times) * 1000.0)
    finally:
        backend.unload()


def _selftest_inputs(x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Test images whose top-1 leads by a margin one rounding step cannot erase.

    Int8 kernels differ by one quantization step (1/256) between XNNPACK and the
    builtin kernels; a near-tie could then flip the argmax and fail a healthy box.
    """
    top2 = np.sort(probs, axis=1)[:, -2:]
    clear = np.flatnonzero(top2[:, 1] - top2[:, 0] >= SELFTEST_MIN_MARGIN)
    return x[clear[:SELFTEST_VECTORS]]


def build(ctx: BuildContext) -> list[Path]:
    """Write ``digits-edge-litert-<version>.bundle`` into ``ctx.build_dir``.

    The int8 and fp32 ``.tflite`` files stay in ``ctx.work_dir("digits_litert")``
    for inspection and benchmarks; only the int8 one is bundled.
    """
    from edgefleet.converters.bundler import build_bundle
    from models.recipe import RecipeError

    split = load_split()
    clf = train_mlp(split)
    acc_sklearn = float(clf.score(split.x_test / PIXEL_MAX, split.y_test))
    layers = mlp_layers(clf)
    int8_path, int8, fp32_path, fp32 = _write_models(layers, split, ctx.work_dir("digits_litert"))
    if int8.input_quant is None:  # int8 always has it; this narrows the type
        raise RecipeError(f"{NAME}: the int8 model has no input quantization")
    input_quant = QuantParams(scale=int8.input_quant.scale, zero_point=int8.input_quant.zero_point)
    fields = manifest_fields(ctx.version, input_quant, {})
    p_int8, ms_int8 = _run_backend(int8_path, fields, split.x_test, repeats=200)
    p_fp32, ms_fp32 = _run_backend(fp32_path, fields, split.x_test, repeats=200)
    acc_int8 = float(np.mean(p_int8.argmax(axis=1) == split.y_test))
    acc_fp32 = float(np.mean(p_fp32.argmax(axis=1) == split.y_test))
    if acc_fp32 - acc_int8 > MAX_INT8_ACCURACY_LOSS:
        raise RecipeError(
            f"{NAME}: int8 accuracy {acc_int8:.4f} is more than"
            f" {MAX_INT8_ACCURACY_LOSS:.0%} below fp32 {acc_fp32:.4f}"
        )
    metrics: dict[str, Any] = {
        "dataset": "sklearn load_digits, stratified 25% test split, random_state=0",
        "test_samples": len(split.y_test),
        "architecture": "MLP " + "-".join(str(n) for n in int8.layer_sizes),
        "accuracy_sklearn": round(acc_sklearn, 4),
        "accuracy_fp32": round(acc_fp32, 4),
        "accuracy_int8": round(acc_int8, 4),
        "int8_fp32_top1_agreement": round(
            float(np.mean(p_int8.argmax(axis=1) == p_fp32.argmax(axis=1))), 4
        ),
        "size_bytes_int8": int8.size_bytes,
        "size_bytes_fp32": fp32.size_bytes,
        "latency_ms_int8_batch1_1thread": round(ms_int8 or 0.0, 4),
        "latency_ms_fp32_batch1_1thread": round(ms_fp32 or 0.0, 4),
        "quantization": "full int8, per-channel weights, min/max calibration on the training split",
        "int8_io": "float32 (in-graph QUANTIZE)" if int8.float_io else "int8",
    }
    out = ctx.build_dir / f"{NAME}-{ctx.version}.bundle"
    build_bundle(
        out=out,
        model_file=int8_path,
        manifest=manifest_fields(ctx.version, input_quant, metrics),
        test_inputs={INPUT: _selftest_inputs(split.x_test, p_int8)},
        private_key=ctx.private_key,
        # Integer kernels may round one step differently on another CPU (or
        # without XNNPACK); the predicted digit must still be the same.
        self_test={"argmax_output": OUTPUT, "min_argmax_agreement": 1.0},
        # The held-out digits' reference profile: the agent's drift score compares
        # live pixels and answers with it (core/drift.py).
        profile_inputs={INPUT: split.x_test.astype(np.float32)},
    )
    return [out]

"""Measure a model the way the agent will run it: accuracy, size, latency.

Models are run through the agent's own backend (``edgefleet.core.backends.create_backend``)
with the default runtime configuration, so the figures a converter writes into a
manifest are the figures a store PC with the same CPU would see, not those of some
differently tuned session.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.core.backends import Backend, create_backend
from edgefleet.core.backends.config import BackendConfig
from edgefleet.core.bundle.archive import sha256_file
from edgefleet.core.bundle.manifest import OIP_TO_NUMPY, Manifest
from edgefleet.core.errors import EdgefleetError

log = logging.getLogger(__name__)

RUNTIME_BY_SUFFIX = {".onnx": "onnx", ".tflite": "litert"}
# Batches for accuracy runs: big enough to amortise call overhead, small enough
# that an image model's eval set never has to sit in memory as one tensor.
EVAL_BATCH = 64


class EvaluationError(EdgefleetError):
    """The model or the evaluation data cannot be used as given."""


def runtime_for(model_file: Path) -> str:
    try:
        return RUNTIME_BY_SUFFIX[model_file.suffix.lower()]
    except KeyError:
        raise EvaluationError(
            f"{model_file.name}: cannot tell the runtime from the suffix"
            f" (expected one of {sorted(RUNTIME_BY_SUFFIX)})"
        ) from None


def manifest_for(model_file: Path, fields: Mapping[str, Any]) -> Manifest:
    """A throw-away manifest describing ``model_file``, enough to create a backend."""
    doc = {k: v for k, v in fields.items() if k not in ("self_test", "metrics")}
    doc.setdefault("runtime", runtime_for(model_file))
    doc["model_file"] = model_file.name
    # The size is irrelevant here; only the bundle writer's entry is checked.
    doc["files"] = {model_file.name: {"sha256": sha256_file(model_file), "size": 0}}
    return Manifest.model_validate(doc)


@contextmanager
def open_model(
    model_file: Path, fields: Mapping[str, Any], runtime: BackendConfig | None = None
) -> Iterator[Backend]:
    """A loaded agent backend for ``model_file``, described by manifest ``fields``."""
    manifest = manifest_for(model_file, fields)
    backend = create_backend(model_file, manifest, runtime or BackendConfig())
    backend.load()
    try:
        yield backend
    finally:
        backend.unload()


@dataclass(frozen=True)
class EvalSet:
    """Labelled evaluation data: model inputs by name and integer class labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray | slice) -> dict[str, np.ndarray]:
        return {name: value[index] for name, value in self.inputs.items()}


_X_KEYS = ("x", "X", "X_test")
_Y_KEYS = ("y", "Y", "y_test")


def load_npz(path: Path) -> dict[str, np.ndarray]:
    # Never unpickle: an .npz from elsewhere must not be able to run code.
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"cannot read {path}: {exc}") from exc


def inputs_from_arrays(
    arrays: Mapping[str, np.ndarray], input_names: list[str], what: str
) -> dict[str, np.ndarray]:
    """Map npz arrays to model inputs: by input name, or ``x`` for a one-input model."""
    if all(name in arrays for name in input_names):
        return {name: arrays[name] for name in input_names}
    if len(input_names) == 1:
        for key in _X_KEYS:
            if key in arrays:
                return {input_names[0]: arrays[key]}
    raise EvaluationError(
        f"{what} holds {sorted(arrays)}; expected an array per model input"
        f" {input_names}" + (" or 'x'" if len(input_names) == 1 else "")
    )


def load_eval_set(path: Path, input_specs: list[Mapping[str, Any]]) -> EvalSet:
    """Read an ``.npz`` with ``x`` (or one array per input name) and labels ``y``."""
    arrays = load_npz(path)
    names = [str(spec["name"]) for spec in input_specs]
    inputs = inputs_from_arrays(arrays, names, path.name)
    y_key = next((k for k in _Y_KEYS if k in arrays), None)
    if y_key is None:
        raise EvaluationError(f"{path.name} has no labels array 'y'")
    labels = np.asarray(arrays[y_key])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise EvaluationError(
            f"{path.name}: 'y' must be a 1-D array of integer class ids, got"
            f" {labels.dtype} {labels.shape}"
        )
    dtypes = {str(s["name"]): OIP_TO_NUMPY[str(s["datatype"])] for s in input_specs}
    for name, value in inputs.items():
        if value.shape[0] != labels.shape[0]:
            raise EvaluationError(
                f"{path.name}: input {name!r} has {value.shape[0]} samples, y has {labels.shape[0]}"
            )
        inputs[name] = np.ascontiguousarray(value, dtype=dtypes[name])
    return EvalSet(inputs, labels.astype(np.int64))


def fixed_batch(manifest: Manifest) -> int | None:
    """The batch size a model insists on (common in .tflite), or None when it is dynamic."""
    fixed = {t.shape[0] for t in manifest.inputs if t.shape and t.shape[0] > 0}
    return fixed.pop() if len(fixed) == 1 else None


def predict(backend: Backend, data: EvalSet, output: str) -> np.ndarray:
    """Run the whole eval set; return ``output`` (class scores or class ids) for every sample."""
    fixed = fixed_batch(backend.manifest)
    batch = fixed or EVAL_BATCH
    parts: list[np.ndarray] = []
    for start in range(0, len(data), batch):
        chunk = data.take(slice(start, start + batch))
        got = next(iter(chunk.values())).shape[0]
        if fixed is not None and got < fixed:
            # Pad the last chunk of a fixed-batch model, then drop the padding.
            chunk = {k: _pad(v, fixed) for k, v in chunk.items()}
        result = backend.infer(chunk)
        if output not in result:
            raise EvaluationError(f"model has no output {output!r} (has {sorted(result)})")
        parts.append(np.asarray(result[output])[:got])
    return np.concatenate(parts, axis=0)


def _pad(value: np.ndarray, size: int) -> np.ndarray:
    pad = [(0, size - value.shape[0])] + [(0, 0)] * (value.ndim - 1)
    return np.pad(value, pad, mode="edge")


def class_ids(output: np.ndarray) -> np.ndarray:
    """Scores (N, classes) → argmax; an output that already is class ids passes through."""
    if output.ndim >= 2 and output.shape[-1] > 1:
        ids: np.ndarray = output.reshape(output.shape[0], -1).argmax(axis=-1)
        return ids
    return output.reshape(output.shape[0]).astype(np.int64)


def latency_ms(
    backend: Backend,
    sample: Mapping[str, np.ndarray],
    runs: int = 200,
    warmup: int = 10,
    budget_s: float = 5.0,
) -> tuple[float, int]:
    """Median wall time of one ``infer`` call on ``sample``; returns (ms, runs made).

    The median, because a laptop or CI box stalls now and then and the mean would
    report those stalls as the model's speed. ``budget_s`` bounds a slow model to
    a few seconds (but at least 10 timed runs).
    """
    feed = dict(sample)
    for _ in range(warmup):
        backend.infer(feed)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < runs and (len(times) < 10 or time.perf_counter() < deadline):
        t0 = time.perf_counter_ns()
        backend.infer(feed)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(times), len(times)


@dataclass(frozen=True)
class ModelMetrics:
    path: Path
    accuracy: float
    size_bytes: int
    latency_ms: float
    latency_runs: int
    eval_samples: int
    quant_format: str
    # The scored output for every eval sample: used to pick robust test vectors.
    outputs: np.ndarray


def evaluate_model(
    model_file: Path,
    fields: Mapping[str, Any],
    data: EvalSet,
    output: str,
    *,
    latency_runs: int = 200,
    runtime: BackendConfig | None = None,
) -> ModelMetrics:
    """Accuracy on ``data`` (argmax of ``output`` against the labels), size and latency."""
    log.info("evaluating %s on %d samples", model_file.name, len(data))
    with open_model(model_file, fields, runtime) as backend:
        outputs = predict(backend, data, output)
        accuracy = float(np.mean(class_ids(outputs) == data.labels))
        fixed = fixed_batch(backend.manifest)
        one = data.take(slice(0, 1))
        if fixed is not None and fixed > 1:
            one = {k: _pad(v, fixed) for k, v in one.items()}
        log.info("measuring latency of %s (up to %d runs)", model_file.name, latency_runs)
        lat, made = latency_ms(backend, one, runs=latency_runs)
    metrics = ModelMetrics(
        path=model_file,
        accuracy=accuracy,
        size_bytes=model_file.stat().st_size,
        latency_ms=lat,
        latency_runs=made,
        eval_samples=len(data),
        quant_format=quant_format_of(model_file),
        outputs=outputs,
    )
    log.info(
        "  %s: accuracy %.4f, %d bytes, %.3f ms median (batch 1), format %s",
        model_file.name,
        metrics.accuracy,
        metrics.size_bytes,
        lat,
        metrics.quant_format,
    )
    return metrics


_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
_DYNAMIC_OPS = {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def quant_format_of(model_file: Path) -> str:
    """``fp32``, ``qdq``, ``qoperator`` or ``dynamic`` for ONNX; ``int8``/``fp32`` for TFLite."""
    if model_file.suffix.lower() == ".tflite":
        return _tflite_format(model_file)
    import onnx  # converter-side dependency; the agent never needs it

    model = onnx.load(str(model_file), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    if ops & _DYNAMIC_OPS:
        return "dynamic"
    if any(op.startswith("QLinear") or op.endswith("Integer") for op in ops):
        return "qoperator"
    if ops & _QDQ_OPS:
        return "qdq"
    return "fp32"


def _tflite_format(model_file: Path) -> str:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        return "unknown"
    interpreter = Interpreter(model_path=str(model_file))
    kinds = {np.dtype(d["dtype"]) for d in interpreter.get_tensor_details()}
    return "int8" if kinds & {np.dtype(np.int8), np.dtype(np.uint8)} else "fp32"

"""ONNX Runtime post-training quantization with the defaults that pay on our CPUs.

FIELD-NOTES: on the AVX-512 VNNI boxes only *static* quantization with uint8
activations and int8 weights (u8s8) beat fp32; int8 activations (s8s8) and dynamic
quantization were 2-20x slower. So static QDQ u8s8 is the default, the other
combinations stay available (other CPUs, NPUs that want s8s8) but warn.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from edgefleet.converters.evaluate import (
    EvaluationError,
    inputs_from_arrays,
    load_npz,
    quant_format_of,
)
from edgefleet.core.errors import EdgefleetError

if TYPE_CHECKING:  # onnxruntime.quantization pulls in onnx: imported only when quantizing
    from onnxruntime.quantization import CalibrationDataReader, QuantType

log = logging.getLogger(__name__)

Mode = Literal["static", "dynamic"]
Format = Literal["qdq", "qoperator", "auto"]
ModelFormat = Literal["qdq", "qoperator"]  # what "auto" chooses between
IntType = Literal["uint8", "int8"]
CalibrateMethod = Literal["minmax", "entropy", "percentile"]

CALIBRATION_BATCH = 32
DEFAULT_CALIBRATION_SAMPLES = 1000


class QuantizationError(EdgefleetError):
    """The model cannot be quantized as asked; the message says why and what to do."""


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    mode: str
    format: str
    activations: str
    weights: str
    # Batch-1 median latency (ms) of each candidate format, when ``auto`` measured them.
    measured_ms: dict[str, float] = field(default_factory=dict)


def _input_specs(model_path: Path) -> list[tuple[str, list[int], str]]:
    """(name, shape with -1 for dynamic, numpy dtype) of each graph input."""
    from edgefleet.core.bundle.manifest import OIP_TO_NUMPY

    inputs = describe_onnx(model_path)["inputs"]
    return [(i["name"], i["shape"], OIP_TO_NUMPY[i["datatype"]]) for i in inputs]


def load_calibration(
    path: Path, model_path: Path, max_samples: int = DEFAULT_CALIBRATION_SAMPLES
) -> dict[str, np.ndarray]:
    """Calibration inputs from an ``.npz`` (``x`` or one array per model input)."""
    specs = _input_specs(model_path)
    arrays = load_npz(path)
    try:
        inputs = inputs_from_arrays(arrays, [s[0] for s in specs], path.name)
    except EvaluationError as exc:
        raise QuantizationError(str(exc)) from exc
    n = min(v.shape[0] for v in inputs.values())
    # Evenly spread, not the first N: eval sets are often sorted by class.
    index = np.linspace(0, n - 1, num=min(n, max_samples)).round().astype(int)
    dtypes = {name: dtype for name, _, dtype in specs}
    return {k: np.ascontiguousarray(v[index], dtype=dtypes[k]) for k, v in inputs.items()}


def _calibration_reader(data: Mapping[str, np.ndarray], model_path: Path) -> CalibrationDataReader:
    from onnxruntime.quantization import CalibrationDataReader

    dims = {shape[0] for _, shape, _ in _input_specs(model_path) if shape}
    fixed = dims.pop() if len(dims) == 1 and min(dims) > 0 else None
    batch = fixed or CALIBRATION_BATCH

    class NpzReader(CalibrationDataReader):  # type: ignore[misc]  # ORT has no types
        """Feeds calibration samples in batches the model accepts."""

        def __init__(self) -> None:
            n = min(v.shape[0] for v in data.values())
            # A fixed-batch model gets only whole batches: the tail is dropped.
            stop = n - n % batch if fixed else n
            self._batches = iter(
                [{k: v[i : i + batch] for k, v in data.items()} for i in range(0, stop, batch)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    return NpzReader()


class _DropOrtChatter(logging.Filter):
    """ORT's quantizer logs advice on the root logger; our log already says what we did."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno < logging.ERROR and "onnxruntime" in record.pathname.replace("\\", "/")
        )


@contextmanager
def _quiet_ort() -> Iterator[None]:
    root = logging.getLogger()
    chatter = _DropOrtChatter()
    root.addFilter(chatter)
    try:
        yield
    finally:
        root.removeFilter(chatter)


def preprocess(model_path: Path, out: Path) -> Path:
    """Shape inference + graph fusion (e.g. MatMul+Add → Gemm) before quantizing.

    Symbolic shape inference is skipped: it needs sympy, which we do not ship, and
    plain ONNX shape inference is enough for the models we quantize. When the
    pre-processor cannot handle a model, quantizing the original still works.
    """
    from onnxruntime.quantization import quant_pre_process

    try:
        with _quiet_ort():
            quant_pre_process(str(model_path), str(out), skip_symbolic_shape=True)
    except Exception as exc:  # an optimisation only: report and go on
        log.warning("pre-processing %s failed (%s); quantizing it as is", model_path.name, exc)
        shutil.copyfile(model_path, out)
    return out


def _qtype(name: IntType) -> QuantType:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def _quantize_once(
    source: Path,
    out: Path,
    *,
    mode: Mode,
    fmt: Literal["qdq", "qoperator"],
    activations: IntType,
    weights: IntType,
    calibration: Mapping[str, np.ndarray] | None,
    per_channel: bool,
    method: CalibrateMethod,
    display: str,
) -> None:
    """One quantization run; ``display`` names the user's model in errors (not the temp copy)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    with _quiet_ort():
        try:
            if mode == "dynamic":
                quantize_dynamic(
                    str(source), str(out), per_channel=per_channel, weight_type=_qtype(weights)
                )
            else:
                assert calibration is not None
                quantize_static(
                    str(source),
                    str(out),
                    _calibration_reader(calibration, source),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    per_channel=per_channel,
                    activation_type=_qtype(activations),
                    weight_type=_qtype(weights),
                    calibrate_method={
                        "minmax": CalibrationMethod.MinMax,
                        "entropy": CalibrationMethod.Entropy,
                        "percentile": CalibrationMethod.Percentile,
                    }[method],
                )
        except Exception as exc:
            if "ai.onnx domain" in str(exc):
                raise QuantizationError(
                    f"{display} uses only ai.onnx.ml operators (e.g. an skl2onnx"
                    " LogisticRegression or RandomForest), which ONNX Runtime cannot quantize;"
                    " use an MLP or a MatMul+Add model instead"
                ) from exc
            raise QuantizationError(f"quantizing {display} failed: {exc}") from exc
    if quant_format_of(out) == "fp32":
        raise QuantizationError(
            f"nothing in {display} was quantized: it has no operator ONNX Runtime"
            " quantizes (MatMul, Gemm, Conv...)"
        )


def quantize_model(
    model: Path,
    out: Path,
    *,
    mode: Mode = "static",
    fmt: Format = "qdq",
    activations: IntType = "uint8",
    weights: IntType = "int8",
    calibration: Mapping[str, np.ndarray] | None = None,
    per_channel: bool = False,
    method: CalibrateMethod = "minmax",
    latency_runs: int = 200,
) -> QuantizeResult:
    """Quantize ``model`` into ``out``. ``calibration``: inputs by name (static mode).

    ``fmt="auto"`` quantizes to both QDQ and QOperator, times each at batch 1 with
    the agent's backend and keeps the faster; ties go to QDQ, the more portable one.
    """
    if mode == "static" and not calibration:
        raise QuantizationError("static quantization needs calibration data")
    if mode == "dynamic":
        log.warning(
            "dynamic quantization was 2-20x slower than fp32 on the measured x86 CPUs;"
            " compare latency before shipping it"
        )
    elif (activations, weights) != ("uint8", "int8"):
        log.warning(
            "activations %s / weights %s: only uint8/int8 (u8s8) beat fp32 on the measured"
            " x86 CPUs",
            activations,
            weights,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp_dir:
        tmp = Path(tmp_dir)
        log.info("pre-processing %s", model.name)
        source = preprocess(model, tmp / "pre.onnx")
        formats: list[ModelFormat]
        if mode == "dynamic":
            formats = ["qoperator"]
        elif fmt == "auto":
            formats = ["qdq", "qoperator"]
        else:
            formats = [fmt]
        candidates: dict[ModelFormat, Path] = {}
        for f in formats:
            log.info(
                "quantizing %s: %s %s, activations %s, weights %s%s",
                model.name,
                mode,
                f,
                activations,
                weights,
                ", per channel" if per_channel else "",
            )
            candidates[f] = tmp / f"{f}.onnx"
            _quantize_once(
                source,
                candidates[f],
                mode=mode,
                fmt=f,
                activations=activations,
                weights=weights,
                calibration=calibration,
                per_channel=per_channel,
                method=method,
                display=model.name,
            )
        measured: dict[str, float] = {}
        chosen = formats[0]
        if len(candidates) > 1:
            assert calibration is not None
            sample = {k: v[:1] for k, v in calibration.items()}
            for f, path in candidates.items():
                measured[f] = _latency(path, sample, latency_runs)
                log.info("  %s: %.3f ms median at batch 1", f, measured[f])
            chosen = min(formats, key=lambda f: (measured[f], f != "qdq"))
            log.info("keeping %s", chosen)
        shutil.copyfile(candidates[chosen], out)
    fmt_name = "dynamic" if mode == "dynamic" else chosen
    act = "uint8" if mode == "dynamic" else activations
    return QuantizeResult(out, mode, fmt_name, act, weights, measured)


def _latency(model: Path, sample: Mapping[str, np.ndarray], runs: int) -> float:
    from edgefleet.converters.evaluate import latency_ms, open_model

    with open_model(model, describe_onnx(model)) as backend:
        ms, _ = latency_ms(backend, sample, runs=runs)
    return ms


def describe_onnx(model: Path) -> dict[str, Any]:
    """Minimal manifest fields (name, inputs, outputs) read from an ONNX graph."""
    import onnx
    from onnx import helper

    from edgefleet.core.bundle.manifest import NUMPY_TO_OIP

    graph = onnx.load(str(model), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def spec(value: onnx.ValueInfoProto) -> dict[str, Any]:
        t = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return {"name": value.name, "datatype": NUMPY_TO_OIP[dtype], "shape": shape}

    return {
        "name": "candidate",
        "version": "0",
        "inputs": [spec(i) for i in graph.input if i.name not in initializers],
        "outputs": [spec(o) for o in graph.output],
    }

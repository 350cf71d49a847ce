"""A small TFLite writer for multi-layer perceptrons, full-integer (int8) or fp32.

LiteRT has no converter that works without TensorFlow, and TensorFlow (or torch +
litert-torch) is far too heavy for a converter that only has to turn a few dense
layers into a ``.tflite``. An MLP needs two builtin ops (four with float I/O), so this module writes
the flatbuffer itself, with the schema bindings that ship inside ``ai-edge-litert``
(``ai_edge_litert.schema_py_generated``; the PyPI ``tflite`` package has no object
API) and the ``flatbuffers`` package that ai-edge-litert already depends on.

The int8 model follows the TFLite 8-bit quantization spec, as TF's converter does
with ``inference_input_type=int8`` / ``inference_output_type=int8``:

* activations int8, asymmetric (per-tensor scale and zero point, from calibration
  min/max, the range always containing 0);
* weights int8, symmetric (zero point 0, values in [-127, 127]), per output channel
  by default or per tensor;
* biases int32 with scale ``input_scale * weight_scale`` and zero point 0;
* ReLU fused into FULLY_CONNECTED (the output range then starts at 0);
* SOFTMAX output with scale 1/256 and zero point -128 (the int8 kernel demands it).

By default the model's input and output tensors are int8 with quantization
parameters; the agent's LiteRT backend quantizes float input and dequantizes the
output, so a caller sends and receives floats. ``float_io=True`` puts QUANTIZE /
DEQUANTIZE ops at the edges instead (same answers; on a model this small numpy's
quantization passes cost more than LiteRT's in-graph ones). The batch dimension is
dynamic (``shape_signature`` -1), so LiteRT can resize it instead of looping.

The quantization here is honest post-training quantization with min/max
calibration, nothing more: no per-layer search, no bias correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as tfl

Precision = Literal["int8", "fp32"]

INT8_MIN, INT8_MAX = -128, 127
# Weights use the narrow range [-127, 127] (the spec's symmetric int8), so that
# -w is always representable.
WEIGHT_QMAX = 127
# The int8 SOFTMAX kernel refuses any other output quantization.
SOFTMAX_SCALE = 1.0 / 256.0
SOFTMAX_ZERO_POINT = -128
# TFLite's own converter aligns constant buffers to 16 bytes so that kernels and
# delegates may read weights in place from an mmapped file.
BUFFER_ALIGNMENT = 16
FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
SIGNATURE_KEY = "serving_default"

# Builtin op versions as TFLite's op_version.cc assigns them; an older runtime
# refuses a model whose op versions it does not know instead of misrunning it.
_OP_VERSIONS: dict[tuple[int, Precision], int] = {
    (tfl.BuiltinOperator.FULLY_CONNECTED, "fp32"): 1,
    (tfl.BuiltinOperator.FULLY_CONNECTED, "int8"): 4,
    (tfl.BuiltinOperator.SOFTMAX, "fp32"): 1,
    (tfl.BuiltinOperator.SOFTMAX, "int8"): 2,
    (tfl.BuiltinOperator.QUANTIZE, "int8"): 1,
    (tfl.BuiltinOperator.DEQUANTIZE, "int8"): 2,
}


@dataclass(frozen=True)
class Dense:
    """One fully connected layer: ``y = x @ weight + bias`` (sklearn's orientation)."""

    weight: np.ndarray  # (in_features, out_features)
    bias: np.ndarray  # (out_features,)

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])


@dataclass(frozen=True)
class TensorQuant:
    """Affine quantization of one tensor: ``real = scale * (q - zero_point)``."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class TFLiteModelInfo:
    """What was written, for the bundle manifest and for tests."""

    precision: Precision
    size_bytes: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_quant: TensorQuant | None
    output_quant: TensorQuant | None
    per_channel: bool
    layer_sizes: tuple[int, ...]
    # int8 inside, float32 at the model's edges (QUANTIZE / DEQUANTIZE ops).
    float_io: bool = False


def dense_layers_from_sklearn(clf: Any) -> list[Dense]:
    """The layers of a fitted ``sklearn.neural_network.MLPClassifier``.

    Only what the writer can express exactly is accepted: ReLU hidden layers and a
    softmax output (sklearn uses a single logistic unit for two classes, which this
    writer does not model).
    """
    activation = getattr(clf, "activation", None)
    out_activation = getattr(clf, "out_activation_", None)
    if not hasattr(clf, "coefs_"):
        raise ValueError("expected a fitted MLPClassifier (no coefs_)")
    if activation != "relu":
        raise ValueError(f"hidden activation must be 'relu', not {activation!r}")
    if out_activation != "softmax":
        raise ValueError(
            f"output activation must be 'softmax' (3+ classes), not {out_activation!r}"
        )
    return [
        Dense(np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64))
        for w, b in zip(clf.coefs_, clf.intercepts_, strict=True)
    ]


def check_layers(layers: Sequence[Dense]) -> None:
    if not layers:
        raise ValueError("an MLP needs at least one dense layer")
    for i, layer in enumerate(layers):
        if layer.weight.ndim != 2 or layer.bias.shape != (layer.out_features,):
            raise ValueError(
                f"layer {i}: weight must be (in, out) and bias (out,); got"
                f" {layer.weight.shape} and {layer.bias.shape}"
            )
        if not (np.all(np.isfinite(layer.weight)) and np.all(np.isfinite(layer.bias))):
            raise ValueError(f"layer {i}: weights or bias are not finite")
        if i and layers[i - 1].out_features != layer.in_features:
            raise ValueError(
                f"layer {i} takes {layer.in_features} features but layer {i - 1}"
                f" gives {layers[i - 1].out_features}"
            )


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    p: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return p


def mlp_activations(layers: Sequence[Dense], x: np.ndarray) -> list[np.ndarray]:
    """Float64 outputs of every layer (after ReLU for hidden layers; logits last)."""
    out: list[np.ndarray] = []
    h = np.asarray(x, dtype=np.float64)
    for i, layer in enumerate(layers):
        h = h @ layer.weight + layer.bias
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
        out.append(h)
    return out


def mlp_forward(layers: Sequence[Dense], x: np.ndarray) -> np.ndarray:
    """The float64 reference: class probabilities, as sklearn's ``predict_proba``."""
    return _softmax(mlp_activations(layers, x)[-1])


def choose_qparams(rmin: float, rmax: float) -> TensorQuant:
    """Asymmetric int8 parameters for a real range, the way TFLite's converter nudges.

    The range is widened to contain 0 so that 0 (ReLU's floor, zero padding) is
    exactly representable; a degenerate range gets scale 1 rather than a division
    by zero.
    """
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if rmax - rmin < 1e-12:
        return TensorQuant(1.0, 0)
    scale = (rmax - rmin) / (INT8_MAX - INT8_MIN)
    zero_point = int(np.clip(round(INT8_MIN - rmin / scale), INT8_MIN, INT8_MAX))
    # Stored as float32 in the model; keep the value the kernels will see.
    return TensorQuant(float(np.float32(scale)), zero_point)


def quantize(x: np.ndarray, q: TensorQuant) -> np.ndarray:
    """Float to int8 as TFLite's QUANTIZE op does (round half away from zero)."""
    v = np.asarray(x, dtype=np.float64) / q.scale
    r = np.sign(v) * np.floor(np.abs(v) + 0.5)
    clipped: np.ndarray = np.clip(r + q.zero_point, INT8_MIN, INT8_MAX)
    return clipped.astype(np.int8)


def dequantize(x: np.ndarray, q: TensorQuant) -> np.ndarray:
    return ((x.astype(np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)).astype(
        np.float32
    )


def _weight_scales(w_out_in: np.ndarray, per_channel: bool) -> np.ndarray:
    """Symmetric scales, one per output row (or one for all); all-zero rows get 1."""
    absmax = np.abs(w_out_in).max(axis=1) if per_channel else np.array([np.abs(w_out_in).max()])
    scales = absmax / WEIGHT_QMAX
    return np.where(scales > 0, scales, 1.0).astype(np.float32)


class _AlignedBufferT(tfl.BufferT):  # type: ignore[misc]
    """A buffer whose bytes start on a 16-byte boundary of the file.

    The generated ``BufferT.Pack`` aligns data only to its element size (1 byte);
    this mirrors ``Builder.CreateNumpyVector`` with the alignment TFLite wants.
    """

    def Pack(self, builder: flatbuffers.Builder) -> int:
        if self.data is None:
            return super().Pack(builder)  # type: ignore[no-any-return]
        payload = bytes(self.data)
        builder.StartVector(1, len(payload), BUFFER_ALIGNMENT)
        builder.head = builder.head - len(payload)
        builder.Bytes[builder.head : builder.head + len(payload)] = payload
        builder.vectorNumElems = len(payload)
        data = builder.EndVector()
        tfl.BufferStart(builder)
        tfl.BufferAddData(builder, data)
        return tfl.BufferEnd(builder)  # type: ignore[no-any-return]


class _GraphBuilder:
    """Collects tensors, buffers and operators of a single-subgraph model."""

    def __init__(self, precision: Precision) -> None:
        self.precision = precision
        # Buffer 0 is the empty sentinel every tensor without constant data points at.
        self.buffers: list[tfl.BufferT] = [tfl.BufferT()]
        self.tensors: list[tfl.TensorT] = []
        self.operators: list[tfl.OperatorT] = []
        self.opcodes: list[tfl.OperatorCodeT] = []
        self._opcode_index: dict[int, int] = {}

    def tensor(
        self,
        name: str,
        shape: Sequence[int],
        dtype: int,
        *,
        data: np.ndarray | None = None,
        scales: Sequence[float] | None = None,
        zero_points: Sequence[int] | None = None,
        quantized_dimension: int = 0,
        dynamic_batch: bool = False,
    ) -> int:
        t = tfl.TensorT()
        t.name = name
        t.type = dtype
        t.shape = list(shape)
        if dynamic_batch:
            t.shapeSignature = [-1, *shape[1:]]
        t.buffer = 0
        if data is not None:
            buf = _AlignedBufferT()
            buf.data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        if scales is not None:
            qp = tfl.QuantizationParametersT()
            qp.scale = [float(s) for s in scales]
            qp.zeroPoint = [int(z) for z in (zero_points or [0] * len(scales))]
            qp.quantizedDimension = quantized_dimension
            t.quantization = qp
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(
        self,
        code: int,
        inputs: Sequence[int],
        outputs: Sequence[int],
        options_type: int,
        options: Any,
    ) -> None:
        if code not in self._opcode_index:
            oc = tfl.OperatorCodeT()
            # Codes below 127 must also be stored in the deprecated int8 field,
            # which is all that runtimes before TF 2.4 read.
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.builtinCode = code
            oc.version = _OP_VERSIONS[(code, self.precision)]
            self._opcode_index[code] = len(self.opcodes)
            self.opcodes.append(oc)
        o = tfl.OperatorT()
        o.opcodeIndex = self._opcode_index[code]
        o.inputs = list(inputs)
        o.outputs = list(outputs)
        o.builtinOptionsType = options_type
        o.builtinOptions = options
        self.operators.append(o)

    def finish(self, inputs: Sequence[int], outputs: Sequence[int], description: str) -> bytes:
        sg = tfl.SubGraphT()
        sg.tensors = self.tensors
        sg.inputs = list(inputs)
        sg.outputs = list(outputs)
        sg.operators = self.operators
        sg.name = "main"

        def tensor_map(index: int) -> tfl.TensorMapT:
            m = tfl.TensorMapT()
            m.name = self.tensors[index].name
            m.tensorIndex = index
            return m

        # A signature lets LiteRT's SignatureRunner address tensors by name too.
        sig = tfl.SignatureDefT()
        sig.inputs = [tensor_map(i) for i in inputs]
        sig.outputs = [tensor_map(i) for i in outputs]
        sig.signatureKey = SIGNATURE_KEY
        sig.subgraphIndex = 0

        model = tfl.ModelT()
        model.version = SCHEMA_VERSION
        model.operatorCodes = self.opcodes
        model.subgraphs = [sg]
        model.description = description
        model.buffers = self.buffers
        model.signatureDefs = [sig]
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())


def _fc_options(relu: bool) -> tfl.FullyConnectedOptionsT:
    opts = tfl.FullyConnectedOptionsT()
    opts.fusedActivationFunction = (
        tfl.ActivationFunctionType.RELU if relu else tfl.ActivationFunctionType.NONE
    )
    opts.weightsFormat = tfl.FullyConnectedOptionsWeightsFormat.DEFAULT
    opts.keepNumDims = False
    return opts


def _softmax_options() -> tfl.SoftmaxOptionsT:
    opts = tfl.SoftmaxOptionsT()
    opts.beta = 1.0
    return opts


def _activation_ranges(
    layers: Sequence[Dense], calibration: np.ndarray
) -> tuple[TensorQuant, list[TensorQuant]]:
    x = np.asarray(calibration, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != layers[0].in_features or len(x) == 0:
        raise ValueError(
            f"calibration data must be (n, {layers[0].in_features}) with n > 0, got {x.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("calibration data holds non-finite values")
    acts = mlp_activations(layers, x)
    return (
        choose_qparams(x.min(), x.max()),
        [choose_qparams(a.min(), a.max()) for a in acts],
    )


def mlp_to_tflite(
    layers: Sequence[Dense],
    *,
    precision: Precision = "int8",
    calibration: np.ndarray | None = None,
    per_channel: bool = True,
    dynamic_batch: bool = True,
    float_io: bool = False,
    input_name: str = "input",
    output_name: str = "probabilities",
    description: str = "edgefleet converters.tflite_int8 MLP",
) -> tuple[bytes, TFLiteModelInfo]:
    """Serialize ``layers`` (ReLU between them, softmax at the end) as a ``.tflite``.

    ``calibration`` (representative float inputs, shape (n, in_features)) is needed
    for int8: it fixes the activation ranges. ``dynamic_batch=False`` writes a model
    with a fixed batch of 1, as most TFLite models in the wild are. ``float_io=True``
    (int8 only) puts QUANTIZE / DEQUANTIZE ops at the edges so the model itself takes
    and returns float32, as TF's converter does by default; without it the model's
    input and output tensors are int8. Returns the model bytes and a summary.
    """
    check_layers(layers)
    if precision not in ("int8", "fp32"):
        raise ValueError(f"precision must be 'int8' or 'fp32', not {precision!r}")
    n_in, n_out = layers[0].in_features, layers[-1].out_features
    g = _GraphBuilder(precision)
    fc, softmax = tfl.BuiltinOperator.FULLY_CONNECTED, tfl.BuiltinOperator.SOFTMAX
    fc_opt_type = tfl.BuiltinOptions.FullyConnectedOptions
    sm_opt_type = tfl.BuiltinOptions.SoftmaxOptions
    last = len(layers) - 1
    batch = -1 if dynamic_batch else 1

    if precision == "fp32":
        f32 = tfl.TensorType.FLOAT32
        current = g.tensor(input_name, [1, n_in], f32, dynamic_batch=dynamic_batch)
        model_input = current
        for i, layer in enumerate(layers):
            w = g.tensor(
                f"dense_{i}/weight",
                [layer.out_features, layer.in_features],
                f32,
                data=layer.weight.T.astype(np.float32),
            )
            b = g.tensor(
                f"dense_{i}/bias", [layer.out_features], f32, data=layer.bias.astype(np.float32)
            )
            name = "logits" if i == last else f"dense_{i}/relu"
            out = g.tensor(name, [1, layer.out_features], f32, dynamic_batch=dynamic_batch)
            g.op(fc, [current, w, b], [out], fc_opt_type, _fc_options(relu=i != last))
            current = out
        probs = g.tensor(output_name, [1, n_out], f32, dynamic_batch=dynamic_batch)
        g.op(softmax, [current], [probs], sm_opt_type, _softmax_options())
        data = g.finish([model_input], [probs], description)
        return data, TFLiteModelInfo(
            "fp32",
            len(data),
            (batch, n_in),
            (batch, n_out),
            None,
            None,
            False,
            (n_in, *(layer.out_features for layer in layers)),
        )

    if calibration is None:
        raise ValueError("int8 needs calibration data (representative inputs)")
    i8, i32 = tfl.TensorType.INT8, tfl.TensorType.INT32
    in_q, act_qs = _activation_ranges(layers, calibration)
    current = g.tensor(
        f"{input_name}/int8" if float_io else input_name,
        [1, n_in],
        i8,
        scales=[in_q.scale],
        zero_points=[in_q.zero_point],
        dynamic_batch=dynamic_batch,
    )
    model_input, current_q = current, in_q
    if float_io:
        f32 = tfl.TensorType.FLOAT32
        model_input = g.tensor(input_name, [1, n_in], f32, dynamic_batch=dynamic_batch)
        g.op(
            tfl.BuiltinOperator.QUANTIZE,
            [model_input],
            [current],
            tfl.BuiltinOptions.QuantizeOptions,
            tfl.QuantizeOptionsT(),
        )
    for i, layer in enumerate(layers):
        w_oi = layer.weight.T  # TFLite stores FULLY_CONNECTED weights as (out, in)
        w_scales = _weight_scales(w_oi, per_channel)
        col = w_scales.astype(np.float64)[:, None]
        w_q = np.clip(np.round(w_oi / col), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
        # The kernel checks bias_scale == input_scale * weight_scale (to 1e-6), so
        # compute it from the float32 values stored in the model.
        b_scales = (np.float32(current_q.scale) * w_scales).astype(np.float32)
        b_q = np.round(layer.bias / b_scales.astype(np.float64))
        b_q = np.clip(b_q, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        w = g.tensor(
            f"dense_{i}/weight",
            list(w_q.shape),
            i8,
            data=w_q,
            scales=w_scales.tolist(),
            zero_points=[0] * len(w_scales),
        )
        b = g.tensor(
            f"dense_{i}/bias",
            [layer.out_features],
            i32,
            data=b_q,
            scales=b_scales.tolist(),
            zero_points=[0] * len(b_scales),
        )
        out_q = act_qs[i]
        name = "logits" if i == last else f"dense_{i}/relu"
        out = g.tensor(
            name,
            [1, layer.out_features],
            i8,
            scales=[out_q.scale],
            zero_points=[out_q.zero_point],
            dynamic_batch=dynamic_batch,
        )
        g.op(fc, [current, w, b], [out], fc_opt_type, _fc_options(relu=i != last))
        current, current_q = out, out_q
    probs_q = TensorQuant(SOFTMAX_SCALE, SOFTMAX_ZERO_POINT)
    probs = g.tensor(
        f"{output_name}/int8" if float_io else output_name,
        [1, n_out],
        i8,
        scales=[probs_q.scale],
        zero_points=[probs_q.zero_point],
        dynamic_batch=dynamic_batch,
    )
    g.op(softmax, [current], [probs], sm_opt_type, _softmax_options())
    model_output = probs
    if float_io:
        model_output = g.tensor(
            output_name, [1, n_out], tfl.TensorType.FLOAT32, dynamic_batch=dynamic_batch
        )
        g.op(
            tfl.BuiltinOperator.DEQUANTIZE,
            [probs],
            [model_output],
            tfl.BuiltinOptions.DequantizeOptions,
            tfl.DequantizeOptionsT(),
        )
    data = g.finish([model_input], [model_output], description)
    return data, TFLiteModelInfo(
        "int8",
        len(data),
        (batch, n_in),
        (batch, n_out),
        in_q,
        probs_q,
        per_channel,
        (n_in, *(layer.out_features for layer in layers)),
        float_io,
    )


def write_mlp_tflite(path: Path, layers: Sequence[Dense], **kwargs: Any) -> TFLiteModelInfo:
    """``mlp_to_tflite`` written to ``path``; same keyword arguments."""
    data, info = mlp_to_tflite(layers, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return info


__all__ = [
    "Dense",
    "TFLiteModelInfo",
    "TensorQuant",
    "choose_qparams",
    "dense_layers_from_sklearn",
    "dequantize",
    "mlp_forward",
    "mlp_to_tflite",
    "quantize",
    "write_mlp_tflite",
]

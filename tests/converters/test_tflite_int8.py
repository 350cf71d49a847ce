"""The int8/fp32 TFLite MLP writer, checked against the real LiteRT interpreter."""

from __future__ import annotations

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as tfl
from ai_edge_litert.interpreter import Interpreter

from edgefleet.converters.tflite_int8 import (
    SOFTMAX_SCALE,
    SOFTMAX_ZERO_POINT,
    Dense,
    TensorQuant,
    choose_qparams,
    dense_layers_from_sklearn,
    dequantize,
    mlp_forward,
    mlp_to_tflite,
    quantize,
    write_mlp_tflite,
)
from models.digits_litert import PIXEL_MAX, DigitsSplit, load_split, mlp_layers, train_mlp


@pytest.fixture(scope="module")
def digits() -> tuple[DigitsSplit, object, list[Dense]]:
    split = load_split()
    clf = train_mlp(split)
    return split, clf, mlp_layers(clf)


def run_litert(model: bytes, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """One batched call through a bare LiteRT interpreter (no edgefleet code)."""
    it = Interpreter(model_content=model, num_threads=threads)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape), strict=True)
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    return it.get_tensor(out["index"])


def run_int8(model: bytes, x: np.ndarray) -> np.ndarray:
    it = Interpreter(model_content=model)
    (in_scale, in_zp), (out_scale, out_zp) = (
        it.get_input_details()[0]["quantization"],
        it.get_output_details()[0]["quantization"],
    )
    q = run_litert(model, quantize(x, TensorQuant(in_scale, in_zp)))
    return dequantize(q, TensorQuant(out_scale, out_zp))


# ---- quantization arithmetic ---------------------------------------------------------


def test_qparams_cover_zero_and_use_the_full_int8_range():
    q = choose_qparams(0.0, 16.0)
    assert q.zero_point == -128
    assert q.scale == pytest.approx(16.0 / 255.0)
    # A range that excludes 0 is widened to include it (ReLU floors, padding).
    assert choose_qparams(2.0, 4.0) == choose_qparams(0.0, 4.0)
    neg = choose_qparams(-3.0, -1.0)
    assert neg.zero_point == 127
    mid = choose_qparams(-1.0, 1.0)
    assert mid.zero_point in (-1, 0)
    assert quantize(np.array([0.0]), mid)[0] == mid.zero_point  # 0 is exact
    assert choose_qparams(0.0, 0.0) == TensorQuant(1.0, 0)


def test_quantize_rounds_half_away_from_zero_and_saturates():
    q = TensorQuant(1.0, 0)
    got = quantize(np.array([-2.5, -0.5, 0.5, 1.5, 2.5, -1000.0, 1000.0]), q)
    assert got.tolist() == [-3, -1, 1, 2, 3, -128, 127]
    assert got.dtype == np.int8
    # 8 / (16/255) = 127.5 exactly: half rounds up, away from zero.
    pixels = quantize(np.array([0.0, 8.0, 16.0]), TensorQuant(16.0 / 255.0, -128))
    assert pixels.tolist() == [-128, 0, 127]


# ---- what the file holds ---------------------------------------------------------------


def _read(model: bytes) -> tfl.ModelT:
    assert tfl.Model.ModelBufferHasIdentifier(model, 0)
    return tfl.ModelT.InitFromPackedBuf(model, 0)


def test_int8_model_follows_the_tflite_quantization_spec(digits):
    split, _, layers = digits
    data, info = mlp_to_tflite(
        layers, precision="int8", calibration=split.x_train, input_name="pixels"
    )
    model = _read(data)
    sg = model.subgraphs[0]
    ops = [model.operatorCodes[o.opcodeIndex].builtinCode for o in sg.operators]
    fc, sm = tfl.BuiltinOperator.FULLY_CONNECTED, tfl.BuiltinOperator.SOFTMAX
    assert ops == [fc] * len(layers) + [sm]
    versions = {oc.builtinCode: oc.version for oc in model.operatorCodes}
    assert versions == {fc: 4, sm: 2}

    tensors = sg.tensors
    inp = tensors[sg.inputs[0]]
    assert inp.name == b"pixels" or inp.name == "pixels"
    assert inp.type == tfl.TensorType.INT8
    assert list(inp.shapeSignature) == [-1, 64]
    assert info.input_quant == TensorQuant(
        float(np.float32(16.0 / 255.0)), -128
    )  # calibrated on 0..16 pixels

    for i, op in enumerate(sg.operators[:-1]):
        x, w, b = (tensors[j] for j in op.inputs)
        out = tensors[op.outputs[0]]
        assert (x.type, w.type, b.type, out.type) == (
            tfl.TensorType.INT8,
            tfl.TensorType.INT8,
            tfl.TensorType.INT32,
            tfl.TensorType.INT8,
        )
        relu = op.builtinOptions.fusedActivationFunction == tfl.ActivationFunctionType.RELU
        assert relu == (i < len(layers) - 1)
        if relu:
            assert out.quantization.zeroPoint[0] == -128  # range starts at 0
        w_scales = np.asarray(w.quantization.scale, dtype=np.float64)
        assert len(w_scales) == layers[i].out_features  # per channel
        assert w.quantization.quantizedDimension == 0
        assert set(np.asarray(w.quantization.zeroPoint).tolist()) == {0}
        wq = np.frombuffer(bytes(model.buffers[w.buffer].data), dtype=np.int8)
        assert wq.min() >= -127  # symmetric narrow range
        assert wq.reshape(w.shape).shape == (layers[i].out_features, layers[i].in_features)
        expected = np.float32(x.quantization.scale[0]) * w_scales.astype(np.float32)
        np.testing.assert_allclose(b.quantization.scale, expected, rtol=1e-6)
        assert set(np.asarray(b.quantization.zeroPoint).tolist()) == {0}

    probs = tensors[sg.outputs[0]]
    assert probs.type == tfl.TensorType.INT8
    assert probs.quantization.scale[0] == pytest.approx(SOFTMAX_SCALE)
    assert probs.quantization.zeroPoint[0] == SOFTMAX_ZERO_POINT
    assert model.signatureDefs[0].signatureKey in (b"serving_default", "serving_default")


def test_constant_buffers_are_16_byte_aligned(digits):
    split, _, layers = digits
    data, _ = mlp_to_tflite(layers, precision="int8", calibration=split.x_train)
    root = tfl.Model.GetRootAs(data, 0)
    checked = 0
    for i in range(root.BuffersLength()):
        buf = root.Buffers(i)
        if buf.DataLength():
            offset = buf._tab.Vector(buf._tab.Offset(4))  # start of the bytes in the file
            assert offset % 16 == 0
            checked += 1
    assert checked == 2 * len(layers)


# ---- accuracy with the real runtime ---------------------------------------------------


def test_int8_accuracy_within_one_point_of_sklearn(digits):
    split, clf, layers = digits
    acc_sklearn = clf.score(split.x_test / PIXEL_MAX, split.y_test)
    for per_channel in (True, False):
        data, info = mlp_to_tflite(
            layers, precision="int8", calibration=split.x_train, per_channel=per_channel
        )
        probs = run_int8(data, split.x_test)
        acc = float(np.mean(probs.argmax(axis=1) == split.y_test))
        assert acc >= acc_sklearn - 0.01, (per_channel, acc, acc_sklearn)
        assert info.size_bytes == len(data)
    # Per-tensor weights are smaller (one scale per tensor), per-channel the default.
    small, _ = mlp_to_tflite(layers, calibration=split.x_train, per_channel=False)
    big, _ = mlp_to_tflite(layers, calibration=split.x_train)
    assert len(small) < len(big)


def test_fp32_matches_sklearn_predict_proba(digits):
    split, clf, layers = digits
    data, info = mlp_to_tflite(layers, precision="fp32")
    assert info.input_quant is None and info.precision == "fp32"
    got = run_litert(data, split.x_test)
    want = clf.predict_proba(split.x_test / PIXEL_MAX)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # sklearn computed in float32 (it trained on float32 pixels); the reference in float64.
    np.testing.assert_allclose(mlp_forward(layers, split.x_test), want, atol=1e-6)
    # int8 is ~4x smaller than fp32.
    int8, _ = mlp_to_tflite(layers, calibration=split.x_train)
    assert len(int8) < len(data) / 2.5


def test_float_io_variant_quantizes_inside_the_graph(digits):
    split, _, layers = digits
    plain, _ = mlp_to_tflite(layers, calibration=split.x_train)
    data, info = mlp_to_tflite(layers, calibration=split.x_train, float_io=True)
    assert info.float_io and info.input_quant == choose_qparams(0.0, 16.0)
    model = _read(data)
    sg = model.subgraphs[0]
    ops = [model.operatorCodes[o.opcodeIndex].builtinCode for o in sg.operators]
    assert ops[0] == tfl.BuiltinOperator.QUANTIZE and ops[-1] == tfl.BuiltinOperator.DEQUANTIZE
    assert sg.tensors[sg.inputs[0]].type == tfl.TensorType.FLOAT32
    assert sg.tensors[sg.outputs[0]].type == tfl.TensorType.FLOAT32
    got = run_litert(data, split.x_test.astype(np.float32))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, run_int8(plain, split.x_test), atol=1.0 / 256 + 1e-6)


def test_fixed_batch_model_has_no_dynamic_dimension(digits):
    split, _, layers = digits
    data, info = mlp_to_tflite(layers, calibration=split.x_train, dynamic_batch=False)
    it = Interpreter(model_content=data)
    assert it.get_input_details()[0]["shape_signature"].tolist() == [1, 64]
    assert info.input_shape == (1, 64)


def test_write_mlp_tflite_writes_the_file(digits, tmp_path):
    split, _, layers = digits
    path = tmp_path / "sub" / "m.tflite"
    info = write_mlp_tflite(path, layers, precision="int8", calibration=split.x_train[:100])
    assert path.stat().st_size == info.size_bytes
    assert not list(path.parent.glob("*.tmp"))
    Interpreter(model_path=str(path)).allocate_tensors()


# ---- refusals --------------------------------------------------------------------------


def test_refuses_what_it_cannot_express(digits):
    split, _, layers = digits
    with pytest.raises(ValueError, match="calibration"):
        mlp_to_tflite(layers, precision="int8")
    with pytest.raises(ValueError, match="calibration data must be"):
        mlp_to_tflite(layers, precision="int8", calibration=split.x_train[:, :10])
    with pytest.raises(ValueError, match="takes"):
        mlp_to_tflite([layers[0], layers[2]], precision="fp32")
    with pytest.raises(ValueError, match="at least one"):
        mlp_to_tflite([], precision="fp32")
    bad = Dense(np.full((64, 10), np.nan), np.zeros(10))
    with pytest.raises(ValueError, match="not finite"):
        mlp_to_tflite([bad], precision="fp32")
    with pytest.raises(ValueError, match="precision"):
        mlp_to_tflite(layers, precision="int4")  # type: ignore[arg-type]


def test_sklearn_import_checks_the_activations(digits):
    from sklearn.neural_network import MLPClassifier

    split, _, _ = digits
    tanh = MLPClassifier(hidden_layer_sizes=(8,), activation="tanh", max_iter=5, random_state=0)
    with pytest.warns(Warning):  # not converged after 5 iterations: fine here
        tanh.fit(split.x_train[:200], split.y_train[:200])
    with pytest.raises(ValueError, match="relu"):
        dense_layers_from_sklearn(tanh)
    with pytest.raises(ValueError, match="fitted"):
        dense_layers_from_sklearn(MLPClassifier())

"""The digits recipe: real training, conversion, quantization and bundling."""

from __future__ import annotations

import cv2
import numpy as np

from edgefleet.agent.config import load_config
from edgefleet.converters.bundletools import read_manifest_unverified, verify_bundle
from edgefleet.converters.evaluate import open_model
from edgefleet.converters.quantize import quantize_model
from edgefleet.converters.sklearn import sklearn_to_onnx
from edgefleet.core.bundle.manifest import ImagePreprocessing
from models.__main__ import main as build_main
from models.digits import (
    CLOUD_SPEC,
    EDGE_SPEC,
    INPUT,
    LABEL,
    SCORES,
    load_split,
    load_test_set,
    render_digit_png,
    train_edge,
)


def test_int8_edge_within_one_point_of_fp32_and_cloud_more_accurate(digits):
    edge, cloud = digits.build.edge.metrics, digits.build.cloud.metrics
    assert edge["eval_samples"] == cloud["eval_samples"] == 450
    assert edge["quant_format"] == "qdq" and cloud["quant_format"] == "fp32"
    assert abs(edge["accuracy_fp32"] - edge["accuracy_int8"]) * 100 <= 1.0
    assert edge["accuracy_drop_points"] <= 1.0
    assert edge["accuracy_int8"] >= 0.96
    assert cloud["accuracy_fp32"] > edge["accuracy_int8"]
    assert cloud["accuracy_fp32"] >= 0.985
    assert edge["size_bytes_int8"] < edge["size_bytes_fp32"] < cloud["size_bytes_fp32"]
    for m in (edge, cloud):
        assert m["latency_ms_fp32"] > 0


def test_bundles_verify_and_self_test_on_this_machine(digits):
    for report, name in ((digits.build.edge, "digits-edge"), (digits.build.cloud, "digits-cloud")):
        assert report.out.name == f"{name}-1.bundle"
        assert report.out.parent == digits.build_dir
        result = verify_bundle(report.out, [digits.ctx.public_key_path], self_test=True)
        assert result.key_id == digits.ctx.key_id
        assert result.self_test == "passed 32 vectors"
        m = result.manifest
        assert m.name == name and m.version == "1" and m.runtime == "onnx"
        assert m.labels == [str(i) for i in range(10)]
        assert [t.name for t in m.inputs] == [INPUT] and m.inputs[0].shape == [-1, 64]
        assert [t.name for t in m.outputs] == [SCORES, LABEL]
    edge = read_manifest_unverified(digits.build.edge.out)[0]
    assert edge.fallback.cloud_model == "digits-cloud" and edge.fallback.threshold == 0.9
    assert edge.self_test is not None and edge.self_test.argmax_output == SCORES


def test_edge_and_cloud_answer_the_same_request(digits):
    x, y = load_test_set(digits.build.test_set)
    request = {INPUT: x[:16]}
    answers = {}
    for path, spec in ((digits.build.int8_onnx, EDGE_SPEC), (digits.build.cloud_onnx, CLOUD_SPEC)):
        with open_model(path, {**spec, "version": "1"}) as backend:
            answers[spec["name"]] = backend.infer(request)
    for out in answers.values():
        assert set(out) == {SCORES, LABEL}
        assert out[SCORES].shape == (16, 10) and out[SCORES].dtype == np.float32
        np.testing.assert_allclose(out[SCORES].sum(axis=1), 1.0, atol=0.02)
        np.testing.assert_array_equal(out[LABEL], out[SCORES].argmax(axis=1))
        assert np.mean(out[LABEL] == y[:16]) >= 0.9


def test_held_out_split_is_saved(digits):
    x, y = load_test_set(digits.build.test_set)
    assert x.shape == (450, 64) and x.dtype == np.float32
    assert y.shape == (450,) and y.dtype == np.int64
    assert 0 <= x.min() and x.max() <= 16
    assert np.bincount(y).min() >= 40  # stratified: every digit well represented
    with np.load(digits.build.test_set, allow_pickle=False) as data:
        np.testing.assert_array_equal(data["X_test"], x)


def test_rendered_png_round_trips_through_the_image_preprocessing(digits):
    from edgefleet.core.processing.image import preprocess

    x, y = load_test_set(digits.build.test_set)
    spec = ImagePreprocessing.model_validate(EDGE_SPEC["preprocessing"])
    png = render_digit_png(x[0])
    assert png.startswith(b"\x89PNG")
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert img.shape == (64, 64)
    assert img.mean() > 128  # white paper, dark ink
    tensors = np.concatenate([preprocess(render_digit_png(x[i]), spec)[0] for i in range(40)])
    assert tensors.shape == (40, 64)
    np.testing.assert_allclose(tensors, x[:40], atol=16 / 255 + 1e-6)
    with open_model(digits.build.int8_onnx, {**EDGE_SPEC, "version": "1"}) as backend:
        predicted = backend.infer({INPUT: tensors})[LABEL]
    assert np.mean(predicted == y[:40]) >= 0.95


def test_agent_yaml_serves_every_bundle_and_if_missing_skips(digits):
    config = load_config(digits.build_dir / "agent.yaml")
    # The store PC's config serves the edge model; the cloud model is the cloud's.
    assert [m.bundle.name for m in config.models] == ["digits-edge-1.bundle"]
    assert all(m.labels == ["stable"] for m in config.models)
    assert config.trust.public_keys == [digits.ctx.public_key_path]
    assert config.store.path == digits.build_dir / "store"
    cloud = load_config(digits.build_dir / "cloud.yaml")
    assert cloud.profile == "cloud" and cloud.server.port == 8490
    assert [m.bundle.name for m in cloud.models] == ["digits-cloud-1.bundle"]

    before = {p: p.stat().st_mtime_ns for p in digits.build.bundles}
    assert (
        build_main(["--out", str(digits.build_dir), "--only", "digits", "--if-missing", "-q"]) == 0
    )
    assert {p: p.stat().st_mtime_ns for p in digits.build.bundles} == before


def test_training_conversion_and_quantization_are_deterministic(digits, tmp_path):
    split = load_split()
    fp32 = sklearn_to_onnx(train_edge(split), 64, tmp_path / "again.onnx", input_name=INPUT)
    assert fp32.read_bytes() == digits.build.fp32_onnx.read_bytes()
    int8 = quantize_model(fp32, tmp_path / "again.int8.onnx", calibration={INPUT: split.x_train})
    assert int8.path.read_bytes() == digits.build.int8_onnx.read_bytes()

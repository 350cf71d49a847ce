"""edge-convert: conversion, quantization, the quality gate, sign / verify / inspect.

Real models throughout (the digits MLP and SVM from the session build, small sklearn
models trained here); no mocks.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import joblib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from edgefleet.converters.bundletools import inspect_bundle, verify_bundle
from edgefleet.converters.cli import EXIT_ERROR, EXIT_GATE, EXIT_OK, main
from edgefleet.converters.evaluate import EvalSet, quant_format_of
from edgefleet.converters.gate import (
    QualityGateError,
    SpecError,
    bundle_model,
    pick_test_vectors,
    prepare_spec,
)
from edgefleet.converters.quantize import QuantizationError, quantize_model
from edgefleet.converters.sklearn import sklearn_to_onnx
from edgefleet.core.bundle.signing import generate_keypair, load_private_key
from edgefleet.core.errors import BundleError, SignatureError
from models.digits import EDGE_SPEC, INPUT, load_test_set

METRIC_KEYS = {
    "accuracy_fp32",
    "accuracy_int8",
    "accuracy_drop_points",
    "size_bytes_fp32",
    "size_bytes_int8",
    "latency_ms_fp32",
    "latency_ms_int8",
    "eval_samples",
    "quant_format",
}


def eval_set(digits) -> EvalSet:
    x, y = load_test_set(digits.build.test_set)
    return EvalSet({INPUT: x}, y)


def garbage_int8(digits, out: Path) -> Path:
    """Calibrated on noise in [0, 0.5] instead of pixels 0..16: activations clip badly."""
    noise = np.random.default_rng(0).uniform(0, 0.5, size=(256, 64)).astype(np.float32)
    return quantize_model(digits.build.fp32_onnx, out, calibration={INPUT: noise}).path


def write_spec(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump({**EDGE_SPEC, "version": "7", **overrides}))
    return path


def rewrite_member(src: Path, dst: Path, name: str, change) -> None:
    """Copy a bundle, passing member ``name``'s bytes through ``change``."""
    with tarfile.open(src, "r:*") as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            f = tin.extractfile(m)
            assert f is not None
            data = f.read()
            if m.name == name:
                data = change(data)
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


# --- keygen ----------------------------------------------------------------------


def test_keygen_makes_private_key_0600_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path / "k"), "--name", "ci"]) == EXIT_OK
    key = tmp_path / "k" / "ci.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "k" / "ci.pub").exists()
    load_private_key(key)
    assert "key id" in capsys.readouterr().out

    before = key.read_bytes()
    assert main(["keygen", "--out", str(tmp_path / "k"), "--name", "ci"]) == EXIT_ERROR
    assert "refusing to overwrite" in capsys.readouterr().err
    assert key.read_bytes() == before


# --- sklearn -------------------------------------------------------------------------


def test_sklearn_cli_converts_joblib_with_plain_tensor_outputs(tmp_path, digits):
    from sklearn.linear_model import LogisticRegression

    x, y = load_test_set(digits.build.test_set)
    clf = LogisticRegression(max_iter=500).fit(x, y)
    joblib.dump(clf, tmp_path / "lr.joblib")
    out = tmp_path / "lr.onnx"
    rc = main(
        [
            "sklearn",
            "--model",
            str(tmp_path / "lr.joblib"),
            "--features",
            "64",
            "-o",
            str(out),
            "--input-name",
            "pixels",
            "--rename-output",
            "probabilities=scores",
        ]
    )
    assert rc == EXIT_OK
    sess = ort.InferenceSession(str(out))
    assert [i.name for i in sess.get_inputs()] == ["pixels"]
    label, scores = sess.run(["label", "scores"], {"pixels": x[:20]})
    # zipmap disabled: a (N, classes) float tensor, not a list of dicts
    assert isinstance(scores, np.ndarray) and scores.shape == (20, 10)
    np.testing.assert_allclose(scores, clf.predict_proba(x[:20]), atol=1e-4)
    np.testing.assert_array_equal(label, clf.predict(x[:20]))


def test_sklearn_help_warns_that_joblib_is_a_pickle(capsys):
    with pytest.raises(SystemExit):
        main(["sklearn", "--help"])
    assert "pickle" in capsys.readouterr().out


# --- quantize --------------------------------------------------------------------------


def test_quantize_cli_defaults_to_static_qdq_u8s8(tmp_path, digits):
    x, _ = load_test_set(digits.build.test_set)
    np.savez(tmp_path / "cal.npz", x=x)
    out = tmp_path / "q.onnx"
    rc = main(
        [
            "quantize",
            str(digits.build.fp32_onnx),
            "-o",
            str(out),
            "--calibration",
            str(tmp_path / "cal.npz"),
        ]
    )
    assert rc == EXIT_OK
    assert quant_format_of(out) == "qdq"
    model = onnx.load(str(out))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q_nodes
    # activations uint8: every runtime QuantizeLinear's zero point is uint8
    assert {inits[n.input[2]].dtype for n in q_nodes} == {np.dtype(np.uint8)}
    # weights int8: the quantized weight initializers
    assert any(v.dtype == np.int8 and v.ndim == 2 for v in inits.values())
    assert out.stat().st_size < digits.build.fp32_onnx.stat().st_size / 2


def test_quantize_static_needs_calibration(tmp_path, digits, capsys):
    rc = main(["quantize", str(digits.build.fp32_onnx), "-o", str(tmp_path / "q.onnx")])
    assert rc == EXIT_ERROR
    assert "--calibration" in capsys.readouterr().err


def test_quantize_auto_measures_both_formats_and_keeps_the_faster(tmp_path, digits):
    x, _ = load_test_set(digits.build.test_set)
    result = quantize_model(
        digits.build.fp32_onnx,
        tmp_path / "auto.onnx",
        fmt="auto",
        calibration={INPUT: x},
        latency_runs=50,
    )
    measured = result.measured_ms
    assert set(measured) == {"qdq", "qoperator"}
    assert measured[result.format] == min(measured.values())
    assert quant_format_of(result.path) == result.format


def test_quantize_refuses_model_with_only_ml_operators(tmp_path, digits):
    from sklearn.ensemble import RandomForestClassifier

    x, y = load_test_set(digits.build.test_set)
    forest = RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)
    model = sklearn_to_onnx(forest, 64, tmp_path / "rf.onnx", input_name=INPUT)
    with pytest.raises(QuantizationError, match="ai.onnx.ml|nothing in"):
        quantize_model(model, tmp_path / "rf.int8.onnx", calibration={INPUT: x})


# --- quality gate and bundle ---------------------------------------------------------------


def test_gate_refuses_damaged_int8_model_and_writes_nothing(tmp_path, digits):
    damaged = garbage_int8(digits, tmp_path / "damaged.onnx")
    out = tmp_path / "out" / "digits-edge-9.bundle"
    with pytest.raises(QualityGateError, match="points less accurate") as info:
        bundle_model(
            model=damaged,
            reference=digits.build.fp32_onnx,
            spec=EDGE_SPEC,
            eval_set=eval_set(digits),
            out=out,
            private_key=digits.ctx.private_key,
            version="9",
            latency_runs=20,
        )
    result = info.value.result
    assert result.drop_points is not None and result.drop_points > 1.0
    assert not out.exists()
    assert not list(tmp_path.glob("out/*"))


def test_gate_cli_exits_3_with_clear_message_and_no_bundle(tmp_path, digits, capsys):
    damaged = garbage_int8(digits, tmp_path / "damaged.onnx")
    out = tmp_path / "refused.bundle"
    rc = main(
        [
            "bundle",
            str(damaged),
            "--reference",
            str(digits.build.fp32_onnx),
            "--spec",
            str(write_spec(tmp_path / "spec.yaml")),
            "--eval",
            str(digits.build.test_set),
            "--key",
            str(digits.ctx.private_key_path),
            "-o",
            str(out),
            "--latency-runs",
            "20",
        ]
    )
    assert rc == EXIT_GATE
    err = capsys.readouterr().err
    assert "quality gate" in err and "no bundle written" in err
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_bundle_cli_accepts_good_model_then_verify_and_inspect(tmp_path, digits, capsys):
    out = tmp_path / "digits-edge-7.bundle"
    rc = main(
        [
            "bundle",
            str(digits.build.int8_onnx),
            "--reference",
            str(digits.build.fp32_onnx),
            "--spec",
            str(write_spec(tmp_path / "spec.yaml")),
            "--eval",
            str(digits.build.test_set),
            "--key",
            str(digits.ctx.private_key_path),
            "-o",
            str(out),
            "--latency-runs",
            "20",
            "--max-drop",
            "1.0",
        ]
    )
    assert rc == EXIT_OK, capsys.readouterr().err
    capsys.readouterr()

    assert (
        main(["verify", str(out), "--pubkey", str(digits.ctx.public_key_path), "--self-test"])
        == EXIT_OK
    )
    line = capsys.readouterr().out
    assert line.startswith("OK ") and digits.ctx.key_id in line and "passed 32 vectors" in line

    assert main(["inspect", str(out), "--json"]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "digits-edge" and info["version"] == "7"
    assert info["signed_by"] == digits.ctx.key_id
    metrics = info["metrics"]
    assert METRIC_KEYS <= set(metrics)
    assert metrics["accuracy_drop_points"] <= 1.0
    assert metrics["eval_samples"] == 450 and metrics["quant_format"] == "qdq"
    assert metrics["size_bytes_int8"] < metrics["size_bytes_fp32"]
    assert info["self_test"]["argmax_output"] == "probabilities"
    assert set(info["files"]) == {"model.onnx", "selftest.npz", "profile.json"}

    assert main(["inspect", str(out)]) == EXIT_OK
    text = capsys.readouterr().out
    assert "digits-edge:7" in text and "accuracy_int8" in text and "pixels FP32 [-1, 64]" in text


def test_quantized_model_without_reference_is_refused(tmp_path, digits):
    with pytest.raises(QualityGateError, match="no fp32 reference"):
        bundle_model(
            model=digits.build.int8_onnx,
            spec=EDGE_SPEC,
            eval_set=eval_set(digits),
            out=tmp_path / "x.bundle",
            private_key=None,
            version="1",
            latency_runs=5,
        )
    assert not (tmp_path / "x.bundle").exists()


def test_spec_errors_name_the_field(tmp_path, digits):
    model = digits.build.int8_onnx
    with pytest.raises(SpecError, match="model_file"):
        prepare_spec({**EDGE_SPEC, "version": "1", "model_file": "x.onnx"}, model)
    with pytest.raises(SpecError, match="postprocessing refers to unknown output"):
        prepare_spec(
            {
                **EDGE_SPEC,
                "version": "1",
                "postprocessing": {"type": "classification", "output": "nope"},
            },
            model,
        )
    with pytest.raises(SpecError, match="runtime"):
        prepare_spec({**EDGE_SPEC, "version": "1", "runtime": "litert"}, model)
    fields, _, _ = prepare_spec({**EDGE_SPEC, "version": 3}, model)
    assert fields["version"] == "3" and fields["runtime"] == "onnx"


def test_test_vectors_are_confident_correct_and_cover_every_class():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 10)
    scores = rng.uniform(0, 0.2, size=(40, 4))
    scores[np.arange(40), labels] += rng.uniform(0.05, 0.8, size=40)
    scores[3] = [0.1, 0.9, 0.0, 0.0]  # confidently wrong (label 0)
    picked = pick_test_vectors(scores, labels, 8)
    assert len(picked) == 8
    assert set(labels[picked]) == {0, 1, 2, 3}
    assert 3 not in picked
    top2 = np.sort(scores, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    for c in range(4):
        chosen = [i for i in picked if labels[i] == c]
        left = [i for i in np.flatnonzero(labels == c) if i not in picked and i != 3]
        # the widest-margin samples of each class were taken
        assert min(margin[chosen]) >= max(margin[left])


# --- sign / verify ----------------------------------------------------------------------------


def test_verify_fails_on_tampered_bundle(tmp_path, digits, capsys):
    src = digits.build.edge.out
    pub = str(digits.ctx.public_key_path)

    def flip(data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 0xFF])

    model_tampered = tmp_path / "model-tampered.bundle"
    rewrite_member(src, model_tampered, "model.onnx", flip)
    assert main(["verify", str(model_tampered), "--pubkey", pub]) == EXIT_ERROR
    assert "sha256 mismatch" in capsys.readouterr().err

    manifest_tampered = tmp_path / "manifest-tampered.bundle"
    rewrite_member(
        src,
        manifest_tampered,
        "manifest.json",
        lambda b: b.replace(b'"threshold": 0.9', b'"threshold": 0.1'),
    )
    with pytest.raises(SignatureError, match="manifest was altered"):
        verify_bundle(manifest_tampered, [digits.ctx.public_key_path])

    truncated = tmp_path / "truncated.bundle"
    truncated.write_bytes(src.read_bytes()[:2000])
    with pytest.raises(BundleError):
        verify_bundle(truncated, [digits.ctx.public_key_path])


def test_sign_with_another_key_changes_who_verifies(tmp_path, digits, capsys):
    other_priv, other_pub = generate_keypair(tmp_path / "other", "other")
    resigned = tmp_path / "resigned.bundle"
    assert (
        main(["sign", str(digits.build.edge.out), "--key", str(other_priv), "-o", str(resigned)])
        == EXIT_OK
    )
    capsys.readouterr()
    assert main(["verify", str(resigned), "--pubkey", str(other_pub)]) == EXIT_OK
    assert capsys.readouterr().out.startswith("OK ")
    assert main(["verify", str(resigned), "--pubkey", str(digits.ctx.public_key_path)]) == 1
    assert "untrusted key" in capsys.readouterr().err
    # the original is untouched
    assert verify_bundle(digits.build.edge.out, [digits.ctx.public_key_path]).key_id == (
        digits.ctx.key_id
    )

    inplace = tmp_path / "inplace.bundle"
    shutil.copyfile(digits.build.edge.out, inplace)
    assert main(["sign", str(inplace), "--key", str(other_priv)]) == EXIT_OK
    assert inspect_bundle(inplace)["signed_by"] != digits.ctx.key_id


def test_console_script_verify_and_inspect(tmp_path, digits):
    """The installed ``edge-convert`` entry point, as CI would call it."""
    exe = Path(sys.executable).with_name("edge-convert")
    if not exe.exists():
        pytest.skip("edge-convert console script not installed in this environment")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    ok = subprocess.run(
        [
            str(exe),
            "verify",
            str(digits.build.cloud.out),
            "--pubkey",
            str(digits.ctx.public_key_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK ") and "digits-cloud:1" in ok.stdout
    (tmp_path / "junk.bundle").write_bytes(b"not a tar file")
    bad = subprocess.run(
        [
            str(exe),
            "verify",
            str(tmp_path / "junk.bundle"),
            "--pubkey",
            str(digits.ctx.public_key_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 1 and "edge-convert: error:" in bad.stderr
    assert "not a readable bundle" in bad.stderr
    usage = subprocess.run(
        [str(exe), "-q", "inspect", str(tmp_path / "missing.bundle")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert usage.returncode == 2 and "no such file" in usage.stderr


# --- torch (optional extra) ---------------------------------------------------------------


def test_torch_subcommand_without_torch_says_how_to_install(tmp_path, capsys, monkeypatch):
    # A None entry makes `import torch` fail as on a box without the extra.
    monkeypatch.setitem(sys.modules, "torch", None)
    rc = main(
        ["torch", "--module", "json:loads", "--input-shape", "1,4", "-o", str(tmp_path / "m.onnx")]
    )
    assert rc == EXIT_ERROR
    assert ".[torch]" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def _tiny_torch_module():  # a factory for --module, imported by name in the test below
    import torch

    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_torch_export_runs_in_onnxruntime(tmp_path):
    import torch

    from edgefleet.converters.torch_export import export_torch

    module = _tiny_torch_module()
    torch.save(module.state_dict(), tmp_path / "w.pt")
    out = export_torch(
        "tests.converters.test_converters:_tiny_torch_module",
        tmp_path / "m.onnx",
        (1, 4),
        weights=tmp_path / "w.pt",
        input_name="x",
        output_names=["y"],
    )
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    (got,) = ort.InferenceSession(str(out)).run(["y"], {"x": x})
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

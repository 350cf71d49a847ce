"""The reference profile in the signed bundle (converters/bundler.py, core/drift.py):
written by ``edge-convert bundle`` and the digits recipe, covered by the signature
through its sha256 (a changed profile fails verification), optional (``--no-profile``)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgefleet.converters.bundletools import verify_bundle
from edgefleet.converters.cli import EXIT_ERROR, EXIT_OK, main
from edgefleet.core.bundle.manifest import PROFILE_NAME
from edgefleet.core.drift import ReferenceProfile
from edgefleet.core.errors import BundleError
from edgefleet.core.protocol import CONFIDENCE_BOUNDS
from models.digits import EDGE_SPEC, INPUT, load_test_set


def read_member(bundle: Path, name: str) -> bytes:
    with tarfile.open(bundle, "r:*") as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read()


def rewrite_member(src: Path, dst: Path, name: str, data: bytes) -> None:
    with tarfile.open(src, "r:*") as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            f = tin.extractfile(m)
            assert f is not None
            body = data if m.name == name else f.read()
            info = tarfile.TarInfo(m.name)
            info.size = len(body)
            tout.addfile(info, io.BytesIO(body))


def test_digits_recipe_bundle_carries_a_verified_profile(digits, tmp_path):
    bundle = digits.build.edge.out
    result = verify_bundle(bundle, [digits.ctx.public_key_path])
    m = result.manifest
    assert m.reference_profile == PROFILE_NAME and PROFILE_NAME in m.files
    profile = ReferenceProfile.model_validate_json(read_member(bundle, PROFILE_NAME))
    x, y = load_test_set(digits.build.test_set)
    assert profile.samples == len(y) == 450 and profile.bins == 10
    (inp,) = profile.inputs
    # 64 pixels: each its own feature, with the reference's quantile edges.
    assert inp.input == INPUT and inp.kind == "features" and len(inp.features) == 64
    f = inp.features[36]  # a central pixel: many values, up to 10 bins
    assert f.name == f"{INPUT}[36]" and 2 <= len(f.shares) <= 10
    assert f.edges == sorted(set(f.edges))
    # Right-inclusive bins: a pixel equal to an edge counts in the bin that edge ends.
    counts = np.bincount(np.searchsorted(f.edges, x[:, 36], side="left"), minlength=len(f.shares))
    assert f.shares == pytest.approx(list(counts / counts.sum()), abs=1e-5)
    # The class distribution: the model's answers, close to the balanced labels.
    assert profile.classes is not None and len(profile.classes.shares) == 10
    assert profile.classes.labels == m.labels
    assert max(abs(s - 0.1) for s in profile.classes.shares) < 0.03
    assert profile.confidence is not None and profile.confidence.le == list(CONFIDENCE_BOUNDS)
    assert profile.confidence.rule == m.confidence.rule
    assert sum(profile.confidence.shares) == pytest.approx(1.0)

    # Any change to the profile fails verification: the manifest lists its sha256
    # (here one digit, so the size still matches and the hash is what catches it).
    raw = read_member(bundle, PROFILE_NAME)
    assert raw.count(b'"samples":450') == 1
    tampered = tmp_path / "tampered.bundle"
    rewrite_member(bundle, tampered, PROFILE_NAME, raw.replace(b'"samples":450', b'"samples":451'))
    with pytest.raises(BundleError, match=r"profile\.json: sha256 mismatch"):
        verify_bundle(tampered, [digits.ctx.public_key_path])


def _bundle_cli(digits, tmp_path: Path, out: Path, *extra: str) -> int:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**EDGE_SPEC, "version": "8"}))
    return main(
        [
            "bundle",
            str(digits.build.fp32_onnx),
            "--spec",
            str(spec),
            "--eval",
            str(digits.build.test_set),
            "--key",
            str(digits.ctx.private_key_path),
            "-o",
            str(out),
            "--latency-runs",
            "10",
            *extra,
        ]
    )


def test_bundle_cli_profile_options(digits, tmp_path, capsys):
    five = tmp_path / "five.bundle"
    assert _bundle_cli(digits, tmp_path, five, "--profile-bins", "5") == EXIT_OK
    profile = ReferenceProfile.model_validate_json(read_member(five, PROFILE_NAME))
    assert profile.bins == 5
    assert max(len(f.shares) for f in profile.inputs[0].features) <= 5

    none = tmp_path / "none.bundle"
    assert _bundle_cli(digits, tmp_path, none, "--no-profile") == EXIT_OK
    m = verify_bundle(none, [digits.ctx.public_key_path]).manifest
    assert m.reference_profile is None and set(m.files) == {"model.onnx", "selftest.npz"}

    capsys.readouterr()
    bad = tmp_path / "bad.bundle"
    assert _bundle_cli(digits, tmp_path, bad, "--profile-bins", "1") == EXIT_ERROR
    assert "--profile-bins must be between 2 and 100" in capsys.readouterr().err
    assert not bad.exists()

"""The deliberately bad digits-edge (models/digits_bad.py): about 20 points worse than
version 1 on the held-out split, yet signed, self-testing and let through by the
converter's quality gate, so the demo and the benchmark can push it for real."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.converters.bundletools import read_manifest_unverified, verify_bundle
from edgefleet.converters.evaluate import open_model
from edgefleet.core.bundle.archive import read_bundle
from edgefleet.core.bundle.signing import TrustStore
from models.digits import EDGE_NAME, EDGE_SPEC, INPUT, LABEL, load_split, load_test_set
from models.digits_bad import (
    WORSE,
    WorseBuild,
    build_worse,
    confuse_labels,
    worse_bundle,
    worse_version,
)


@pytest.fixture(scope="module")
def worse20(digits) -> WorseBuild:
    return build_worse(digits.ctx, 20)


def test_twenty_points_worse_than_version_1_on_the_held_out_split(digits, worse20):
    v1 = digits.build.edge.metrics["accuracy_int8"]
    assert isinstance(v1, float) and v1 >= 0.96
    drop = (v1 - worse20.accuracy) * 100
    assert 15.0 <= drop <= 25.0, f"version 1 {v1:.4f}, bad {worse20.accuracy:.4f}"
    # The figure in the manifest is what the bundle's own model file does on that split.
    x, y = load_test_set(digits.build.test_set)
    trust = TrustStore.from_files([digits.ctx.public_key_path])
    contents = read_bundle(worse20.out, digits.build_dir / "unpacked-worse-20", trust, 1 << 30)
    model = contents.directory / contents.manifest.model_file
    with open_model(model, {**EDGE_SPEC, "version": worse_version(20)}) as backend:
        predicted = backend.infer({INPUT: x})[LABEL]
    assert float(np.mean(predicted == y)) == pytest.approx(worse20.accuracy, abs=1e-4)


def test_signed_with_the_version_1_key_self_tests_and_passes_the_quality_gate(digits, worse20):
    assert worse20.out == worse_bundle(digits.build_dir, 20)
    result = verify_bundle(worse20.out, [digits.ctx.public_key_path], self_test=True)
    assert result.key_id == digits.ctx.key_id
    assert result.self_test == "passed 32 vectors"
    m = result.manifest
    assert m.name == EDGE_NAME and m.version == "worse-20"
    v1 = read_manifest_unverified(digits.build.edge.out)[0]
    # Same contract as version 1: an agent serving version 1 can swap it in.
    assert m.inputs == v1.inputs and m.outputs == v1.outputs and m.labels == v1.labels
    assert m.preprocessing == v1.preprocessing and m.fallback == v1.fallback
    # The gate compared it with its own fp32 model: quantization cost under a point.
    assert worse20.report.gate.passed
    assert worse20.report.metrics["accuracy_drop_points"] <= 1.0
    assert m.metrics["label_confusion_share"] == WORSE[20]
    assert "DELIBERATELY BAD" in (m.description or "")


def test_confused_labels_are_deterministic_and_follow_the_share():
    split = load_split()
    a, b = confuse_labels(split, 0.27), confuse_labels(split, 0.27)
    np.testing.assert_array_equal(a, b)
    changed = a != split.y_train
    assert abs(changed.mean() - 0.27) < 0.01
    # Every class loses its share, and a confused label is never the true one.
    for c in range(10):
        assert abs(changed[split.y_train == c].mean() - 0.27) < 0.02
    assert not np.any(a[changed] == split.y_train[changed])
    assert not np.any(confuse_labels(split, 0.0) != split.y_train)
    assert (confuse_labels(split, 0.02) != split.y_train).sum() < changed.sum()

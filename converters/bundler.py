"""Assemble a signed bundle from a model file, its description and test inputs.

The expected outputs of the test vectors are produced here by the same backend
code the agent runs, so the agent's self-test checks that the box reproduces what
the converter saw. Given eval inputs, the bundle also gets their reference profile
(``profile.json``, core/drift.py): the inputs' bins and the model's class and
confidence distribution on them, scored by the agent's own scoring code, so the
agent can tell how far its live traffic drifted from what the model was measured on.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.core.backends import create_backend
from edgefleet.core.backends.config import BackendConfig
from edgefleet.core.bundle.archive import sha256_file, write_bundle
from edgefleet.core.bundle.manifest import PROFILE_NAME, Manifest
from edgefleet.core.bundle.selftest import save_vectors
from edgefleet.core.drift import DEFAULT_BINS, ReferenceProfile, build_profile
from edgefleet.core.processing.scoring import scorable, score

# Batches for the profile's model runs (the eval set never sits in memory as outputs).
PROFILE_BATCH = 64

MODEL_FILE_NAMES = {"onnx": "model.onnx", "litert": "model.tflite"}
SELFTEST_FILE = "selftest.npz"


def run_model(
    model_file: Path,
    manifest_fields: Mapping[str, Any],
    inputs: dict[str, np.ndarray],
    runtime: BackendConfig | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model_file`` once through the agent's backend for its runtime."""
    doc = dict(manifest_fields)
    doc["model_file"] = model_file.name
    doc["files"] = {model_file.name: {"sha256": sha256_file(model_file), "size": 0}}
    doc.pop("self_test", None)
    manifest = Manifest.model_validate(doc)
    backend = create_backend(model_file, manifest, runtime or BackendConfig())
    backend.load()
    try:
        return backend.infer(inputs)
    finally:
        backend.unload()


def make_profile(
    model_file: Path,
    manifest_fields: Mapping[str, Any],
    inputs: Mapping[str, np.ndarray],
    bins: int = DEFAULT_BINS,
    runtime: BackendConfig | None = None,
) -> ReferenceProfile:
    """The reference profile of eval ``inputs`` (batch first) for ``model_file``: the
    inputs' bins, and when the model's outputs can be scored, its top-1 classes and
    confidences on them (the manifest's confidence rule, the agent's scoring code)."""
    doc = dict(manifest_fields)
    doc["model_file"] = model_file.name
    doc["files"] = {model_file.name: {"sha256": sha256_file(model_file), "size": 0}}
    doc.pop("self_test", None)
    manifest = Manifest.model_validate(doc)
    n = min(int(v.shape[0]) for v in inputs.values())
    top: list[np.ndarray] = []
    conf: list[np.ndarray] = []
    if scorable(manifest):
        fixed = {t.shape[0] for t in manifest.inputs if t.shape and t.shape[0] > 0}
        batch = fixed.pop() if len(fixed) == 1 else PROFILE_BATCH
        backend = create_backend(model_file, manifest, runtime or BackendConfig())
        backend.load()
        try:
            for start in range(0, n, batch):
                chunk = {k: v[start : start + batch] for k, v in inputs.items()}
                got = next(iter(chunk.values())).shape[0]
                if got < batch and fixed:
                    chunk = {k: _pad(v, batch) for k, v in chunk.items()}
                scored = score(manifest, backend.infer(chunk))
                conf.append(scored.confidence[:got])
                if scored.top_class is not None:
                    top.append(scored.top_class[:got])
        finally:
            backend.unload()
    return build_profile(
        {k: v[:n] for k, v in inputs.items()},
        bins=bins,
        top_class=np.concatenate(top) if top else None,
        n_classes=len(manifest.labels),
        labels=manifest.labels,
        confidence=np.concatenate(conf) if conf else None,
        rule=manifest.confidence.rule,
    )


def _pad(value: np.ndarray, size: int) -> np.ndarray:
    pad = [(0, size - value.shape[0])] + [(0, 0)] * (value.ndim - 1)
    return np.pad(value, pad, mode="edge")


def build_bundle(
    *,
    out: Path,
    model_file: Path,
    manifest: Mapping[str, Any],
    test_inputs: dict[str, np.ndarray],
    private_key: Ed25519PrivateKey | None,
    self_test: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Path] | None = None,
    profile_inputs: Mapping[str, np.ndarray] | None = None,
    profile_bins: int = DEFAULT_BINS,
) -> Manifest:
    """Write ``out``: the model, test vectors made by running it, manifest, signature,
    and with ``profile_inputs`` (the eval inputs) their reference profile
    (``profile.json``, see ``make_profile``).

    ``manifest`` holds every manifest field except ``model_file``, ``files`` and
    ``self_test`` (whose tolerances come from ``self_test``).
    """
    runtime = manifest["runtime"]
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp_dir:
        tmp = Path(tmp_dir)
        model_name = MODEL_FILE_NAMES[runtime]
        shutil.copyfile(model_file, tmp / model_name)
        expected = run_model(tmp / model_name, manifest, test_inputs)
        save_vectors(tmp / SELFTEST_FILE, test_inputs, expected)
        doc = dict(manifest)
        doc["model_file"] = model_name
        doc["self_test"] = {"file": SELFTEST_FILE, **(self_test or {})}
        files = {model_name: tmp / model_name, SELFTEST_FILE: tmp / SELFTEST_FILE}
        files |= dict(extra_files or {})
        if profile_inputs is not None:
            profile = make_profile(tmp / model_name, manifest, profile_inputs, profile_bins)
            (tmp / PROFILE_NAME).write_text(profile.model_dump_json(), encoding="utf-8")
            files[PROFILE_NAME] = tmp / PROFILE_NAME
        return write_bundle(out, doc, files, private_key)

"""Assemble a signed bundle from a model file, its description and test inputs.

The expected outputs of the test vectors are produced here by the same backend
code the agent runs, so the agent's self-test checks that the box reproduces what
the converter saw.
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
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.bundle.selftest import save_vectors

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


def build_bundle(
    *,
    out: Path,
    model_file: Path,
    manifest: Mapping[str, Any],
    test_inputs: dict[str, np.ndarray],
    private_key: Ed25519PrivateKey | None,
    self_test: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, Path] | None = None,
) -> Manifest:
    """Write ``out``: the model, test vectors made by running it, manifest, signature.

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
        return write_bundle(out, doc, files, private_key)

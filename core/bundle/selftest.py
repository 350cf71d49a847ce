"""Self-test: a bundle's test vectors must reproduce before its version may serve.

Test vectors live in an ``.npz`` (never pickled: ``allow_pickle=False``) holding
``input.<name>`` and ``expected.<name>`` arrays.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgefleet.core.backends.base import Backend
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.errors import SelfTestError

INPUT_PREFIX = "input."
EXPECTED_PREFIX = "expected."


def load_vectors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise SelfTestError(f"test vectors {path.name} unreadable: {exc}") from exc
    inputs = {k[len(INPUT_PREFIX) :]: v for k, v in arrays.items() if k.startswith(INPUT_PREFIX)}
    expected = {
        k[len(EXPECTED_PREFIX) :]: v for k, v in arrays.items() if k.startswith(EXPECTED_PREFIX)
    }
    if not inputs or not expected:
        raise SelfTestError(f"test vectors {path.name} hold no inputs or no expected outputs")
    return inputs, expected


def save_vectors(
    path: Path, inputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> None:
    arrays = {INPUT_PREFIX + k: v for k, v in inputs.items()}
    arrays |= {EXPECTED_PREFIX + k: v for k, v in expected.items()}
    with open(path, "wb") as f:
        # No pickles in test vectors (load_vectors refuses them too).
        np.savez_compressed(f, allow_pickle=False, **arrays)


def run_self_test(backend: Backend, manifest: Manifest, directory: Path) -> str:
    """Run the bundle's test vectors; return a one-line summary or raise SelfTestError."""
    spec = manifest.self_test
    if spec is None:
        return "no test vectors"
    inputs, expected = load_vectors(directory / spec.file)
    try:
        got = backend.infer(inputs)
    except Exception as exc:
        raise SelfTestError(f"self-test inference failed: {exc}") from exc
    n = next(iter(inputs.values())).shape[0]
    for name, want in expected.items():
        if name not in got:
            raise SelfTestError(f"self-test: model produced no output {name!r}")
        have = got[name]
        if have.shape != want.shape:
            raise SelfTestError(
                f"self-test: output {name!r} has shape {have.shape}, expected {want.shape}"
            )
        if name == spec.argmax_output:
            agree = float(np.mean(have.argmax(axis=-1) == want.argmax(axis=-1)))
            if agree < spec.min_argmax_agreement:
                raise SelfTestError(
                    f"self-test: output {name!r} top-1 agrees on {agree:.1%} of {n} vectors,"
                    f" below {spec.min_argmax_agreement:.1%}"
                )
            continue
        if not np.allclose(have, want, atol=spec.atol, rtol=spec.rtol):
            worst = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))))
            raise SelfTestError(
                f"self-test: output {name!r} differs from the expected values"
                f" (max abs error {worst:.4g}, atol {spec.atol})"
            )
    return f"passed {n} vectors"

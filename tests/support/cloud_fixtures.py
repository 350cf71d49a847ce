"""Fixtures for the cloud-fallback tests (helpers in tests/support/cloud_helpers.py).

A pytest plugin, loaded by tests/conftest.py's ``pytest_plugins`` and never imported
directly, so pytest can rewrite its asserts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.converters.bundler import build_bundle
from edgefleet.core.bundle.signing import load_private_key
from tests.support.cloud_helpers import CLOUD_NAME, CLOUD_W, Servers, write_onnx
from tests.support.tiny import TEST_X, TINY_B, TINY_MANIFEST, TINY_W


@pytest.fixture(scope="session")
def cloud_bundles(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]
) -> dict[str, Path]:
    """Signed bundles: the edge model with fallback defaults, and cloud models good and bad."""
    out = tmp_path_factory.mktemp("cloud-bundles")
    private = load_private_key(keys[0])
    made: dict[str, Path] = {}

    def make(
        key: str,
        name: str,
        w: np.ndarray,
        b: np.ndarray,
        *,
        out_name: str = "probs",
        poison: bool = False,
        **fields: Any,
    ) -> None:
        model = write_onnx(out / f"{key}.onnx", w, b, out_name, poison)
        n = w.shape[1]
        manifest = {
            **TINY_MANIFEST,
            "name": name,
            "version": "1",
            "outputs": [{"name": out_name, "datatype": "FP32", "shape": [-1, n]}],
            "labels": [f"c{i}" for i in range(n)] if n != 3 else ["a", "b", "c"],
            "postprocessing": {"type": "classification", "output": out_name},
            **fields,
        }
        made[key] = out / f"{key}.bundle"
        build_bundle(
            out=made[key],
            model_file=model,
            manifest=manifest,
            test_inputs={"x": TEST_X},
            private_key=private,
            self_test={"atol": 1e-5},
        )

    edge_fallback = {"mode": "cloud_when_unsure", "threshold": 1.0, "cloud_model": CLOUD_NAME}
    make("edge", "tiny", TINY_W, TINY_B, fallback=edge_fallback)
    make("cloud", CLOUD_NAME, CLOUD_W, TINY_B, fallback={"mode": "edge_only"})
    make("poison", CLOUD_NAME, CLOUD_W, TINY_B, poison=True)
    five = np.concatenate([CLOUD_W, CLOUD_W[:, :2]], axis=1)
    make("five", CLOUD_NAME, five, np.zeros(5, np.float32))
    make("renamed", CLOUD_NAME, CLOUD_W, TINY_B, out_name="scores")
    return made


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    yield s
    await s.close()  # what it leaves running fails the test (tests/support/leaks.py)

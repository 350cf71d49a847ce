"""digits-edge bundles for the drift tests (tests/agent/test_drift.py,
tests/fleet/test_fleet_drift.py): the fp32 digits model signed with the test key, its
reference profile made on the training split, so the held-out split is new data of
the same distribution; and the OIP requests that feed an agent such digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from edgefleet.converters.bundler import build_bundle
from edgefleet.converters.gate import prepare_spec
from edgefleet.core.bundle.signing import load_private_key
from models.digits import EDGE_SPEC, INPUT, load_split


def digits_bundle(digits: Any, keys: Any, out_dir: Path, version: str, profile: bool) -> Path:
    """``digits-edge-<version>.bundle`` in ``out_dir``; ``profile``: with profile.json."""
    split = load_split()
    model = digits.build.fp32_onnx
    fields, _, _ = prepare_spec(EDGE_SPEC, model, version)
    out = out_dir / f"digits-edge-{version}.bundle"
    build_bundle(
        out=out,
        model_file=model,
        manifest=fields,
        test_inputs={INPUT: split.x_test[:8]},
        private_key=load_private_key(keys[0]),
        profile_inputs={INPUT: split.x_train} if profile else None,
    )
    return out


async def send_digits(session: aiohttp.ClientSession, base: str, x: np.ndarray) -> None:
    """``x`` to the agent at ``base`` in OIP requests of 1 to 3 digits, each answered."""
    i = 0
    while i < len(x):
        part = x[i : i + 1 + i % 3].astype(np.float32)
        i += len(part)
        body = {
            "inputs": [
                {
                    "name": INPUT,
                    "shape": list(part.shape),
                    "datatype": "FP32",
                    "data": part.ravel().tolist(),
                }
            ]
        }
        async with session.post(f"{base}/v2/models/digits-edge/infer", json=body) as r:
            assert r.status == 200, await r.text()

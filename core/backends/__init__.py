"""Inference runtimes behind one interface; ``create_backend`` picks by the manifest."""

from __future__ import annotations

from pathlib import Path

from edgefleet.core.backends.base import Backend, BackendInfo
from edgefleet.core.backends.config import BackendConfig
from edgefleet.core.bundle.manifest import Manifest


def create_backend(
    model_path: Path, manifest: Manifest, runtime: BackendConfig, instances: int | None = None
) -> Backend:
    """``instances``: runs of this model at once (``batching.instances``); None or 0 means
    the runtime's own setting (``onnx.sessions``, ``litert.interpreters``)."""
    # Imported lazily: a box serving only ONNX models never imports LiteRT, and vice versa.
    if manifest.runtime == "onnx":
        from edgefleet.core.backends.onnx import OnnxBackend

        return OnnxBackend(model_path, manifest, runtime.onnx, instances)
    if manifest.runtime == "litert":
        from edgefleet.core.backends.litert import LiteRTBackend

        return LiteRTBackend(model_path, manifest, runtime.litert, instances)
    raise ValueError(f"unknown runtime {manifest.runtime!r}")


__all__ = ["Backend", "BackendInfo", "create_backend"]

"""The one interface every inference runtime implements.

Like MLServer's ``MLModel``: load, infer, unload. A backend is synchronous and is
always called from a worker thread, never from the event loop; it declares how
many ``infer`` calls may run at once so the caller can size its concurrency.
Batching and parallelism are wrappers around this interface, not part of it.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.core.bundle.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class BackendInfo:
    """What the backend reports about itself, shown in model metadata and to the fleet."""

    runtime: str
    provider: str = "unloaded"
    # Set when the preferred accelerator could not be used and we fell back.
    fallback_reason: str | None = None
    providers_tried: list[str] = field(default_factory=list)
    # Set when an inference failed on the accelerator after loading and the model
    # moved to the CPU for good (the fleet sees it in ``reported``).
    runtime_fallback: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for model metadata and the fleet's ``reported`` state."""
        return {
            "runtime": self.runtime,
            "provider": self.provider,
            "fallback_reason": self.fallback_reason,
            "runtime_fallback": self.runtime_fallback,
            "providers_tried": list(self.providers_tried),
        }


class Backend(abc.ABC):
    """A loaded model version. Inputs and outputs are dicts of numpy arrays.

    Callers pass float (or the manifest's declared dtype) tensors; a quantized
    model's input/output quantization is the backend's business, not the caller's.
    """

    runtime: str = ""

    def __init__(self, model_path: Path, manifest: Manifest) -> None:
        self.model_path = model_path
        self.manifest = manifest
        self.info = BackendInfo(runtime=self.runtime)

    @property
    def max_concurrency(self) -> int:
        """How many ``infer`` calls may run at the same time."""
        return 1

    @property
    def instance_limit(self) -> int | None:
        """The most ``infer`` calls that can ever overlap; None: no hard limit.

        ``max_concurrency`` is what the backend was sized for; a runtime whose
        model instances are a fixed pool (LiteRT interpreters) cannot go beyond it,
        one that runs concurrently on one session (ONNX Runtime) can.
        """
        return self.max_concurrency

    @property
    def warmup_repeats(self) -> int:
        """Runs per shape a warm-up needs so every instance has allocated for it."""
        return 1

    @abc.abstractmethod
    def load(self) -> None:
        """Create sessions/interpreters. Raises ``ModelLoadError`` with a clear reason."""

    @abc.abstractmethod
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one (possibly batched) inference. Thread-safe up to ``max_concurrency``."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Release the runtime's resources. Idempotent."""

"""PyTorch modules to ONNX (optional: ``pip install -e '.[torch]'``).

torch is imported only inside these functions: the converter CLI, the sample model
recipes and the tests must work on a machine without it (it is ~190 MB even as the
CPU build, ~3 GB when pip resolves a CUDA build; see FIELD-NOTES).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from edgefleet.core.errors import EdgefleetError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
INSTALL_HINT = (
    "PyTorch export needs the optional 'torch' extra: pip install -c constraints.txt -e '.[torch]'"
    " (pins the CPU build; an unpinned torch pulls ~3 GB of CUDA wheels)"
)


class TorchExportError(EdgefleetError):
    pass


def import_torch() -> ModuleType:
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise TorchExportError(INSTALL_HINT) from exc


def load_factory(spec: str) -> Callable[[], Any]:
    """``package.module:callable`` → the callable (a class or a function returning a module)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TorchExportError(f"--module must look like package.module:factory, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TorchExportError(f"cannot import {module_name}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise TorchExportError(f"{module_name} has no attribute {attr!r}") from None
    if not callable(target):
        raise TorchExportError(f"{spec} is not callable")
    factory: Callable[[], Any] = target
    return factory


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise TorchExportError(f"input shape {text!r} must be integers like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise TorchExportError(f"input shape {text!r} must be positive integers like 1,3,224,224")
    return shape


def export_torch(
    factory: str | Callable[[], Any],
    out: Path,
    input_shape: Sequence[int],
    *,
    weights: Path | None = None,
    input_name: str = "input",
    output_names: Sequence[str] = ("output",),
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
) -> Path:
    """Build the module with ``factory``, load ``weights`` (a state dict), export to ``out``.

    Weights are read with ``weights_only=True``: a ``.pt`` file is a pickle, and this
    refuses anything but tensors and plain containers.

    ``exporter``: ``dynamo`` (torch.export based, the default since torch 2.9, needs
    onnxscript), ``torchscript`` (the legacy tracer) or ``auto`` (dynamo when
    onnxscript is installed, else the tracer, so no further package is required).
    """
    torch = import_torch()
    make = load_factory(factory) if isinstance(factory, str) else factory
    module = make()
    if not isinstance(module, torch.nn.Module):
        raise TorchExportError(f"the factory returned {type(module).__name__}, not a torch Module")
    if weights is not None:
        log.info("loading weights from %s", weights)
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]  # Lightning-style checkpoints wrap it
        module.load_state_dict(state)
    module.eval()
    dummy = torch.zeros(*input_shape, dtype=torch.float32)
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {input_name: {0: "batch"}} | {name: {0: "batch"} for name in output_names}
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "exporting %s with input %s %s to %s",
        type(module).__name__,
        input_name,
        list(input_shape),
        out,
    )
    if exporter == "auto":
        exporter = "dynamo" if importlib.util.find_spec("onnxscript") is not None else "torchscript"
    if exporter not in ("dynamo", "torchscript"):
        raise TorchExportError(f"unknown exporter {exporter!r} (auto, dynamo, torchscript)")
    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                (dummy,),
                str(out),
                input_names=[input_name],
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=exporter == "dynamo",
            )
    except ImportError as exc:
        raise TorchExportError(
            f"the {exporter} exporter is unavailable: {exc}"
            " (pip install onnxscript for the dynamo exporter)"
        ) from exc
    log.info("wrote %s (%d bytes)", out, out.stat().st_size)
    return out

"""What the box offers to run models on, found at start and on request.

- ONNX Runtime: the execution providers this onnxruntime build has (the wheel
  decides: ``onnxruntime`` has CPU (and Azure), ``onnxruntime-gpu`` CUDA/TensorRT,
  ``onnxruntime-openvino`` OpenVINO, ``onnxruntime-directml`` DirectML, the macOS
  wheel CoreML), compared with the configured preference list.
- LiteRT: each configured external delegate library (Edge TPU, a GPU delegate...)
  is looked up and checked for the TFLite plugin entry points, without importing
  LiteRT; XNNPACK (CPU) ships with LiteRT itself.

A runtime that no loaded model uses is not imported just to look (onnxruntime
costs ~19 MB of resident memory): its section then says so, and is filled in once
a model of that runtime has loaded.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from edgefleet.core.backends.config import BackendConfig, LiteRTConfig, OnnxConfig
from edgefleet.core.backends.threads import physical_cores

log = logging.getLogger(__name__)

CPU_PROVIDERS = frozenset({"CPUExecutionProvider", "AzureExecutionProvider"})
# What the accelerators ONNX Runtime may offer are, for the log and the fleet.
KNOWN_ONNX_ACCELERATORS = {
    "OpenVINOExecutionProvider": "Intel CPU/iGPU/NPU via OpenVINO",
    "CUDAExecutionProvider": "NVIDIA GPU (CUDA)",
    "TensorrtExecutionProvider": "NVIDIA GPU (TensorRT)",
    "DmlExecutionProvider": "GPU via DirectML (Windows)",
    "CoreMLExecutionProvider": "Apple GPU/Neural Engine (CoreML)",
    "ROCMExecutionProvider": "AMD GPU (ROCm)",
    "MIGraphXExecutionProvider": "AMD GPU (MIGraphX)",
    "QNNExecutionProvider": "Qualcomm NPU (QNN)",
    "NnapiExecutionProvider": "Android NNAPI",
    "VitisAIExecutionProvider": "AMD NPU (Vitis AI)",
}
# tensorflow/lite/delegates/external/external_delegate_interface.h
DELEGATE_SYMBOLS = ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate")


def find_delegate_library(library: Path) -> str:
    """The loadable name of an external delegate library; OSError saying why not.

    LiteRT's ``Delegate`` runs its finalizer on a half-built object when the library
    is missing or lacks the plugin entry points, which Python reports as an ignored
    exception on every load attempt; checking with ctypes first gives one clear error.
    """
    names = [str(library)]
    # The config loader makes relative paths relative to the config file, which
    # turns a bare soname ("libedgetpu.so.1", meant for the dynamic loader's search
    # path) into a path that does not exist: then try the soname as well.
    if library.is_absolute() and not library.exists():
        names.append(library.name)
    errors: list[str] = []
    for name in names:
        try:
            handle = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
            continue
        missing = [s for s in DELEGATE_SYMBOLS if not hasattr(handle, s)]
        if missing:
            raise OSError(f"{name} is not a TFLite external delegate (no {', '.join(missing)})")
        return name
    raise OSError("; ".join(dict.fromkeys(errors)))


def detect_onnx(config: OnnxConfig) -> dict[str, Any]:
    if "onnxruntime" not in sys.modules:
        return {
            "checked": False,
            "why": "onnxruntime not imported yet (no ONNX model loaded)",
            "preferred": list(config.providers),
        }
    import onnxruntime as ort

    available = list(ort.get_available_providers())
    return {
        "checked": True,
        "version": ort.__version__,
        "device": ort.get_device(),
        "available": available,
        "accelerators": [p for p in available if p not in CPU_PROVIDERS],
        "preferred": list(config.providers),
        "preferred_missing": [p for p in config.providers if p not in available],
    }


def detect_litert(config: LiteRTConfig) -> dict[str, Any]:
    if importlib.util.find_spec("ai_edge_litert") is not None:
        package: str | None = "ai-edge-litert"
    elif importlib.util.find_spec("tflite_runtime") is not None:
        package = "tflite-runtime"
    else:
        package = None
    delegates = []
    for d in config.delegates:
        row: dict[str, Any] = {"library": str(d.library)}
        try:
            row["found"] = find_delegate_library(d.library)
        except OSError as exc:
            row["found"] = None
            row["error"] = str(exc)
        delegates.append(row)
    return {
        "package": package,
        "xnnpack": config.xnnpack,
        "delegates": delegates,
        "accelerators": [r["library"] for r in delegates if r["found"]],
    }


def detect(runtime: BackendConfig) -> dict[str, Any]:
    """Blocking (it may dlopen delegate libraries): call it from a worker thread."""
    onnx = detect_onnx(runtime.onnx)
    litert = detect_litert(runtime.litert)
    return {
        "cpu": {
            "logical": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "physical": physical_cores(),
        },
        "onnx": onnx,
        "litert": litert,
        # One flat list for the fleet's `reported` state and the CLI.
        "accelerators": [f"onnx:{p}" for p in onnx.get("accelerators", [])]
        + [f"litert:{Path(lib).name}" for lib in litert["accelerators"]],
    }


def summary(found: dict[str, Any]) -> str:
    """One log line."""
    onnx = found["onnx"]
    if onnx["checked"]:
        accel = ", ".join(
            f"{p} ({KNOWN_ONNX_ACCELERATORS.get(p, 'accelerator')})" for p in onnx["accelerators"]
        )
        text = f"onnxruntime {onnx['version']}: {accel or 'CPU only'}"
        if onnx["preferred_missing"]:
            text += f" (preferred but not in this build: {', '.join(onnx['preferred_missing'])})"
    else:
        text = "onnxruntime: not checked (no ONNX model loaded)"
    litert = found["litert"]
    if litert["delegates"]:
        parts = [
            f"{r['library']} {'found' if r['found'] else 'missing'}" for r in litert["delegates"]
        ]
        text += f"; LiteRT delegates: {', '.join(parts)}"
    elif litert["package"]:
        text += "; LiteRT: CPU (XNNPACK)" if litert["xnnpack"] else "; LiteRT: CPU"
    cpu = found["cpu"]
    return f"{text}; CPU {cpu['physical']} core(s), {cpu['logical']} logical"


__all__ = [
    "KNOWN_ONNX_ACCELERATORS",
    "detect",
    "detect_litert",
    "detect_onnx",
    "find_delegate_library",
    "summary",
]

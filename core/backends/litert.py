"""LiteRT (TensorFlow Lite) backend.

Runtime: ``ai_edge_litert`` (LiteRT 2.x); ``tflite_runtime`` only when LiteRT is not
importable (older ARM images), because tflite-runtime 2.14 needs numpy<2 and never
puts int8 through XNNPACK (see FIELD-NOTES.md).

Where a model runs, in preference order:

1. each configured external delegate (Edge TPU ``libedgetpu.so.1``, a GPU delegate
   library...), loaded with ``load_delegate(library, options)``;
2. the CPU with XNNPACK, which LiteRT applies by default (``xnnpack: true``);
3. the CPU with the builtin kernels only (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``):
   what ``xnnpack: false`` asks for, and the last resort otherwise.

A candidate that cannot load its library, build the interpreter or allocate the
tensors is skipped with one log line; ``info.provider`` names the one that runs and
``info.fallback_reason`` says why the preferred one does not.

A delegate can also fail later, at ``invoke``. Then the same input is retried on
a new pool of CPU interpreters (XNNPACK, else builtin): if the CPU answers, the
model stays on the CPU from then on (logged once, ``info.runtime_fallback``); if
it fails too, the input was at fault and the delegate stays.

An interpreter is not thread-safe, so the backend keeps a pool of
``interpreters`` of them, each used by one call at a time (``max_concurrency`` is
the pool size). ``invoke`` releases the GIL, so the pool gives real parallelism;
``num_threads: 0`` sizes each interpreter to ``physical cores // interpreters``
(``edgefleet.core.backends.threads``). The pool size is ``interpreters``, or the
``instances`` the dynamic batcher asks for.

Quantization is invisible to callers: for a full-integer model (int8/uint8 input
with a scale), float input is quantized with the input's scale and zero point, and
int8/uint8 outputs are dequantized to float32 when the manifest declares a float
output. Input already in the model's integer dtype passes through unchanged.

Batching: most TFLite models have a fixed batch of 1. When the caller's batch
differs, inputs whose ``shape_signature`` has -1 there are resized (and the
tensors reallocated); otherwise the batch is run in chunks of the model's batch
and the outputs are stacked.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.core.backends.accelerators import find_delegate_library
from edgefleet.core.backends.base import Backend
from edgefleet.core.backends.config import ExternalDelegate, LiteRTConfig
from edgefleet.core.backends.threads import auto_threads
from edgefleet.core.bundle.manifest import OIP_TO_NUMPY, Manifest, TensorSpec
from edgefleet.core.errors import BadRequest, EdgeError, ModelLoadError

log = logging.getLogger(__name__)

try:
    from ai_edge_litert import interpreter as _tfl

    RUNTIME_PACKAGE = "ai-edge-litert"
except ImportError:  # pragma: no cover - only on images without LiteRT wheels
    from tflite_runtime import interpreter as _tfl

    RUNTIME_PACKAGE = "tflite-runtime"
log.info("LiteRT backend runs on %s", RUNTIME_PACKAGE)

XNNPACK = "XNNPACK"
CPU_BUILTIN = "cpu-builtin"
_FLOAT_KINDS = ("f",)


def delegate_provider(library: Path | str) -> str:
    return f"delegate:{Path(library).name}"


def _is_delegate(provider: str) -> bool:
    return provider.startswith("delegate:")


@dataclass(frozen=True)
class _Candidate:
    provider: str
    delegate: ExternalDelegate | None
    # False: builtin kernels only, no default (XNNPACK) delegate.
    default_delegates: bool


@dataclass(frozen=True)
class _Binding:
    """One manifest tensor tied to the model tensor of the same name."""

    name: str
    index: int
    model_dtype: np.dtype
    wire_dtype: np.dtype  # what the manifest says the caller sends / receives
    shape: tuple[int, ...]  # the model's shape as built (batch as in the file)
    signature: tuple[int, ...]  # -1 where the model allows resizing
    scale: float  # 0.0: not quantized
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and self.model_dtype.kind in ("i", "u")


@dataclass
class _Slot:
    interpreter: Any
    provider: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Input shapes currently allocated, so a resize happens only when one changes.
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)


@functools.cache
def _int_range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def quantize_input(x: np.ndarray, dtype: np.dtype, scale: float, zero_point: int) -> np.ndarray:
    """Float to the model's integer dtype: x / scale + zero_point, rounded, saturated.

    Computed as XNNPACK's float-to-int8 convert does (float32, multiply by 1/scale,
    round half to even), so it matches a graph whose QUANTIZE op runs on XNNPACK.
    In-place ufuncs: numpy's per-pass costs are the whole cost here, next to an
    invoke of well under a microsecond for a small model.
    """
    v: np.ndarray = np.multiply(x, np.float32(1.0 / scale), dtype=np.float32)
    v += np.float32(zero_point)
    np.rint(v, out=v)
    lo, hi = _int_range(dtype)
    # ufuncs, not np.clip: clip's Python wrapper costs more than the arithmetic here.
    np.maximum(v, lo, out=v)
    np.minimum(v, hi, out=v)
    return v.astype(dtype)


def dequantize_output(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


class LiteRTBackend(Backend):
    runtime = "litert"

    def __init__(
        self,
        model_path: Path,
        manifest: Manifest,
        config: LiteRTConfig,
        instances: int | None = None,
    ) -> None:
        super().__init__(model_path, manifest)
        self.config = config
        self._pool_size = instances or config.interpreters
        self._slots: list[_Slot] = []
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._fallback_lock = threading.Lock()
        # A CPU pool built after a delegate failed on an input the CPU failed on too:
        # kept, so that each further bad input does not build interpreters again.
        self._cpu_spare: tuple[str, list[_Slot], queue.SimpleQueue[_Slot]] | None = None
        self._inputs: dict[str, _Binding] = {}
        self._outputs: list[_Binding] = []

    @property
    def max_concurrency(self) -> int:
        return self._pool_size

    @property
    def warmup_repeats(self) -> int:
        # Each interpreter allocates its own tensors for a new shape.
        return self._pool_size

    @property
    def num_threads(self) -> int:
        return self.config.num_threads or auto_threads(self._pool_size)

    # ---- loading ----------------------------------------------------------------

    def _candidates(self) -> list[_Candidate]:
        default_delegates = self.config.xnnpack
        chain = [
            _Candidate(delegate_provider(d.library), d, default_delegates)
            for d in self.config.delegates
        ]
        if self.config.xnnpack:
            chain.append(_Candidate(XNNPACK, None, True))
        chain.append(_Candidate(CPU_BUILTIN, None, False))
        return chain

    def _load_delegate(self, spec: ExternalDelegate) -> Any:
        library = find_delegate_library(spec.library)
        return _tfl.load_delegate(library, dict(spec.options))

    def _new_interpreter(self, candidate: _Candidate) -> Any:
        kwargs: dict[str, Any] = {
            "model_path": str(self.model_path),
            "num_threads": self.num_threads,
        }
        if not candidate.default_delegates:
            kwargs["experimental_op_resolver_type"] = (
                _tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            )
        if candidate.delegate is not None:
            # One delegate instance per interpreter: delegates keep per-graph state
            # and are not meant to be shared between interpreters.
            kwargs["experimental_delegates"] = [self._load_delegate(candidate.delegate)]
        interpreter = _tfl.Interpreter(**kwargs)
        interpreter.allocate_tensors()
        return interpreter

    def _build_pool(
        self, candidates: list[_Candidate], errors: list[str]
    ) -> tuple[_Candidate | None, list[Any]]:
        """The first candidate that builds a whole pool of interpreters, and the pool."""
        for candidate in candidates:
            self.info.providers_tried.append(candidate.provider)
            try:
                pool = [self._new_interpreter(candidate) for _ in range(self._pool_size)]
            except Exception as exc:  # LiteRT raises ValueError, RuntimeError, OSError...
                reason = f"{candidate.provider}: {str(exc).strip() or type(exc).__name__}"
                errors.append(reason)
                log.warning(
                    "%s:%s cannot use %s, trying the next (%s)",
                    self.manifest.name,
                    self.manifest.version,
                    candidate.provider,
                    reason,
                )
                continue
            return candidate, pool
        return None, []

    def _make_slots(
        self, pool: list[Any], provider: str
    ) -> tuple[list[_Slot], queue.SimpleQueue[_Slot]]:
        slots = [_Slot(interpreter, provider) for interpreter in pool]
        free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for slot in slots:
            slot.shapes = {b.index: b.shape for b in self._inputs.values()}
            free.put(slot)
        return slots, free

    def load(self) -> None:
        if self._slots:
            return
        if not self.model_path.is_file():
            raise ModelLoadError(f"model file {self.model_path} does not exist")
        errors: list[str] = []
        candidates = self._candidates()
        chosen, pool = self._build_pool(candidates, errors)
        if chosen is None:
            raise ModelLoadError(f"LiteRT cannot load {self.model_path.name}: " + "; ".join(errors))
        self._bind(pool[0])
        if chosen is not candidates[0]:
            # Each skipped candidate was logged above; this is what the fleet sees.
            self.info.fallback_reason = "; ".join(errors)
        self.info.provider = chosen.provider
        self._slots, self._free = self._make_slots(pool, chosen.provider)
        log.info(
            "%s:%s loaded on %s (%s, %d interpreter(s) x %d thread(s))",
            self.manifest.name,
            self.manifest.version,
            chosen.provider,
            RUNTIME_PACKAGE,
            len(self._slots),
            self.num_threads,
        )

    def _binding(self, spec: TensorSpec, detail: dict[str, Any], kind: str) -> _Binding:
        shape = tuple(int(d) for d in detail["shape"])
        signature = tuple(int(d) for d in detail.get("shape_signature", detail["shape"]))
        if len(spec.shape) != len(shape):
            raise ModelLoadError(
                f"manifest {kind} {spec.name!r} has shape {spec.shape}, the model's is"
                f" {list(signature)} (rank {len(shape)})"
            )
        # The batch dimension (0) may differ: the backend resizes or chunks.
        for axis, (want, have) in enumerate(zip(spec.shape, signature, strict=True)):
            if axis and want != -1 and have != -1 and want != have:
                raise ModelLoadError(
                    f"manifest {kind} {spec.name!r} has shape {spec.shape}, the model's is"
                    f" {list(signature)}"
                )
        qp = detail.get("quantization_parameters") or {}
        scales = np.asarray(qp.get("scales", []), dtype=np.float64)
        zero_points = np.asarray(qp.get("zero_points", []), dtype=np.int64)
        scale, zero_point = detail.get("quantization", (0.0, 0))
        model_dtype = np.dtype(detail["dtype"])
        wire_dtype = np.dtype(OIP_TO_NUMPY[spec.datatype])
        if len(scales) > 1 and wire_dtype.kind in _FLOAT_KINDS:
            raise ModelLoadError(
                f"model {kind} {spec.name!r} is quantized per axis; declare it with the"
                f" model's dtype ({model_dtype}) in the manifest"
            )
        if len(scales) == 1:
            scale, zero_point = float(scales[0]), int(zero_points[0])
        binding = _Binding(
            spec.name,
            int(detail["index"]),
            model_dtype,
            wire_dtype,
            shape,
            signature,
            float(scale),
            int(zero_point),
        )
        if (
            kind == "input"
            and model_dtype.kind in ("i", "u")
            and not binding.quantized
            and wire_dtype.kind in _FLOAT_KINDS
        ):
            raise ModelLoadError(
                f"model input {spec.name!r} is {model_dtype} without quantization parameters;"
                f" float input cannot be converted, declare it {model_dtype} in the manifest"
            )
        return binding

    def _bind(self, interpreter: Any) -> None:
        """The manifest must describe the model it ships with, by tensor name."""
        model_inputs = {d["name"]: d for d in interpreter.get_input_details()}
        model_outputs = {d["name"]: d for d in interpreter.get_output_details()}
        inputs: dict[str, _Binding] = {}
        for spec in self.manifest.inputs:
            if spec.name not in model_inputs:
                raise ModelLoadError(
                    f"manifest input {spec.name!r} is not an input of the model"
                    f" (model inputs: {sorted(model_inputs)})"
                )
            inputs[spec.name] = self._binding(spec, model_inputs[spec.name], "input")
        unfed = sorted(set(model_inputs) - set(inputs))
        if unfed:
            raise ModelLoadError(f"model inputs {unfed} are not described in the manifest")
        outputs: list[_Binding] = []
        for spec in self.manifest.outputs:
            if spec.name not in model_outputs:
                raise ModelLoadError(
                    f"manifest output {spec.name!r} is not an output of the model"
                    f" (model outputs: {sorted(model_outputs)})"
                )
            outputs.append(self._binding(spec, model_outputs[spec.name], "output"))
        self._inputs, self._outputs = inputs, outputs

    # ---- inference --------------------------------------------------------------

    def _prepare(self, name: str, value: np.ndarray) -> np.ndarray:
        b = self._inputs[name]
        x = np.asarray(value)
        if x.dtype == b.model_dtype:
            return x  # already what the model takes (e.g. pre-quantized int8)
        if b.quantized:
            if x.dtype.kind not in ("f", "i", "u", "b"):
                raise BadRequest(f"input {name!r}: cannot quantize dtype {x.dtype}")
            if x.dtype.kind == "f" and np.isnan(x).any():
                # A NaN has no integer value; casting it gives an arbitrary one.
                raise BadRequest(f"input {name!r} contains NaN")
            return quantize_input(x, b.model_dtype, b.scale, b.zero_point)
        if b.model_dtype.kind in ("i", "u") and x.dtype.kind == "f":
            lo, hi = _int_range(b.model_dtype)
            clipped: np.ndarray = np.clip(np.rint(x), lo, hi)
            return clipped.astype(b.model_dtype)
        return x.astype(b.model_dtype)

    def _chunk_batch(self, feed: dict[str, np.ndarray]) -> int | None:
        """The caller's batch when the model's batch is fixed and differs; else None."""
        chunked: set[int] = set()
        batches: set[int] = set()
        for name, b in self._inputs.items():
            got = feed[name].shape
            bad = len(got) != len(b.shape) or any(
                g != want and sig != -1
                for g, want, sig in zip(got[1:], b.shape[1:], b.signature[1:], strict=True)
            )
            if bad:
                raise BadRequest(
                    f"input {name!r} has shape {list(got)}, the model takes {list(b.signature)}"
                )
            batches.add(got[0])
            if got[0] != b.shape[0] and b.signature[0] != -1:
                chunked.add(got[0])
        if not chunked:
            return None
        if len(batches) != 1:
            raise BadRequest(f"inputs disagree on the batch size: {sorted(batches)}")
        return batches.pop()

    def _run(self, slot: _Slot, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        interpreter = slot.interpreter
        changed = False
        try:
            for name, b in self._inputs.items():
                shape = feed[name].shape
                if slot.shapes.get(b.index) != shape:
                    # strict: only the dimensions the model marks -1 may change.
                    interpreter.resize_tensor_input(b.index, list(shape), strict=True)
                    slot.shapes[b.index] = shape
                    changed = True
            if changed:
                interpreter.allocate_tensors()
        except Exception:
            # The recorded shapes may no longer be what is allocated (e.g. allocation
            # of a huge batch failed): forget them, so the next call resizes afresh.
            slot.shapes.clear()
            raise
        for name, b in self._inputs.items():
            interpreter.set_tensor(b.index, np.ascontiguousarray(feed[name]))
        interpreter.invoke()
        # get_tensor returns a copy, never a view of the interpreter's arena, which
        # the next invoke on this slot would overwrite.
        return [interpreter.get_tensor(b.index) for b in self._outputs]

    def _run_chunks(self, slot: _Slot, feed: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
        """A fixed-batch model: run ``n`` items in chunks of its batch, stack outputs."""
        model_batch = next(iter(self._inputs.values())).shape[0]
        parts: list[list[np.ndarray]] = [[] for _ in self._outputs]
        # max(n, 1): an empty batch still runs once, for the outputs' shapes.
        for start in range(0, max(n, 1), model_batch):
            chunk: dict[str, np.ndarray] = {}
            for name, value in feed.items():
                part = value[start : start + model_batch]
                if len(part) < model_batch:
                    pad = np.zeros((model_batch - len(part), *part.shape[1:]), dtype=part.dtype)
                    part = np.concatenate([part, pad])
                chunk[name] = part
            for i, out in enumerate(self._run(slot, chunk)):
                if out.ndim == 0 or out.shape[0] != model_batch:
                    raise BadRequest(
                        f"output {self._outputs[i].name!r} has no batch dimension; send"
                        f" exactly the model's batch of {model_batch}"
                    )
                parts[i].append(out[: min(model_batch, n - start)])
        return [np.concatenate(p) for p in parts]

    def _on_free_slot(
        self, free: queue.SimpleQueue[_Slot], feed: dict[str, np.ndarray], batch: int | None
    ) -> list[np.ndarray]:
        slot = free.get()
        try:
            with slot.lock:
                if slot.interpreter is None:  # unloaded while we waited
                    raise ModelLoadError(
                        f"{self.manifest.name}:{self.manifest.version} is not loaded"
                    )
                if batch is not None:
                    return self._run_chunks(slot, feed, batch)
                return self._run(slot, feed)
        finally:
            free.put(slot)

    def _fall_back(
        self, failed: list[_Slot], feed: dict[str, np.ndarray], batch: int | None, exc: Exception
    ) -> list[np.ndarray]:
        """An invoke failed on a delegate: retry on CPU interpreters, stay there if it works."""
        with self._fallback_lock:
            if self._slots is failed:
                if self._cpu_spare is None:
                    cpu = [c for c in self._candidates() if not _is_delegate(c.provider)]
                    chosen, pool = self._build_pool(cpu, [])
                    if chosen is None:
                        raise exc  # no CPU pool to compare with: report the original error
                    self._cpu_spare = (chosen.provider, *self._make_slots(pool, chosen.provider))
                provider, slots, free = self._cpu_spare
                # Raises if the CPU fails too: the input was at fault, the delegate stays.
                raw = self._on_free_slot(free, feed, batch)
                reason = f"{self.info.provider} failed at run time ({exc}); running on {provider}"
                self._slots, self._free, self._cpu_spare = slots, free, None
                self.info.runtime_fallback = reason
                self.info.fallback_reason = reason
                self.info.provider = provider
                log.error("%s:%s %s", self.manifest.name, self.manifest.version, reason)
                return raw
        # Another call moved the model to the CPU meanwhile.
        return self._on_free_slot(self._free, feed, batch)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        slots, free = self._slots, self._free
        if not slots:
            raise ModelLoadError(f"{self.manifest.name}:{self.manifest.version} is not loaded")
        missing = sorted(set(self._inputs) - set(inputs))
        unknown = sorted(set(inputs) - set(self._inputs))
        if missing or unknown:
            raise BadRequest(f"inputs missing: {missing}, unknown: {unknown}")
        feed = {name: self._prepare(name, value) for name, value in inputs.items()}
        batch = self._chunk_batch(feed)
        try:
            raw = self._on_free_slot(free, feed, batch)
        except EdgeError:
            raise
        except Exception as exc:
            if not _is_delegate(slots[0].provider):
                raise
            raw = self._fall_back(slots, feed, batch, exc)
        results: dict[str, np.ndarray] = {}
        for b, value in zip(self._outputs, raw, strict=True):
            if b.quantized and b.wire_dtype.kind in _FLOAT_KINDS:
                value = dequantize_output(value, b.scale, b.zero_point)
            results[b.name] = value
        return results

    def unload(self) -> None:
        slots, self._slots = self._slots, []
        if self._cpu_spare is not None:
            slots = [*slots, *self._cpu_spare[1]]
            self._cpu_spare = None
        for slot in slots:
            # Waits for an inference still running on this interpreter.
            with slot.lock:
                slot.interpreter = None
        self.info.provider = "unloaded"


__all__ = [
    "CPU_BUILTIN",
    "RUNTIME_PACKAGE",
    "XNNPACK",
    "LiteRTBackend",
    "delegate_provider",
    "dequantize_output",
    "quantize_input",
]

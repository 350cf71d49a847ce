"""Measure, gate and bundle: the last step between a quantized model and the fleet.

``bundle_model`` evaluates the model to ship (usually int8) and its fp32 reference
on the same labelled data, refuses when quantization cost more accuracy than
allowed, and otherwise writes a signed bundle whose manifest carries the figures.
Nothing is written when the gate refuses, so a CI job cannot publish by accident.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from edgefleet.converters.bundler import build_bundle
from edgefleet.converters.evaluate import (
    EvalSet,
    EvaluationError,
    ModelMetrics,
    evaluate_model,
    fixed_batch,
    manifest_for,
    runtime_for,
)
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.drift import DEFAULT_BINS
from edgefleet.core.errors import EdgefleetError

log = logging.getLogger(__name__)

DEFAULT_MAX_DROP = 1.0
DEFAULT_SELFTEST_SAMPLES = 32
# Fields the converter fills in; a spec that sets them is mistaken about who owns them.
_GENERATED = ("model_file", "files", "created_at", "created_by")
_SELFTEST_KEYS = {"atol", "rtol", "argmax_output", "min_argmax_agreement"}


class SpecError(EdgefleetError):
    """The model spec (manifest fields) is invalid; the message names the field."""


class QualityGateError(EdgefleetError):
    """The quantized model lost more accuracy than allowed. No bundle was written."""

    def __init__(self, message: str, result: GateResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class GateResult:
    reference: ModelMetrics | None
    candidate: ModelMetrics
    max_drop_points: float
    drop_points: float | None

    @property
    def passed(self) -> bool:
        return self.drop_points is None or self.drop_points <= self.max_drop_points


def check_gate(
    reference: ModelMetrics | None, candidate: ModelMetrics, max_drop_points: float
) -> GateResult:
    """Compare accuracies in percentage points; raise QualityGateError past the limit."""
    drop = None
    if reference is not None:
        drop = round((reference.accuracy - candidate.accuracy) * 100.0, 4)
    result = GateResult(reference, candidate, max_drop_points, drop)
    if not result.passed:
        assert reference is not None and drop is not None
        raise QualityGateError(
            f"quality gate: {candidate.path.name} ({candidate.quant_format}) is"
            f" {drop:.2f} points less accurate than {reference.path.name}"
            f" ({candidate.accuracy:.4f} vs {reference.accuracy:.4f} on"
            f" {candidate.eval_samples} samples), over the allowed {max_drop_points:.2f};"
            " no bundle written (try other calibration data, per-channel weights,"
            " or excluding the sensitive layers from quantization)",
            result,
        )
    return result


def gate_metrics(result: GateResult) -> dict[str, float | int | str | None]:
    """The manifest ``metrics`` for a gated model (or an unquantized one)."""
    cand, ref = result.candidate, result.reference
    m: dict[str, float | int | str | None] = {
        "eval_samples": cand.eval_samples,
        "quant_format": cand.quant_format,
        "latency_batch": 1,
        "latency_runs": cand.latency_runs,
    }
    if ref is None and cand.quant_format == "fp32":
        m |= {
            "accuracy_fp32": round(cand.accuracy, 4),
            "size_bytes_fp32": cand.size_bytes,
            "latency_ms_fp32": round(cand.latency_ms, 4),
        }
        return m
    m |= {
        "accuracy_int8": round(cand.accuracy, 4),
        "size_bytes_int8": cand.size_bytes,
        "latency_ms_int8": round(cand.latency_ms, 4),
    }
    if ref is not None:
        m |= {
            "accuracy_fp32": round(ref.accuracy, 4),
            "accuracy_drop_points": result.drop_points,
            "max_drop_points": result.max_drop_points,
            "size_bytes_fp32": ref.size_bytes,
            "latency_ms_fp32": round(ref.latency_ms, 4),
        }
    else:
        m["quality_gate"] = "skipped: no fp32 reference"
    return m


def load_spec(path: Path) -> dict[str, Any]:
    """Manifest fields from a YAML file (name, version, inputs, outputs, labels, ...)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"cannot read spec {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: the spec must be a mapping of manifest fields")
    return doc


def prepare_spec(
    spec: Mapping[str, Any], model: Path, version: str | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split a spec into (manifest fields, self-test overrides, extra metrics) and validate.

    Validation uses the agent's own Manifest model, so a spec error is reported
    before minutes of evaluation rather than after.
    """
    fields = dict(spec)
    for key in _GENERATED:
        if key in fields:
            raise SpecError(f"spec sets {key!r}, which the converter generates")
    self_test = dict(fields.pop("self_test", None) or {})
    unknown = set(self_test) - _SELFTEST_KEYS
    if unknown:
        raise SpecError(
            f"spec self_test: unknown keys {sorted(unknown)} (known: {sorted(_SELFTEST_KEYS)})"
        )
    extra_metrics = dict(fields.pop("metrics", None) or {})
    if version is not None:
        fields["version"] = str(version)
    if "version" in fields:
        fields["version"] = str(fields["version"])  # YAML reads `version: 1` as an int
    try:
        expected_runtime = runtime_for(model)
    except EvaluationError as exc:
        raise SpecError(str(exc)) from exc
    fields.setdefault("runtime", expected_runtime)
    if fields["runtime"] != expected_runtime:
        raise SpecError(
            f"spec says runtime {fields['runtime']!r} but {model.name} is {expected_runtime}"
        )
    try:
        manifest_for(model, fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise SpecError(f"spec invalid at {loc}: {first['msg']}") from exc
    return fields, self_test, extra_metrics


def score_output(fields: Mapping[str, Any]) -> str | None:
    post = fields.get("postprocessing") or {}
    return post.get("output") if post.get("type") == "classification" else None


def pick_test_vectors(outputs: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` eval samples to use as self-test vectors.

    Correctly classified samples with the widest top-1/top-2 margin come first,
    taken round-robin over the classes: an int8 model's scores move a little between
    CPUs (different kernels round differently), and a vector sitting on a decision
    boundary would make the self-test fail on a healthy box.
    """
    if outputs.ndim >= 2 and outputs.shape[-1] > 1:
        scores = outputs.reshape(outputs.shape[0], -1).astype(np.float64)
        top2 = np.sort(scores, axis=-1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        predicted = scores.argmax(axis=-1)
    else:
        predicted = outputs.reshape(outputs.shape[0]).astype(np.int64)
        margin = np.ones(predicted.shape[0])
    correct = predicted == labels
    # Best first: correct before wrong, then by margin, then by index for determinism.
    order = np.lexsort((np.arange(labels.shape[0]), -margin, ~correct))
    queues: dict[int, list[int]] = {}
    for i in order:
        queues.setdefault(int(labels[i]), []).append(int(i))
    picked: list[int] = []
    while len(picked) < min(n, labels.shape[0]):
        for queue in queues.values():
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return np.array(sorted(picked), dtype=np.int64)


def _created_by() -> str:
    try:
        return f"edge-convert {metadata.version('edgefleet')}"
    except metadata.PackageNotFoundError:
        return "edge-convert"


@dataclass(frozen=True)
class BundleReport:
    out: Path
    manifest: Manifest
    metrics: dict[str, float | int | str | None]
    gate: GateResult


def bundle_model(
    *,
    model: Path,
    spec: Mapping[str, Any],
    eval_set: EvalSet,
    out: Path,
    private_key: Ed25519PrivateKey | None,
    reference: Path | None = None,
    max_drop: float = DEFAULT_MAX_DROP,
    version: str | None = None,
    selftest_samples: int = DEFAULT_SELFTEST_SAMPLES,
    latency_runs: int = 200,
    skip_gate: bool = False,
    output: str | None = None,
    profile_bins: int | None = DEFAULT_BINS,
) -> BundleReport:
    """Evaluate ``model`` (and its fp32 ``reference``), gate, and write the bundle ``out``.

    ``spec``: manifest fields (see ``load_spec``). ``output``: the output holding
    class scores, by default the classification postprocessing's. Raises
    QualityGateError (nothing written) when the accuracy drop exceeds ``max_drop``
    percentage points, or when a quantized model comes without a reference unless
    ``skip_gate``. ``profile_bins``: the bins per feature of the eval set's reference
    profile written into the bundle (``profile.json``, core/drift.py); None: no profile.
    """
    fields, self_test, extra_metrics = prepare_spec(spec, model, version)
    output = output or score_output(fields)
    if output is None:
        raise SpecError(
            "cannot tell which output holds the class scores: give the spec a"
            " classification postprocessing or pass the output name"
        )
    candidate = evaluate_model(model, fields, eval_set, output, latency_runs=latency_runs)
    ref_metrics = None
    if reference is not None:
        ref_fields = dict(fields, runtime=runtime_for(reference))
        ref_metrics = evaluate_model(
            reference, ref_fields, eval_set, output, latency_runs=latency_runs
        )
    elif candidate.quant_format != "fp32" and not skip_gate:
        raise QualityGateError(
            f"{model.name} is quantized ({candidate.quant_format}) but no fp32 reference was"
            " given, so its accuracy drop cannot be checked; pass the reference model"
            " (or skip the gate explicitly)",
            GateResult(None, candidate, max_drop, None),
        )
    result = check_gate(ref_metrics, candidate, max_drop)
    if result.drop_points is not None:
        log.info("quality gate passed: drop %.2f points (max %.2f)", result.drop_points, max_drop)
    metrics = dict(extra_metrics) | gate_metrics(result)

    manifest = manifest_for(model, fields)
    n = fixed_batch(manifest) or selftest_samples
    picked = pick_test_vectors(candidate.outputs, eval_set.labels, n)
    test_inputs = eval_set.take(picked)
    quantized = candidate.quant_format != "fp32"
    tolerances: dict[str, Any] = {
        # An int8 model's scores may differ by a few quantization steps across CPUs;
        # its predicted class must not (argmax_output), so only that is held exact.
        "atol": 0.05 if quantized else 1e-3,
        "rtol": 1e-2 if quantized else 1e-3,
    }
    if outputs_are_scores(fields, output):
        tolerances["argmax_output"] = output
    tolerances |= self_test

    log.info("writing %s (%d self-test vectors)", out, len(picked))
    tmp = out.with_name(out.name + ".tmp")
    try:
        written = build_bundle(
            out=out,
            model_file=model,
            manifest=fields | {"metrics": metrics, "created_by": _created_by()},
            test_inputs=test_inputs,
            private_key=private_key,
            self_test=tolerances,
            profile_inputs=eval_set.inputs if profile_bins else None,
            profile_bins=profile_bins or DEFAULT_BINS,
        )
    finally:
        tmp.unlink(missing_ok=True)
    return BundleReport(out, written, metrics, result)


def outputs_are_scores(fields: Mapping[str, Any], output: str) -> bool:
    for spec in fields.get("outputs", []):
        if spec.get("name") == output:
            shape = spec.get("shape") or []
            return len(shape) >= 2 and shape[-1] != 1
    return False

"""The fallback policy of one model version, and the per-item decision it makes.

``resolve_policy`` lays the agent config over the bundle's defaults (see
``agent.cloud.config`` for the precedence). ``item_scores`` turns a model's raw
outputs into one confidence per batch item with the policy's rule, and
``route_items`` decides for each item: answer locally (``confident``), ask the
cloud (``unsure``), or answer locally and also send it for an ``audit``.

Decisions are per item: in a batched request only the unsure items go to the
cloud (in one call), so a batch of 32 confident images and one blurry one costs
one small cloud call, not 33 images' worth.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edgefleet.agent.cloud.config import FallbackConfig, Mode, ModelFallback, Rule
from edgefleet.core.bundle.manifest import ClassificationPost, DetectionPost, Manifest
from edgefleet.core.processing import classification

log = logging.getLogger(__name__)

CLASSIFIER_RULES = ("top1", "margin", "entropy")
DETECTOR_RULES = ("mean_box", "min_box")
DEFAULT_CALLS_PER_MINUTE = 600
DEFAULT_MAX_IN_FLIGHT = 4


class Route(enum.StrEnum):
    CONFIDENT = "confident"
    UNSURE = "unsure"
    AUDIT = "audit"


@dataclass(frozen=True)
class FallbackPolicy:
    model: str
    version: str
    mode: Mode
    rule: Rule
    threshold: float
    class_thresholds: dict[int, float] = field(default_factory=dict)  # class id -> threshold
    cloud_model: str | None = None
    cloud_version: str | None = None
    audit_rate: float = 0.0
    max_calls_per_minute: int = DEFAULT_CALLS_PER_MINUTE
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    timeout_ms: int = 300
    # Set when the policy cannot involve the cloud at all, saying why.
    inactive: str | None = None

    @property
    def active(self) -> bool:
        return self.inactive is None and self.mode != "edge_only"

    def threshold_for(self, class_id: int | None) -> float:
        if class_id is None:
            return self.threshold
        return self.class_thresholds.get(class_id, self.threshold)

    def describe(self, labels: list[str]) -> dict[str, object]:
        """For model metadata and ``GET /v1/fallback``."""
        return {
            "mode": self.mode if self.active else "edge_only",
            "configured_mode": self.mode,
            "inactive": self.inactive,
            "confidence_rule": self.rule,
            "threshold": self.threshold,
            "class_thresholds": {
                (labels[i] if i < len(labels) else str(i)): t
                for i, t in sorted(self.class_thresholds.items())
            },
            "cloud_model": self.cloud_model,
            "cloud_version": self.cloud_version,
            "audit_rate": self.audit_rate,
            "max_calls_per_minute": self.max_calls_per_minute,
            "max_in_flight": self.max_in_flight,
            "timeout_ms": self.timeout_ms,
        }


def _layers(config: FallbackConfig, name: str) -> list[ModelFallback]:
    own = config.models.get(name)
    return [config.defaults, *([own] if own is not None else [])]


def resolve_policy(
    manifest: Manifest, config: FallbackConfig, *, cloud_configured: bool
) -> FallbackPolicy:
    """Built-in defaults < bundle defaults < ``fallback.defaults`` < ``fallback.models[name]``."""
    fb = manifest.fallback
    values: dict[str, object] = {
        "mode": fb.mode,
        "rule": manifest.confidence.rule,
        "threshold": fb.threshold,
        "class_thresholds": dict(fb.class_thresholds),
        "cloud_model": fb.cloud_model,
        "cloud_version": None,
        "audit_rate": fb.audit_rate,
        "max_calls_per_minute": DEFAULT_CALLS_PER_MINUTE,
        "max_in_flight": DEFAULT_MAX_IN_FLIGHT,
        "timeout_ms": config.cloud.timeout_ms,
    }
    for layer in _layers(config, manifest.name):
        for key, value in layer.model_dump(exclude_none=True).items():
            values["rule" if key == "confidence_rule" else key] = value
    labels = manifest.labels
    by_id: dict[int, float] = {}
    for label, t in dict(values.pop("class_thresholds")).items():  # type: ignore[call-overload]
        if label in labels:
            by_id[labels.index(label)] = float(t)
        else:
            log.warning(
                "%s: class_thresholds names unknown label %r; ignored", manifest.name, label
            )
    inactive = _why_inactive(manifest, values, cloud_configured)
    return FallbackPolicy(
        model=manifest.name,
        version=manifest.version,
        class_thresholds=by_id,
        inactive=inactive,
        **values,  # type: ignore[arg-type]
    )


def _why_inactive(
    manifest: Manifest, values: Mapping[str, object], cloud_configured: bool
) -> str | None:
    post = manifest.postprocessing
    rule = values["rule"]
    if values["mode"] == "edge_only":
        return None  # not inactive: asked for
    if not cloud_configured:
        return "no cloud endpoint configured (fallback.cloud.url)"
    if not values["cloud_model"]:
        return "no cloud model named (bundle fallback.cloud_model or config)"
    if isinstance(post, ClassificationPost):
        if rule not in CLASSIFIER_RULES:
            return f"confidence rule {rule} does not apply to a classifier"
    elif isinstance(post, DetectionPost):
        if rule not in DETECTOR_RULES:
            return f"confidence rule {rule} does not apply to a detector"
    else:
        return "raw outputs: no confidence to judge by"
    return None


@dataclass(frozen=True)
class ItemScores:
    """One confidence per batch item; the top-1 class for classifiers."""

    confidence: np.ndarray  # (batch,) float64 in [0, 1]
    top_class: np.ndarray | None  # (batch,) int64, classifiers only


def item_scores(manifest: Manifest, outputs: Mapping[str, np.ndarray], rule: str) -> ItemScores:
    """Confidence per item from raw outputs (detectors: decode first; call off the loop)."""
    post = manifest.postprocessing
    if isinstance(post, ClassificationPost):
        probs = classification.probabilities(dict(outputs), post)
        conf = np.array([classification.confidence(p, rule) for p in probs], dtype=np.float64)
        return ItemScores(conf, probs.argmax(axis=1).astype(np.int64))
    if isinstance(post, DetectionPost):
        from edgefleet.core.processing.detection import decode_ssd

        per_item = decode_ssd(outputs, post)
        conf = np.empty(len(per_item), dtype=np.float64)
        for i, found in enumerate(per_item):
            scores = [d.score for d in found]
            # Nothing found is a confident answer, as the image endpoint reports it.
            if not scores:
                conf[i] = 1.0
            else:
                conf[i] = min(scores) if rule == "min_box" else float(np.mean(scores))
        return ItemScores(conf, None)
    raise ValueError(f"{manifest.name}: raw outputs carry no confidence")


def route_items(policy: FallbackPolicy, scores: ItemScores, rng: random.Random) -> list[Route]:
    routes: list[Route] = []
    for i, conf in enumerate(scores.confidence):
        cls = int(scores.top_class[i]) if scores.top_class is not None else None
        if conf < policy.threshold_for(cls):
            routes.append(Route.UNSURE)
        elif policy.audit_rate > 0 and rng.random() < policy.audit_rate:
            routes.append(Route.AUDIT)
        else:
            routes.append(Route.CONFIDENT)
    return routes

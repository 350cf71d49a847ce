"""The fallback policy of one model version, and the per-item decision it makes.

``resolve_policy`` lays the agent config over the bundle's defaults (see
``agent.cloud.config`` for the precedence). ``route_items`` takes the model's
outputs scored by the policy's rule (``edgefleet.core.processing.scoring``: one
confidence per batch item) and decides for each item: answer locally
(``confident``), ask the cloud (``unsure``), or answer locally and also send it for
an ``audit``.

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

from edgefleet.agent.cloud.config import FallbackConfig, Mode, ModelFallback, Rule
from edgefleet.core.bundle.manifest import ClassificationPost, DetectionPost, Manifest
from edgefleet.core.processing import classification, detection
from edgefleet.core.processing.scoring import Scored

log = logging.getLogger(__name__)

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
    # Where each setting came from: default | bundle | fleet | local (resolve_policy).
    sources: dict[str, str] = field(default_factory=dict)

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
            "sources": dict(self.sources),
        }

    def effective(self, labels: list[str]) -> dict[str, object]:
        """The settings the fleet may set, as in force (``reported.fallback_effective``)."""
        doc = self.describe(labels)
        keys = ("mode", "configured_mode", "inactive", "confidence_rule")
        return {
            **{k: doc[k] for k in keys},
            "threshold": float(self.threshold),
            "class_thresholds": {k: float(v) for k, v in dict(doc["class_thresholds"]).items()},  # type: ignore[call-overload]
            "audit_rate": float(self.audit_rate),
        }

    def effective_sources(self) -> dict[str, str]:
        """``reported.fallback_source``: the source of each fleet-settable setting."""
        return {k: v for k, v in self.sources.items() if k in FLEET_KEYS}


# The settings a fleet policy may carry (core.protocol.FleetFallback).
FLEET_KEYS = ("mode", "confidence_rule", "threshold", "class_thresholds", "audit_rate")


def _layers(config: FallbackConfig, name: str) -> list[ModelFallback]:
    own = config.models.get(name)
    return [config.defaults, *([own] if own is not None else [])]


def resolve_policy(
    manifest: Manifest,
    config: FallbackConfig,
    *,
    cloud_configured: bool,
    fleet: ModelFallback | None = None,
) -> FallbackPolicy:
    """Built-in defaults < bundle defaults < the fleet's policy for this model
    (``fleet``, from the desired state) < ``fallback.defaults`` <
    ``fallback.models[name]`` (this box's agent.yaml: a local override stays possible
    and is reported as ``local``). ``sources`` records which layer set each value."""
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
    sources = {k: "default" for k in (*values, "confidence_rule")}
    sources.pop("rule")
    for k in ("mode", "confidence_rule", "threshold", "class_thresholds", "cloud_model",
              "audit_rate"):  # fmt: skip
        sources[k] = "bundle"
    layers: list[tuple[str, ModelFallback]] = [("fleet", fleet)] if fleet is not None else []
    layers += [("local", layer) for layer in _layers(config, manifest.name)]
    for source, layer in layers:
        for key, value in layer.model_dump(exclude_none=True).items():
            values["rule" if key == "confidence_rule" else key] = value
            sources[key] = source
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
        sources=sources,
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
        if rule not in classification.RULES:
            return f"confidence rule {rule} does not apply to a classifier"
    elif isinstance(post, DetectionPost):
        if rule not in detection.RULES:
            return f"confidence rule {rule} does not apply to a detector"
    else:
        return "raw outputs: no confidence to judge by"
    return None


def route_items(policy: FallbackPolicy, scores: Scored, rng: random.Random) -> list[Route]:
    """One route per item of ``scores`` (scored by ``policy.rule``)."""
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

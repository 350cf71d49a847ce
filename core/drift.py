"""Input and output drift against a bundle's reference profile: the math, once.

The converter (``edgefleet.converters.bundler``) profiles the eval data it measured a
model on and writes the profile into the bundle as ``profile.json`` (listed in the
manifest's ``files`` with its sha256, so the signature covers it; docs/bundle-format.md).
The agent (``agent/telemetry_stats.py``) bins its live inputs and answers with the
same edges and reports a drift score per model version and window. Both sides use
this module, so a live item lands in exactly the bin an eval item would have.

**Features.** A model input is seen per sample as a flat vector. When the vector has
at most ``MAX_FEATURES`` values (tabular data, the 64 pixels of a digit) every value
is a feature of its own (``x[0]``, ``x[1]``...). Wider inputs (images) are summarised
per sample by simple image statistics on the tensor the model receives: mean
brightness and contrast (the standard deviation). The image's original size is not
a feature: every image is resized to the model's fixed input size, and requests on
the OIP endpoint carry no original image, so the statistic would not mean the same
thing on every endpoint.

**Bins.** Per feature, the reference's quantile edges (``bins`` quantiles, duplicates
removed: a discrete feature gets fewer bins) and the reference share of each bin.
Bins are right-inclusive (a value equal to an edge belongs to the bin the edge ends)
and open at both ends, so every live value has a bin. A constant feature has one
edge (its value) and shares ``[1, 0]``: anything above it is drift.

**Outputs.** The class distribution (top-1 class shares, classifiers) and the
confidence histogram, with the buckets of the telemetry confidence histogram
(``protocol.CONFIDENCE_BOUNDS``), by the model's confidence rule.

**Scores.** PSI (population stability index) ``sum((a - e) * ln(a / e))`` over the
bins, with shares below ``EPSILON`` raised to it (an empty bin would otherwise make
it infinite), and the Jensen–Shannon divergence in bits (0 for identical
distributions, at most 1). PSI rule of thumb: below 0.1 stable, 0.1–0.2 moderate,
above 0.2 a real shift. Pure functions and plain data: any thread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefleet.core.bundle.manifest import PROFILE_NAME
from edgefleet.core.protocol import CONFIDENCE_BOUNDS

PROFILE_SCHEMA: Final = 1
DEFAULT_BINS: Final = 10
MAX_BINS: Final = 100
MAX_FEATURES: Final = 256  # wider inputs are summarised by image statistics
IMAGE_STATS: Final = ("brightness", "contrast")
EPSILON: Final = 1e-4  # the smallest share PSI uses (empty bins)
# Fewer items than this in a window say more about the sample than about the input:
# the expected PSI of an unchanged distribution is about (bins - 1) / n per feature.
MIN_SAMPLES: Final = 100
NO_PROFILE: Final = "no reference profile"
PROFILE_FILE: Final = PROFILE_NAME  # the bundle member (core/bundle/manifest.py)

FeatureKind = Literal["features", "image_stats"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_shares(shares: Sequence[float], what: str) -> None:
    if any(s < 0 for s in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"{what}: shares must be >= 0 and add up to 1")


class FeatureProfile(_Strict):
    """One feature's reference: inner bin edges (ascending) and each bin's share."""

    name: str = Field(min_length=1, max_length=100)
    edges: list[float] = Field(min_length=1, max_length=MAX_BINS)
    shares: list[float]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if len(self.shares) != len(self.edges) + 1:
            raise ValueError(f"{self.name}: shares must have one more entry than edges")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError(f"{self.name}: edges must be strictly ascending")
        _check_shares(self.shares, self.name)
        return self


class InputProfile(_Strict):
    """One model input: per-value features, or image statistics of wide inputs."""

    input: str = Field(min_length=1)
    kind: FeatureKind
    features: list[FeatureProfile] = Field(min_length=1, max_length=MAX_FEATURES)


class ClassProfile(_Strict):
    """Top-1 class shares of the eval set, in class-id order."""

    labels: list[str]
    shares: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.labels and len(self.labels) != len(self.shares):
            raise ValueError("classes: one share per label")
        _check_shares(self.shares, "classes")
        return self


class ConfidenceProfile(_Strict):
    """The eval set's confidence histogram: the telemetry buckets, as shares."""

    rule: str
    le: list[float]
    shares: list[float]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if tuple(self.le) != CONFIDENCE_BOUNDS or len(self.shares) != len(CONFIDENCE_BOUNDS) + 1:
            raise ValueError(f"confidence: le must be {list(CONFIDENCE_BOUNDS)}, one share more")
        _check_shares(self.shares, "confidence")
        return self


class ReferenceProfile(_Strict):
    """``profile.json``: what the model's eval inputs and answers looked like."""

    schema_version: Literal[1] = PROFILE_SCHEMA
    samples: int = Field(ge=1)
    bins: int = Field(ge=2, le=MAX_BINS)
    inputs: list[InputProfile] = Field(default_factory=list)
    classes: ClassProfile | None = None
    confidence: ConfidenceProfile | None = None


# ------------------------------------------------------------------------ the math


def features_of(kind: FeatureKind, array: np.ndarray) -> np.ndarray:
    """``array`` (batch first) as an (items, features) float64 matrix for ``kind``."""
    flat = np.asarray(array).reshape(array.shape[0], -1).astype(np.float64, copy=False)
    if kind == "features":
        return flat
    if flat.shape[1] == 0:
        return np.zeros((flat.shape[0], len(IMAGE_STATS)))
    return np.stack([flat.mean(axis=1), flat.std(axis=1)], axis=1)


def kind_for(width: int) -> FeatureKind:
    return "features" if width <= MAX_FEATURES else "image_stats"


def feature_names(name: str, kind: FeatureKind, width: int) -> list[str]:
    if kind == "image_stats":
        return list(IMAGE_STATS)
    return [f"{name}[{i}]" for i in range(width)]


def quantile_edges(values: np.ndarray, bins: int) -> list[float]:
    """Inner edges of ``bins`` equal-count bins of ``values``, duplicates removed."""
    qs = np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return [float(v) for v in np.unique(qs)]


def bin_counts(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """How many of ``values`` fall in each bin (``len(edges) + 1``, right-inclusive)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")
    return np.bincount(idx, minlength=len(edges) + 1)


def shares(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return c / total if total > 0 else c


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> float:
    """PSI of ``actual`` against ``expected`` (shares or counts, normalised here)."""
    e = np.maximum(shares(expected), EPSILON)
    a = np.maximum(shares(actual), EPSILON)
    return max(0.0, float(np.sum((a - e) * np.log(a / e))))


def js_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen–Shannon divergence in bits between two distributions (shares or counts)."""
    ps, qs = shares(p), shares(q)
    m = (ps + qs) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return min(1.0, max(0.0, (kl(ps) + kl(qs)) / 2))


def confidence_counts(confidence: np.ndarray) -> np.ndarray:
    """The telemetry confidence histogram's counts (``le`` buckets, then "above")."""
    return bin_counts(np.asarray(confidence, dtype=np.float64), CONFIDENCE_BOUNDS)


# ------------------------------------------------------------------ the profile


def build_profile(
    inputs: Mapping[str, np.ndarray],
    *,
    bins: int = DEFAULT_BINS,
    top_class: np.ndarray | None = None,
    n_classes: int = 0,
    labels: Sequence[str] = (),
    confidence: np.ndarray | None = None,
    rule: str = "top1",
) -> ReferenceProfile:
    """The reference profile of eval ``inputs`` (batch first) and, when given, the
    model's top-1 classes and confidences on them (by ``rule``)."""
    if not 2 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be between 2 and {MAX_BINS}")
    n = min((int(v.shape[0]) for v in inputs.values()), default=0)
    if n == 0:
        raise ValueError("a reference profile needs at least one sample")
    profiles = []
    for name, value in inputs.items():
        width = int(np.prod(value.shape[1:], dtype=np.int64))
        kind = kind_for(width)
        matrix = features_of(kind, value[:n])
        feats = []
        for col, fname in zip(matrix.T, feature_names(name, kind, width), strict=True):
            edges = quantile_edges(col, bins)
            feats.append(
                FeatureProfile(name=fname, edges=edges, shares=_rounded(bin_counts(col, edges)))
            )
        profiles.append(InputProfile(input=name, kind=kind, features=feats))
    classes = None
    if top_class is not None:
        k = max(n_classes, int(top_class.max()) + 1 if top_class.size else 1)
        counts = np.bincount(np.asarray(top_class, dtype=np.int64), minlength=k)
        names = list(labels) if len(labels) == k else []
        classes = ClassProfile(labels=names, shares=_rounded(counts))
    conf = None
    if confidence is not None and confidence.size:
        conf = ConfidenceProfile(
            rule=rule, le=list(CONFIDENCE_BOUNDS), shares=_rounded(confidence_counts(confidence))
        )
    return ReferenceProfile(samples=n, bins=bins, inputs=profiles, classes=classes, confidence=conf)


def _rounded(counts: np.ndarray) -> list[float]:
    """Shares to 6 decimals (a small file), still adding up to 1 within 1e-6."""
    s = shares(counts)
    out = [round(float(v), 6) for v in s]
    # Put the rounding remainder on the largest share so the sum stays exact.
    i = int(np.argmax(s))
    out[i] = round(out[i] + 1.0 - sum(out), 6)
    return out


# ---------------------------------------------------------------- live counting


@dataclass(frozen=True)
class DriftScore:
    """One window's drift: None figures when there is no profile or too few items
    (``reason`` says which)."""

    samples: int
    psi_max: float | None = None
    psi_mean: float | None = None
    psi_output: float | None = None
    js_max: float | None = None
    js_output: float | None = None
    worst_feature: str | None = None
    reason: str | None = None


@dataclass
class DriftCounts:
    """Live bin counts against one profile. ``add`` and ``score`` in one thread at a
    time (the agent: its executor, one job per version at a time)."""

    profile: ReferenceProfile
    samples: int = 0
    features: dict[str, list[np.ndarray]] = field(default_factory=dict)
    classes: np.ndarray | None = None
    confidence: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.samples = 0
        self.features = {
            p.input: [np.zeros(len(f.shares), dtype=np.int64) for f in p.features]
            for p in self.profile.inputs
        }
        c = self.profile.classes
        self.classes = np.zeros(len(c.shares), dtype=np.int64) if c is not None else None
        conf = self.profile.confidence
        self.confidence = np.zeros(len(conf.shares), dtype=np.int64) if conf is not None else None

    def add(
        self,
        inputs: Mapping[str, np.ndarray],
        top_class: np.ndarray | None = None,
        confidence: np.ndarray | None = None,
    ) -> None:
        """Count one batch: ``inputs`` by name (batch first); the answer's top-1
        classes and confidences (by the profile's rule) when the model has them."""
        n = 0
        for p in self.profile.inputs:
            value = inputs.get(p.input)
            if value is None or value.ndim == 0 or value.shape[0] == 0:
                continue
            matrix = features_of(p.kind, value)
            if matrix.shape[1] != len(p.features):
                continue  # not the shape the profile was made for: nothing to compare
            n = max(n, matrix.shape[0])
            for counts, col, f in zip(self.features[p.input], matrix.T, p.features, strict=True):
                counts += bin_counts(col, f.edges)
        if top_class is not None and self.classes is not None:
            ids = np.asarray(top_class, dtype=np.int64)
            ids = ids[(ids >= 0) & (ids < self.classes.shape[0])]
            self.classes += np.bincount(ids, minlength=self.classes.shape[0])
            n = max(n, int(top_class.shape[0]))
        if confidence is not None and self.confidence is not None:
            self.confidence += confidence_counts(confidence)
            n = max(n, int(confidence.shape[0]))
        self.samples += n

    def score(self, min_samples: int = MIN_SAMPLES) -> DriftScore:
        """The drift of what was counted; figures None below ``min_samples`` items."""
        if self.samples < min_samples:
            why = f"too few samples ({self.samples} < {min_samples})"
            return DriftScore(self.samples, reason=why)
        psis: list[tuple[float, float, str]] = []
        for p in self.profile.inputs:
            for counts, f in zip(self.features[p.input], p.features, strict=True):
                if counts.sum() > 0:
                    psis.append((psi(f.shares, counts), js_divergence(f.shares, counts), f.name))
        out_psi = out_js = None
        if self.classes is not None and self.classes.sum() > 0:
            assert self.profile.classes is not None
            out_psi = psi(self.profile.classes.shares, self.classes)
            out_js = js_divergence(self.profile.classes.shares, self.classes)
        elif self.confidence is not None and self.confidence.sum() > 0:
            assert self.profile.confidence is not None
            out_psi = psi(self.profile.confidence.shares, self.confidence)
            out_js = js_divergence(self.profile.confidence.shares, self.confidence)
        if not psis:
            return DriftScore(
                self.samples,
                psi_output=_r(out_psi),
                js_output=_r(out_js),
                reason=None if out_psi is not None else "no input matched the profile",
            )
        worst = max(psis)
        return DriftScore(
            self.samples,
            psi_max=_r(worst[0]),
            psi_mean=_r(sum(p[0] for p in psis) / len(psis)),
            psi_output=_r(out_psi),
            js_max=_r(max(p[1] for p in psis)),
            js_output=_r(out_js),
            worst_feature=worst[2],
        )


def _r(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 6)

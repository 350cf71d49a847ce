"""A model's raw outputs, read once: one confidence per batch item, and what the answer holds.

``score`` is the one entry point for every consumer of a model's outputs: the agent's
data plane (the fleet's confidence histogram), its cloud-fallback policy (which
items are unsure), the answers it builds (labels, top-k, boxes) and the converters'
threshold calibration. It decodes once (for a detector, box decoding and NMS are
real work: ``score_off_loop`` keeps that off the event loop) and keeps what it
decoded, so that judging the same outputs by another rule (``Scored.under``) or
merging in another model's answer for some items (``Scored.replace``) decodes
nothing again.

The rules themselves live with their task: ``classification.confidence`` (``top1``,
``margin``, ``entropy``) and ``detection.confidence`` (``mean_box``, ``min_box``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from edgefleet.core.bundle.manifest import ClassificationPost, DetectionPost, Manifest
from edgefleet.core.processing import classification, detection
from edgefleet.core.processing.detection import Detection


@dataclass(frozen=True)
class Scored:
    """One batch's outputs, scored: per item, its confidence by ``rule``.

    Classifiers keep their ``probabilities`` (batch, classes) and ``top_class``;
    detectors their ``detections`` (per item, best first, coordinates normalised to
    the model input). Immutable: ``under`` and ``replace`` return new objects.
    """

    rule: str
    confidence: np.ndarray  # (batch,) float64 in [0, 1]
    top_class: np.ndarray | None = None  # (batch,) int64, classifiers only
    probabilities: np.ndarray | None = None  # (batch, classes), classifiers only
    detections: tuple[list[Detection], ...] | None = None  # per item, detectors only

    def __len__(self) -> int:
        return int(self.confidence.shape[0])

    def under(self, rule: str) -> Scored:
        """The same items judged by ``rule``, from what was decoded (nothing decoded again)."""
        if rule == self.rule:
            return self
        if self.probabilities is not None:
            conf = classification.confidences(self.probabilities, rule)
        else:
            assert self.detections is not None
            conf = _detection_confidences(self.detections, rule)
        return Scored(rule, conf, self.top_class, self.probabilities, self.detections)

    def replace(self, rows: Sequence[int], other: Scored) -> Scored:
        """These scores with items ``rows`` taken from ``other`` (its items in ``rows``
        order): the answer once another model (the cloud) answered those items."""
        other = other.under(self.rule)
        idx = np.asarray(rows, dtype=np.intp)
        conf = self.confidence.copy()
        conf[idx] = other.confidence
        top = probs = None
        if self.top_class is not None and other.top_class is not None:
            top = self.top_class.copy()
            top[idx] = other.top_class
        if self.probabilities is not None and other.probabilities is not None:
            probs = self.probabilities.copy()
            probs[idx] = other.probabilities
        dets = None
        if self.detections is not None and other.detections is not None:
            merged = list(self.detections)
            for j, i in enumerate(rows):
                merged[i] = other.detections[j]
            dets = tuple(merged)
        return Scored(self.rule, conf, top, probs, dets)

    def least_confident(self) -> float | None:
        """The least sure item's confidence (the one that says most about a model that
        is unsure); None for an empty batch."""
        if not self.confidence.shape[0]:
            return None
        return float(self.confidence.min())


def scorable(manifest: Manifest) -> bool:
    """Whether the model's outputs carry a confidence (not ``raw`` postprocessing)."""
    return isinstance(manifest.postprocessing, ClassificationPost | DetectionPost)


def score(manifest: Manifest, outputs: Mapping[str, np.ndarray], rule: str | None = None) -> Scored:
    """Score ``outputs`` by ``rule`` (default: the manifest's ``confidence.rule``).

    Runs in the caller's thread: a detector's decoding takes real time (see
    ``score_off_loop``). Raises ``ValueError`` for raw outputs, or outputs whose shapes
    disagree with the manifest.
    """
    rule = rule or manifest.confidence.rule
    post = manifest.postprocessing
    if isinstance(post, ClassificationPost):
        probs = classification.probabilities(dict(outputs), post)
        return Scored(
            rule,
            classification.confidences(probs, rule),
            probs.argmax(axis=1).astype(np.int64),
            probs,
        )
    if isinstance(post, DetectionPost):
        found = tuple(detection.decode_ssd(outputs, post))
        return Scored(rule, _detection_confidences(found, rule), detections=found)
    raise ValueError(f"{manifest.name}: raw outputs carry no confidence")


async def score_off_loop(
    manifest: Manifest,
    outputs: Mapping[str, np.ndarray],
    executor: Executor | None,
    rule: str | None = None,
) -> Scored:
    """``score`` from a coroutine without holding the event loop: a detector's decoding
    runs in ``executor``; a classifier's few µs of numpy run inline (a thread hop would
    cost more than the work)."""
    if isinstance(manifest.postprocessing, DetectionPost):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, score, manifest, outputs, rule)
    return score(manifest, outputs, rule)


def _detection_confidences(found: Sequence[Sequence[Detection]], rule: str) -> np.ndarray:
    return np.array([detection.confidence(f, rule) for f in found], dtype=np.float64)

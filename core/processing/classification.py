"""A classifier's scores → probabilities, labelled top-k predictions, and the confidence
rules ``top1``, ``margin`` and ``entropy`` (the only place they are spelled; callers go
through ``edgefleet.core.processing.scoring.score`` or ``confidences``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgefleet.core.bundle.manifest import ClassificationPost

# The confidence rules of a classifier (``confidence``).
RULES = ("top1", "margin", "entropy")


@dataclass(frozen=True)
class Prediction:
    label: str
    confidence: float
    class_id: int


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


def probabilities(outputs: dict[str, np.ndarray], post: ClassificationPost) -> np.ndarray:
    """(batch, classes) float probabilities."""
    scores = np.asarray(outputs[post.output], dtype=np.float32)
    scores = scores.reshape(scores.shape[0], -1)
    return softmax(scores) if post.apply_softmax else scores


def top_k(probs: np.ndarray, labels: list[str], k: int) -> list[Prediction]:
    """Top-k for one item (1-D ``probs``)."""
    k = min(k, probs.shape[0])
    idx = np.argpartition(-probs, k - 1)[:k]
    idx = idx[np.argsort(-probs[idx], kind="stable")]
    return [
        Prediction(labels[i] if i < len(labels) else str(i), float(probs[i]), int(i)) for i in idx
    ]


def confidence(probs: np.ndarray, rule: str) -> float:
    """One number in [0, 1] for one item: high means the model is sure."""
    p = np.clip(probs.astype(np.float64), 0.0, 1.0)
    if rule == "margin":
        top2 = np.sort(p)[-2:] if p.shape[0] > 1 else np.array([0.0, p[0]])
        return float(top2[1] - top2[0])
    if rule == "entropy":
        total = p.sum()
        if total <= 0 or p.shape[0] < 2:
            return 0.0
        q = p / total
        h = -float(np.sum(q[q > 0] * np.log(q[q > 0])))
        return 1.0 - h / math.log(p.shape[0])
    return float(p.max())


def confidences(probs: np.ndarray, rule: str) -> np.ndarray:
    """``confidence`` of each row of (batch, classes) ``probs``: (batch,) float64.

    Row by row on purpose: each value is exactly what ``confidence`` gives for that
    item alone, so a batch and its items one by one never disagree in the last digit.
    """
    return np.array([confidence(p, rule) for p in probs], dtype=np.float64)

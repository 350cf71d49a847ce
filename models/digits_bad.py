"""Recipe ``digits_bad``: deliberately worse ``digits-edge`` versions, for the demo and
the ``rollout_guard`` benchmark only. Never ship one.

A version that loads, verifies and self-tests fine but answers worse: the case a
rollout must catch on what the model *does* (shadow agreement, field signals), since
every liveness check passes. It is the digits MLP of models/digits.py (same inputs,
outputs, preprocessing, labels, fallback settings, same signing key as version 1),
trained on labels where a share of every class was **confused** with the class it
looks most like: the ``share`` of each class's training digits that sit closest to
another class's centroid (relative to their own) get that other class's label.
Because the confused digits form a coherent region (not scattered noise the MLP
would average out), the model learns the confusion, confidently, and the accuracy
drop on the held-out split follows the share closely (about 0.8 points per point of
share; uniform random label noise was tried and is far less predictable at small
drops). ``WORSE`` maps the nominal drop (points) to the share measured to give it.

Why the converter's quality gate does not refuse it: the gate compares the int8
model with *its own* fp32 reference (the cost of quantization), and quantizing the
bad model costs no more than quantizing a good one. Its self-test vectors are its
own outputs, so the self-test passes too. The manifest says what it is
(``description`` and ``metrics.label_confusion_share``).

Layout: ``<build>/fleet/worse/digits-edge-worse-<points>.bundle`` (version
``worse-<points>``). ``python -m models`` builds the 20-points-worse one (the fleet
demo's bad version, a few seconds); the benchmark builds the others on demand with
``ensure_worse``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.converters.evaluate import EvalSet
from edgefleet.converters.gate import BundleReport, bundle_model
from edgefleet.converters.quantize import quantize_model
from edgefleet.converters.sklearn import sklearn_to_onnx
from models.digits import (
    EDGE_NAME,
    EDGE_SPEC,
    INPUT,
    N_FEATURES,
    DigitsSplit,
    load_split,
    train_edge,
)
from models.recipe import BuildContext, RecipeError

log = logging.getLogger("models.digits_bad")

WORSE_DIR = "worse"
# Nominal accuracy drop (points below version 1) -> share of each class confused.
# Measured on the held-out split (fp32 MLP, seed 0): 0.27 -> ~20, 0.12 -> 10.0,
# 0.05 -> 5.3, 0.02 -> 2.7 points; the build logs the int8 figure it got.
WORSE: dict[int, float] = {20: 0.27, 10: 0.12, 5: 0.05, 2: 0.02}
DEMO_POINTS = 20


def worse_version(points: int) -> str:
    return f"worse-{points}"


def worse_bundle(build_dir: Path, points: int = DEMO_POINTS) -> Path:
    """Where the ``points``-worse bundle lives in a build (it may not exist yet)."""
    return build_dir / "fleet" / WORSE_DIR / f"{EDGE_NAME}-{worse_version(points)}.bundle"


def confuse_labels(split: DigitsSplit, share: float) -> np.ndarray:
    """Training labels with ``share`` of every class relabelled as its nearest other class.

    Per class, the digits whose distance to their own class centroid is largest
    relative to the nearest other centroid are taken first (stable order, so the
    result is deterministic). Returns a new array; ``split`` is unchanged.
    """
    if not 0.0 <= share < 0.5:
        raise RecipeError(f"confused share must be in [0, 0.5), got {share}")
    x, y = split.x_train.astype(np.float64), split.y_train
    classes = np.unique(y)
    centroids = np.stack([x[y == c].mean(axis=0) for c in classes])
    dist = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)
    rows = np.arange(len(y))
    own = dist[rows, np.searchsorted(classes, y)]
    dist[rows, np.searchsorted(classes, y)] = np.inf
    nearest_other = classes[dist.argmin(axis=1)]
    closeness = own / dist.min(axis=1)  # high: looks like another class
    labels = y.copy()
    for c in classes:
        idx = np.nonzero(y == c)[0]
        k = round(share * len(idx))
        pick = idx[np.argsort(-closeness[idx], kind="stable")[:k]]
        labels[pick] = nearest_other[pick]
    return labels


@dataclass(frozen=True)
class WorseBuild:
    points: int
    share: float
    report: BundleReport

    @property
    def out(self) -> Path:
        return self.report.out

    @property
    def accuracy(self) -> float:
        acc = self.report.metrics["accuracy_int8"]
        assert isinstance(acc, float)
        return acc


def build_worse(
    ctx: BuildContext, points: int = DEMO_POINTS, *, share: float | None = None
) -> WorseBuild:
    """Train, convert, quantize, gate and bundle the ``points``-worse digits-edge.

    ``share`` overrides the calibrated ``WORSE[points]``. The bundle is signed with
    ``ctx``'s key, like version 1. Runs on the calling thread (a few seconds of CPU).
    """
    if share is None:
        if points not in WORSE:
            raise RecipeError(f"no calibrated share for {points} points (known: {sorted(WORSE)})")
        share = WORSE[points]
    version = worse_version(points)
    split = load_split()
    noisy = DigitsSplit(split.x_train, split.x_test, confuse_labels(split, share), split.y_test)
    changed = int((noisy.y_train != split.y_train).sum())
    log.info(
        "digits_bad: %s: %d of %d training labels confused (share %.3f)",
        version,
        changed,
        len(split.y_train),
        share,
    )
    work = ctx.work_dir("digits_bad")
    stem = f"{EDGE_NAME}-{version}"
    fp32 = sklearn_to_onnx(
        train_edge(noisy), N_FEATURES, work / f"{stem}.fp32.onnx", input_name=INPUT
    )
    int8 = quantize_model(
        fp32,
        work / f"{stem}.int8.onnx",
        mode="static",
        fmt="qdq",
        activations="uint8",
        weights="int8",
        calibration={INPUT: split.x_train},
    ).path
    spec: dict[str, Any] = {
        **EDGE_SPEC,
        "description": f"DELIBERATELY BAD, for the fleet demo and benchmark only: {EDGE_NAME}"
        f" trained with {share:.0%} of every class's labels confused with its nearest"
        f" class (about {points} points less accurate than version 1).",
        "metrics": {"label_confusion_share": share, "nominal_drop_points": points},
    }
    out = worse_bundle(ctx.build_dir, points)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = bundle_model(
        model=int8,
        reference=fp32,  # the gate checks what quantization cost, which is small here
        spec=spec,
        eval_set=EvalSet({INPUT: split.x_test}, split.y_test),
        out=out,
        private_key=ctx.private_key,
        version=version,
        latency_runs=20,
    )
    built = WorseBuild(points, share, report)
    log.info(
        "digits_bad: %s accuracy %.4f on %d held-out digits (nominal %d points worse)",
        version,
        built.accuracy,
        len(split.y_test),
        points,
    )
    return built


def ensure_worse(ctx: BuildContext, points: int) -> Path:
    """The ``points``-worse bundle, built now unless the build already has it."""
    path = worse_bundle(ctx.build_dir, points)
    return path if path.exists() else build_worse(ctx, points).out


def build(ctx: BuildContext) -> list[Path]:
    """Recipe entry point: the demo's bad version (``DEMO_POINTS`` worse)."""
    return [build_worse(ctx, DEMO_POINTS).out]


def main(argv: list[str] | None = None) -> int:
    """``python -m models.digits_bad [--out DIR]``: build every ``WORSE`` version and
    print its held-out accuracy beside version 1's (the edge MLP of models/digits.py)."""
    import argparse

    from edgefleet.converters.evaluate import open_model
    from models.digits import LABEL

    parser = argparse.ArgumentParser(prog="python -m models.digits_bad", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=None, help="build directory")
    args = parser.parse_args(argv)
    ctx = BuildContext.create(args.out)
    split = load_split()
    v1_onnx = ctx.work_dir("digits") / "digits-edge.int8.onnx"
    if v1_onnx.exists():
        with open_model(v1_onnx, {**EDGE_SPEC, "version": "1"}) as backend:
            predicted = backend.infer({INPUT: split.x_test})[LABEL]
        v1 = float(np.mean(predicted == split.y_test))
        print(f"version 1: accuracy {v1:.4f} on {len(split.y_test)} held-out digits")
    else:
        v1 = None
        print(f"version 1 not built in {ctx.build_dir} (python -m models): no reference")
    for points in sorted(WORSE, reverse=True):
        built = build_worse(ctx, points)
        drop = "" if v1 is None else f", {100 * (v1 - built.accuracy):.1f} points below version 1"
        print(
            f"{worse_version(points)}: share {built.share:.2f}, accuracy {built.accuracy:.4f}"
            f"{drop}: {built.out}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

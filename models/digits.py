"""Recipe: handwritten digits, an int8 edge model and a more accurate fp32 cloud model.

* ``digits-edge``: an MLP (one hidden layer of 128) trained on sklearn's bundled
  ``load_digits``, converted with skl2onnx, statically quantized (QDQ, uint8
  activations / int8 weights, calibrated on the training split), and shipped only
  if it lost at most 1 accuracy point. Unsure answers (top-1 below 0.9) go to
  ``digits-cloud``.
* ``digits-cloud``: an RBF SVM with calibrated probabilities, fp32, more accurate
  and ~40x bigger: the model the edge falls back to.

Both take the same input and return the same outputs, so one request works against
either: ``pixels`` FP32 [-1, 64] (8x8 grey, values 0..16 as in the dataset) →
``probabilities`` FP32 [-1, 10] and ``label`` INT64 [-1]. The image endpoint gets
there from a photo of dark ink on light paper: invert, area-shrink to 8x8, x16/255.

The split (stratified, 25% test, random_state=0) is the one models/digits_litert.py
uses too, so their accuracies compare.
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
from models.recipe import BuildContext, RecipeError

log = logging.getLogger("models.digits")

EDGE_NAME = "digits-edge"
CLOUD_NAME = "digits-cloud"
TEST_SET = "digits-test.npz"
INPUT = "pixels"
SCORES = "probabilities"
LABEL = "label"
N_FEATURES = 64
LABELS = [str(i) for i in range(10)]
PIXEL_MAX = 16.0
SEED = 0
TEST_SIZE = 0.25
HIDDEN_LAYERS = (128,)
FALLBACK_THRESHOLD = 0.9
MAX_DROP_POINTS = 1.0

PREPROCESSING: dict[str, Any] = {
    "type": "image",
    "input": INPUT,
    "width": 8,
    "height": 8,
    "color": "GRAY",
    "layout": "NC",
    "resize": "stretch",
    "interpolation": "area",
    # Demo images are dark ink on white paper; the dataset is bright ink on black.
    "invert": True,
    "scale": PIXEL_MAX / 255.0,
    "mean": [0.0],
    "std": [1.0],
}
_COMMON: dict[str, Any] = {
    "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, N_FEATURES]}],
    "outputs": [
        {"name": SCORES, "datatype": "FP32", "shape": [-1, len(LABELS)]},
        {"name": LABEL, "datatype": "INT64", "shape": [-1]},
    ],
    "labels": LABELS,
    "preprocessing": PREPROCESSING,
    "postprocessing": {"type": "classification", "output": SCORES, "top_k": 3},
    "confidence": {"rule": "top1"},
}
EDGE_SPEC: dict[str, Any] = {
    "name": EDGE_NAME,
    "description": "Handwritten digit (0-9) classifier for 8x8 grey images (pixel values"
    " 0..16, sklearn digits): an MLP quantized to int8 (ONNX QDQ u8s8).",
    **_COMMON,
    "fallback": {
        "mode": "cloud_when_unsure",
        "threshold": FALLBACK_THRESHOLD,
        "cloud_model": CLOUD_NAME,
    },
}
CLOUD_SPEC: dict[str, Any] = {
    "name": CLOUD_NAME,
    "description": "Handwritten digit (0-9) classifier for 8x8 grey images (pixel values"
    " 0..16, sklearn digits): an RBF SVM with calibrated probabilities, fp32; the"
    " cloud model digits-edge falls back to.",
    **_COMMON,
    # It is the cloud: nowhere further to send a hard case.
    "fallback": {"mode": "edge_only", "threshold": 0.0},
}


@dataclass(frozen=True)
class DigitsSplit:
    x_train: np.ndarray  # (n, 64) float32, 0..16
    x_test: np.ndarray
    y_train: np.ndarray  # (n,) int64
    y_test: np.ndarray


def load_split() -> DigitsSplit:
    """sklearn's digits, stratified 75/25 split, random_state=0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32),
        y.astype(np.int64),
        test_size=TEST_SIZE,
        stratify=y,
        random_state=SEED,
    )
    return DigitsSplit(x_train, x_test, y_train, y_test)


def train_edge(
    split: DigitsSplit, hidden_layers: tuple[int, ...] = HIDDEN_LAYERS, seed: int = SEED
) -> Any:
    """MLP trained on pixels/16 (better conditioned), then rescaled to take raw 0..16."""
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    clf = MLPClassifier(hidden_layer_sizes=hidden_layers, max_iter=600, random_state=seed)
    # One BLAS thread: for matrices this small threads only add contention (10x slower
    # on a busy 2-core box), and a multi-threaded reduction order may change the last
    # bits of the weights, hence the model's sha256, from machine to machine.
    with threadpool_limits(limits=1):
        clf.fit(split.x_train / PIXEL_MAX, split.y_train)
    # x/16 @ W == x @ (W/16): fold the scaling into the first layer, so the model's
    # input is the dataset's (and the preprocessing's) 0..16 range.
    clf.coefs_[0] = clf.coefs_[0] / PIXEL_MAX
    return clf


def train_cloud(split: DigitsSplit) -> Any:
    """RBF SVM; probabilities from Platt scaling fitted on cross-validated scores."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC
    from threadpoolctl import threadpool_limits

    # ensemble=False: one SVM on all training data, calibrated on CV predictions
    # (what SVC(probability=True) did before sklearn deprecated it).
    clf = CalibratedClassifierCV(SVC(C=10.0, gamma=0.001), ensemble=False)
    with threadpool_limits(limits=1):  # see train_edge
        return clf.fit(split.x_train, split.y_train)


def save_test_set(split: DigitsSplit, path: Path) -> Path:
    """The held-out split as ``x`` (float32 [N, 64], 0..16) and ``y`` (int64 [N]).

    ``X_test``/``y_test`` hold the same arrays under the names sklearn users expect.
    """
    with open(path, "wb") as f:
        np.savez_compressed(
            f, x=split.x_test, y=split.y_test, X_test=split.x_test, y_test=split.y_test
        )
    return path


def load_test_set(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return data["x"], data["y"]


def render_digit_png(pixels: np.ndarray, size: int = 64) -> bytes:
    """A dataset digit (64 or 8x8 values 0..16) as a PNG of dark ink on white paper.

    Upscaled with nearest-neighbour: area-shrinking it back to 8x8 (what the
    preprocessing does) then gives the original values to within 1/255 x 16.
    """
    import cv2

    grid = np.asarray(pixels, dtype=np.float32).reshape(8, 8)
    ink = np.clip(np.rint(grid * (255.0 / PIXEL_MAX)), 0, 255).astype(np.uint8)
    img = cv2.resize(255 - ink, (size, size), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RecipeError("PNG encoding failed")
    return buf.tobytes()


@dataclass(frozen=True)
class DigitsBuild:
    edge: BundleReport
    cloud: BundleReport
    test_set: Path
    fp32_onnx: Path
    int8_onnx: Path
    cloud_onnx: Path

    @property
    def bundles(self) -> list[Path]:
        return [self.edge.out, self.cloud.out]


def _build_edge(
    ctx: BuildContext,
    split: DigitsSplit,
    eval_set: EvalSet,
    work: Path,
    out: Path,
    version: str,
    *,
    hidden_layers: tuple[int, ...] = HIDDEN_LAYERS,
    seed: int = SEED,
    max_drop: float = MAX_DROP_POINTS,
) -> BundleReport:
    """Train, convert, quantize (static QDQ u8s8), gate and bundle one edge MLP."""
    log.info("digits: training the edge MLP %s (seed %d)", hidden_layers, seed)
    edge = train_edge(split, hidden_layers, seed)
    stem = f"digits-edge{'' if version == ctx.version else '-' + version}"
    fp32 = sklearn_to_onnx(edge, N_FEATURES, work / f"{stem}.fp32.onnx", input_name=INPUT)
    int8 = quantize_model(
        fp32,
        work / f"{stem}.int8.onnx",
        mode="static",
        fmt="qdq",
        activations="uint8",
        weights="int8",
        calibration={INPUT: split.x_train},
    ).path
    return bundle_model(
        model=int8,
        reference=fp32,
        spec=EDGE_SPEC,
        eval_set=eval_set,
        out=out,
        private_key=ctx.private_key,
        version=version,
        max_drop=max_drop,
    )


def build_edge_update(ctx: BuildContext, out_dir: Path, version: str = "2") -> Path:
    """A newer ``digits-edge`` for the fleet demo: retrained wider,
    signed with the same key, so a fleet can push it to agents running version 1."""
    split = load_split()
    eval_set = EvalSet({INPUT: split.x_test}, split.y_test)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _build_edge(
        ctx,
        split,
        eval_set,
        ctx.work_dir("digits"),
        out_dir / f"{EDGE_NAME}-{version}.bundle",
        version,
        hidden_layers=(256,),  # 0.9867 vs version 1's 0.9822 on the held-out digits
    )
    return report.out


def build_digits(ctx: BuildContext, *, max_drop: float = MAX_DROP_POINTS) -> DigitsBuild:
    """Train, convert, quantize, gate and bundle both digits models into ``ctx.build_dir``."""
    work = ctx.work_dir("digits")
    log.info("digits: loading sklearn's digits and splitting 75/25")
    split = load_split()
    test_set = save_test_set(split, ctx.build_dir / TEST_SET)
    eval_set = EvalSet({INPUT: split.x_test}, split.y_test)

    edge_report = _build_edge(
        ctx, split, eval_set, work, ctx.bundle_path(EDGE_NAME), ctx.version, max_drop=max_drop
    )
    fp32, int8 = work / "digits-edge.fp32.onnx", work / "digits-edge.int8.onnx"

    log.info("digits: training the cloud SVM")
    cloud = train_cloud(split)
    cloud_onnx = sklearn_to_onnx(
        cloud, N_FEATURES, work / "digits-cloud.fp32.onnx", input_name=INPUT
    )
    cloud_report = bundle_model(
        model=cloud_onnx,
        spec=CLOUD_SPEC,
        eval_set=eval_set,
        out=ctx.bundle_path(CLOUD_NAME),
        private_key=ctx.private_key,
        version=ctx.version,
    )
    edge_acc = edge_report.metrics["accuracy_int8"]
    cloud_acc = cloud_report.metrics["accuracy_fp32"]
    assert isinstance(edge_acc, float) and isinstance(cloud_acc, float)
    if cloud_acc <= edge_acc:
        # A fallback to a model no better than the edge would be pointless traffic.
        raise RecipeError(
            f"digits-cloud ({cloud_acc}) is not more accurate than digits-edge ({edge_acc})"
        )
    log.info(
        "digits: edge int8 %.4f (fp32 %.4f), cloud %.4f on %d held-out digits",
        edge_acc,
        edge_report.metrics["accuracy_fp32"],
        cloud_acc,
        len(eval_set),
    )
    return DigitsBuild(edge_report, cloud_report, test_set, fp32, int8, cloud_onnx)


def build(ctx: BuildContext) -> list[Path]:
    """Recipe entry point: ``digits-edge-<v>.bundle`` and ``digits-cloud-<v>.bundle``."""
    return build_digits(ctx).bundles

"""SSD-with-anchors decoding (BlazeFace and friends), exactly as MediaPipe does it.

Three MediaPipe calculators are reproduced here in vectorised numpy:

* ``SsdAnchorsCalculator``: the anchor grid the model's raw outputs are relative to;
* ``TensorsToDetectionsCalculator``: raw regressors + class logits → boxes, keypoints
  and scores (sigmoid of clipped logits), dropping boxes under ``min_score``;
* ``NonMaxSuppressionCalculator`` with the ``WEIGHTED`` algorithm and IoU overlap:
  boxes overlapping the best remaining one are merged into it, weighted by score.

Everything works on coordinates normalised to the model input (0..1). ``ImageTransform``
maps them back to the original image, undoing a letterbox (or a stretch).

Box layout: BlazeFace's graph sets ``reverse_output_order: true`` on
TensorsToDetectionsCalculator, i.e. raw boxes are ``x_center, y_center, w, h``
(``box_format: xywh``), followed by keypoints as ``x, y`` pairs at
``keypoint_coord_offset``. TF-style SSD models use ``yxhw`` and often
``apply_exponential_on_box_size``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.core.bundle.manifest import DetectionPost, SsdAnchors

Box = tuple[float, float, float, float]
# The confidence rules of a detector (``confidence``).
RULES = ("mean_box", "min_box")
# Answers report box scores to this many decimals.
SCORE_DECIMALS = 5


@dataclass(frozen=True)
class Detection:
    """One detected object; coordinates normalised to the model input (0..1)."""

    box: Box  # xmin, ymin, xmax, ymax
    score: float
    class_id: int
    keypoints: tuple[tuple[float, float], ...]  # (x, y) each


# --------------------------------------------------------------------------- anchors


def _calculate_scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    # MediaPipe's CalculateScale: linear between min and max over the stride list.
    if count == 1:
        return (min_scale + max_scale) * 0.5
    return min_scale + (max_scale - min_scale) * index / (count - 1.0)


def _anchor_key(opts: SsdAnchors) -> tuple[tuple[str, Any], ...]:
    # The pydantic model holds lists, so it is not hashable itself; its dump is.
    return tuple(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(opts.model_dump().items())
    )


@functools.lru_cache(maxsize=32)
def _anchors_for(key: tuple[tuple[str, Any], ...]) -> np.ndarray:
    o = dict(key)
    strides: tuple[int, ...] = o["strides"]
    aspect_ratios: tuple[float, ...] = o["aspect_ratios"]
    num_layers: int = o["num_layers"]
    if len(strides) != num_layers:
        # MediaPipe CHECK-fails here; a bad manifest must not crash the agent.
        raise ValueError(f"anchors: {len(strides)} strides given for {num_layers} layers")
    n_strides = len(strides)
    groups: list[np.ndarray] = []
    layer_id = 0
    while layer_id < num_layers:
        widths: list[float] = []
        heights: list[float] = []
        # Consecutive layers with the same stride share one feature map: their
        # anchors are interleaved per grid cell, in layer order.
        last = layer_id
        while last < n_strides and strides[last] == strides[layer_id]:
            scale = _calculate_scale(o["min_scale"], o["max_scale"], last, n_strides)
            ratios: list[float] = []
            scales: list[float] = []
            if last == 0 and o["reduce_boxes_in_lowest_layer"]:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                ratios += list(aspect_ratios)
                scales += [scale] * len(aspect_ratios)
                if o["interpolated_scale_aspect_ratio"] > 0.0:
                    scale_next = (
                        1.0
                        if last == n_strides - 1
                        else _calculate_scale(o["min_scale"], o["max_scale"], last + 1, n_strides)
                    )
                    scales.append(float(np.sqrt(scale * scale_next)))
                    ratios.append(o["interpolated_scale_aspect_ratio"])
            for r, s in zip(ratios, scales, strict=True):
                heights.append(s / np.sqrt(r))
                widths.append(s * np.sqrt(r))
            last += 1
        stride = strides[layer_id]
        fm_h = int(np.ceil(o["input_size_height"] / stride))
        fm_w = int(np.ceil(o["input_size_width"] / stride))
        n_per_cell = len(widths)
        # Order: y, then x, then anchor within the cell (MediaPipe's loop nest).
        ys = (np.arange(fm_h, dtype=np.float64) + o["anchor_offset_y"]) / fm_h
        xs = (np.arange(fm_w, dtype=np.float64) + o["anchor_offset_x"]) / fm_w
        grid = np.empty((fm_h, fm_w, n_per_cell, 4), dtype=np.float64)
        grid[..., 0] = xs[np.newaxis, :, np.newaxis]
        grid[..., 1] = ys[:, np.newaxis, np.newaxis]
        if o["fixed_anchor_size"]:
            grid[..., 2] = 1.0
            grid[..., 3] = 1.0
        else:
            grid[..., 2] = np.asarray(widths)
            grid[..., 3] = np.asarray(heights)
        groups.append(grid.reshape(-1, 4))
        layer_id = last
    anchors = np.concatenate(groups).astype(np.float32)
    # The array is shared by every caller through the cache: make it read-only.
    anchors.setflags(write=False)
    return anchors


def generate_anchors(opts: SsdAnchors) -> np.ndarray:
    """(N, 4) float32 anchors: x_center, y_center, w, h; cached per options, read-only."""
    return _anchors_for(_anchor_key(opts))


# --------------------------------------------------------------------------- decoding


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box against (M, 4) boxes, xmin/ymin/xmax/ymax."""
    iw = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    ih = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.clip(iw, 0.0, None) * np.clip(ih, 0.0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    # MediaPipe: a zero normaliser means no overlap, not a division error.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0.0, inter / union, 0.0)


def non_max_suppression(
    boxes: np.ndarray,
    scores: np.ndarray,
    keypoints: np.ndarray,
    iou_threshold: float,
    max_detections: int,
    weighted: bool = True,
) -> list[tuple[np.ndarray, int, np.ndarray]]:
    """MediaPipe's NonMaxSuppressionCalculator (IoU overlap) on one image's candidates.

    ``boxes`` (M, 4), ``scores`` (M,), ``keypoints`` (M, K, 2). Returns, best first,
    (box, index of the leading candidate, keypoints); the score and class of a merged
    detection are those of its leading candidate, as in MediaPipe.

    The loop runs once per *output* detection; each step compares against all
    remaining candidates at once.
    """
    # Stable sort: equal scores keep anchor order, so results are reproducible
    # (MediaPipe's std::sort leaves ties unspecified).
    remaining = np.argsort(-scores, kind="stable")
    out: list[tuple[np.ndarray, int, np.ndarray]] = []
    while remaining.size and len(out) < max_detections:
        top = int(remaining[0])
        overlap = _iou(boxes[top], boxes[remaining]) > iou_threshold
        # The leader always joins its own cluster (IoU 1 with itself); MediaPipe
        # instead stops altogether after a zero-area leader, which only a
        # degenerate model output can produce.
        overlap[0] = True
        members = remaining[overlap]
        if weighted:
            w = scores[members].astype(np.float64)
            total = w.sum()
            box = (boxes[members] * w[:, np.newaxis]).sum(axis=0) / total
            kps = (keypoints[members] * w[:, np.newaxis, np.newaxis]).sum(axis=0) / total
        else:
            box, kps = boxes[top].astype(np.float64), keypoints[top].astype(np.float64)
        out.append((box, top, kps))
        remaining = remaining[~overlap]
    return out


def decode_boxes(
    raw: np.ndarray, anchors: np.ndarray, post: DetectionPost
) -> tuple[np.ndarray, np.ndarray]:
    """Raw regressors (..., N, num_coords) → boxes (..., N, 4) and keypoints (..., N, K, 2).

    Boxes are xmin, ymin, xmax, ymax; keypoints x, y; all normalised to the input.
    """
    off = post.box_coord_offset
    k = post.num_keypoints
    ax, ay, aw, ah = (anchors[:, i] for i in range(4))
    ix, iy, iw, ih = (0, 1, 2, 3) if post.box_format == "xywh" else (1, 0, 3, 2)
    xc = raw[..., off + ix] / post.x_scale * aw + ax
    yc = raw[..., off + iy] / post.y_scale * ah + ay
    if post.apply_exponential_on_box_size:
        w = np.exp(raw[..., off + iw] / post.w_scale) * aw
        h = np.exp(raw[..., off + ih] / post.h_scale) * ah
    else:
        w = raw[..., off + iw] / post.w_scale * aw
        h = raw[..., off + ih] / post.h_scale * ah
    boxes = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], axis=-1)
    kp_off = off + post.keypoint_coord_offset
    kp = raw[..., kp_off : kp_off + 2 * k].reshape(*raw.shape[:-1], k, 2)
    kx = kp[..., 0] / post.x_scale * aw[:, np.newaxis] + ax[:, np.newaxis]
    ky = kp[..., 1] / post.y_scale * ah[:, np.newaxis] + ay[:, np.newaxis]
    return boxes, np.stack([kx, ky], axis=-1)


def decode_scores(raw: np.ndarray, post: DetectionPost) -> tuple[np.ndarray, np.ndarray]:
    """Class logits (..., N, C) → best score (..., N) and its class id (..., N)."""
    scores = raw.astype(np.float32)
    if post.sigmoid_score:
        t = post.score_clipping_thresh
        # BlazeFace's background logits reach -30000: clip to the threshold, and use
        # float64 so exp(100) stays finite (float32 overflows to inf with a warning).
        clipped = np.clip(scores.astype(np.float64), -t, t)
        scores = (1.0 / (1.0 + np.exp(-clipped))).astype(np.float32)
    class_ids = scores.argmax(axis=-1)
    return np.take_along_axis(scores, class_ids[..., np.newaxis], axis=-1)[..., 0], class_ids


def decode_ssd(outputs: Mapping[str, np.ndarray], post: DetectionPost) -> list[list[Detection]]:
    """The model's raw outputs → detections per batch item, best first.

    ``outputs[post.boxes_output]`` is (B, N, num_coords) and
    ``outputs[post.scores_output]`` (B, N, num_classes), N the number of anchors.
    Raises ``ValueError`` when shapes and manifest disagree.
    """
    anchors = generate_anchors(post.anchors)
    n = anchors.shape[0]
    raw_boxes = np.asarray(outputs[post.boxes_output], dtype=np.float32)
    raw_scores = np.asarray(outputs[post.scores_output], dtype=np.float32)
    need = max(
        post.box_coord_offset + 4,
        post.box_coord_offset + post.keypoint_coord_offset + 2 * post.num_keypoints,
    )
    if post.num_coords < need:
        raise ValueError(f"num_coords {post.num_coords} < {need} needed for box and keypoints")
    # A batch-1 model run at batch B may fold the batch into the anchor axis
    # (BlazeFace gives (1, B*896, 16)); refuse rather than decode garbage.
    if raw_boxes.ndim == 2:
        raw_boxes = raw_boxes[np.newaxis]
    if raw_boxes.ndim != 3 or raw_boxes.shape[1:] != (n, post.num_coords):
        raise ValueError(
            f"{post.boxes_output!r} has shape {raw_boxes.shape},"
            f" expected (batch, {n}, {post.num_coords})"
        )
    batch = raw_boxes.shape[0]
    if raw_scores.size == 0 or raw_scores.size % (batch * n):
        raise ValueError(
            f"{post.scores_output!r} has shape {raw_scores.shape}, expected ({batch}, {n}, classes)"
        )
    raw_scores = raw_scores.reshape(batch, n, -1)
    boxes, keypoints = decode_boxes(raw_boxes, anchors, post)
    scores, class_ids = decode_scores(raw_scores, post)
    width = boxes[..., 2] - boxes[..., 0]
    height = boxes[..., 3] - boxes[..., 1]
    # MediaPipe drops boxes under min_score and boxes with negative or NaN size.
    keep = (scores >= post.min_score) & (width >= 0) & (height >= 0)
    results: list[list[Detection]] = []
    for b in range(batch):
        idx = np.flatnonzero(keep[b])
        if idx.size == 0:
            results.append([])
            continue
        kept = non_max_suppression(
            boxes[b, idx],
            scores[b, idx],
            keypoints[b, idx],
            post.iou_threshold,
            post.max_detections,
            weighted=post.weighted_nms,
        )
        results.append(
            [
                Detection(
                    box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                    score=float(scores[b, idx[lead]]),
                    class_id=int(class_ids[b, idx[lead]]),
                    keypoints=tuple((float(x), float(y)) for x, y in kps),
                )
                for box, lead, kps in kept
            ]
        )
    return results


# --------------------------------------------------------------------------- confidence


def reported_score(d: Detection) -> float:
    """A detection's score as answers report it (``SCORE_DECIMALS`` decimals)."""
    return round(d.score, SCORE_DECIMALS)


def confidence(found: Sequence[Detection], rule: str, *, as_reported: bool = False) -> float:
    """One number in [0, 1] for one image's detections: ``min_box`` the least sure box,
    ``mean_box`` (any other rule) their mean; nothing found is a confident answer (1.0).

    ``as_reported``: from the scores as an answer shows them (``SCORE_DECIMALS``
    decimals), so that a caller can recompute the answer's confidence from its boxes;
    otherwise (the fallback policy, the fleet's statistics) at full precision.
    """
    scores = [reported_score(d) if as_reported else d.score for d in found]
    if not scores:
        return 1.0
    if rule == "min_box":
        return min(scores)
    return float(np.mean(scores))

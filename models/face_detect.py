"""Recipe: MediaPipe's BlazeFace short-range face detector as a LiteRT bundle.

The model is the real pretrained ``face_detection_short_range.tflite`` shipped inside
the ``mediapipe==0.10.14`` wheel (later wheels no longer carry it); nothing is
trained here. The manifest carries every option of MediaPipe's face-detection graph
(``face_detection.pbtxt`` + ``face_detection_short_range.pbtxt``) so the agent decodes
the raw tensors exactly as MediaPipe would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.core.bundle.manifest import DetectionPost, ImagePreprocessing, SsdAnchors
from edgefleet.core.processing.detection import decode_ssd
from edgefleet.core.processing.image import resize, to_tensor
from models.sample_images import astronaut_rgb
from models.wheels import WheelMember

if TYPE_CHECKING:
    from models.recipe import BuildContext

NAME = "face-detect"
MODEL = WheelMember(
    package="mediapipe",
    version="0.10.14",
    member="mediapipe/modules/face_detection/face_detection_short_range.tflite",
    sha256="bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
)
SIZE = 128

# ImageToTensorCalculator: keep_aspect_ratio, BORDER_ZERO, float range [-1, 1].
# value = (pixel * scale - mean) / std = pixel * 2/255 - 1.
PREPROCESSING = ImagePreprocessing(
    input="input",
    width=SIZE,
    height=SIZE,
    color="RGB",
    layout="NHWC",
    resize="letterbox",
    interpolation="linear",
    scale=2.0 / 255.0,
    mean=[1.0],
    std=[1.0],
)

# SsdAnchorsCalculator + TensorsToDetectionsCalculator + NonMaxSuppressionCalculator
# options of face_detection_short_range.
POSTPROCESSING = DetectionPost(
    boxes_output="regressors",
    scores_output="classificators",
    anchors=SsdAnchors(
        num_layers=4,
        min_scale=0.1484375,
        max_scale=0.75,
        input_size_width=SIZE,
        input_size_height=SIZE,
        anchor_offset_x=0.5,
        anchor_offset_y=0.5,
        strides=[8, 16, 16, 16],
        aspect_ratios=[1.0],
        fixed_anchor_size=True,
        interpolated_scale_aspect_ratio=1.0,
        reduce_boxes_in_lowest_layer=False,
    ),
    num_coords=16,
    box_coord_offset=0,
    num_keypoints=6,
    x_scale=128.0,
    y_scale=128.0,
    w_scale=128.0,
    h_scale=128.0,
    sigmoid_score=True,
    score_clipping_thresh=100.0,
    min_score=0.5,
    iou_threshold=0.3,
    max_detections=100,
    weighted_nms=True,
)


def to_input(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (1, 128, 128, 3) float32 in [-1, 1], letterboxed.

    The agent's own preprocessing, so the self-test vectors are what it would feed.
    """
    boxed, _ = resize(image, PREPROCESSING)
    return to_tensor(boxed, PREPROCESSING)


def _measure(
    model_path: Path, x: np.ndarray, runs: int = 50
) -> tuple[dict[str, np.ndarray], float]:
    """Raw outputs for ``x`` and the median single-thread latency in ms."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model_path), num_threads=1)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        interp.invoke()
        times.append(time.perf_counter() - t0)
    outputs = {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}
    return outputs, float(np.median(times) * 1000.0)


def manifest_fields(version: str, metrics: dict[str, Any]) -> dict[str, Any]:
    n = POSTPROCESSING.num_coords
    return {
        "name": NAME,
        "version": version,
        "runtime": "litert",
        "description": (
            "BlazeFace short-range face detector (MediaPipe), for faces within ~2 m of"
            " the camera: 128x128 RGB letterboxed input, up to 896 candidate boxes with 6"
            " keypoints (eyes, nose tip, mouth, ear tragions), decoded with SSD anchors"
            " and weighted NMS."
        ),
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, SIZE, SIZE, 3]}],
        "outputs": [
            {"name": "regressors", "datatype": "FP32", "shape": [1, 896, n]},
            {"name": "classificators", "datatype": "FP32", "shape": [1, 896, 1]},
        ],
        "labels": ["face"],
        "preprocessing": PREPROCESSING.model_dump(),
        "postprocessing": POSTPROCESSING.model_dump(),
        "confidence": {"rule": "mean_box"},
        "metrics": metrics,
    }


def build(ctx: BuildContext) -> list[Path]:
    """Write ``face-detect-<version>.bundle`` into ``ctx.build_dir``."""
    from edgefleet.converters.bundler import build_bundle
    from models.recipe import RecipeError

    model_path = MODEL.fetch(ctx.cache_dir)
    photo = to_input(astronaut_rgb(ctx.cache_dir))
    # A blank (black) frame: the self-test also pins the "nothing there" answer.
    blank = to_input(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))

    # Refuse to ship a bundle whose decoding is off: exactly one face on the photo.
    outputs, latency_ms = _measure(model_path, photo)
    faces = decode_ssd(outputs, POSTPROCESSING)[0]
    if len(faces) != 1 or faces[0].score < 0.8:
        raise RecipeError(f"face-detect: expected one face on the astronaut, got {faces}")

    metrics: dict[str, Any] = {
        "source": f"mediapipe {MODEL.version} wheel",
        "source_member": MODEL.member,
        "size_bytes": model_path.stat().st_size,
        "anchors": 896,
        "latency_ms_fp32_1thread": round(latency_ms, 3),
        "astronaut_face_score": round(faces[0].score, 4),
    }
    out = ctx.bundle_path(NAME)
    # The model's batch is fixed at 1 (resizing it folds the batch into the anchor
    # axis: (1, 1792, 16) for two images); the LiteRT backend runs these two
    # vectors one at a time and stacks the outputs.
    test_inputs = {"input": np.concatenate([photo, blank])}
    build_bundle(
        out=out,
        model_file=model_path,
        manifest=manifest_fields(ctx.version, metrics),
        test_inputs=test_inputs,
        private_key=ctx.private_key,
        self_test={"atol": 1e-3, "rtol": 1e-3},
    )
    return [out]

"""Image bytes → the model's input tensor, as the bundle's manifest prescribes.

Runs in a worker thread (decoding a JPEG takes about a millisecond); never on the
event loop.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from edgefleet.core.bundle.manifest import ImagePreprocessing
from edgefleet.core.errors import BadRequest

Box = tuple[float, float, float, float]
_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}


@functools.cache
def cv2_module() -> ModuleType:
    """OpenCV, imported on first use.

    OpenCV holds ~15 MB of resident memory; a box whose apps only send tensors never
    pays for it. The pixel cap must be set before the import: it makes OpenCV refuse
    decompression bombs (a tiny PNG claiming 100k x 100k pixels) instead of
    allocating gigabytes.
    """
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64 * 1024 * 1024))
    import cv2

    return cv2


def _interpolation(name: str) -> Any:
    cv2 = cv2_module()
    return {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}[name]


@dataclass(frozen=True)
class ImageTransform:
    """How an original image became the model input, to map coordinates back.

    A model pixel ``m`` comes from original pixel ``(m - pad) / scale``.
    """

    orig_width: int
    orig_height: int
    model_width: int
    model_height: int
    scale_x: float  # model pixels per original pixel
    scale_y: float
    pad_x: float  # model pixels of padding on the left / top
    pad_y: float

    @classmethod
    def for_letterbox(
        cls, orig_width: int, orig_height: int, model_width: int, model_height: int
    ) -> ImageTransform:
        """Keep the aspect ratio, centre the image, pad the rest (MediaPipe keep_aspect_ratio).

        The resized size is rounded to whole pixels, so scale_x and scale_y may differ
        by a fraction of a pixel's worth; both are recorded exactly.
        """
        if min(orig_width, orig_height, model_width, model_height) <= 0:
            raise ValueError("image and model sizes must be positive")
        scale = min(model_width / orig_width, model_height / orig_height)
        new_w = min(model_width, max(1, round(orig_width * scale)))
        new_h = min(model_height, max(1, round(orig_height * scale)))
        return cls(
            orig_width,
            orig_height,
            model_width,
            model_height,
            new_w / orig_width,
            new_h / orig_height,
            float((model_width - new_w) // 2),
            float((model_height - new_h) // 2),
        )

    @classmethod
    def for_stretch(
        cls, orig_width: int, orig_height: int, model_width: int, model_height: int
    ) -> ImageTransform:
        if min(orig_width, orig_height, model_width, model_height) <= 0:
            raise ValueError("image and model sizes must be positive")
        return cls(
            orig_width,
            orig_height,
            model_width,
            model_height,
            model_width / orig_width,
            model_height / orig_height,
            0.0,
            0.0,
        )

    @property
    def resized_size(self) -> tuple[int, int]:
        """(width, height) of the image content inside the model input."""
        return (
            round(self.orig_width * self.scale_x),
            round(self.orig_height * self.scale_y),
        )

    def point_to_pixels(self, x: float, y: float, ndigits: int | None = 1) -> tuple[float, float]:
        """A normalised model-input point → original pixels (not clipped: keypoints
        of a face cut by the image edge may legitimately lie outside)."""
        px = (x * self.model_width - self.pad_x) / self.scale_x
        py = (y * self.model_height - self.pad_y) / self.scale_y
        if ndigits is None:
            return float(px), float(py)
        return round(px, ndigits), round(py, ndigits)

    def box_to_pixels(self, box: Box, ndigits: int | None = 1) -> list[float]:
        """Normalised xmin, ymin, xmax, ymax → original pixels, clipped to the image.

        ``ndigits`` rounds for JSON answers (0.1 px is below any model's accuracy);
        ``None`` keeps full precision.
        """
        x1, y1 = self.point_to_pixels(box[0], box[1], None)
        x2, y2 = self.point_to_pixels(box[2], box[3], None)
        w, h = float(self.orig_width), float(self.orig_height)
        out = [
            min(max(x1, 0.0), w),
            min(max(y1, 0.0), h),
            min(max(x2, 0.0), w),
            min(max(y2, 0.0), h),
        ]
        return out if ndigits is None else [round(v, ndigits) for v in out]


def letterbox(
    image: np.ndarray, width: int, height: int, interpolation: int | None = None
) -> tuple[np.ndarray, ImageTransform]:
    """Resize ``image`` (H, W[, C]) into ``width`` x ``height`` keeping its aspect ratio.

    The image is centred and the border is zero (black), as MediaPipe's
    ImageToTensorCalculator does with ``BORDER_ZERO``; the dtype is kept.
    ``interpolation`` is a cv2 flag, default bilinear.
    """
    h, w = image.shape[:2]
    t = ImageTransform.for_letterbox(w, h, width, height)
    new_w, new_h = t.resized_size
    cv2 = cv2_module()
    flag = cv2.INTER_LINEAR if interpolation is None else interpolation
    resized = cv2.resize(image, (new_w, new_h), interpolation=flag)
    # cv2 drops a trailing channel axis of 1; restore the caller's layout.
    resized = resized.reshape((new_h, new_w, *image.shape[2:]))
    out = np.zeros((height, width, *image.shape[2:]), dtype=image.dtype)
    px, py = int(t.pad_x), int(t.pad_y)
    out[py : py + new_h, px : px + new_w] = resized
    return out, t


def decode_image(data: bytes, color: str) -> np.ndarray:
    """Decode JPEG/PNG bytes to an HxWxC uint8 array in ``color`` order (GRAY: HxWx1)."""
    if not data:
        raise BadRequest("empty image body")
    if not any(data.startswith(m) for m in _MAGIC):
        raise BadRequest("body is not a JPEG or PNG image")
    buf = np.frombuffer(data, dtype=np.uint8)
    cv2 = cv2_module()
    flag = cv2.IMREAD_GRAYSCALE if color == "GRAY" else cv2.IMREAD_COLOR
    try:
        img = cv2.imdecode(buf, flag)
    except cv2.error as exc:
        raise BadRequest(f"image could not be decoded: {exc.msg.strip()}") from exc
    if img is None or img.size == 0:
        raise BadRequest("image is corrupt or truncated and could not be decoded")
    if color == "GRAY":
        return img[:, :, np.newaxis]
    if color == "RGB":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def resize(img: np.ndarray, spec: ImagePreprocessing) -> tuple[np.ndarray, ImageTransform]:
    cv2 = cv2_module()
    interp = _interpolation(spec.interpolation)
    h, w, channels = img.shape
    if spec.resize == "letterbox":
        return letterbox(img, spec.width, spec.height, interp)
    out = cv2.resize(img, (spec.width, spec.height), interpolation=interp)
    transform = ImageTransform.for_stretch(w, h, spec.width, spec.height)
    return out.reshape(spec.height, spec.width, channels), transform


def to_tensor(img: np.ndarray, spec: ImagePreprocessing) -> np.ndarray:
    """HxWxC uint8 → float32 tensor with a batch dimension of 1, in the model's layout."""
    x = img.astype(np.float32)
    if spec.invert:
        x = 255.0 - x
    x *= spec.scale
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    elif spec.layout == "NC":
        x = x.reshape(-1)
    return np.ascontiguousarray(x[np.newaxis], dtype=np.float32)


def preprocess(data: bytes, spec: ImagePreprocessing) -> tuple[np.ndarray, ImageTransform]:
    img = decode_image(data, spec.color)
    resized, transform = resize(img, spec)
    return to_tensor(resized, spec), transform

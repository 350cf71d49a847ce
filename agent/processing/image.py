"""Image bytes → the model's input tensor, as the bundle's manifest prescribes.

Runs in a worker thread (decoding a JPEG takes about a millisecond); never on the
event loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Set before cv2 is imported: refuse decompression bombs (a tiny PNG claiming
# 100k x 100k pixels) instead of allocating gigabytes.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64 * 1024 * 1024))

import cv2
import numpy as np

from agent.bundle.manifest import ImagePreprocessing
from agent.errors import BadRequest

_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}


@dataclass(frozen=True)
class ImageTransform:
    """Maps coordinates normalised to the model input back to original pixels."""

    orig_width: int
    orig_height: int
    model_width: int
    model_height: int
    scale_x: float  # model pixels per original pixel
    scale_y: float
    pad_x: float  # model pixels of padding left / top (letterbox)
    pad_y: float

    def box_to_pixels(self, box: tuple[float, float, float, float]) -> list[float]:
        x1, y1, x2, y2 = box
        px = [
            (x1 * self.model_width - self.pad_x) / self.scale_x,
            (y1 * self.model_height - self.pad_y) / self.scale_y,
            (x2 * self.model_width - self.pad_x) / self.scale_x,
            (y2 * self.model_height - self.pad_y) / self.scale_y,
        ]
        w, h = float(self.orig_width), float(self.orig_height)
        return [
            round(min(max(px[0], 0.0), w), 1),
            round(min(max(px[1], 0.0), h), 1),
            round(min(max(px[2], 0.0), w), 1),
            round(min(max(px[3], 0.0), h), 1),
        ]

    def point_to_pixels(self, x: float, y: float) -> tuple[float, float]:
        return (
            round((x * self.model_width - self.pad_x) / self.scale_x, 1),
            round((y * self.model_height - self.pad_y) / self.scale_y, 1),
        )


def decode_image(data: bytes, color: str) -> np.ndarray:
    """Decode JPEG/PNG bytes to an HxWxC uint8 array in ``color`` order (GRAY: HxWx1)."""
    if not data:
        raise BadRequest("empty image body")
    if not any(data.startswith(m) for m in _MAGIC):
        raise BadRequest("body is not a JPEG or PNG image")
    buf = np.frombuffer(data, dtype=np.uint8)
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
    h, w = img.shape[:2]
    interp = _INTERPOLATION[spec.interpolation]
    channels = img.shape[2]
    if spec.resize == "stretch":
        out = cv2.resize(img, (spec.width, spec.height), interpolation=interp)
        transform = ImageTransform(
            w, h, spec.width, spec.height, spec.width / w, spec.height / h, 0.0, 0.0
        )
    else:
        scale = min(spec.width / w, spec.height / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = cv2.resize(img, (nw, nh), interpolation=interp)
        pad_x, pad_y = (spec.width - nw) // 2, (spec.height - nh) // 2
        out = np.zeros((spec.height, spec.width, channels), dtype=img.dtype)
        out[pad_y : pad_y + nh, pad_x : pad_x + nw] = resized.reshape(nh, nw, channels)
        transform = ImageTransform(w, h, spec.width, spec.height, nw / w, nh / h, pad_x, pad_y)
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

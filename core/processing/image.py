"""Image bytes → the model's input tensor, as the bundle's manifest prescribes.

Runs in a worker thread (decoding a JPEG takes about a millisecond); never on the
event loop.

Memory: decoding is the one step whose memory an outsider chooses. A 190 KiB PNG of
one colour decodes to 64 megapixels, 192 MiB in BGR and twice that while OpenCV
decodes it. So the dimensions are read from the PNG/JPEG header first
(:func:`read_header`, a few dozen bytes parsed in Python), the memory the decode will
take is estimated from them (:meth:`ImageHeader.decode_bytes`), and an image over its
share of the process's decode budget is refused (413) before a pixel is decoded; the
decodes themselves run at most :attr:`DecodeLimits.concurrency` at a time
(:func:`set_decode_limits`, set by the agent from its config).
"""

from __future__ import annotations

import functools
import os
import struct
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from edgefleet.core.bundle.manifest import ImagePreprocessing
from edgefleet.core.errors import BadRequest, PayloadTooLarge

Box = tuple[float, float, float, float]
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_MIB = 1024 * 1024


@functools.cache
def cv2_module() -> ModuleType:
    """OpenCV, imported on first use.

    OpenCV holds ~15 MB of resident memory; a box whose apps only send tensors never
    pays for it. OpenCV's own pixel cap (64 megapixels, read at import) stays as a
    last line behind :func:`decode_image`'s budget check, which is what bounds the
    memory (with the default budget, far below that cap).
    """
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64 * 1024 * 1024))
    import cv2

    return cv2


# ---- header dimensions and the decode budget -----------------------------------------

# JPEG start-of-frame markers (C4 is DHT, C8 is reserved, CC is DAC): baseline,
# extended, progressive, lossless; differential and arithmetic variants.
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_PROGRESSIVE = frozenset((0xC2, 0xC6, 0xCA, 0xCE))


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header announces, before anything is decoded."""

    format: Literal["PNG", "JPEG"]
    width: int
    height: int
    # JPEG only: the coefficients of every component are buffered for the whole image
    # (progressive or multi-scan files), in 2-byte units per pixel; 0 when streamed.
    coefficient_bytes_per_pixel: float = 0.0

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def decode_bytes(self, color: str) -> int:
        """Peak memory of decoding this image with OpenCV into ``color``.

        Measured (OpenCV 4, RSS high-water mark): OpenCV's decoders take twice the
        output (an internal buffer, then the result), so 6 bytes per pixel to BGR/RGB
        and 2 to grey, whatever the file's bit depth or alpha; a progressive JPEG adds
        its coefficient buffer (3 bytes per pixel at 4:2:0, 6 at 4:4:4), needed even
        for a grey result. Kept slightly above what was measured.
        """
        channels = 1 if color == "GRAY" else 3
        per_pixel = 2.1 * channels + self.coefficient_bytes_per_pixel
        return int(self.pixels * per_pixel) + _MIB


def _png_header(data: bytes) -> ImageHeader:
    # Signature, then the IHDR chunk first (the PNG spec requires it): length 13,
    # "IHDR", width and height as big-endian uint32.
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise BadRequest("image is corrupt or truncated: PNG without an IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    return ImageHeader("PNG", width, height)


def _jpeg_header(data: bytes) -> ImageHeader:
    """Walk the JPEG segments to the frame header (SOFn); a few reads per segment."""
    i, n = 2, len(data)
    frame: tuple[int, int, int, list[tuple[int, int]]] | None = None  # marker, w, h, comps
    while i < n:
        if data[i] != 0xFF:
            if frame is not None:
                break  # the size is known: the decoder will say what is wrong after it
            raise BadRequest(f"image is corrupt or truncated: JPEG marker expected at {i}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            continue
        if marker == 0xD9:  # EOI
            break
        if i + 2 > n:
            break
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2:
            if frame is not None:
                break
            raise BadRequest(f"image is corrupt or truncated: JPEG segment length {length}")
        segment = data[i + 2 : i + length]
        if marker in _SOF:
            if len(segment) < 6:
                break
            _precision, height, width, count = struct.unpack(">BHHB", segment[:6])
            sampling = [
                (segment[7 + 3 * c] >> 4, segment[7 + 3 * c] & 0x0F)
                for c in range(count)
                if 8 + 3 * c < len(segment)
            ]
            if height == 0:  # the height comes later, in a DNL segment: not supported
                raise BadRequest("JPEG without its height in the frame header is not supported")
            frame = (marker, width, height, sampling)
        elif marker == 0xDA:  # start of scan: the frame header must have come before
            if frame is None:
                break
            scan_components = segment[0] if segment else 0
            marker, width, height, sampling = frame
            buffered = marker in _PROGRESSIVE or scan_components < len(sampling)
            return ImageHeader("JPEG", width, height, _coefficients(sampling) if buffered else 0.0)
        i += length
    if frame is not None:  # no readable scan after it: assume the costlier (buffered) decode
        return ImageHeader("JPEG", frame[1], frame[2], _coefficients(frame[3]))
    raise BadRequest("image is corrupt or truncated: JPEG without a frame header")


def _coefficients(sampling: list[tuple[int, int]]) -> float:
    """Bytes per pixel of a whole-image coefficient buffer: 2 per sample of each component."""
    if not sampling:
        return 6.0
    h_max = max(h for h, _ in sampling) or 1
    v_max = max(v for _, v in sampling) or 1
    return 2.0 * sum(h * v for h, v in sampling) / (h_max * v_max)


def read_header(data: bytes) -> ImageHeader:
    """Format and dimensions from a PNG or JPEG header; 400 for anything else."""
    if not data:
        raise BadRequest("empty image body")
    if data.startswith(_PNG):
        header = _png_header(data)
    elif data.startswith(_JPEG):
        header = _jpeg_header(data)
    else:
        raise BadRequest("body is not a JPEG or PNG image")
    if header.width == 0 or header.height == 0:
        raise BadRequest(f"{header.format} header announces {header.width}x{header.height} pixels")
    return header


@dataclass(frozen=True)
class DecodeLimits:
    """The memory every image decode of this process may use together.

    Each decode may take ``memory_bytes / concurrency``; at most ``concurrency`` run
    at once (the others wait in their worker thread). ``setting`` names where the
    budget comes from, for the refusal message.
    """

    memory_bytes: int = 256 * _MIB
    concurrency: int = 2
    setting: str = "the image decode memory budget"

    @property
    def per_image_bytes(self) -> int:
        return self.memory_bytes // self.concurrency


class _Budget:
    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self.slots = threading.BoundedSemaphore(limits.concurrency)


_budget = _Budget(DecodeLimits())


def set_decode_limits(limits: DecodeLimits) -> None:
    """Set this process's decode budget (the agent does, from its config, at start).

    Process-wide on purpose: memory limits (a unit's MemoryMax) are per process. Decodes
    already running finish under the budget they started with.
    """
    global _budget
    _budget = _Budget(limits)


def check_decode_budget(header: ImageHeader, color: str, limits: DecodeLimits) -> None:
    """413 when decoding ``header``'s image would take more than one decode's share."""
    need = header.decode_bytes(color)
    share = limits.per_image_bytes
    if need > share:
        raise PayloadTooLarge(
            f"image is {header.width}x{header.height} pixels ({header.format}): decoding it"
            f" takes about {need / _MIB:.0f} MiB, over the {share / _MIB:.0f} MiB one image"
            f" may use ({limits.setting}: {limits.memory_bytes / _MIB:.0f} MiB for"
            f" {limits.concurrency} decodes at once)"
        )


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
    """Decode JPEG/PNG bytes to an HxWxC uint8 array in ``color`` order (GRAY: HxWx1).

    Blocking (a worker thread): waits for one of the process's decode slots. 400 for
    what is not a readable PNG/JPEG, 413 for an image over the decode budget.
    """
    budget = _budget  # one budget for the whole call, even if it is replaced meanwhile
    header = read_header(data)
    check_decode_budget(header, color, budget.limits)
    buf = np.frombuffer(data, dtype=np.uint8)
    cv2 = cv2_module()
    flag = cv2.IMREAD_GRAYSCALE if color == "GRAY" else cv2.IMREAD_COLOR
    with budget.slots:
        try:
            img: np.ndarray | None = cv2.imdecode(buf, flag)
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
    x: np.ndarray = img.astype(np.float32)
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
    """Image bytes → (the model's input tensor, how to map coordinates back).

    Blocking (a worker thread). An RGB model's image is resized while still BGR and
    converted afterwards: the same pixels, without a second full-size copy.
    """
    img = decode_image(data, "BGR" if spec.color == "RGB" else spec.color)
    resized, transform = resize(img, spec)
    if spec.color == "RGB":
        cv2 = cv2_module()
        shape = resized.shape
        resized = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB).reshape(shape)
    return to_tensor(resized, spec), transform

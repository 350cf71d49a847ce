"""Images for the tiny model's image preprocessing (a 2x2 grey image is its 4 features)."""

from __future__ import annotations

import cv2
import numpy as np

# The tiny model reads a 2x2 grey image as its 4 features.
IMAGE_PRE = {
    "type": "image",
    "input": "x",
    "width": 2,
    "height": 2,
    "color": "GRAY",
    "layout": "NC",
    "scale": 1 / 255,
    "interpolation": "area",
}


def png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


IMG = np.array([[0, 255], [128, 64]], dtype=np.uint8)
BIG = cv2.resize(IMG, (40, 40), interpolation=cv2.INTER_NEAREST)

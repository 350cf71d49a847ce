"""Real photographs for recipes and tests, taken from published wheels (no hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.wheels import WheelMember

# scikit-image's astronaut: Eileen Collins, 512x512 RGB, public domain (NASA).
ASTRONAUT = WheelMember(
    package="scikit-image",
    version="0.26.0",
    member="skimage/data/astronaut.png",
    sha256="88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
)


def astronaut_png(cache_dir: Path) -> Path:
    """Path of ``astronaut.png`` (512x512 RGB), fetched once into ``cache_dir``."""
    return ASTRONAUT.fetch(cache_dir)


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path} is not a readable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def astronaut_rgb(cache_dir: Path) -> np.ndarray:
    """The astronaut photo as a (512, 512, 3) uint8 RGB array."""
    return load_rgb(astronaut_png(cache_dir))

"""Demo images for ``edge-agent demo``: ``<build>/demo/<model>/*.png``, one folder per model.

Digits are held-out test images rendered as dark ink on white paper (what a camera
pointed at a form would see); the face detector gets the astronaut photo.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from models.digits import TEST_SET, load_test_set, render_digit_png
from models.recipe import BuildContext
from models.sample_images import astronaut_png

DEMO_DIR = "demo"
DIGIT_MODELS = ("digits-edge", "digits-edge-litert")
DIGITS_SHOWN = 6


def write_demo_images(ctx: BuildContext, models: set[str]) -> Path:
    root = ctx.build_dir / DEMO_DIR
    shutil.rmtree(root, ignore_errors=True)
    test_set = ctx.build_dir / TEST_SET
    if test_set.exists():
        x, y = load_test_set(test_set)
        # The first image of each of a few classes: varied, and the same every build.
        picks = [int((y == label).nonzero()[0][0]) for label in range(DIGITS_SHOWN)]
        for model in DIGIT_MODELS:
            if model not in models:
                continue
            (root / model).mkdir(parents=True)
            for i in picks:
                name = f"digit-{int(y[i])}-test{i}.png"
                (root / model / name).write_bytes(render_digit_png(x[i]))
    if "face-detect" in models:
        (root / "face-detect").mkdir(parents=True)
        shutil.copyfile(astronaut_png(ctx.cache_dir), root / "face-detect" / "astronaut.png")
    return root

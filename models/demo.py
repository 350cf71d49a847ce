"""Demo images for ``edge-agent demo``: ``<build>/demo/<model>/*.png``, one folder per model.

Digits are held-out test images rendered as dark ink on white paper (what a camera
pointed at a form would see); the face detector gets the astronaut photo.

For the cloud-fallback part of the demo, ``digits-edge/ambiguous-<digit>-test<i>.png``
is the held-out digit the edge model is least sure about (below its fallback
threshold) among those the cloud model gets right, preferring one the edge gets
wrong: confidences are measured through the agent's own image preprocessing and
backends on the very PNG the demo sends.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from models.digits import CLOUD_NAME, EDGE_NAME, TEST_SET, load_test_set, render_digit_png
from models.recipe import BuildContext
from models.sample_images import astronaut_png

log = logging.getLogger("models.demo")

DEMO_DIR = "demo"
DIGIT_MODELS = ("digits-edge", "digits-edge-litert")
DIGITS_SHOWN = 6
AMBIGUOUS_PREFIX = "ambiguous-"


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
        if {EDGE_NAME, CLOUD_NAME} <= models:
            found = pick_ambiguous(ctx, x, y)
            if found is not None:
                i, png = found
                name = f"{AMBIGUOUS_PREFIX}{int(y[i])}-test{i}.png"
                (root / EDGE_NAME / name).write_bytes(png)
    if "face-detect" in models:
        (root / "face-detect").mkdir(parents=True)
        shutil.copyfile(astronaut_png(ctx.cache_dir), root / "face-detect" / "astronaut.png")
    return root


def pick_ambiguous(ctx: BuildContext, x: np.ndarray, y: np.ndarray) -> tuple[int, bytes] | None:
    """(index, PNG) of the held-out digit the edge should hand to the cloud, or None."""
    from edgefleet.agent.config import RuntimeConfig
    from edgefleet.converters.evaluate import open_model
    from edgefleet.core.bundle.archive import read_bundle
    from edgefleet.core.bundle.manifest import ClassificationPost
    from edgefleet.core.bundle.signing import TrustStore
    from edgefleet.core.processing import classification
    from edgefleet.core.processing.image import preprocess

    pngs = [render_digit_png(row) for row in x]
    trust = TrustStore.from_files([ctx.public_key_path])
    scores: dict[str, tuple[np.ndarray, float]] = {}
    with tempfile.TemporaryDirectory(prefix="demo-pick-") as tmp:
        for name in (EDGE_NAME, CLOUD_NAME):
            contents = read_bundle(ctx.bundle_path(name), Path(tmp) / name, trust, 1 << 30)
            m = contents.manifest
            assert m.preprocessing is not None and isinstance(m.postprocessing, ClassificationPost)
            tensor = np.concatenate([preprocess(p, m.preprocessing)[0] for p in pngs])
            fields = m.model_dump(exclude={"files", "self_test", "metrics"})
            with open_model(contents.directory / m.model_file, fields, RuntimeConfig()) as be:
                out = be.infer({m.preprocessing.input: tensor})
            probs = classification.probabilities(out, m.postprocessing)
            scores[name] = (probs, m.fallback.threshold)
    edge_probs, threshold = scores[EDGE_NAME]
    cloud_probs, _ = scores[CLOUD_NAME]
    conf = edge_probs.max(axis=1)
    edge_right = edge_probs.argmax(axis=1) == y
    cloud_right = cloud_probs.argmax(axis=1) == y
    # Clearly below the threshold, so a rounding difference cannot flip the demo.
    candidates = np.flatnonzero(cloud_right & (conf < threshold - 0.1))
    if candidates.size == 0:
        log.warning("no held-out digit is ambiguous for %s: no fallback demo image", EDGE_NAME)
        return None
    wrong = candidates[~edge_right[candidates]]
    pool = wrong if wrong.size else candidates
    i = int(pool[np.argmin(conf[pool])])
    log.info(
        "demo: ambiguous digit %d (test %d): edge %.3f says %d, cloud says %d",
        int(y[i]),
        i,
        conf[i],
        int(edge_probs[i].argmax()),
        int(cloud_probs[i].argmax()),
    )
    return i, pngs[i]

"""BlazeFace decoding: MediaPipe's anchors, real LiteRT on a real photo, NMS, letterbox."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgefleet.core.bundle.manifest import SsdAnchors
from edgefleet.core.processing.detection import (
    Detection,
    decode_ssd,
    generate_anchors,
    non_max_suppression,
)
from edgefleet.core.processing.image import ImageTransform, letterbox
from models.face_detect import MODEL, POSTPROCESSING, PREPROCESSING, to_input
from models.sample_images import ASTRONAUT, astronaut_rgb
from models.wheels import wheel_member

CACHE = Path(__file__).resolve().parents[2] / "models" / ".cache"
# Eileen Collins' face in the 512x512 astronaut photo, by eye (x1, y1, x2, y2).
FACE_REGION = (170.0, 70.0, 270.0, 200.0)


def iou(a: list[float] | tuple[float, ...], b: list[float] | tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    # No skip when offline: the package registry is part of the test environment,
    # and a silently skipped detector test would prove nothing.
    return astronaut_rgb(CACHE)


@pytest.fixture(scope="session")
def interpreter():
    from ai_edge_litert.interpreter import Interpreter

    path = MODEL.fetch(CACHE)
    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    return interp


def run(interpreter, x: np.ndarray) -> dict[str, np.ndarray]:
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}


def detect(interpreter, image: np.ndarray) -> tuple[list[Detection], ImageTransform]:
    boxed, transform = letterbox(image, 128, 128)
    x = boxed.astype(np.float32) * PREPROCESSING.scale - PREPROCESSING.mean[0]
    return decode_ssd(run(interpreter, x[np.newaxis]), POSTPROCESSING)[0], transform


# ------------------------------------------------------------------------- anchors


def test_blazeface_anchors_match_mediapipe() -> None:
    a = generate_anchors(POSTPROCESSING.anchors)
    assert a.shape == (896, 4)
    # Stride 8: 16x16 cells x 2 anchors; strides 16,16,16 share an 8x8 map, 6 per cell.
    np.testing.assert_allclose(a[0], [0.03125, 0.03125, 1.0, 1.0])
    np.testing.assert_allclose(a[1], [0.03125, 0.03125, 1.0, 1.0])
    np.testing.assert_allclose(a[2], [0.09375, 0.03125, 1.0, 1.0])
    np.testing.assert_allclose(a[32], [0.03125, 0.09375, 1.0, 1.0])  # second row
    np.testing.assert_allclose(a[511], [0.96875, 0.96875, 1.0, 1.0])
    np.testing.assert_allclose(a[512:518], [[0.0625, 0.0625, 1.0, 1.0]] * 6)
    np.testing.assert_allclose(a[518], [0.1875, 0.0625, 1.0, 1.0])
    np.testing.assert_allclose(a[-1], [0.9375, 0.9375, 1.0, 1.0])


def test_anchor_sizes_without_fixed_size() -> None:
    opts = POSTPROCESSING.anchors.model_copy(update={"fixed_anchor_size": False})
    a = generate_anchors(opts)
    s0 = 0.1484375
    s1 = 0.1484375 + (0.75 - 0.1484375) / 3  # CalculateScale(layer 1 of 4)
    np.testing.assert_allclose(a[0, 2:], [s0, s0], rtol=1e-6)
    # The interpolated extra anchor: sqrt(scale * next scale), aspect ratio 1.
    np.testing.assert_allclose(a[1, 2:], [math.sqrt(s0 * s1)] * 2, rtol=1e-6)
    # The last layer interpolates towards 1.0.
    np.testing.assert_allclose(a[-1, 2:], [math.sqrt(0.75)] * 2, rtol=1e-6)


def test_anchors_aspect_ratios_and_cache() -> None:
    opts = SsdAnchors(
        num_layers=2,
        min_scale=0.2,
        max_scale=0.8,
        input_size_width=64,
        input_size_height=32,
        strides=[16, 32],
        aspect_ratios=[1.0, 2.0],
        fixed_anchor_size=False,
        interpolated_scale_aspect_ratio=0.0,
    )
    a = generate_anchors(opts)
    # 4x2 map x 2 ratios + 2x1 map x 2 ratios.
    assert a.shape == (8 * 2 + 2 * 2, 4)
    np.testing.assert_allclose(a[1, 2:], [0.2 * math.sqrt(2), 0.2 / math.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(a[0, :2], [0.125, 0.25])
    # Equal options hit the cache and share one read-only array.
    assert generate_anchors(opts.model_copy()) is a
    assert not a.flags.writeable
    bad = opts.model_copy(update={"num_layers": 3})
    with pytest.raises(ValueError, match="strides"):
        generate_anchors(bad)


# ------------------------------------------------------------------ real model


def test_astronaut_face(interpreter, astronaut: np.ndarray) -> None:
    assert astronaut.shape == (512, 512, 3)
    dets, transform = detect(interpreter, astronaut)
    assert len(dets) == 1, dets
    face = dets[0]
    assert face.score > 0.8
    assert face.class_id == 0
    box = transform.box_to_pixels(face.box)
    assert iou(box, FACE_REGION) > 0.5, box
    # Keypoints: right eye, left eye, nose tip, mouth, right ear, left ear (subject's).
    kps = [transform.point_to_pixels(x, y) for x, y in face.keypoints]
    assert len(kps) == 6
    for x, y in kps[:4]:
        assert box[0] <= x <= box[2] and box[1] <= y <= box[3]
    (rex, rey), (lex, ley), (_, nose_y), (_, mouth_y) = kps[:4]
    assert rex < lex  # the subject's right eye is on the image's left
    assert max(rey, ley) < nose_y < mouth_y


def test_blank_images_give_nothing(interpreter) -> None:
    for value in (0, 128, 255):
        img = np.full((240, 320, 3), value, dtype=np.uint8)
        dets, _ = detect(interpreter, img)
        assert dets == [], value


def test_batch_decoding_keeps_items_apart(interpreter, astronaut: np.ndarray) -> None:
    face = run(interpreter, to_input(astronaut))
    blank = run(interpreter, to_input(np.zeros((128, 128, 3), np.uint8)))
    both = {k: np.concatenate([face[k], blank[k]]) for k in face}
    got = decode_ssd(both, POSTPROCESSING)
    assert [len(d) for d in got] == [1, 0]
    assert got[0] == decode_ssd(face, POSTPROCESSING)[0]


def test_weighted_nms_differs_from_plain_on_the_photo(interpreter, astronaut) -> None:
    raw = run(interpreter, to_input(astronaut))
    weighted = decode_ssd(raw, POSTPROCESSING)
    plain = decode_ssd(raw, POSTPROCESSING.model_copy(update={"weighted_nms": False}))
    assert len(weighted[0]) == len(plain[0]) == 1
    # Same leader (score), but the weighted box averages several raw candidates.
    assert weighted[0][0].score == plain[0][0].score
    assert weighted[0][0].box != plain[0][0].box
    assert iou(weighted[0][0].box, plain[0][0].box) > 0.8


def test_folded_batch_is_refused(interpreter) -> None:
    # BlazeFace run at batch 2 answers (1, 1792, 16): decoding that must fail loudly.
    raw = {"regressors": np.zeros((1, 1792, 16), np.float32),
           "classificators": np.zeros((1, 1792, 1), np.float32)}  # fmt: skip
    with pytest.raises(ValueError, match="regressors"):
        decode_ssd(raw, POSTPROCESSING)


# ---------------------------------------------------------- synthetic decoding


def synthetic(boxes: dict[int, tuple[float, float, float, float, float]]) -> dict[str, np.ndarray]:
    """Raw BlazeFace outputs with anchor i → (x_center, y_center, w, h, score)."""
    anchors = generate_anchors(POSTPROCESSING.anchors)
    reg = np.zeros((1, 896, 16), np.float32)
    logits = np.full((1, 896, 1), -50.0, np.float32)
    for i, (xc, yc, w, h, score) in boxes.items():
        ax, ay, aw, ah = anchors[i]
        reg[0, i, :4] = [(xc - ax) * 128 / aw, (yc - ay) * 128 / ah, w * 128 / aw, h * 128 / ah]
        reg[0, i, 4:6] = [(xc - ax) * 128, (yc - ay) * 128]  # first keypoint at the centre
        logits[0, i, 0] = math.log(score / (1 - score))
    return {"regressors": reg, "classificators": logits}


def test_weighted_nms_merges_overlapping_boxes() -> None:
    raw = synthetic({
        10: (0.50, 0.50, 0.2, 0.2, 0.9),
        600: (0.52, 0.50, 0.2, 0.2, 0.6),   # IoU 0.82 with the first: merged
        300: (0.20, 0.80, 0.1, 0.1, 0.7),   # far away: its own detection
        20: (0.80, 0.20, 0.1, 0.1, 0.4),    # under min_score 0.5: dropped
    })  # fmt: skip
    dets = decode_ssd(raw, POSTPROCESSING)[0]
    assert [round(d.score, 4) for d in dets] == [0.9, 0.7]
    merged = dets[0]
    xmin = (0.9 * 0.40 + 0.6 * 0.42) / 1.5
    np.testing.assert_allclose(merged.box, [xmin, 0.4, xmin + 0.2, 0.6], atol=1e-5)
    kx = (0.9 * 0.5 + 0.6 * 0.52) / 1.5
    np.testing.assert_allclose(merged.keypoints[0], [kx, 0.5], atol=1e-5)
    np.testing.assert_allclose(dets[1].box, [0.15, 0.75, 0.25, 0.85], atol=1e-5)

    plain = decode_ssd(raw, POSTPROCESSING.model_copy(update={"weighted_nms": False}))[0]
    np.testing.assert_allclose(plain[0].box, [0.4, 0.4, 0.6, 0.6], atol=1e-5)
    assert len(plain) == 2


def test_nms_threshold_and_max_detections() -> None:
    # IoU of two 0.2-wide boxes shifted by 0.1: 0.02/0.06 = 1/3, just above 0.3.
    boxes = np.array([[0.0, 0.0, 0.2, 0.2], [0.1, 0.0, 0.3, 0.2], [0.5, 0.5, 0.6, 0.6]])
    scores = np.array([0.6, 0.9, 0.7])
    kps = np.zeros((3, 0, 2))
    out = non_max_suppression(boxes, scores, kps, 0.3, 10, weighted=False)
    assert [lead for _, lead, _ in out] == [1, 2]
    out = non_max_suppression(boxes, scores, kps, 0.34, 10, weighted=False)
    assert [lead for _, lead, _ in out] == [1, 2, 0]
    out = non_max_suppression(boxes, scores, kps, 0.34, 2, weighted=True)
    assert [lead for _, lead, _ in out] == [1, 2]


def test_negative_size_boxes_are_dropped() -> None:
    raw = synthetic({10: (0.5, 0.5, 0.2, 0.2, 0.9)})
    raw["regressors"][0, 10, 2] *= -1  # negative width
    assert decode_ssd(raw, POSTPROCESSING) == [[]]


# ------------------------------------------------------------------- letterbox


def test_letterbox_geometry_roundtrip() -> None:
    # A bright rectangle on a 512x300 (wide) image: padded top and bottom.
    img = np.zeros((300, 512, 3), np.uint8)
    img[100:180, 200:360] = 255
    boxed, t = letterbox(img, 128, 128)
    assert boxed.shape == (128, 128, 3) and boxed.dtype == np.uint8
    assert (t.scale_x, t.scale_y) == (0.25, 75 / 300)
    assert (t.pad_x, t.pad_y) == (0.0, 26.0)
    assert not boxed[:26].any() and not boxed[101:].any()  # zero border, as MediaPipe
    ys, xs = np.nonzero(boxed[..., 0] > 127)
    box_norm = (xs.min() / 128, ys.min() / 128, (xs.max() + 1) / 128, (ys.max() + 1) / 128)
    got = t.box_to_pixels(box_norm, ndigits=None)
    # One model pixel is 4 original pixels here.
    np.testing.assert_allclose(got, [200, 100, 360, 180], atol=4)


def test_image_transform_tall_and_clipping() -> None:
    t = ImageTransform.for_letterbox(300, 600, 128, 128)
    assert (t.pad_x, t.pad_y) == (32.0, 0.0)
    assert t.resized_size == (64, 128)
    # The model input's centre is the image centre; the padding maps outside and clips.
    assert t.point_to_pixels(0.5, 0.5) == (150.0, 300.0)
    assert t.box_to_pixels((0.0, 0.0, 1.0, 1.0)) == [0.0, 0.0, 300.0, 600.0]
    s = ImageTransform.for_stretch(640, 480, 128, 128)
    assert s.box_to_pixels((0.25, 0.5, 0.5, 1.0)) == [160.0, 240.0, 320.0, 480.0]
    gray, tg = letterbox(np.full((50, 100), 7, np.uint8), 32, 32)
    assert gray.shape == (32, 32) and tg.pad_y == 8.0 and gray[8:24].min() == 7


def test_face_on_cropped_astronaut_maps_back(interpreter, astronaut: np.ndarray) -> None:
    full, t_full = detect(interpreter, astronaut)
    reference = t_full.box_to_pixels(full[0].box)
    crop = np.ascontiguousarray(astronaut[:300])  # 512 wide, 300 high: letterboxed
    dets, t = detect(interpreter, crop)
    assert t.pad_y > 0
    assert len(dets) == 1 and dets[0].score > 0.8
    assert iou(t.box_to_pixels(dets[0].box), reference) > 0.85


def test_face_on_rotated_crop_maps_back(interpreter, astronaut: np.ndarray) -> None:
    crop = np.ascontiguousarray(astronaut[:300])
    upright, t_up = detect(interpreter, crop)
    x1, y1, x2, y2 = t_up.box_to_pixels(upright[0].box)
    # Rotated 90° counter-clockwise: 300 wide, 512 high, padded left and right.
    rotated = np.ascontiguousarray(np.rot90(crop))
    dets, t = detect(interpreter, rotated)
    assert rotated.shape[:2] == (512, 300) and t.pad_x > 0
    assert len(dets) == 1 and dets[0].score > 0.7
    # (x, y) → (y, W - x) under np.rot90.
    expected = [y1, 512 - x2, y2, 512 - x1]
    assert iou(t.box_to_pixels(dets[0].box), expected) > 0.6


# ---------------------------------------------------------------- wheel helper


def test_wheel_member_cache_and_pin(tmp_path: Path, astronaut: np.ndarray) -> None:
    # The session fixture fetched it: a second call is a cache hit (no pip).
    path = ASTRONAUT.fetch(CACHE)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="refusing"):
        wheel_member("scikit-image", "0.26.0", "../etc/passwd", "0" * 64, tmp_path)
    with pytest.raises(RuntimeError, match="sha256"):
        wheel_member(ASTRONAUT.package, ASTRONAUT.version, ASTRONAUT.member, "0" * 64, tmp_path)
    assert not list(tmp_path.rglob("*.png"))  # nothing unverified is left behind


# ---------------------------------------------------------------------- recipe


def test_recipe_bundle_verifies_self_tests_and_decodes(tmp_path: Path, interpreter, astronaut):
    from edgefleet.agent.config import RuntimeConfig
    from edgefleet.core.backends import create_backend
    from edgefleet.core.bundle.archive import read_bundle
    from edgefleet.core.bundle.selftest import load_vectors, run_self_test
    from edgefleet.core.bundle.signing import TrustStore
    from models import face_detect
    from models.recipe import BuildContext

    ctx = BuildContext.create(tmp_path / "build", cache_dir=CACHE)
    [bundle] = face_detect.build(ctx)
    assert bundle.name == "face-detect-1.bundle"
    trust = TrustStore.from_files([ctx.public_key_path])
    contents = read_bundle(bundle, tmp_path / "installed", trust)
    m = contents.manifest
    assert m.runtime == "litert" and m.labels == ["face"]
    assert m.postprocessing == POSTPROCESSING and m.preprocessing == PREPROCESSING
    assert m.metrics["source"] == "mediapipe 0.10.14 wheel"
    backend = create_backend(contents.directory / m.model_file, m, RuntimeConfig())
    backend.load()
    try:
        assert run_self_test(backend, m, contents.directory) == "passed 2 vectors"
        inputs, _ = load_vectors(contents.directory / m.self_test.file)
        got = decode_ssd(backend.infer(inputs), m.postprocessing)
    finally:
        backend.unload()
    # The pinned vectors are the photo (one face) and a blank frame (none).
    assert [len(d) for d in got] == [1, 0]
    np.testing.assert_allclose(inputs["input"][:1], to_input(astronaut))


def test_yxhw_layout_decodes_like_xywh(interpreter, astronaut: np.ndarray) -> None:
    """A TF-style model emitting y, x, h, w gives the same faces once the manifest says so."""
    outputs = run(interpreter, to_input(astronaut))
    raw = outputs[POSTPROCESSING.boxes_output].copy()
    swapped = raw.copy()
    swapped[..., [0, 1, 2, 3]] = raw[..., [1, 0, 3, 2]]
    yxhw = POSTPROCESSING.model_copy(update={"box_format": "yxhw"})
    want = decode_ssd(outputs, POSTPROCESSING)[0]
    got = decode_ssd({**outputs, POSTPROCESSING.boxes_output: swapped}, yxhw)[0]
    assert len(got) == len(want) == 1
    np.testing.assert_allclose(got[0].box, want[0].box, rtol=1e-6)


# ---------------------------------------------------------------------- scoring


def test_scoring_a_detector_decodes_once_and_judges_by_either_rule(
    interpreter, astronaut: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``score``: what the agent's answers, fallback policy and statistics all read."""
    from edgefleet.core.bundle.manifest import Manifest
    from edgefleet.core.processing import detection
    from edgefleet.core.processing.scoring import score
    from models.face_detect import manifest_fields

    fields = manifest_fields("1", {})
    m = Manifest.model_validate(
        {**fields, "model_file": "m.tflite", "files": {"m.tflite": {"sha256": "0" * 64, "size": 1}}}
    )
    photo = run(interpreter, to_input(astronaut))
    want = decode_ssd(photo, POSTPROCESSING)[0]
    calls: list[int] = []
    real = detection.decode_ssd

    def counting(outputs, post):
        calls.append(1)
        return real(outputs, post)

    monkeypatch.setattr(detection, "decode_ssd", counting)
    scored = score(m, photo)
    assert scored.detections == (want,) and scored.rule == "mean_box"
    # The model's confidence at full precision; an answer's from the scores it shows.
    assert scored.confidence.tolist() == [want[0].score]
    assert detection.confidence(want, "mean_box", as_reported=True) == round(want[0].score, 5)
    strict = scored.under("min_box")  # another rule: nothing decoded again
    assert strict.confidence.tolist() == [want[0].score] and calls == [1]
    # Nothing found is a confident answer.
    blank = run(interpreter, to_input(np.zeros((128, 128, 3), np.uint8)))
    assert score(m, blank).confidence.tolist() == [1.0]
    assert score(m, blank).detections == ([],)

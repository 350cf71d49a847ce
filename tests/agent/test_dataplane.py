"""The data plane (agent/dataplane.py): one path for every inference API.

What it guarantees, on real agents, real models and a real broker:

* the confidence the fleet's ``inference_stats`` histogram counts is the same for the
  same inputs whichever endpoint they came through (OIP tensors or an image), with
  or without a cloud configured;
* a detector's outputs are decoded once per answer (once more for the cloud's answer
  when the cloud answered), never again for the response or the statistics;
* a new protocol is a thin adapter: ``DataPlane.infer`` with a decode function and
  no HTTP at all gives the same answer, counts it, and turns a model's failure into
  an error of the core's tree.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest

from edgefleet.agent.dataplane import DataPlane, InferenceRequest, ModelInput
from edgefleet.agent.fleet_link import FLEET
from edgefleet.agent.server.context import DATA_PLANE
from edgefleet.core.bundle.manifest import ImagePreprocessing, Manifest
from edgefleet.core.errors import EdgeError
from edgefleet.core.processing import detection
from edgefleet.core.processing.image import preprocess
from edgefleet.core.processing.scoring import Scored
from tests.support.brokers import Mosquitto
from tests.support.brokers import agent_fleet_section as fleet_section
from tests.support.cloud_helpers import TOKEN, cloud_config, cloud_reference, tensor
from tests.support.images import IMAGE_PRE, png
from tests.support.tiny import TEST_X, agent_config, tiny_reference

DEV = "store-0042"
CACHE = Path(__file__).resolve().parents[2] / "models" / ".cache"
# Grey 2x2 images (the tiny model's four features), upscaled so a PNG decodes to them
# exactly; different enough to land in different confidence buckets.
IMAGES = [
    np.array(img, dtype=np.uint8)
    for img in (
        [[0, 255], [128, 64]],
        [[255, 0], [0, 255]],
        [[10, 20], [30, 40]],
        [[200, 180], [90, 250]],
        [[128, 128], [128, 128]],
        [[0, 0], [255, 255]],
    )
]


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def _big(img: np.ndarray) -> np.ndarray:
    return cv2.resize(img, (40, 40), interpolation=cv2.INTER_NEAREST)


def _confidence_counts(app: Any) -> list[int]:
    """The confidence histogram of what the agent would send the fleet now (and swap)."""
    docs = app[FLEET].stats.take()
    assert [d["errors"] for d in docs] == [0] * len(docs)
    total = [0] * 11
    for d in docs:
        total = [a + b for a, b in zip(total, d["confidence"]["counts"], strict=True)]
    return total


async def _oip(session: aiohttp.ClientSession, base: str, x: np.ndarray) -> dict[str, Any]:
    async with session.post(f"{base}/v2/models/tiny/infer", json={"inputs": [tensor(x)]}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _image(session: aiohttp.ClientSession, base: str, data: bytes) -> dict[str, Any]:
    async with session.post(f"{base}/v1/predict/tiny", data=data) as r:
        assert r.status == 200, await r.text()
        return await r.json()


@pytest.mark.parametrize("with_cloud", [False, True], ids=["no-cloud", "cloud"])
async def test_fleet_confidence_is_the_same_through_oip_and_the_image_endpoint(
    mosquitto: Mosquitto,
    servers: Any,
    session: aiohttp.ClientSession,
    make_tiny_bundle: Any,
    cloud_bundles: dict[str, Path],
    keys: tuple[Path, Path],
    tmp_path: Path,
    with_cloud: bool,
) -> None:
    fleet = fleet_section(mosquitto.port, tmp_path)
    fleet["telemetry"]["stats_interval_s"] = 3600  # the test takes the windows itself
    extra: dict[str, Any] = {"device_id": DEV, "fleet": fleet}
    if with_cloud:
        cloud = await servers.agent(cloud_config(tmp_path / "cloud", keys, cloud_bundles["cloud"]))
        # Every item unsure: the cloud answers them all. The policy judges by another
        # rule than the model's: the fleet still sees the answer's confidence.
        extra["fallback"] = {
            "cloud": {"url": cloud.base, "token": TOKEN, "timeout_ms": 5000},
            "models": {"tiny": {"confidence_rule": "margin"}},
        }
    fallback = {"mode": "cloud_when_unsure", "threshold": 1.0, "cloud_model": "tiny-cloud"}
    bundle = make_tiny_bundle("dp", preprocessing=IMAGE_PRE, fallback=fallback)
    edge = await servers.agent(agent_config(tmp_path / "edge", keys, [bundle], **extra))
    spec = ImagePreprocessing.model_validate(IMAGE_PRE)
    pngs = [png(_big(img)) for img in IMAGES]
    # The same tensors, through OIP: what the image endpoint makes of each picture.
    tensors = [preprocess(data, spec)[0] for data in pngs]
    for x in tensors:
        doc = await _oip(session, edge.base, x)
        assert doc["parameters"]["source"] == ("cloud" if with_cloud else "edge")
    through_oip = _confidence_counts(edge.app)
    answers = [await _image(session, edge.base, data) for data in pngs]
    through_images = _confidence_counts(edge.app)
    assert sum(through_oip) == len(IMAGES)
    assert through_oip == through_images
    # ... and it is the confidence the image answer reports: the model's rule (top1)
    # on whoever answered.
    reference = cloud_reference if with_cloud else tiny_reference
    for x, answer in zip(tensors, answers, strict=True):
        assert answer["source"] == ("cloud" if with_cloud else "edge")
        assert answer["confidence"] == pytest.approx(reference(x).max(), rel=1e-5)
    assert len({int(np.digitize(a["confidence"], np.arange(0.1, 1, 0.1))) for a in answers}) > 1


# ---- detectors: decoded once ---------------------------------------------------------------


@pytest.fixture(scope="module")
def face_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[Path, Path]]:
    """The real face-detect bundle (BlazeFace, LiteRT), signed with its own build keys."""
    from models import face_detect
    from models.recipe import BuildContext

    ctx = BuildContext.create(tmp_path_factory.mktemp("face") / "build", cache_dir=CACHE)
    [bundle] = face_detect.build(ctx)
    return bundle, (ctx.private_key_path, ctx.public_key_path)


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the real SSD decoder (a wrapper that calls it; any thread)."""
    calls: list[int] = []
    lock = threading.Lock()
    real = detection.decode_ssd

    def counting(outputs: Any, post: Any) -> Any:
        with lock:
            calls.append(1)
        return real(outputs, post)

    monkeypatch.setattr(detection, "decode_ssd", counting)
    return calls


@pytest.mark.parametrize(("threshold", "source"), [(0.0, "edge"), (1.0, "cloud")])
async def test_a_detector_is_decoded_once_per_answer(
    servers: Any,
    session: aiohttp.ClientSession,
    face_bundle: tuple[Path, tuple[Path, Path]],
    decode_calls: list[int],
    tmp_path: Path,
    threshold: float,
    source: str,
) -> None:
    from models.sample_images import astronaut_rgb

    bundle, keys = face_bundle
    cloud = await servers.agent(cloud_config(tmp_path / "cloud", keys, bundle))
    policy = {"mode": "cloud_when_unsure", "cloud_model": "face-detect", "threshold": threshold}
    fallback = {
        "cloud": {"url": cloud.base, "token": TOKEN, "timeout_ms": 5000},
        "models": {"face-detect": policy},
    }
    edge = await servers.agent(agent_config(tmp_path / "edge", keys, [bundle], fallback=fallback))
    photo = cv2.imencode(".png", cv2.cvtColor(astronaut_rgb(CACHE), cv2.COLOR_RGB2BGR))[1]
    decode_calls.clear()  # count this request only
    async with session.post(f"{edge.base}/v1/predict/face-detect", data=photo.tobytes()) as r:
        assert r.status == 200, await r.text()
        doc = await r.json()
    assert doc["source"] == source
    assert len(doc["detections"]) == 1 and doc["detections"][0]["label"] == "face"
    # The edge's outputs once (policy, answer and statistics alike); the cloud's answer
    # once more when the cloud answered. Nothing decoded twice.
    assert len(decode_calls) == (2 if source == "cloud" else 1)
    # The answer's confidence is the mean_box rule on the boxes it shows.
    assert doc["confidence"] == doc["detections"][0]["confidence"]


# ---- a protocol without HTTP ---------------------------------------------------------------


async def test_an_adapter_without_http_gets_the_same_answer_and_the_same_accounting(
    mosquitto: Mosquitto,
    start_agent: Any,
    make_tiny_bundle: Any,
    cloud_bundles: dict[str, Path],
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    fleet = fleet_section(mosquitto.port, tmp_path)
    fleet["telemetry"]["stats_interval_s"] = 3600
    # The poison model fails in ONNX Runtime for any input value of 10 or more.
    agent = await start_agent(
        agent_config(
            tmp_path,
            keys,
            [make_tiny_bundle("a1"), cloud_bundles["poison"]],
            device_id=DEV,
            fleet=fleet,
        )
    )
    plane: DataPlane = agent.app[DATA_PLANE]

    def request(model: str, x: np.ndarray, *, scores: bool = False) -> InferenceRequest[str]:
        async def decode(manifest: Manifest) -> ModelInput[str]:
            return ModelInput({"x": x}, context=f"batch for {manifest.name}")

        return InferenceRequest(model, None, decode, scores=scores)

    answer = await plane.infer(request("tiny", TEST_X, scores=True))
    np.testing.assert_allclose(answer.outputs["probs"], tiny_reference(TEST_X), rtol=1e-5)
    assert (answer.manifest.name, answer.manifest.version) == ("tiny", "a1")
    assert answer.context == "batch for tiny" and answer.provenance.source == "edge"
    assert isinstance(answer.scored, Scored) and len(answer.scored) == len(TEST_X)
    want = tiny_reference(TEST_X).max(axis=1)
    np.testing.assert_allclose(answer.scored.confidence, want, rtol=1e-5)
    # A model failing at run time: an error of the core's tree (500, its type only),
    # the runtime's exception kept as the cause, and counted against that version.
    with pytest.raises(EdgeError) as failed:
        await plane.infer(request("tiny-cloud", np.full((1, 4), 10.0, np.float32)))
    assert failed.value.status == 500 and failed.value.message.startswith("internal error (")
    assert failed.value.__cause__ is not None
    docs = {d["model"]: d for d in agent.app[FLEET].stats.take()}
    assert (docs["tiny"]["count"], docs["tiny"]["errors"]) == (1, 0)
    # the least sure item of the batch is the one the histogram counts
    least = float(want.min())
    assert docs["tiny"]["confidence"]["counts"][int(np.ceil(least * 10)) - 1] == 1
    assert (docs["tiny-cloud"]["count"], docs["tiny-cloud"]["errors"]) == (1, 1)


def test_the_answer_confidence_takes_the_cloud_items_and_is_the_least_sure() -> None:
    edge = Scored("top1", np.array([0.8, 0.3, 0.1]), np.array([0, 1, 2]))
    assert edge.least_confident() == pytest.approx(0.1)
    # rows 1 and 2 answered by the cloud: the edge's 0.3 and 0.1 are replaced
    cloud = Scored("top1", np.array([0.95, 0.7]), np.array([2, 2]))
    merged = edge.replace([1, 2], cloud)
    assert merged.least_confident() == pytest.approx(0.7)
    assert merged.top_class is not None and merged.top_class.tolist() == [0, 2, 2]
    assert edge.confidence.tolist() == [0.8, 0.3, 0.1]  # the edge's own scores unchanged
    assert Scored("top1", np.array([])).least_confident() is None

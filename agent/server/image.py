"""``POST /v1/predict/{model}``: JPEG/PNG in, labels or boxes with confidences out.

A protocol adapter: it decodes the image into the model's input tensor
(``edgefleet.core.processing.image``), hands it to the data plane
(``agent/dataplane.py``: resolution, the model, scoring, the cloud, metrics and fleet
statistics) and writes the scored answer as labels or boxes in image pixels.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from edgefleet.agent.dataplane import InferenceRequest, InferenceResponse, ModelInput
from edgefleet.agent.provenance import Provenance
from edgefleet.agent.server.context import data_plane, services
from edgefleet.agent.split import http_routing_key
from edgefleet.core.bundle.manifest import ClassificationPost, Manifest
from edgefleet.core.errors import BadRequest
from edgefleet.core.http import json_response
from edgefleet.core.processing import classification, detection
from edgefleet.core.processing.image import ImageTransform, preprocess
from edgefleet.core.processing.scoring import scorable

routes = web.RouteTableDef()


async def _image_bytes(request: web.Request) -> bytes:
    if request.content_type == "multipart/form-data":
        from edgefleet.agent.server.bodies import read_form_file  # precise 400s

        return await read_form_file(request, "image")
    return await request.read()


def _int_query(request: web.Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(f"query parameter {key} must be an integer") from exc
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {key} must be between {lo} and {hi}")
    return value


def _bool_query(request: web.Request, key: str, default: bool) -> bool:
    raw = request.query.get(key)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise BadRequest(f"query parameter {key} must be true or false")


@dataclass(frozen=True)
class ImageQuery:
    """What the answer needs from the request: where the boxes go back to, and top_k."""

    transform: ImageTransform
    top_k: int | None


@routes.post("/v1/predict/{model}")
@routes.post("/v1/predict/{model}/versions/{version}")
async def predict_image(request: web.Request) -> web.Response:
    """Decode the image → the data plane → labels or boxes."""
    version = request.match_info.get("version") or request.query.get("version")

    async def decode(m: Manifest) -> ModelInput[ImageQuery]:
        spec = m.preprocessing
        if spec is None or not scorable(m):
            raise BadRequest(
                f"model {m.name} takes tensors, not images: use POST /v2/models/{m.name}/infer"
            )
        top_k = _int_query(request, "top_k", 0, 0, 1000) or None
        data = await _image_bytes(request)
        allow_cloud = _bool_query(request, "cloud", True)
        loop = asyncio.get_running_loop()
        pool = services(request).inference_executor
        tensor, transform = await loop.run_in_executor(pool, preprocess, data, spec)
        # The image goes along so a hard example keeps the original, not just the tensor.
        return ModelInput(
            {spec.input: tensor}, ImageQuery(transform, top_k), allow_cloud=allow_cloud, image=data
        )

    async def routing_key() -> str | None:  # a traffic split's (agent/split.py)
        try:
            return http_routing_key(request.headers, request.query)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    answer = await data_plane(request).infer(
        InferenceRequest(
            request.match_info["model"], version, decode, scores=True, routing_key=routing_key
        )
    )
    m = answer.manifest
    return json_response(
        {
            "model": m.name,
            "version": m.version,
            **provenance_fields(answer.provenance, m.labels),
            "provider": answer.provider,
            "latency_ms": round(answer.latency_ms, 3),
            **prediction_fields(answer),
        }
    )


def prediction_fields(answer: InferenceResponse[ImageQuery]) -> dict[str, Any]:
    """The scored answer for the one image: labels (top-k) or boxes in image pixels."""
    m = answer.manifest
    scored = answer.scored
    query = answer.context
    assert scored is not None  # asked for (scores=True), and the model is scorable
    if scored.probabilities is not None:
        post = m.postprocessing
        assert isinstance(post, ClassificationPost)
        preds = classification.top_k(scored.probabilities[0], m.labels, query.top_k or post.top_k)
        return {
            "predictions": [{"label": p.label, "confidence": p.confidence} for p in preds],
            "confidence": float(scored.confidence[0]),
        }
    assert scored.detections is not None
    shown = scored.detections[0]
    if query.top_k is not None:
        shown = shown[: query.top_k]
    transform = query.transform
    detections = []
    for d in shown:
        det: dict[str, Any] = {
            "label": m.labels[d.class_id] if d.class_id < len(m.labels) else str(d.class_id),
            "confidence": detection.reported_score(d),
            "box": transform.box_to_pixels(d.box),
        }
        if d.keypoints:
            det["keypoints"] = [list(transform.point_to_pixels(x, y)) for x, y in d.keypoints]
        detections.append(det)
    return {
        "detections": detections,
        # The rule on what is shown (the boxes top_k left, their scores as shown), so
        # the caller can recompute it; the fleet's statistics count the model's own
        # (``scored.confidence``: every box, full precision).
        "confidence": detection.confidence(shown, scored.rule, as_reported=True),
        "image": {"width": transform.orig_width, "height": transform.orig_height},
    }


def provenance_fields(prov: Provenance, labels: list[str]) -> dict[str, Any]:
    """Where the answer came from, nested (one image: one item)."""

    def side(
        model: str | None,
        version: str | None,
        ms: float,
        conf: list[float] | None,
        cls: list[int] | None,
    ) -> dict[str, Any]:
        """One model's part of the answer (edge or cloud)."""
        part: dict[str, Any] = {"model": model, "version": version, "latency_ms": round(ms, 3)}
        if conf:
            part["confidence"] = round(conf[0], 5)
        if cls:
            part["label"] = labels[cls[0]] if cls[0] < len(labels) else str(cls[0])
        return part

    doc: dict[str, Any] = {
        "source": prov.source,
        "fallback": prov.fallback,
        "edge": side(
            prov.edge_model, prov.edge_version, prov.edge_ms, prov.edge_confidence, prov.edge_class
        ),
    }
    if prov.cloud_model is not None and prov.cloud_ms is not None:
        cloud = side(
            prov.cloud_model,
            prov.cloud_version,
            prov.cloud_ms,
            prov.cloud_confidence,
            prov.cloud_class,
        )
        if prov.fallback:
            cloud["error"] = prov.fallback_detail or prov.fallback
        doc["cloud"] = cloud
    if prov.fallback_detail and "cloud" not in doc:
        doc["fallback_detail"] = prov.fallback_detail
    if prov.escalated:
        doc["escalated"] = True
    if prov.audited:
        doc["audited"] = True
    return doc

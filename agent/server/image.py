"""``POST /v1/predict/{model}``: JPEG/PNG in, labels or boxes with confidences out."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from aiohttp import web

from edgefleet.agent.inference import inference
from edgefleet.agent.server.context import services
from edgefleet.core.bundle.manifest import ClassificationPost, DetectionPost, Manifest
from edgefleet.core.errors import BadRequest
from edgefleet.core.http import json_response
from edgefleet.core.processing import classification
from edgefleet.core.processing.image import ImageTransform, preprocess

routes = web.RouteTableDef()


async def _image_bytes(request: web.Request) -> bytes:
    if request.content_type == "multipart/form-data":
        try:
            form = await request.post()
        except ValueError as exc:
            raise BadRequest(f"malformed multipart body: {exc}") from exc
        field = form.get("image")
        if field is None or isinstance(field, str):
            raise BadRequest("multipart body needs a file field named 'image'")
        return field.file.read()
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


def postprocess(
    manifest: Manifest,
    outputs: dict[str, np.ndarray],
    transform: ImageTransform,
    top_k: int | None,
) -> dict[str, Any]:
    """Interpret the model's raw outputs for one image (runs in a worker thread)."""
    post = manifest.postprocessing
    if isinstance(post, ClassificationPost):
        probs = classification.probabilities(outputs, post)[0]
        preds = classification.top_k(probs, manifest.labels, top_k or post.top_k)
        return {
            "predictions": [{"label": p.label, "confidence": p.confidence} for p in preds],
            "confidence": classification.confidence(probs, manifest.confidence.rule),
        }
    if isinstance(post, DetectionPost):
        from edgefleet.core.processing.detection import decode_ssd

        found = decode_ssd(outputs, post)[0]
        if top_k is not None:
            found = found[:top_k]
        detections = []
        for d in found:
            det: dict[str, Any] = {
                "label": manifest.labels[d.class_id]
                if d.class_id < len(manifest.labels)
                else str(d.class_id),
                "confidence": round(float(d.score), 5),
                "box": transform.box_to_pixels(d.box),
            }
            if d.keypoints:
                det["keypoints"] = [list(transform.point_to_pixels(x, y)) for x, y in d.keypoints]
            detections.append(det)
        scores = [d["confidence"] for d in detections]
        if manifest.confidence.rule == "min_box":
            conf = min(scores) if scores else 1.0
        else:
            conf = float(np.mean(scores)) if scores else 1.0
        return {
            "detections": detections,
            "confidence": conf,
            "image": {"width": transform.orig_width, "height": transform.orig_height},
        }
    raise BadRequest(f"model {manifest.name} has no postprocessing for images")


@routes.post("/v1/predict/{model}")
@routes.post("/v1/predict/{model}/versions/{version}")
async def predict_image(request: web.Request) -> web.Response:
    received = time.perf_counter()
    svc = services(request)
    version = request.match_info.get("version") or request.query.get("version")
    # An unknown model, version or label fails here: no version to count it against.
    lv = svc.registry.resolve(request.match_info["model"], version)
    m = lv.manifest
    # Fleet inference aggregates (agent/telemetry_stats.py); None without a fleet.
    stats = inference(request).stats
    try:
        spec = m.preprocessing
        if spec is None or m.postprocessing.type == "raw":
            raise BadRequest(
                f"model {m.name} takes tensors, not images: use POST /v2/models/{m.name}/infer"
            )
        top_k = _int_query(request, "top_k", 0, 0, 1000) or None
        data = await _image_bytes(request)
        loop = asyncio.get_running_loop()
        pool = svc.inference_executor
        allow_cloud = _bool_query(request, "cloud", True)
        tensor, transform = await loop.run_in_executor(pool, preprocess, data, spec)
        # The image goes along so a hard example keeps the original, not just the tensor.
        result = await inference(request).run(
            lv, {spec.input: tensor}, image=data, allow_cloud=allow_cloud, received=received
        )
        answer = await loop.run_in_executor(pool, postprocess, m, result.outputs, transform, top_k)
    except Exception:
        # Bad image or query, a full queue, a runtime failure: an error of this version.
        # (A client that hangs up is a CancelledError: not counted.)
        if stats is not None:
            stats.record_error(m.name, m.version, time.perf_counter() - received)
        raise
    latency_ms = (time.perf_counter() - received) * 1000
    svc.metrics.request_duration.observe(m.name, m.version, value=latency_ms / 1000)
    if stats is not None:
        # The confidence the caller sees, already computed by postprocess (worker thread).
        stats.record_answer(
            m.name, m.version, latency_ms / 1000, result.provenance, answer.get("confidence")
        )
    return json_response(
        {
            "model": m.name,
            "version": m.version,
            **result.provenance.image_fields(m.labels),
            "provider": lv.backend.info.provider,
            "latency_ms": round(latency_ms, 3),
            **answer,
        }
    )


def _bool_query(request: web.Request, key: str, default: bool) -> bool:
    raw = request.query.get(key)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise BadRequest(f"query parameter {key} must be true or false")

"""Open Inference Protocol (KServe v2) REST endpoints, with the binary tensor and
model repository extensions, so standard clients (tritonclient, KServe's) work."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from edgefleet.agent.inference import inference
from edgefleet.agent.server.context import services
from edgefleet.agent.server.tensors import HEADER_LENGTH, decode_request, encode_response
from edgefleet.agent.serving_registry import LoadedVersion
from edgefleet.core import __version__
from edgefleet.core.errors import BadRequest, NotFound, Unavailable
from edgefleet.core.http import error_response, json_response, read_json_object

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_labels", "image_predict"]
PLATFORMS = {"onnx": "onnxruntime_onnx", "litert": "tensorflow_lite"}

routes = web.RouteTableDef()


@routes.get("/v2/health/live")
async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


@routes.get("/v2/health/ready")
async def ready(request: web.Request) -> web.Response:
    registry = services(request).registry
    if registry.ready():
        return json_response({"ready": True})
    not_ready = [
        n
        for n in registry.model_names()
        if registry.known_state(n).active not in registry.loaded_versions(n)
    ]
    return json_response(
        {"ready": False, "error": f"models without a ready version: {not_ready}"}, 503
    )


@routes.get("/v2")
async def server_metadata(request: web.Request) -> web.Response:
    return json_response(
        {"name": "edgefleet-agent", "version": __version__, "extensions": EXTENSIONS}
    )


def _version_param(request: web.Request) -> str | None:
    return request.match_info.get("version")


def model_metadata(lv: LoadedVersion, request: web.Request) -> dict[str, Any]:
    m = lv.manifest
    registry = services(request).registry
    state = registry.known_state(m.name)
    return {
        "name": m.name,
        "versions": list(state.installed),
        "platform": PLATFORMS[m.runtime],
        "inputs": [t.model_dump() for t in m.inputs],
        "outputs": [t.model_dump() for t in m.outputs],
        "parameters": {
            "version": m.version,
            "active": state.active == m.version,
            "labels": {k: v for k, v in state.labels.items() if v == m.version},
            "provider": lv.backend.info.provider,
            "provider_fallback": lv.backend.info.fallback_reason,
            "self_test": lv.self_test,
            "task": m.task,
            "class_labels": m.labels,
            "confidence_rule": m.confidence.rule,
            "fallback": m.fallback.model_dump(),
            # The bundle's defaults with this agent's config laid over them.
            "fallback_effective": inference(request).policy(m).describe(m.labels),
            "metrics": m.metrics,
        },
    }


@routes.get("/v2/models/{model}")
@routes.get("/v2/models/{model}/versions/{version}")
async def metadata(request: web.Request) -> web.Response:
    lv = services(request).registry.resolve(request.match_info["model"], _version_param(request))
    return json_response(model_metadata(lv, request))


@routes.get("/v2/models/{model}/ready")
@routes.get("/v2/models/{model}/versions/{version}/ready")
async def model_ready(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    try:
        lv = services(request).registry.resolve(name, _version_param(request))
    except Unavailable as exc:
        return json_response({"name": name, "ready": False, "error": exc.message}, 503)
    return json_response({"name": name, "version": lv.manifest.version, "ready": True})


@routes.post("/v2/models/{model}/infer")
@routes.post("/v2/models/{model}/versions/{version}/infer")
async def infer(request: web.Request) -> web.Response:
    received = time.perf_counter()
    svc = services(request)
    # An unknown model, version or label fails here: no version to count it against.
    lv = svc.registry.resolve(request.match_info["model"], _version_param(request))
    m = lv.manifest
    # Fleet inference aggregates (agent/telemetry_stats.py); None without a fleet.
    stats = inference(request).stats
    try:
        body = await request.read()
        req = decode_request(body, request.headers.get(HEADER_LENGTH), lv.manifest)
        # The cloud's timeout counts from here: the caller's wait is bounded, not the call's.
        result = await inference(request).run(
            lv, req.inputs, allow_cloud=_allow_cloud(req.parameters), received=received
        )
        latency_ms = (time.perf_counter() - received) * 1000
        head = {
            "model_name": m.name,
            "model_version": m.version,
            "parameters": {
                # source, fallback, both versions and confidences, edge_ms, cloud_ms.
                **result.provenance.oip_parameters(),
                "provider": lv.backend.info.provider,
                "latency_ms": round(latency_ms, 3),
            },
        }
        svc.metrics.request_duration.observe(m.name, m.version, value=latency_ms / 1000)
        payload, header_len = encode_response(req, result.outputs, head)
    except Exception:
        # Bad input, a full queue, a runtime failure: an error of this version. (A client
        # that hangs up is a CancelledError: not an answer, not an error, not counted.)
        if stats is not None:
            stats.record_error(m.name, m.version, time.perf_counter() - received)
        raise
    if stats is not None:
        stats.record_answer(m.name, m.version, latency_ms / 1000, result.provenance)
    if header_len is None:
        return web.Response(body=payload, content_type="application/json")
    return web.Response(
        body=payload,
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_len)},
    )


def _allow_cloud(parameters: dict[str, Any]) -> bool:
    """Request parameter ``cloud: false`` keeps this request on the box (e.g. private data)."""
    value = parameters.get("cloud", True)
    if not isinstance(value, bool):
        raise BadRequest("parameter 'cloud' must be true or false")
    return value


# ---- model repository extension ---------------------------------------------


@routes.post("/v2/repository/index")
async def repository_index(request: web.Request) -> web.Response:
    doc = await read_json_object(request, optional=True)
    only_ready = bool(doc.get("ready", False))
    registry = services(request).registry
    rows = []
    for name in registry.model_names():
        state = registry.known_state(name)
        loaded = registry.loaded_versions(name)
        for version in state.installed:
            is_ready = version in loaded
            if only_ready and not is_ready:
                continue
            row: dict[str, Any] = {
                "name": name,
                "version": version,
                "state": "READY" if is_ready else "UNAVAILABLE",
                "reason": "" if is_ready else "not loaded",
            }
            if version == state.active:
                row["active"] = True
            rows.append(row)
    return json_response(rows)


@routes.post("/v2/repository/models/{model}/load")
async def repository_load(request: web.Request) -> web.Response:
    await read_json_object(request, optional=True)
    name = request.match_info["model"]
    registry = services(request).registry
    if name not in registry.model_names():
        raise NotFound(f"unknown model {name!r}")
    lv = await registry.load_model(name)
    return json_response({"name": name, "version": lv.manifest.version, "state": "READY"})


@routes.post("/v2/repository/models/{model}/unload")
async def repository_unload(request: web.Request) -> web.Response:
    await read_json_object(request, optional=True)
    name = request.match_info["model"]
    registry = services(request).registry
    if name not in registry.model_names():
        raise NotFound(f"unknown model {name!r}")
    await registry.unload_model(name)
    return json_response({"name": name, "state": "UNAVAILABLE"})


__all__ = ["error_response", "model_metadata", "routes"]

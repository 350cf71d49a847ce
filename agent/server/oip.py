"""Open Inference Protocol (KServe v2) REST endpoints, with the binary tensor and
model repository extensions, so standard clients (tritonclient, KServe's) work.

``infer`` is a protocol adapter: it decodes the request (``tensors.py``), hands it
to the data plane (``agent/dataplane.py``: resolution, the model, scoring, the cloud,
metrics and fleet statistics) and encodes the answer."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from edgefleet.agent.dataplane import InferenceRequest, ModelInput
from edgefleet.agent.provenance import Provenance
from edgefleet.agent.server.context import data_plane, services
from edgefleet.agent.server.tensors import (
    HEADER_LENGTH,
    InferRequest,
    decode_request,
    encode_response,
)
from edgefleet.agent.serving_registry import LoadedVersion
from edgefleet.agent.split import check_routing_key, http_routing_key
from edgefleet.core import __version__
from edgefleet.core.bundle.manifest import Manifest
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
            "fallback_effective": data_plane(request).router.policy(m).describe(m.labels),
            # Input drift against the bundle's reference profile (agent/telemetry_stats.py).
            "drift": _drift(request, m),
            "metrics": m.metrics,
        },
    }


def _drift(request: web.Request, m: Manifest) -> dict[str, Any]:
    stats = data_plane(request).stats
    if stats is None:  # the aggregates run with a fleet link only
        return {"samples": 0, "drift_reason": "no fleet link: drift is not computed"}
    return stats.drift.status(m)


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
    """Decode (JSON or binary tensors) → the data plane → encode, the same way."""

    async def decode(manifest: Manifest) -> ModelInput[InferRequest]:
        body = await request.read()
        req = decode_request(body, request.headers.get(HEADER_LENGTH), manifest)
        return ModelInput(req.inputs, req, allow_cloud=_allow_cloud(req.parameters))

    answer = await data_plane(request).infer(
        InferenceRequest(
            request.match_info["model"],
            _version_param(request),
            decode,
            routing_key=lambda: _routing_key(request),
        )
    )
    m = answer.manifest
    head = {
        "model_name": m.name,
        "model_version": m.version,
        "parameters": {
            # source, fallback, both versions and confidences, edge_ms, cloud_ms.
            **provenance_parameters(answer.provenance),
            "provider": answer.provider,
            "latency_ms": round(answer.latency_ms, 3),
        },
    }
    payload, header_len = encode_response(answer.context, answer.outputs, head)
    if header_len is None:
        return web.Response(body=payload, content_type="application/json")
    return web.Response(
        body=payload,
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(header_len)},
    )


async def _routing_key(request: web.Request) -> str | None:
    """A traffic split's routing key (agent/split.py): the ``X-Routing-Key`` header,
    ``?routing_key=``, or the request's ``parameters.routing_key``. Read only when
    the model has a split: the body's JSON (its header part, for binary tensors) is
    then parsed once more, for the parameters alone; a body that does not parse is
    left for the decoder to refuse."""
    try:
        key = http_routing_key(request.headers, request.query)
        if key is not None:
            return key
        body = await request.read()
        n = request.headers.get(HEADER_LENGTH)
        try:
            doc = orjson.loads(body[: int(n)] if n is not None else body)
        except (ValueError, orjson.JSONDecodeError):
            return None
        params = doc.get("parameters") if isinstance(doc, dict) else None
        if not isinstance(params, dict) or "routing_key" not in params:
            return None
        return check_routing_key(params["routing_key"], "parameter 'routing_key'")
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def provenance_parameters(prov: Provenance) -> dict[str, Any]:
    """Where the answer came from, as flat scalars (all OIP allows in ``parameters``).

    Per-item values (confidences, cloud rows) are numbers for a batch of one and
    comma-separated strings, in batch order, for larger batches.
    """
    p: dict[str, Any] = {"source": prov.source}
    if prov.fallback:
        p["fallback"] = prov.fallback
        if prov.fallback_detail:
            p["fallback_detail"] = prov.fallback_detail
    p["edge_model_version"] = prov.edge_version
    p["edge_ms"] = round(prov.edge_ms, 3)
    if prov.edge_confidence is not None:
        p["edge_confidence"] = _scalar_or_csv(prov.edge_confidence)
    if prov.cloud_model is not None:
        p["cloud_model"] = prov.cloud_model
    if prov.cloud_version is not None:
        p["cloud_model_version"] = prov.cloud_version
    if prov.cloud_ms is not None:
        p["cloud_ms"] = round(prov.cloud_ms, 3)
    if prov.cloud_confidence is not None:
        p["cloud_confidence"] = _scalar_or_csv(prov.cloud_confidence)
    if prov.source == "mixed":
        p["cloud_items"] = ",".join(str(i) for i in prov.cloud_items)
    if prov.escalated:
        p["escalated"] = True
    if prov.audited:
        p["audited"] = True
    return p


def _scalar_or_csv(values: list[float]) -> float | str:
    if len(values) == 1:
        return round(values[0], 6)
    return ",".join(f"{v:.6g}" for v in values)


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

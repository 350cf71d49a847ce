"""Local management endpoints (``/v1/...``): model status, bundle install,
activation, rollback and labels. The fleet link drives the same registry calls."""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from edgefleet.agent.server.context import data_plane, services
from edgefleet.core.errors import BadRequest, PayloadTooLarge
from edgefleet.core.http import json_response, read_json_object

routes = web.RouteTableDef()


def _spool_file(spool: Path) -> Path:
    spool.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=spool, suffix=".bundle")
    os.close(fd)
    return Path(name)


def model_status(request: web.Request, name: str) -> dict[str, Any]:
    registry = services(request).registry
    state = registry.known_state(name)
    loaded = registry.loaded_versions(name)
    versions = []
    for version in state.installed:
        lv = loaded.get(version)
        row: dict[str, Any] = {
            "version": version,
            "active": version == state.active,
            "labels": sorted(k for k, v in state.labels.items() if v == version),
            "loaded": lv is not None,
        }
        if lv is not None:
            row |= {
                "runtime": lv.manifest.runtime,
                "provider": lv.backend.info.provider,
                "provider_fallback": lv.backend.info.fallback_reason,
                "self_test": lv.self_test,
                "queue": lv.runner.pending,
                # Set when an accelerator failed at run time and the model moved to the CPU.
                "runtime_fallback": lv.backend.info.runtime_fallback,
                "batching": lv.runner.describe(),
            }
        versions.append(row)
    split = registry.split_for(name)
    return {
        "name": name,
        "active": state.active,
        "previous": state.previous,
        "labels": state.labels,
        "last_error": state.last_error,
        "versions": versions,
        # Issue 11: the shadow candidate (not served) with its agreement figures since
        # start, and the traffic split in force (agent/shadow.py, agent/split.py).
        "shadow": data_plane(request).shadow.describe(name),
        "split": None
        if split is None
        else {"version": split.version, "weight": split.weight, "source": split.source},
    }


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    registry = services(request).registry
    # Bundles of the config that could not be installed (bad signature, bad archive...):
    # the agent serves the others and says which were skipped and why.
    return json_response(
        {
            "models": [model_status(request, n) for n in registry.model_names()],
            "config_errors": registry.config_errors,
        }
    )


@routes.get("/v1/system")
async def system(request: web.Request) -> web.Response:
    """What the box offers (CPU cores, ONNX Runtime providers, LiteRT delegates)."""
    registry = services(request).registry
    found = await registry.detect_accelerators()
    return json_response({"accelerators": found, "models": registry.provider_report()["models"]})


@routes.get("/v1/models/{model}")
async def show_model(request: web.Request) -> web.Response:
    return json_response(model_status(request, request.match_info["model"]))


@routes.post("/v1/bundles")
async def upload_bundle(request: web.Request) -> web.Response:
    """Install a bundle sent as the request body; ``?activate=1`` also activates it."""
    svc = services(request)
    limit = svc.config.store.max_member_bytes
    loop = asyncio.get_running_loop()
    io = svc.io_executor
    spool = svc.config.store.path / ".uploads"
    tmp = await loop.run_in_executor(io, _spool_file, spool)
    try:
        size = 0
        with open(tmp, "wb") as f:  # noqa: ASYNC230 - writes go through the executor below
            async for chunk in request.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"bundle larger than the {limit} byte limit")
                await loop.run_in_executor(io, f.write, chunk)
        if size == 0:
            raise BadRequest("empty bundle body")
        manifest = await svc.registry.install(tmp)
    finally:
        await loop.run_in_executor(io, functools.partial(tmp.unlink, missing_ok=True))
    result: dict[str, Any] = {"name": manifest.name, "version": manifest.version, "installed": True}
    if request.query.get("activate") in ("1", "true", "yes"):
        await svc.registry.activate(manifest.name, manifest.version)
        result["active"] = True
    return json_response(result, 201)


@routes.post("/v1/models/{model}/versions/{version}/activate")
async def activate(request: web.Request) -> web.Response:
    name, version = request.match_info["model"], request.match_info["version"]
    registry = services(request).registry
    registry.known_state(name)
    lv = await registry.activate(name, version)
    return json_response({"name": name, "active": lv.manifest.version, "self_test": lv.self_test})


@routes.post("/v1/models/{model}/rollback")
async def rollback(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    registry = services(request).registry
    registry.known_state(name)
    lv = await registry.rollback(name)
    return json_response({"name": name, "active": lv.manifest.version})


@routes.put("/v1/models/{model}/labels/{label}")
async def set_label(request: web.Request) -> web.Response:
    name, label = request.match_info["model"], request.match_info["label"]
    doc = await read_json_object(request)
    version = doc.get("version")
    if not isinstance(version, str):
        raise BadRequest("body needs a string 'version'")
    registry = services(request).registry
    registry.known_state(name)
    await registry.set_label(name, label, version)
    return json_response({"name": name, "label": label, "version": version})


@routes.put("/v1/models/{model}/split")
async def set_split(request: web.Request) -> web.Response:
    """Serve ``version`` (installed) to ``weight`` (0..1) of the requests that name no
    version (agent/split.py); replaces the fleet's split until its next desired state."""
    name = request.match_info["model"]
    doc = await read_json_object(request)
    version, weight = doc.get("version"), doc.get("weight")
    if not isinstance(version, str) or not version:
        raise BadRequest("body needs a string 'version'")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise BadRequest("body needs a number 'weight' in 0..1")
    if not 0.0 <= weight <= 1.0:
        raise BadRequest(f"weight {weight} is not in 0..1")
    registry = services(request).registry
    state = registry.known_state(name)
    if version == state.active:
        raise BadRequest(f"version {version} is the active version of {name}: nothing to split")
    split = await registry.set_split(name, version, float(weight), "local")
    return json_response(
        {"name": name, "version": split.version, "weight": split.weight, "source": split.source}
    )


@routes.delete("/v1/models/{model}/split")
async def clear_split(request: web.Request) -> web.Response:
    """End the model's split (the fleet's too, until its next desired state)."""
    name = request.match_info["model"]
    registry = services(request).registry
    registry.known_state(name)
    old = await registry.clear_split(name)
    return json_response({"name": name, "split": None, "ended": old is not None})


@routes.put("/v1/models/{model}/shadow")
async def set_shadow(request: web.Request) -> web.Response:
    """Run installed ``version`` in shadow on ``sample_rate`` (0..1) of the active
    version's answers (agent/shadow.py): for a local trial or a benchmark; the fleet
    sets it with ``models.<m>.shadow``, and its next desired state replaces this."""
    name = request.match_info["model"]
    doc = await read_json_object(request)
    version, rate = doc.get("version"), doc.get("sample_rate", 1.0)
    if not isinstance(version, str) or not version:
        raise BadRequest("body needs a string 'version'")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise BadRequest("'sample_rate' must be a number in 0..1")
    registry = services(request).registry
    if version == registry.known_state(name).active:
        raise BadRequest(f"version {version} is the active version of {name}: nothing to compare")
    sv = await registry.load_shadow(name, version, float(rate))
    return json_response({"name": name, "version": sv.version, "sample_rate": sv.sample_rate})


@routes.delete("/v1/models/{model}/shadow")
async def clear_shadow(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    registry = services(request).registry
    registry.known_state(name)
    ended = await registry.unload_shadow(name)
    return json_response({"name": name, "shadow": None, "ended": ended})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        text=services(request).metrics.render(),
        content_type="text/plain",
        headers={"X-Content-Type-Options": "nosniff"},
    )

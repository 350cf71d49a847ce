"""``GET /openapi.json``: the agent's API described for humans and code generators."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from edgefleet.core import __version__
from edgefleet.core.http import json_response

routes = web.RouteTableDef()

_ERR = {"$ref": "#/components/responses/Error"}
_M = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_V = {
    "name": "version",
    "in": "path",
    "required": True,
    "description": "a version, or a label such as stable or canary",
    "schema": {"type": "string"},
}


def _op(summary: str, ok: str = "OK", body: str | None = None, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": ok}, "400": _ERR, "404": _ERR, "503": _ERR},
        **extra,
    }
    if body:
        op["requestBody"] = {"content": {body: {"schema": {"type": "object"}}}}
    return op


def spec() -> dict[str, Any]:
    infer = _op(
        "Run inference (JSON, or the binary tensor extension with Inference-Header-Content-Length)",
        body="application/json",
        parameters=[_M],
    )
    infer["requestBody"] = {
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }
    }
    infer["responses"]["413"] = _ERR
    predict = _op("Classify or detect on a JPEG/PNG image", parameters=[_M])
    predict["requestBody"] = {
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
        }
    }
    predict["responses"]["413"] = _ERR
    versioned_infer = {**infer, "parameters": [_M, _V]}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edgefleet agent",
            "version": __version__,
            "description": "Open Inference Protocol (KServe v2) REST API plus an image endpoint."
            ' Errors are always JSON {"error": ...}.',
        },
        "paths": {
            "/v2/health/live": {"get": _op("Liveness")},
            "/v2/health/ready": {"get": _op("Readiness: every model has a ready version")},
            "/v2": {"get": _op("Server metadata and extensions")},
            "/v2/models/{model}": {"get": _op("Model metadata", parameters=[_M])},
            "/v2/models/{model}/versions/{version}": {
                "get": _op("Model version metadata", parameters=[_M, _V])
            },
            "/v2/models/{model}/ready": {"get": _op("Model readiness", parameters=[_M])},
            "/v2/models/{model}/versions/{version}/ready": {
                "get": _op("Model version readiness", parameters=[_M, _V])
            },
            "/v2/models/{model}/infer": {"post": infer},
            "/v2/models/{model}/versions/{version}/infer": {"post": versioned_infer},
            "/v2/repository/index": {"post": _op("Installed models and versions")},
            "/v2/repository/models/{model}/load": {"post": _op("Load a model", parameters=[_M])},
            "/v2/repository/models/{model}/unload": {
                "post": _op("Unload a model", parameters=[_M])
            },
            "/v1/predict/{model}": {"post": predict},
            "/v1/models": {"get": _op("Models with versions, labels, provider, self-test")},
            "/v1/system": {"get": _op("CPU cores, ONNX Runtime providers, LiteRT delegates")},
            "/v1/models/{model}": {"get": _op("One model's status", parameters=[_M])},
            "/v1/bundles": {
                "post": _op(
                    "Install a bundle (body: the bundle file)", body="application/octet-stream"
                )
            },
            "/v1/models/{model}/versions/{version}/activate": {
                "post": _op("Load, self-test and activate a version", parameters=[_M, _V])
            },
            "/v1/models/{model}/rollback": {
                "post": _op("Activate the previous version", parameters=[_M])
            },
            "/v1/models/{model}/labels/{label}": {
                "put": _op(
                    "Point a label at a version",
                    body="application/json",
                    parameters=[
                        _M,
                        {
                            "name": "label",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                    ],
                )
            },
            "/v1/fallback": {
                "get": _op("Cloud fallback: endpoint, breakers, budgets, policies, hard examples")
            },
            "/v1/hard-examples": {
                "get": _op("Hard examples, newest first (?status=&model=&limit=), no tensors")
            },
            "/metrics": {"get": _op("Prometheus metrics", ok="text/plain exposition format")},
            "/openapi.json": {"get": _op("This document")},
        },
        "components": {
            "responses": {
                "Error": {
                    "description": "error",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["error"],
                                "properties": {"error": {"type": "string"}},
                            }
                        }
                    },
                }
            },
            "schemas": {
                "Tensor": {
                    "type": "object",
                    "required": ["name", "shape", "datatype"],
                    "properties": {
                        "name": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "datatype": {"type": "string"},
                        "parameters": {"type": "object"},
                        "data": {"type": "array"},
                    },
                },
                "InferRequest": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Tensor"},
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                },
            },
        },
    }


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return json_response(spec())

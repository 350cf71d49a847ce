"""Open Inference Protocol tensors: JSON and the binary tensor extension, both ways.

Decoding validates everything against the model's manifest before a single byte
reaches the runtime, so a bad request is always a precise 400, never a crash in
ONNX Runtime or LiteRT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from edgefleet.core.bundle.manifest import NUMPY_TO_OIP, OIP_TO_NUMPY, Manifest, TensorSpec
from edgefleet.core.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
_MAX_DIMS = 8


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    # Output name -> binary wanted; empty means every output, JSON unless asked.
    outputs: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False


def _loads(data: bytes | memoryview) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc


def _check_shape(spec: TensorSpec, name: str, shape: Any) -> tuple[int, ...]:
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers")
    if not spec.matches(tuple(shape)):
        raise BadRequest(f"input {name!r}: shape {shape} does not fit the model's {spec.shape}")
    if 0 in shape:
        # An empty tensor reaches the runtime as nothing to compute: ONNX Runtime and the
        # batcher split rows, and a batch of no rows has none to split or answer.
        what = "no rows" if shape and shape[0] == 0 else "no values"
        raise BadRequest(
            f"input {name!r}: shape {shape} holds {what}; every dimension must be at least 1"
        )
    return tuple(shape)


def _decode_json_data(name: str, data: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: data must be a list")
    try:
        arr = np.asarray(data)
    except ValueError as exc:
        raise BadRequest(f"input {name!r}: data is ragged: {exc}") from exc
    if arr.dtype == object or arr.dtype.kind in "USV":
        raise BadRequest(f"input {name!r}: data must hold only numbers")
    if dtype == np.bool_ and arr.dtype != np.bool_ and arr.size:
        raise BadRequest(f"input {name!r}: BOOL data must be true/false")
    if dtype != np.bool_ and arr.dtype == np.bool_ and arr.size:
        raise BadRequest(f"input {name!r}: data is boolean but the datatype is numeric")
    if dtype.kind in "iu" and arr.dtype.kind == "f" and arr.size:
        raise BadRequest(f"input {name!r}: integer datatype but the data holds fractions")
    expected = math.prod(shape)
    if arr.size != expected:
        raise BadRequest(
            f"input {name!r}: {arr.size} values given, shape {list(shape)} needs {expected}"
        )
    try:
        with np.errstate(over="raise", invalid="raise"):
            out = arr.astype(dtype, casting="unsafe")
    except (FloatingPointError, OverflowError) as exc:
        raise BadRequest(f"input {name!r}: values out of range for {dtype}") from exc
    if dtype.kind in "iu" and arr.size and not np.array_equal(out, arr):
        raise BadRequest(f"input {name!r}: values out of range for {NUMPY_TO_OIP[dtype.name]}")
    return out.reshape(shape)


def decode_request(body: bytes, header_length: str | None, manifest: Manifest) -> InferRequest:
    """Parse an infer request body (JSON, or JSON header + binary tensors)."""
    if not body:
        raise BadRequest("empty request body")
    view = memoryview(body)
    binary: memoryview | None = None
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError as exc:
            raise BadRequest(f"{HEADER_LENGTH} is not an integer") from exc
        if n <= 0 or n > len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {n} but the body holds {len(body)} bytes")
        doc, binary = _loads(view[:n]), view[n:]
    else:
        doc = _loads(view)
    if not isinstance(doc, dict):
        raise BadRequest("request must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("request needs a non-empty 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    specs = {t.name: t for t in manifest.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in raw_inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest("each input needs a 'name'")
        name = item["name"]
        spec = specs.get(name)
        if spec is None:
            raise BadRequest(
                f"model {manifest.name} has no input {name!r}; it takes {sorted(specs)}"
            )
        if name in inputs:
            raise BadRequest(f"input {name!r} given twice")
        datatype = item.get("datatype")
        if datatype not in OIP_TO_NUMPY:
            raise BadRequest(f"input {name!r}: unsupported datatype {datatype!r}")
        if datatype != spec.datatype:
            raise BadRequest(
                f"input {name!r}: datatype {datatype}, the model takes {spec.datatype}"
            )
        shape = _check_shape(spec, name, item.get("shape"))
        dtype = np.dtype(OIP_TO_NUMPY[datatype])
        iparams = item.get("parameters") or {}
        size = iparams.get("binary_data_size") if isinstance(iparams, dict) else None
        if size is not None:
            if binary is None:
                raise BadRequest(f"input {name!r} has binary_data_size but no {HEADER_LENGTH}")
            if not isinstance(size, int) or size < 0:
                raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
            want = math.prod(shape) * dtype.itemsize
            if size != want:
                raise BadRequest(
                    f"input {name!r}: binary_data_size {size} but shape {list(shape)}"
                    f" of {datatype} needs {want} bytes"
                )
            if offset + size > len(binary):
                raise BadRequest(
                    f"input {name!r}: binary data ends after {len(binary) - offset} of {size} bytes"
                )
            # Zero-copy view into the request body.
            inputs[name] = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            if "data" not in item:
                raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
            inputs[name] = _decode_json_data(name, item["data"], dtype, shape)
    if binary is not None and offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes of binary data left over after the last input"
        )
    missing = set(specs) - set(inputs)
    if missing:
        raise BadRequest(f"missing inputs: {sorted(missing)}")
    batch = {a.shape[0] for a in inputs.values() if a.ndim}
    if len(batch) > 1:
        raise BadRequest(f"inputs disagree on the batch size: {sorted(batch)}")
    outputs: dict[str, bool] = {}
    raw_outputs = doc.get("outputs") or []
    if not isinstance(raw_outputs, list):
        raise BadRequest("'outputs' must be a list")
    known = {t.name for t in manifest.outputs}
    for out in raw_outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise BadRequest("each requested output needs a 'name'")
        if out["name"] not in known:
            raise BadRequest(f"model {manifest.name} has no output {out['name']!r}")
        oparams = out.get("parameters") or {}
        outputs[out["name"]] = bool(isinstance(oparams, dict) and oparams.get("binary_data"))
    req_id = doc.get("id")
    return InferRequest(
        id=str(req_id) if req_id is not None else None,
        inputs=inputs,
        parameters=params,
        outputs=outputs,
        binary_default=bool(params.get("binary_data_output", False)),
    )


def encode_response(
    request: InferRequest,
    results: dict[str, np.ndarray],
    head: dict[str, Any],
) -> tuple[bytes, int | None]:
    """Return (body, header length or None for plain JSON)."""
    wanted = request.outputs or dict.fromkeys(results, request.binary_default)
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in wanted.items():
        arr = np.ascontiguousarray(results[name])
        datatype = NUMPY_TO_OIP.get(arr.dtype.name)
        if datatype is None:  # e.g. a runtime returning float64 for an FP32 output
            arr, datatype = arr.astype(np.float32), "FP32"
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.reshape(-1)
        outputs.append(entry)
    doc = {**head, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)

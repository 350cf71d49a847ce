"""Hard examples on the wire (issue 11, part 6): the tensor blob both sides store and the
upload body a device sends to the fleet (``PUT /v1/hard-examples/{sha256}``).

**Tensor blob** (``pack``/``unpack``): ``EFT1`` + header length (4 bytes, little
endian) + a JSON header ``{name: {dtype, shape}}`` + the raw bytes of each tensor in
header order. Not npz: zipfile is pure Python and would hold the GIL in the agent's
writer thread while the event loop wants it. Object dtypes are refused on reading.

**Upload body** (``encode_upload``/``decode_upload``): ``EFH1`` + header length (4
bytes, little endian) + a JSON header (:class:`UploadHeader`, sorted keys) + the parts
it lists, in order: ``inputs`` and ``edge_outputs`` (tensor blobs, required),
``cloud_outputs`` (a tensor blob, optional), ``image`` (the original JPEG or PNG,
optional). The example's id is the sha256 of the whole body: the same case sent
twice has the same id, so the fleet answers the second time "already have it".

Pure functions: any thread. ``decode_upload`` refuses anything else with
``ValueError`` and a one-line reason (the fleet's 400).
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.core.names import NAME_PATTERN

TENSOR_MAGIC: Final = b"EFT1"
UPLOAD_MAGIC: Final = b"EFH1"
UPLOAD_SCHEMA: Final = 1
MAX_HEADER_BYTES: Final = 64 * 1024
MAX_TENSORS: Final = 64
PARTS: Final = ("inputs", "edge_outputs", "cloud_outputs", "image")
IMAGE_TYPES: Final = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png"}


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Tensors as one ``EFT1`` blob (module doc)."""
    header: dict[str, dict[str, Any]] = {}
    chunks: list[bytes] = []
    for name, value in arrays.items():
        arr = np.ascontiguousarray(value)
        header[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
        chunks.append(arr.tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([TENSOR_MAGIC, len(head).to_bytes(4, "little"), head, *chunks])


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    """The tensors of an ``EFT1`` blob; ``ValueError`` for anything that is not one
    exactly (bad magic or header, object dtypes, sizes that do not add up)."""
    if blob[:4] != TENSOR_MAGIC or len(blob) < 8:
        raise ValueError("not a packed tensor blob")
    n = int.from_bytes(blob[4:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(blob):
        raise ValueError("tensor blob header is too long")
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError:
        raise ValueError("tensor blob header is not JSON") from None
    if not isinstance(header, dict) or len(header) > MAX_TENSORS:
        raise ValueError("tensor blob header must be an object of at most 64 tensors")
    out: dict[str, np.ndarray] = {}
    offset = 8 + n
    for name, spec in header.items():
        try:
            dtype = np.dtype(spec["dtype"])
            shape = [int(d) for d in spec["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r}: bad dtype or shape") from None
        if dtype.hasobject:  # never: a blob must not be able to make Python objects
            raise ValueError(f"tensor {name!r} has an object dtype")
        if any(d < 0 for d in shape):
            raise ValueError(f"tensor {name!r} has a negative dimension")
        count = int(np.prod(shape, dtype=np.int64))
        size = count * dtype.itemsize
        if offset + size > len(blob):
            raise ValueError(f"tensor {name!r} is cut short")
        out[name] = np.frombuffer(blob, dtype, count, offset).reshape(shape).copy()
        offset += size
    if offset != len(blob):
        raise ValueError("tensor blob has bytes after its tensors")
    return out


class UploadHeader(BaseModel):
    """What a device says about one hard example (the answers' classes and confidences
    are the device's scoring of its stored outputs, by the policy's rule)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    schema_: Literal[1] = Field(UPLOAD_SCHEMA, alias="schema")
    device_id: str = Field(min_length=1, max_length=256)
    model: str = Field(pattern=f"^{NAME_PATTERN}$", max_length=200)
    version: str = Field(pattern=f"^{NAME_PATTERN}$", max_length=200)
    kind: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")  # unsure | escalated | audit | shadow
    status: Literal["answered", "expired", "pending"]
    created_at: float = Field(ge=0.0, le=1e11)
    cloud_model: str | None = Field(None, max_length=200)
    cloud_version: str | None = Field(None, max_length=200)
    edge_class: int | None = Field(None, ge=0, le=2**31)
    edge_confidence: float | None = Field(None, ge=-1e9, le=1e9)
    cloud_class: int | None = Field(None, ge=0, le=2**31)
    cloud_confidence: float | None = Field(None, ge=-1e9, le=1e9)
    agree: bool | None = None
    image_type: Literal["image/jpeg", "image/png"] | None = None
    # [[name, size], ...]: JSON has no tuples (checked by _parts).
    parts: list[Annotated[list[str | int], Field(min_length=2, max_length=2)]] = Field(
        min_length=2, max_length=4
    )

    @field_validator("parts")
    @classmethod
    def _parts(cls, v: list[list[str | int]]) -> list[list[str | int]]:
        for name, size in v:
            if name not in PARTS or type(size) is not int:
                raise ValueError(f"each part must be [name in {list(PARTS)}, size]")
        return v


def image_type(image: bytes) -> str | None:
    """``image/jpeg`` or ``image/png`` by the file's magic; None for anything else."""
    return next((t for magic, t in IMAGE_TYPES.items() if image.startswith(magic)), None)


def encode_upload(header: dict[str, Any], parts: dict[str, bytes]) -> tuple[str, bytes]:
    """``(sha256 id, body)`` for one hard example; ``header`` without ``parts`` and
    ``schema`` (filled here), ``parts`` by name (module doc), empty ones left out."""
    listed = [(name, len(parts[name])) for name in PARTS if parts.get(name)]
    doc = {**header, "schema": UPLOAD_SCHEMA, "parts": listed}
    head = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    body = b"".join(
        [UPLOAD_MAGIC, len(head).to_bytes(4, "little"), head, *(parts[n] for n, _ in listed)]
    )
    return hashlib.sha256(body).hexdigest(), body


def decode_upload(body: bytes) -> tuple[UploadHeader, dict[str, bytes]]:
    """The header and parts of an upload body, every part checked (the tensor blobs
    unpack, the image is a JPEG or PNG of the type said); ``ValueError`` otherwise."""
    if body[:4] != UPLOAD_MAGIC or len(body) < 8:
        raise ValueError("not a hard-example upload (no EFH1 magic)")
    n = int.from_bytes(body[4:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(body):
        raise ValueError("header length is out of bounds")
    try:
        raw = json.loads(body[8 : 8 + n])
    except ValueError:
        raise ValueError("header is not JSON") from None
    if not isinstance(raw, dict):
        raise ValueError("header is not a JSON object")
    try:
        header = UploadHeader.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ValueError(f"header {loc}: {first['msg']}") from None
    names = [name for name, _ in header.parts]
    if len(set(names)) != len(names) or names != [p for p in PARTS if p in names]:
        raise ValueError(f"parts must be a subset of {list(PARTS)}, in that order, once each")
    if names[:2] != ["inputs", "edge_outputs"]:
        raise ValueError("parts must start with inputs and edge_outputs")
    if any(int(size) <= 0 for _, size in header.parts):
        raise ValueError("every part must have a positive size")
    offset = 8 + n
    if offset + sum(int(size) for _, size in header.parts) != len(body):
        raise ValueError("the parts' sizes do not add up to the body's length")
    parts: dict[str, bytes] = {}
    for name, size in header.parts:
        assert isinstance(name, str) and isinstance(size, int)  # _parts checked them
        parts[name] = body[offset : offset + size]
        offset += size
    for name in ("inputs", "edge_outputs", "cloud_outputs"):
        if name in parts:
            try:
                unpack(parts[name])
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    if "image" in parts:
        found = image_type(parts["image"])
        if found is None or found != header.image_type:
            raise ValueError("image is not the JPEG or PNG its image_type says")
    elif header.image_type is not None:
        raise ValueError("image_type given without an image")
    return header, parts

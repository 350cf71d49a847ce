"""Traffic split: serve a canary version to a weighted share of a model's requests.

A split (``models.<m>.split`` of the fleet's desired state, or the local
``PUT /v1/models/{m}/split``) names a canary version and a ``weight`` in 0..1. The
registry (``agent/serving_registry.py``, ``ModelRegistry.resolve``) applies it to the
requests that name no version or label: each one draws a point ``u`` in [0, 1) and
goes to the canary when ``u < weight``, else to the active version.

``u`` comes from the request's routing key when the app passes one (OIP parameter
``routing_key``, ``?routing_key=`` or the ``X-Routing-Key`` header): a hash of the
model name and the key, so the same key (a camera, a till) always gets the same
version for as long as the weight stays, and raising the weight only moves keys from
the active version to the canary, never back. Without a key ``u`` is random.

Pure functions and a frozen dataclass: any thread (the registry calls them on the
event loop, per request: one hash of a short string at most).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

SplitSource = Literal["fleet", "local"]

# Longest routing key taken (an id, not a document); longer ones are refused (400).
MAX_ROUTING_KEY = 256
ROUTING_HEADER = "X-Routing-Key"
_TWO_64 = float(2**64)


@dataclass(frozen=True)
class Split:
    """The canary ``version`` serves ``weight`` of the requests; ``source`` set it."""

    version: str
    weight: float
    source: SplitSource = "fleet"

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"split weight {self.weight!r} is not in 0..1")


def key_point(model: str, key: str) -> float:
    """The routing key's fixed point in [0, 1) for ``model`` (blake2b, 64 bits)."""
    digest = hashlib.blake2b(f"{model}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64


def to_canary(split: Split, model: str, routing_key: str | None, rng: random.Random) -> bool:
    """Whether this request goes to the split's canary (see the module doc)."""
    if split.weight <= 0.0:
        return False
    if split.weight >= 1.0:
        return True
    u = key_point(model, routing_key) if routing_key is not None else rng.random()
    return u < split.weight


def check_routing_key(value: object, where: str) -> str:
    """A routing key as the app gave it: a non-empty string of at most
    ``MAX_ROUTING_KEY`` characters; ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a non-empty string")
    if len(value) > MAX_ROUTING_KEY:
        raise ValueError(f"{where} is longer than {MAX_ROUTING_KEY} characters")
    return value


def http_routing_key(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The ``X-Routing-Key`` header, else the ``routing_key`` query parameter, else None
    (both HTTP endpoints); ``ValueError`` for a bad one."""
    value = headers.get(ROUTING_HEADER)
    if value is not None:
        return check_routing_key(value, f"header {ROUTING_HEADER}")
    value = query.get("routing_key")
    if value is not None:
        return check_routing_key(value, "query parameter routing_key")
    return None

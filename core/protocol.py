"""The agent ⇄ fleet wire protocol: every MQTT message and telemetry record, once.

Topics are in :mod:`edgefleet.core.mqtt.topics`; the payload of each one is a model
here, with the schema version (``SCHEMA``) defined in this module only. The side that
publishes builds the model and sends ``to_json()``; the side that receives calls
``decode(Model, payload, ...)`` (or ``Model.from_obj`` for a JSON value it already
holds, e.g. a telemetry record's ``data``). A renamed or retyped field is then one
edit, and the round-trip tests (tests/core/test_protocol.py) fail when the two sides
disagree. Contract and examples: docs/mqtt.md and docs/fleet.md.

| message | leaf | publisher | receiver |
|---|---|---|---|
| :class:`Desired` | ``desired`` (retained) | fleet/desired.py | agent/sync.py |
| :class:`Reported` | ``reported`` (retained) | agent/sync.py | fleet/ingest.py |
| :class:`Status` | ``status`` (retained) | agent/mqtt_link.py | fleet/ingest.py |
| :class:`TelemetryBatch` | ``telemetry`` | agent/telemetry_sender.py | fleet/ingest.py |
| :class:`Ack` | ``acks`` | fleet/ingest.py | agent/telemetry_sender.py |
| :class:`Event` | ``events``, and ``event`` records | agent/sync.py | fleet/ingest.py |
| :class:`Command` | ``commands`` | fleet/bus.py | agent/sync.py |

Telemetry record kinds (a record's ``data``): ``inference_stats``
(:class:`InferenceStats`, agent/telemetry_stats.py), ``fallback_stats``
(:class:`FallbackStats`, agent/cloud/telemetry.py), ``shadow_stats``
(:class:`ShadowStats`, agent/shadow.py), ``drift_stats`` (:class:`DriftStats`,
agent/telemetry_stats.py), ``event`` (:class:`Event`).

**Receiving.** Every payload is untrusted. ``decode`` refuses with a
:class:`WireError` whose ``reason`` is a counter key, checked in this order: over
the size limit (``oversized``), not JSON (``not_json``), not an object or a schema
that is missing or not an integer or older (``schema``), a schema *newer* than this
code knows (``newer_schema``: the other side was upgraded first; the message is
refused, not guessed at), a ``device_id`` that is not the topic's
(``device_mismatch``), anything else (``invalid``, with the first field's problem).
Validation is strict (JSON ``true`` is not ``1``, ``"4"`` is not ``4``, no NaN or
infinity) and unknown keys are ignored, so a publisher may add optional fields
within a schema; free text (reasons, errors) is cut to ``MAX_TEXT``, not refused.

**Speed.** The fleet's ingest decodes every telemetry batch here: ``orjson`` parses,
pydantic-core checks: ``python -m bench fleet`` on the 2-core box stored 30,700
records/s through it, against 26,100 with the hand-written checks it replaced (a
micro-benchmark: 230 µs against 290-420 µs per 100-record batch). A batch's records
keep their ``data`` as parsed JSON values; the publisher embeds stored record JSON
without re-encoding it (``encode_telemetry``). Pure functions and immutable models: any thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Final, Literal, Self, TypeVar
from urllib.parse import urlsplit

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgefleet.core.errors import EdgefleetError
from edgefleet.core.names import check_name

SCHEMA: Final = 1  # the wire schema of every message below

# What one message may weigh, per topic leaf (the links drop anything over their own
# max_payload_bytes first). A desired for a few dozen models is a few KiB; telemetry
# batches are capped at 256 KiB by the agent (fleet.telemetry.batch_max_bytes).
MAX_BYTES: Final[Mapping[str, int]] = {
    "desired": 256 * 1024,
    "reported": 256 * 1024,
    "status": 4 * 1024,
    "telemetry": 1024 * 1024,
    "acks": 1024 * 1024,
    "events": 64 * 1024,
    "commands": 16 * 1024,
}
# The fleet's revisions count up by one per published document (fleet/db.py); 2^53 - 1
# is beyond any fleet's lifetime and still exact as a JSON number in every reader.
MAX_REVISION: Final = 2**53 - 1
MAX_COUNT: Final = 2**53 - 1  # counts: exact in a float and in SQLite
MAX_TEXT: Final = 2000  # reasons, errors: longer ones are cut, not refused
MAX_REASON_CHARS: Final = 500  # what the agent puts in a reason (one short line)
MAX_DESIRED_MODELS: Final = 256  # per desired document
MAX_REPORTED_MODELS: Final = 200  # per reported document
MAX_RECORDS: Final = 10_000  # per telemetry batch
MAX_RECORD_BYTES: Final = 64 * 1024  # one record's data, as JSON
MAX_ACK_IDS: Final = 10_000

# Bucket upper bounds ("le", inclusive) of the inference_stats histograms of schema 1.
# Histograms merge by adding counts, which needs the same buckets everywhere: other
# bounds are a new schema. Each histogram's counts have one more entry ("above").
LATENCY_BOUNDS_MS: Final[tuple[float, ...]] = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
CONFIDENCE_BOUNDS: Final[tuple[float, ...]] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
MAX_WINDOW_S: Final = 7 * 24 * 3600.0

ModelState = Literal["active", "downloading", "verifying", "activating", "failed", "unmanaged"]
SyncState = Literal["active", "downloading", "verifying", "activating", "failed"]
EVENT_KINDS: Final = (
    "activated",
    "activation_failed",
    "download_failed",
    "verify_failed",
    "rolled_back",
    "command_done",
    "command_failed",
)


class WireError(EdgefleetError, ValueError):
    """A payload this side refuses; ``reason`` is the counter key (module doc)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------- field types


def _cut(value: str) -> str:
    return value[:MAX_TEXT]


def _name(what: str) -> AfterValidator:
    return AfterValidator(lambda v: check_name(v, what))


def _lower(value: str) -> str:
    return value.lower()


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an absolute http(s) URL")
    return value


Text = Annotated[str, AfterValidator(_cut)]  # free text: cut, never refused
Str200 = Annotated[str, Field(min_length=1, max_length=200)]  # names as the fleet shows them
Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]  # record and event ids
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Revision = Annotated[int, Field(ge=0, le=MAX_REVISION)]
ModelName = Annotated[str, _name("model name")]
Version = Annotated[str, _name("version")]
Label = Annotated[str, _name("label")]


class _Wire(BaseModel):
    """Strict (JSON true is not 1, "4" is not 4, no NaN), unknown keys ignored, immutable."""

    model_config = ConfigDict(
        strict=True, extra="ignore", frozen=True, allow_inf_nan=False, populate_by_name=True
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON object this model is on the wire (plain values, wire key names)."""
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_wire())

    @classmethod
    def from_obj(cls, doc: Any) -> Self:
        """Validate a JSON value already parsed; ``WireError("invalid")`` when it is not one."""
        if not isinstance(doc, dict):
            raise WireError("invalid", "not a JSON object")
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            raise WireError("invalid", one_line(exc)) from None


class Message(_Wire):
    """A whole message: carries the schema version (checked by ``from_obj``)."""

    schema_: int = Field(default=SCHEMA, alias="schema")

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: int) -> int:
        if v != SCHEMA:
            raise ValueError(f"schema {v} is not {SCHEMA}")
        return v

    @classmethod
    def from_obj(cls, doc: Any, device_id: str | None = None) -> Self:
        """A parsed message, checked in the order of the module doc; ``device_id``: the
        topic's, which the message's own ``device_id`` must be."""
        if not isinstance(doc, dict):
            raise WireError("schema", "payload is not a JSON object")
        schema = doc.get("schema")
        if type(schema) is not int:
            raise WireError("schema", f"schema is {schema!r}, not {SCHEMA}")
        if schema > SCHEMA:
            raise WireError("newer_schema", f"schema {schema} is newer than this side's {SCHEMA}")
        if schema != SCHEMA:
            raise WireError("schema", f"schema is {schema}, not {SCHEMA}")
        if device_id is not None and doc.get("device_id") != device_id:
            raise WireError(
                "device_mismatch", f"device_id {doc.get('device_id')!r} is not {device_id!r}"
            )
        try:
            return cls.model_validate(doc)
        except ValidationError as exc:
            raise WireError("invalid", one_line(exc)) from None


M = TypeVar("M", bound=Message)


def decode(model: type[M], payload: bytes, *, max_bytes: int, device_id: str | None = None) -> M:
    """``payload`` as a ``model`` message, or ``WireError`` with the reason (module doc)."""
    if len(payload) > max_bytes:
        raise WireError("oversized", f"{len(payload)} bytes, over the {max_bytes} byte limit")
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise WireError("not_json", f"not JSON: {exc}") from None
    return model.from_obj(doc, device_id)


def one_line(exc: ValidationError) -> str:
    """The first problem of a validation error, with its field path, on one line."""
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {first['msg']}{more}"


# ------------------------------------------- shadow and traffic split (issue 11, 1-2)
# A shadow candidate runs beside the active version on a sampled share of live
# requests and answers nothing (agent/shadow.py); a split serves a canary version to a
# weighted share of requests (agent/split.py). Both are optional per desired model and
# carry their bundle like the active version does (the same url/sha256/size checks).

BundleUrl = Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(_http_url)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$"), AfterValidator(_lower)]
BundleSize = Annotated[int, Field(gt=0, le=2**53)]
Share = Annotated[float, Field(ge=0.0, le=1.0)]  # a probability: 0..1 inclusive


class DesiredShadow(_Wire):
    """``models.<m>.shadow``: the candidate to run in shadow on ``sample_rate`` of the
    requests (0: installed and loaded, never run; 1: every request)."""

    version: Version
    url: BundleUrl
    sha256: Sha256
    size: BundleSize
    sample_rate: Share


class DesiredSplit(_Wire):
    """``models.<m>.split``: serve ``version`` (the canary) to ``weight`` of the requests
    that name no version; sticky per routing key (docs/fleet.md)."""

    version: Version
    url: BundleUrl
    sha256: Sha256
    size: BundleSize
    weight: Share


ShadowState = Literal["downloading", "verifying", "ready", "failed"]


class ReportedShadow(_Wire):
    """``reported.models.<m>.shadow``: the shadow candidate's state on the device."""

    version: Str200
    state: ShadowState
    last_error: Text | None = Field(None, exclude_if=lambda v: v is None)


class ReportedSplit(_Wire):
    """``reported.models.<m>.split``: the split in force; ``source`` says whether the
    fleet's desired state or a local admin call (``PUT /v1/models/{m}/split``) set it;
    ``state`` is ``serving`` once the canary is loaded, else what the sync is doing."""

    version: Str200
    weight: Share
    source: Literal["fleet", "local"] = "fleet"
    state: Literal["downloading", "verifying", "serving", "failed"] = "serving"
    last_error: Text | None = Field(None, exclude_if=lambda v: v is None)


class ShadowStats(_Wire):
    """``shadow_stats`` record data: one (model, active version, candidate version) in
    one window (agent/shadow.py).

    ``sampled``: requests picked by ``sample_rate``; each then ends as exactly one of
    ``compared`` (both answered; ``agreed`` of them agree: same top-1 class for
    classifiers, for detectors the same box count with every box matched one-to-one at
    IoU >= 0.5 and the same class), ``errors`` (the candidate raised), ``dropped_queue``
    (the shadow queue was full) or ``dropped_budget`` (over the CPU budget), possibly
    in a later window than the one that sampled it (items in flight), so the outcomes
    are not checked against ``sampled``; checked: ``agreed <= compared`` and the sums'
    bounds. ``conf_delta_sum``/``conf_delta_sumsq``: the sum and sum
    of squares over compared items of (candidate top-1 confidence - active top-1
    confidence), each delta in [-1, 1]; ``*_latency_ms_sum``: the model time of the
    two versions, summed over the compared requests (a batch once; the candidate's
    compute against the active version's runner time, queue included; their ratio:
    the latency ratio). ``task``:
    ``classification``, ``detection`` or ``tensor`` (top-1 of the first output).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    version: str = Field(min_length=1, max_length=200)
    candidate: str = Field(min_length=1, max_length=200)
    task: Literal["classification", "detection", "tensor"]
    window_start: float = Field(ge=0.0, le=1e11)
    window_s: float = Field(ge=0.0, le=MAX_WINDOW_S)
    sampled: Count
    compared: Count
    agreed: Count
    errors: Count
    dropped_queue: Count
    dropped_budget: Count
    conf_delta_sum: float = Field(ge=-float(MAX_COUNT), le=float(MAX_COUNT))
    conf_delta_sumsq: float = Field(ge=0.0, le=float(MAX_COUNT))
    candidate_latency_ms_sum: float = Field(ge=0.0, le=1e15)
    active_latency_ms_sum: float = Field(ge=0.0, le=1e15)

    @model_validator(mode="after")
    def _totals(self) -> Self:
        if self.agreed > self.compared:
            raise ValueError("agreed must be at most compared")
        # Each delta is in [-1, 1] (float sums may overshoot by rounding only).
        slack = 1e-6 * max(1, self.compared)
        if abs(self.conf_delta_sum) > self.compared + slack:
            raise ValueError("|conf_delta_sum| must be at most compared")
        if self.conf_delta_sumsq > self.compared + slack:
            raise ValueError("conf_delta_sumsq must be at most compared")
        if self.compared == 0 and (
            self.candidate_latency_ms_sum or self.active_latency_ms_sum or self.conf_delta_sumsq
        ):
            raise ValueError("latency and confidence sums must be 0 when nothing was compared")
        return self


# ---------------------------------------------------- fallback policy (issue 11, 5)
# The fleet may set a model's cloud-fallback settings per device, group or all
# (fleet/policies.py), carried in ``models.<m>.fallback`` of ``desired``; the agent
# lays them over the bundle's defaults, under its own agent.yaml overrides
# (agent/cloud/policy.py), and reports what is in force and where each setting came
# from (``reported.models.<m>.fallback_effective`` / ``fallback_source``).

FALLBACK_MODES: Final = ("edge_only", "cloud_when_unsure", "edge_first_escalate")
CONFIDENCE_RULES: Final = ("top1", "margin", "entropy", "mean_box", "min_box")
FallbackMode = Literal["edge_only", "cloud_when_unsure", "edge_first_escalate"]
ConfidenceRule = Literal["top1", "margin", "entropy", "mean_box", "min_box"]
PolicySource = Literal["default", "bundle", "fleet", "local"]


class FleetFallback(_Wire):
    """``models.<m>.fallback``: the fleet's settings; every field optional (absent: the
    weaker layer's value stands), unknown keys refused (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid")

    mode: FallbackMode | None = Field(None, exclude_if=lambda v: v is None)
    confidence_rule: ConfidenceRule | None = Field(None, exclude_if=lambda v: v is None)
    threshold: Share | None = Field(None, exclude_if=lambda v: v is None)
    class_thresholds: dict[Annotated[str, Field(min_length=1, max_length=200)], Share] | None = (
        Field(None, max_length=1024, exclude_if=lambda v: v is None)
    )
    audit_rate: Share | None = Field(None, exclude_if=lambda v: v is None)

    def is_empty(self) -> bool:
        return not self.to_wire()


class FallbackEffective(_Wire):
    """``reported.models.<m>.fallback_effective``: the policy the active version runs."""

    mode: FallbackMode
    configured_mode: FallbackMode
    inactive: Text | None = None
    confidence_rule: ConfidenceRule
    threshold: Share
    class_thresholds: dict[str, Share] = Field(default_factory=dict, max_length=1024)
    audit_rate: Share


# ------------------------------------------------ input drift (issue 11, part 3)
# One ``drift_stats`` record per model version and drift window (agent/telemetry_stats.py):
# the live inputs and answers binned with the bundle's reference profile
# (core/drift.py, ``profile.json``). A bundle without a profile still sends its
# record, with null figures and ``drift_reason`` "no reference profile"; a window
# with too few items carries its counts over to the next one and says so.

Psi = Annotated[float, Field(ge=0.0, le=1e6)]  # PSI: 0 = no drift, > 0.2 a real shift


class DriftStats(_Wire):
    """``drift_stats`` record data: one model version's drift over one window.

    ``psi_max``/``psi_mean``: over the input features; ``psi_output``: the class
    distribution (classifiers) or the confidence histogram (detectors); ``js_*``: the
    Jensen–Shannon divergence in bits. Null figures need a ``drift_reason``; figures
    need ``samples`` > 0, ``psi_mean <= psi_max``, and no reason (docs/fleet.md).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    version: str = Field(min_length=1, max_length=200)
    window_start: float = Field(ge=0.0, le=1e11)
    window_s: float = Field(ge=0.0, le=MAX_WINDOW_S)
    samples: Count
    dropped: Count = 0  # items not binned: the agent's drift thread was behind
    features: Count = 0
    psi_max: Psi | None = None
    psi_mean: Psi | None = None
    psi_output: Psi | None = None
    js_max: Share | None = None
    js_output: Share | None = None
    worst_feature: Annotated[str, Field(max_length=100)] | None = None
    drift_reason: Annotated[str, Field(max_length=200)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        figures = (self.psi_max, self.psi_mean, self.psi_output)
        if all(f is None for f in figures):
            if not self.drift_reason:
                raise ValueError("drift_reason is required when every drift figure is null")
            return self
        if self.drift_reason:
            raise ValueError("drift_reason must be null when there are drift figures")
        if self.samples == 0:
            raise ValueError("drift figures need samples > 0")
        if (self.psi_max is None) != (self.psi_mean is None):
            raise ValueError("psi_max and psi_mean are both set or both null")
        if self.psi_max is not None and self.psi_mean is not None:
            if self.psi_mean > self.psi_max + 1e-6:
                raise ValueError("psi_mean must be at most psi_max")
            if self.features == 0:
                raise ValueError("input drift figures need features > 0")
        return self


# --------------------------------------------------------------- fleet → device


class DesiredModel(_Wire):
    """One model of a ``desired`` document: the version to run and where to get it."""

    version: Version
    url: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(_http_url)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$"), AfterValidator(_lower)]
    size: int = Field(gt=0, le=2**53)
    # Omitted on the wire when empty / absent (what fleets have always sent).
    labels: dict[Label, Label] = Field(
        default_factory=dict, max_length=64, exclude_if=lambda v: not v
    )
    rollout: str | None = Field(None, max_length=128, exclude_if=lambda v: v is None)
    # Issue 11 (shadow and split, section above): absent unless the fleet sets them.
    shadow: DesiredShadow | None = Field(None, exclude_if=lambda v: v is None)
    split: DesiredSplit | None = Field(None, exclude_if=lambda v: v is None)
    # Issue 11, part 5 (fallback policy section above): absent unless the fleet sets one.
    fallback: FleetFallback | None = Field(None, exclude_if=lambda v: v is None)

    @model_validator(mode="after")
    def _candidates(self) -> Self:
        if self.shadow is not None and self.shadow.version == self.version:
            raise ValueError("shadow.version must differ from version")
        if self.split is not None and self.split.version == self.version:
            raise ValueError("split.version must differ from version")
        return self


class Desired(Message):
    """The ``desired`` document: what one device should run (docs/fleet.md)."""

    device_id: str = Field(min_length=1, max_length=256)
    revision: Revision
    issued_at: float | None = None
    models: dict[ModelName, DesiredModel] = Field(max_length=MAX_DESIRED_MODELS)


class Command(Message):
    """A ``commands`` message: ``resync`` (with the fleet's current ``revision``) or
    ``rollback`` (with ``model``)."""

    id: str = Field(min_length=1, max_length=128)
    command: str = Field(min_length=1, max_length=64)
    model: str | None = Field(None, max_length=64, exclude_if=lambda v: v is None)
    revision: Revision | None = Field(None, exclude_if=lambda v: v is None)


class Ack(Message):
    """The fleet stored these telemetry records (``acks``; docs/mqtt.md)."""

    batch_id: str = Field(min_length=1, max_length=64)
    record_ids: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, max_length=MAX_ACK_IDS
    )


# --------------------------------------------------------------- device → fleet


class Status(Message):
    """The retained ``status``: the birth message, a clean stop, or the Last Will."""

    state: Literal["online", "offline"]
    device_id: str = Field(min_length=1, max_length=256)
    # "" (an agent that does not know its version) is sent as is and shown as none.
    agent_version: str | None = Field(None, max_length=100, exclude_if=lambda v: v is None)
    protocol: str | None = Field(None, min_length=1, max_length=10, exclude_if=lambda v: v is None)
    reason: Text | None = Field(None, exclude_if=lambda v: v is None)
    # The device's wall clock; absent from the Will (the broker sends it later).
    at: float | None = Field(None, exclude_if=lambda v: v is None)


class ReportedModel(_Wire):
    """One model in ``reported``: what runs, what the sync is doing, why it failed."""

    active: Str200 | None = None
    previous: Str200 | None = None
    desired: Str200 | None = None
    state: ModelState
    rollout: Str200 | None = None
    provider: Str200 | None = None
    last_error: Text | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    # Issue 11 (shadow and split): absent when the model has none.
    shadow: ReportedShadow | None = Field(None, exclude_if=lambda v: v is None)
    split: ReportedSplit | None = Field(None, exclude_if=lambda v: v is None)
    # Issue 11, part 5: the fallback policy in force and each setting's source.
    fallback_effective: FallbackEffective | None = Field(None, exclude_if=lambda v: v is None)
    fallback_source: dict[Annotated[str, Field(max_length=64)], PolicySource] | None = Field(
        None, max_length=32, exclude_if=lambda v: v is None
    )


class Reported(Message):
    """The retained ``reported`` document (docs/fleet.md)."""

    device_id: str = Field(min_length=1, max_length=256)
    revision: Revision
    agent_version: str | None = Field(None, max_length=100)
    at: float | None = None
    accelerators: (
        dict[str, Annotated[list[Annotated[str, Field(max_length=100)]], Field(max_length=50)]]
        | None
    ) = Field(None, max_length=20)
    models: dict[Str200, ReportedModel] = Field(max_length=MAX_REPORTED_MODELS)


class Event(Message):
    """An ``events`` message, also the data of an ``event`` telemetry record."""

    id: Hex32
    device_id: str = Field(min_length=1, max_length=256)
    at: float
    kind: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    model: Str200 | None = None
    version: Str200 | None = None
    previous: Str200 | None = None
    revision: Revision | None = None
    rollout: Str200 | None = None
    reason: Text | None = None
    command_id: Str200 | None = Field(None, exclude_if=lambda v: v is None)


class OutboxCounts(_Wire):
    """A batch's word on the device's outbox: what it dropped when full, what waits."""

    dropped_low: Count = 0
    dropped_high: Count = 0
    waiting: Count = 0


class Record(_Wire):
    """One outbox record in a batch. ``data`` is the producer's JSON value (its kind's
    model below); the batch is valid whatever the data, the kind's model is checked
    separately (a bad record is stored raw, not unpacked: fleet/ingest.py)."""

    id: Hex32
    seq: int = Field(ge=0, le=2**63 - 1)
    kind: str = Field(min_length=1, max_length=64)
    priority: int = Field(ge=0, le=2**63 - 1)
    ts: float
    data: Any


class TelemetryBatch(Message):
    """A ``telemetry`` message: one batch of outbox records (docs/mqtt.md)."""

    device_id: str = Field(min_length=1, max_length=256)
    batch_id: str = Field(min_length=1, max_length=64)
    sent_at: float | None = None
    outbox: OutboxCounts | None = None
    records: list[Record] = Field(min_length=1, max_length=MAX_RECORDS)


def encode_telemetry(
    device_id: str,
    batch_id: str,
    sent_at: float,
    outbox: OutboxCounts,
    records: Iterable[tuple[str, int, str, int, float, bytes]],
) -> bytes:
    """A :class:`TelemetryBatch` message from stored records ``(id, seq, kind, priority,
    ts, data JSON)``: the data is embedded as it was stored, not parsed and encoded
    again (the agent's sender, once per batch of up to 500 records). The keys are
    those of the models above; tests/core/test_protocol.py decodes the result."""
    return orjson.dumps(
        {
            "schema": SCHEMA,
            "device_id": device_id,
            "batch_id": batch_id,
            "sent_at": sent_at,
            "outbox": outbox.to_wire(),
            "records": [
                {
                    "id": rid,
                    "seq": seq,
                    "kind": kind,
                    "priority": priority,
                    "ts": ts,
                    "data": orjson.Fragment(data),
                }
                for rid, seq, kind, priority, ts, data in records
            ],
        }
    )


# ------------------------------------------------------- telemetry record kinds


class Histogram(_Wire):
    """Non-cumulative bucket counts; ``counts`` has one more entry than ``le``."""

    model_config = ConfigDict(extra="forbid")

    le: list[float]
    counts: list[Count]


def _check_histogram(h: Histogram, what: str, bounds: tuple[float, ...]) -> None:
    if len(h.le) != len(bounds) or any(b != want for b, want in zip(h.le, bounds, strict=True)):
        raise ValueError(f"{what}.le must be {list(bounds)}")
    if len(h.counts) != len(bounds) + 1:
        raise ValueError(f"{what}.counts must be a list of {len(bounds) + 1} integers")


Tally = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=64)], Count], Field(max_length=32)
]


class InferenceStats(_Wire):
    """``inference_stats`` record data: one model version's requests in one window.

    Every field required, no others (an extra field would be a new schema), bounds
    equal to schema 1's, and the totals consistent: ``errors <= count``, latency
    counts add up to ``count``, sources to ``count - errors``, confidence and
    fallback counts to at most ``count - errors`` (docs/fleet.md).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200)
    version: str = Field(min_length=1, max_length=200)
    window_start: float = Field(ge=0.0, le=1e11)
    window_s: float = Field(ge=0.0, le=MAX_WINDOW_S)
    count: Count
    errors: Count
    latency_ms: Histogram
    confidence: Histogram
    sources: Tally
    fallback: Tally

    @model_validator(mode="after")
    def _totals(self) -> Self:
        _check_histogram(self.latency_ms, "latency_ms", LATENCY_BOUNDS_MS)
        _check_histogram(self.confidence, "confidence", CONFIDENCE_BOUNDS)
        if self.errors > self.count:
            raise ValueError("errors must be at most count")
        answered = self.count - self.errors
        if sum(self.latency_ms.counts) != self.count:
            raise ValueError("latency_ms.counts must add up to count")
        if sum(self.sources.values()) != answered:
            raise ValueError("sources must add up to count - errors")
        if sum(self.confidence.counts) > answered:
            raise ValueError("confidence.counts must add up to at most count - errors")
        if sum(self.fallback.values()) > answered:
            raise ValueError("fallback must add up to at most count - errors")
        return self

    def to_wire(self) -> dict[str, Any]:
        # The canonical bounds (as the agent writes them: 1, not 1.0).
        doc = super().to_wire()
        doc["latency_ms"]["le"] = list(LATENCY_BOUNDS_MS)
        doc["confidence"]["le"] = list(CONFIDENCE_BOUNDS)
        return doc


Label64 = Annotated[str, Field(max_length=64)]


class FallbackItems(_Wire):
    """Answered items by model version, source (edge, cloud) and reason."""

    model: Label64
    version: Label64
    source: Label64
    reason: Label64
    n: Count


class FallbackCalls(_Wire):
    """Cloud calls by model version, purpose (unsure, escalated, audit, retry), outcome."""

    model: Label64
    version: Label64
    kind: Label64
    outcome: Label64
    n: Count


class FallbackAgreement(_Wire):
    """Items both models answered, by kind and whether their top-1 classes agree."""

    model: Label64
    version: Label64
    kind: Label64
    agree: Label64
    n: Count


class FallbackStats(Message):
    """``fallback_stats`` record data: what the cloud fallback did since the last
    report (agent/cloud/telemetry.py): counts that grew, breakers, offline flag."""

    # Only what grew is sent: an empty list is left out.
    items: list[FallbackItems] = Field(
        default_factory=list, max_length=10_000, exclude_if=lambda v: not v
    )
    calls: list[FallbackCalls] = Field(
        default_factory=list, max_length=10_000, exclude_if=lambda v: not v
    )
    agreement: list[FallbackAgreement] = Field(
        default_factory=list, max_length=10_000, exclude_if=lambda v: not v
    )
    breakers: dict[str, Label64] = Field(default_factory=dict, max_length=1024)
    offline: bool = False
    hard_examples: dict[Label64, Count] = Field(default_factory=dict, max_length=32)


# Record kinds and the model of their data.
RECORD_KINDS: Final[Mapping[str, type[_Wire]]] = {
    "inference_stats": InferenceStats,
    "fallback_stats": FallbackStats,
    "shadow_stats": ShadowStats,
    "drift_stats": DriftStats,
    "event": Event,
}

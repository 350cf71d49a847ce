"""Typed agent configuration, loaded from YAML.

Every section forbids unknown keys (a typo is an error, not a silent default),
errors name the key path and the YAML line it came from, a key given twice is an
error, and every path field is a ``ConfigPath``: relative to the config file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgefleet.agent.cloud.config import FallbackConfig
from edgefleet.core.backends.config import (  # noqa: F401 (the agent's runtime section)
    BackendConfig,
    ExternalDelegate,
    LiteRTConfig,
    OnnxConfig,
)
from edgefleet.core.config import ConfigPath, Section, TrustConfig, parse_yaml_model
from edgefleet.core.errors import ConfigError
from edgefleet.core.mqtt.config import MqttConnectionConfig
from edgefleet.core.names import check_device_id

CLOUD_PORT = 8490  # the cloud profile's default port (DESIGN.md)


class ServerConfig(Section):
    # uvloop cuts the event loop's CPU per request by roughly a quarter (bench serving);
    # auto uses it where installed (Linux/macOS wheels), the stdlib loop elsewhere.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    host: str = "127.0.0.1"
    port: int = Field(8470, ge=0, le=65535)
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    # Requests waiting for one model version beyond this get 503 + Retry-After.
    max_queue_per_model: int = Field(256, gt=0)
    auth_token: str | None = Field(None, description="bearer token required on every call")
    auth_token_file: ConfigPath | None = Field(
        None, description="file holding auth_token (preferred)"
    )
    # Browser pages on these origins may call the API (CORS), including requests that
    # change state; a request from any other page's Origin is refused unless it only
    # reads (GET/HEAD). "*": any page (never on a store PC). docs/threat-model.md.
    cors_origins: list[str] = Field(default_factory=list)
    # Host header names served besides localhost, IP literals and server.host: a DNS
    # name the box is reached by. Other names are refused (DNS rebinding), except on an
    # agent with a bearer token and no list here (a page cannot attach the token).
    allowed_hosts: list[str] = Field(default_factory=list, description='"*": any Host')
    # Slow or stalled clients (docs/threat-model.md): both timeouts count silence, not
    # the whole transfer, so a slow link still uploads a big bundle.
    header_timeout_s: float = Field(10.0, gt=0, description="longest a request head may take")
    body_timeout_s: float = Field(30.0, gt=0, description="longest silence inside a body")
    # At the cap, a new connection evicts the one idle longest on an unfinished request;
    # a few more slots above it serve only /v2/health/* (see agent/server/connections.py).
    max_connections: int = Field(512, ge=1, description="open client connections at most")
    # Decoding an image takes 2-12 bytes per pixel (format and colour dependent); an
    # image whose header announces more than the budget's share of one decode is refused
    # with 413 before a pixel is decoded. The default fits a 1 GiB MemoryMax unit.
    image_decode_memory_mb: int = Field(256, ge=8, description="memory of all image decodes")
    image_decode_concurrency: int = Field(2, ge=1, description="images decoded at once")
    # HTTPS when both are set (the cloud profile on a routable address needs it).
    tls_cert_file: ConfigPath | None = Field(None, description="PEM certificate chain")
    tls_key_file: ConfigPath | None = Field(None, description="PEM private key")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, v: list[str]) -> list[str]:
        # Host headers compare case-insensitively, without a trailing dot or brackets.
        names = [h.strip().lower().rstrip(".").strip("[]") for h in v]
        bad = [h for h in names if not h or "/" in h or " " in h]
        if bad:
            raise ValueError(f"allowed_hosts entries must be host names, got {bad}")
        return names

    @model_validator(mode="after")
    def _pairs(self) -> ServerConfig:
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("give auth_token or auth_token_file, not both")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.auth_token_file is not None:
            # Read at load time: a server must never start without the auth it was
            # configured with (the cloud client's token file, in contrast, is read
            # leniently: see agent/cloud/fallback.py).
            try:
                token = self.auth_token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read auth_token_file: {exc.strerror}") from exc
            if not token:
                raise ValueError(f"auth_token_file {self.auth_token_file} is empty")
            self.auth_token = token
        return self


class StoreConfig(Section):
    path: ConfigPath = Path("/var/lib/edgefleet/models")
    keep_versions: int = Field(3, ge=1, description="installed versions kept per model")
    max_member_bytes: int = Field(512 * 1024 * 1024, gt=0)


def _batch_size_problem(preferred: list[int], max_batch_size: int) -> str | None:
    bad = [n for n in preferred if not 1 <= n <= max_batch_size]
    if bad:
        return f"preferred_batch_sizes {bad} must lie in 1..max_batch_size ({max_batch_size})"
    return None


class BatchingConfig(Section):
    """Dynamic batching of one model version's requests (``agent/batcher.py``).

    On by default with no delay: requests that arrived while the model was busy run
    together, a lone request runs at once (no added latency), and a model is batched
    only after the agent checked at load that its batched answers equal its
    one-by-one answers (otherwise, and for a fixed batch dimension, one by one).
    """

    enabled: bool = True
    max_batch_size: int = Field(8, ge=1, description="rows per execution, summed over requests")
    preferred_batch_sizes: list[int] = Field(
        default_factory=list, description="with a delay: sent as soon as one of these forms"
    )
    max_queue_delay_us: int = Field(
        0, ge=0, le=10_000_000, description="longest the oldest request waits for company"
    )
    instances: int = Field(
        0, ge=0, description="executions at once per version; 0: onnx.sessions/litert.interpreters"
    )
    queue_timeout_ms: int = Field(0, ge=0, description="503 for a request not started by then")

    @model_validator(mode="after")
    def _sizes(self) -> BatchingConfig:
        problem = _batch_size_problem(self.preferred_batch_sizes, self.max_batch_size)
        if problem:
            raise ValueError(problem)
        return self


class BatchingOverride(Section):
    """A model's own batching: only the keys given replace ``runtime.batching``'s."""

    enabled: bool | None = None
    max_batch_size: int | None = Field(None, ge=1)
    preferred_batch_sizes: list[int] | None = None
    max_queue_delay_us: int | None = Field(None, ge=0, le=10_000_000)
    instances: int | None = Field(None, ge=0)
    queue_timeout_ms: int | None = Field(None, ge=0)


class ModelRuntimeConfig(Section):
    batching: BatchingOverride = Field(default_factory=BatchingOverride)


class ShadowConfig(Section):
    """The shadow runner (agent/shadow.py): what a shadow candidate may take from the box."""

    queue_size: int = Field(64, ge=1, description="items waiting; past it new ones are dropped")
    cpu_budget: float = Field(
        0.25, gt=0, le=64, description="share of one core the shadow may use (rolling window)"
    )
    budget_window_s: float = Field(10.0, gt=0, le=3600)
    hard_examples_per_minute: int = Field(
        60, ge=0, description="disagreements kept as hard examples, at most"
    )


class RuntimeConfig(BackendConfig):
    executor_threads: int = Field(0, ge=0, description="inference threads; 0: one per core")
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    # Keyed by model name, not by bundle, so it also covers versions the fleet installs.
    per_model: dict[str, ModelRuntimeConfig] = Field(default_factory=dict)

    def batching_for(self, model: str) -> BatchingConfig:
        """``runtime.batching`` with ``per_model.<model>.batching`` laid over it."""
        own = self.per_model.get(model)
        if own is None:
            return self.batching
        merged = self.batching.model_dump() | own.batching.model_dump(exclude_none=True)
        return BatchingConfig.model_construct(**merged)

    @model_validator(mode="after")
    def _per_model_batching(self) -> RuntimeConfig:
        # A model's override alone cannot be checked: its max may come from the global.
        for name in self.per_model:
            b = self.batching_for(name)
            problem = _batch_size_problem(b.preferred_batch_sizes, b.max_batch_size)
            if problem:
                raise ValueError(f"per_model.{name}.batching: {problem}")
        return self


class ModelEntry(Section):
    """A bundle the agent installs at start when its store does not have it yet."""

    bundle: ConfigPath
    labels: list[str] = Field(default_factory=list, description="e.g. [stable]")
    activate: bool = True


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # json: one JSON object per line on stderr, for log shippers (core/logs.py).
    format: Literal["text", "json"] = "text"


class FleetOutboxConfig(Section):
    path: ConfigPath = Path("/var/lib/edgefleet/outbox.sqlite")
    # Cap on what waits for the fleet (payload bytes + per-record overhead); past it the
    # oldest low-priority records go first (see agent/outbox.py).
    max_bytes: int = Field(64 * 1024 * 1024, gt=0)


class FleetTelemetryConfig(Section):
    flush_interval_s: float = Field(10.0, gt=0, description="longest a record waits to be sent")
    batch_max_records: int = Field(500, gt=0)
    batch_max_bytes: int = Field(256 * 1024, gt=0)
    ack_timeout_s: float = Field(30.0, gt=0, description="resend a batch the fleet did not ack")
    max_in_flight: int = Field(4, gt=0, description="batches awaiting the fleet's ack at once")
    # Per-model inference aggregates (agent/telemetry_stats.py): one record per model
    # version per window, so the outbox grows with the models, not with the traffic.
    stats_interval_s: float = Field(60.0, gt=0, description="window of inference_stats records")


class FleetSyncConfig(Section):
    """The desired-state sync (``agent/sync.py``) and its downloads (``agent/download.py``)."""

    # None: <store.path>/.downloads (the store skips dot-directories). Partial downloads
    # (``*.part``) live here across restarts, so a download resumes where it stopped.
    download_dir: ConfigPath | None = Field(None, description="None: <store.path>/.downloads")
    # None: <store.path>/.sync-state.json: the last processed revision, per-model results.
    state_file: ConfigPath | None = Field(None, description="None: <store.path>/.sync-state.json")
    max_bundle_bytes: int = Field(1024 * 1024 * 1024, gt=0, description="larger are refused")
    # Per request: connecting, and the longest wait for the next bytes (not the whole
    # transfer: a slow store line may take minutes for a big bundle).
    download_timeout_s: float = Field(30.0, gt=0)
    # Transient failures (connection refused/reset, timeouts, 5xx) are retried with a
    # jittered exponential backoff between these; an attempt that got bytes resets it.
    retry_min_s: float = Field(2.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    download_attempts: int = Field(8, ge=1, description="attempts without progress, then failed")
    # An https fleet whose certificate comes from the operator's own CA (written by
    # `edge-agent enroll --ca-file`); None: the system's trust store.
    ca_file: ConfigPath | None = Field(None, description="PEM CA bundle for https bundle URLs")
    # The fleet this device enrolled with (written by `edge-agent enroll`): the only
    # origin bundle downloads send the device credentials to (agent/download.py,
    # CredentialScope). None (configs from before): the broker's host, https only.
    fleet_url: str | None = Field(None, description="enrolled fleet URL; gets the credentials")

    @field_validator("fleet_url")
    @classmethod
    def _fleet_url(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("fleet_url must be an absolute http(s) URL")
        return v

    @model_validator(mode="after")
    def _retry_bounds(self) -> FleetSyncConfig:
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s must be >= retry_min_s")
        return self


class FleetConfig(MqttConnectionConfig):
    """The device's MQTT link to the fleet. Absent: the agent runs standalone (offline first).

    The broker connection (host, port, tls, login, timers) is the core's
    ``MqttConnectionConfig``; ``client_id`` defaults to the ``device_id``. Added here: the
    outbox, the telemetry sender and the desired-state sync.
    """

    outbox: FleetOutboxConfig = Field(default_factory=FleetOutboxConfig)
    telemetry: FleetTelemetryConfig = Field(default_factory=FleetTelemetryConfig)
    sync: FleetSyncConfig = Field(default_factory=FleetSyncConfig)


class AgentConfig(Section):
    profile: Literal["edge", "cloud"] = "edge"
    device_id: str | None = None
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    models: list[ModelEntry] = Field(default_factory=list)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    fleet: FleetConfig | None = Field(None, description="None: no fleet link")
    fallback: FallbackConfig = Field(default_factory=FallbackConfig)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str | None) -> str | None:
        return None if v is None else check_device_id(v)  # the fleet's rule (core/names.py)

    @model_validator(mode="after")
    def _fleet_needs_device_id(self) -> AgentConfig:
        if self.fleet is not None and self.device_id is None:
            raise ValueError("the fleet section needs device_id (the store's id in the fleet)")
        return self

    @model_validator(mode="after")
    def _cloud_profile(self) -> AgentConfig:
        """The cloud profile: a routable bind on 8490, a token always, no fleet, no cloud."""
        if self.profile != "cloud":
            return self
        given = self.server.model_fields_set
        if "host" not in given:
            self.server.host = "0.0.0.0"
        if "port" not in given:
            self.server.port = CLOUD_PORT
        if not self.server.auth_token:
            raise ValueError(
                "profile cloud needs server.auth_token or server.auth_token_file:"
                " the cloud endpoint never serves without a bearer token"
            )
        if self.fleet is not None:
            raise ValueError("profile cloud has no fleet link: remove the fleet section")
        if self.fallback.cloud.url is not None:
            raise ValueError(
                "profile cloud is the end of the line: fallback.cloud.url must be unset"
            )
        return self


def parse_config(text: str, source: str = "<config>", base: Path | None = None) -> AgentConfig:
    """Validate config ``text``; relative paths are made absolute against ``base``
    (the config file's directory), or kept as written without one."""
    return parse_yaml_model(AgentConfig, text, source, base)


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    return parse_config(text, str(path), base=path.resolve().parent)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)

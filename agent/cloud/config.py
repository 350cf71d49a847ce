"""The ``fallback:`` section of the agent configuration.

Precedence for one model's policy, weakest first: built-in defaults, the bundle's
``fallback``/``confidence`` defaults (the data scientist's calibrated choice),
``fallback.defaults`` (this box's operator, for every model), then
``fallback.models[<name>]``. Every override field is optional: ``null`` keeps what
the weaker layer said. The fleet will push the same structure later.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from edgefleet.core.config import ConfigPath, Section

Mode = Literal["edge_only", "cloud_when_unsure", "edge_first_escalate"]
Rule = Literal["top1", "margin", "entropy", "mean_box", "min_box"]


class CloudEndpointConfig(Section):
    """Where the cloud model lives: any Open Inference Protocol server."""

    url: str | None = Field(
        None, description="http(s)://host:port[/prefix]; unset: no cloud, every model edge_only"
    )
    token: str | None = Field(None, description="bearer token sent as Authorization")
    token_file: ConfigPath | None = Field(None, description="file holding the token (preferred)")
    ca_file: ConfigPath | None = Field(None, description="PEM CA bundle for a private cloud CA")
    timeout_ms: int = Field(300, gt=0, le=600_000, description="per call, connect included")
    max_connections: int = Field(8, ge=1, description="pooled keep-alive connections")
    keepalive_s: float = Field(30.0, gt=0)
    max_response_bytes: int = Field(64 * 1024 * 1024, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return v.rstrip("/")


class BreakerConfig(Section):
    """Stop calling a failing cloud; probe again after a growing back-off."""

    failures: int = Field(3, ge=1, description="consecutive failures or timeouts that open it")
    backoff_ms: int = Field(1000, gt=0, description="first probe this long after opening")
    max_backoff_ms: int = Field(60_000, gt=0, description="back-off doubles up to this")
    # Thousands of boxes losing the same cloud must not all probe in the same second.
    jitter: float = Field(0.2, ge=0.0, le=1.0, description="back-off varies by up to this share")


class ModelFallback(Section):
    """Overrides for one model (or, under ``defaults``, for all). ``null``: keep the bundle's."""

    mode: Mode | None = None
    confidence_rule: Rule | None = None
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    class_thresholds: dict[str, float] | None = Field(
        None, description="label -> threshold, for answers whose top-1 is that label"
    )
    cloud_model: str | None = None
    cloud_version: str | None = Field(None, description="a version or label on the cloud")
    audit_rate: float | None = Field(None, ge=0.0, le=1.0)
    max_calls_per_minute: int | None = Field(None, ge=0, description="0: never call the cloud")
    max_in_flight: int | None = Field(None, ge=1)
    timeout_ms: int | None = Field(None, gt=0, le=600_000)

    @field_validator("class_thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for label, t in (v or {}).items():
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"threshold for {label!r} must be between 0 and 1")
        return v


class HardExampleUploadConfig(Section):
    """Kept cases to the fleet (agent/cloud/hard_example_upload.py): with a ``fleet``
    section only, over HTTPS with the device credentials, to the enrolled fleet only."""

    enabled: bool = True
    max_bytes_per_s: int = Field(
        32 * 1024, gt=0, description="bandwidth budget: upload bodies per second, on average"
    )
    window_s: float = Field(1.0, gt=0, le=3600, description="the budget is kept per window")
    interval_s: float = Field(10.0, gt=0, description="look for new cases this often when idle")
    batch: int = Field(32, ge=1, le=1000, description="cases read from the store per round")
    timeout_s: float = Field(60.0, gt=0, description="per upload request")
    max_backoff_s: float = Field(300.0, gt=0, description="a fleet down or full: retry after")


class HardExamplesConfig(Section):
    """Cases that went, or should have gone, to the cloud, kept for retraining."""

    enabled: bool = True
    path: ConfigPath | None = Field(
        None, description="default: hard-examples.sqlite beside the store"
    )
    sample_rate: float = Field(
        1.0, ge=0.0, le=1.0, description="share of answered cases kept (disagreements always)"
    )
    max_bytes: int = Field(64 * 1024 * 1024, gt=0, description="oldest rows go first past this")
    max_rows: int = Field(20_000, gt=0)
    max_image_bytes: int = Field(1024 * 1024, ge=0, description="larger images kept as tensors")
    retry_interval_s: float = Field(30.0, gt=0)
    retry_batch: int = Field(8, ge=1, description="cases retried per round")
    retention_s: float = Field(24 * 3600.0, gt=0, description="failed cases retried this long")
    max_attempts: int = Field(10, ge=1)
    upload: HardExampleUploadConfig = Field(default_factory=HardExampleUploadConfig)


class FallbackConfig(Section):
    # With a fleet link, counts since the last report go to telemetry this often.
    telemetry_interval_s: float = Field(60.0, gt=0)
    cloud: CloudEndpointConfig = Field(default_factory=CloudEndpointConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    defaults: ModelFallback = Field(default_factory=ModelFallback)
    models: dict[str, ModelFallback] = Field(default_factory=dict)
    hard_examples: HardExamplesConfig = Field(default_factory=HardExamplesConfig)

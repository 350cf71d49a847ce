"""Typed agent configuration, loaded from YAML.

Every section forbids unknown keys (a typo is an error, not a silent default), and
errors name the key path and the YAML line it came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8470, ge=0, le=65535)
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0)
    # Requests waiting for one model version beyond this get 503 + Retry-After.
    max_queue_per_model: int = Field(256, gt=0)
    auth_token: str | None = Field(None, description="bearer token required on every call")
    cors_origins: list[str] = Field(default_factory=list)


class StoreConfig(_Section):
    path: Path = Path("/var/lib/edgefleet/models")
    keep_versions: int = Field(3, ge=1, description="installed versions kept per model")
    max_member_bytes: int = Field(512 * 1024 * 1024, gt=0)


class TrustConfig(_Section):
    public_keys: list[Path] = Field(
        default_factory=list, description="PEM files of the Ed25519 keys bundles may be signed by"
    )
    allow_unsigned: bool = Field(False, description="development only; logged loudly at start")


class OnnxConfig(_Section):
    type: Literal["onnx"] = "onnx"
    # Tried in order; CPUExecutionProvider is always appended as the last resort.
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    provider_options: dict[str, dict[str, str]] = Field(default_factory=dict)
    intra_op_threads: int = Field(0, ge=0, description="0: ONNX Runtime picks (one per core)")
    inter_op_threads: int = Field(1, ge=0)
    # ONNX Runtime's pool threads spin-wait after each run by default: fine on a
    # server, but on a 2-4 core store PC it burns a core the event loop, the other
    # models and the store's own apps need. On only for sustained heavy load.
    allow_spinning: bool = False
    sessions: int = Field(1, ge=1, description="concurrent inferences per model version")


class ExternalDelegate(_Section):
    library: Path
    options: dict[str, str] = Field(default_factory=dict)


class LiteRTConfig(_Section):
    type: Literal["litert"] = "litert"
    num_threads: int = Field(0, ge=0, description="0: one per core")
    xnnpack: bool = True
    # Tried in order (e.g. an Edge TPU or GPU delegate); the CPU is the last resort.
    delegates: list[ExternalDelegate] = Field(default_factory=list)
    interpreters: int = Field(1, ge=1, description="interpreters per model version")


class RuntimeConfig(_Section):
    executor_threads: int = Field(0, ge=0, description="inference threads; 0: one per core")
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    litert: LiteRTConfig = Field(default_factory=LiteRTConfig)


class ModelEntry(_Section):
    """A bundle the agent installs at start when its store does not have it yet."""

    bundle: Path
    labels: list[str] = Field(default_factory=list, description="e.g. [stable]")
    activate: bool = True


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class AgentConfig(_Section):
    profile: Literal["edge", "cloud"] = "edge"
    device_id: str | None = None
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    models: list[ModelEntry] = Field(default_factory=list)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str | None) -> str | None:
        if v is not None and ("/" in v or "+" in v or "#" in v or not v):
            raise ValueError("device_id may not contain '/', '+' or '#'")
        return v


PathKey = tuple[str | int, ...]
Lines = dict[PathKey, int]


def _node_lines(node: yaml.Node, path: PathKey, out: Lines) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            out[(*path, k)] = key.start_mark.line + 1
            _node_lines(value, (*path, k), out)
            out[(*path, k)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, (*path, i), out)


def _resolve_paths(raw: Any, base: Path) -> None:
    """Relative paths in a config file are relative to that file, not to the cwd."""
    if not isinstance(raw, dict):
        return
    store = raw.get("store")
    if isinstance(store, dict) and isinstance(store.get("path"), str):
        store["path"] = str(base / store["path"])
    trust = raw.get("trust")
    if isinstance(trust, dict) and isinstance(trust.get("public_keys"), list):
        trust["public_keys"] = [
            str(base / k) if isinstance(k, str) else k for k in trust["public_keys"]
        ]
    for m in raw.get("models") or []:
        if isinstance(m, dict) and isinstance(m.get("bundle"), str):
            m["bundle"] = str(base / m["bundle"])
    runtime = raw.get("runtime")
    litert = runtime.get("litert") if isinstance(runtime, dict) else None
    if isinstance(litert, dict):
        for d in litert.get("delegates") or []:
            # A bare name (libedgetpu.so.1) is for the dynamic loader to find.
            if isinstance(d, dict) and isinstance(d.get("library"), str) and "/" in d["library"]:
                d["library"] = str(base / d["library"])


def parse_config(text: str, source: str = "<config>", base: Path | None = None) -> AgentConfig:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: YAML syntax error at {where}: {problem}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    lines: Lines = {}
    if node is not None:
        _node_lines(node, (), lines)
    if base is not None:
        _resolve_paths(raw, base)
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            # The deepest located ancestor: a missing key has no line of its own.
            line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
            key = ".".join(str(p) for p in loc) or "(root)"
            at = f" (line {line})" if line is not None else ""
            problems.append(f"{key}{at}: {err['msg']}")
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(problems)) from exc


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    return parse_config(text, str(path), base=path.resolve().parent)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)

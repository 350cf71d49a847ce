"""Runtime settings of the model backends (ONNX Runtime, LiteRT).

The agent's ``runtime:`` section extends :class:`BackendConfig` with its executor and
batching; the converters use the defaults to measure and self-test a model exactly as
the agent will run it.
"""

from __future__ import annotations

from pydantic import Field

from edgefleet.core.config import LibraryPath, Section


class OnnxConfig(Section):
    # Tried in order; CPUExecutionProvider is always appended as the last resort.
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    provider_options: dict[str, dict[str, str]] = Field(default_factory=dict)
    intra_op_threads: int = Field(0, ge=0, description="0: cores ÷ concurrent runs")
    inter_op_threads: int = Field(1, ge=0)
    # ONNX Runtime's pool threads spin-wait after each run by default: fine on a
    # server, but on a 2-4 core store PC it burns a core the event loop, the other
    # models and the store's own apps need. On only for sustained heavy load.
    allow_spinning: bool = False
    sessions: int = Field(1, ge=1, description="concurrent inferences per model version")


class ExternalDelegate(Section):
    library: LibraryPath  # a bare name (no '/') is for the dynamic loader to find
    options: dict[str, str] = Field(default_factory=dict)


class LiteRTConfig(Section):
    num_threads: int = Field(0, ge=0, description="0: cores ÷ interpreters")
    xnnpack: bool = True
    # Tried in order (e.g. an Edge TPU or GPU delegate); the CPU is the last resort.
    delegates: list[ExternalDelegate] = Field(default_factory=list)
    interpreters: int = Field(1, ge=1, description="interpreters per model version")


class BackendConfig(Section):
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    litert: LiteRTConfig = Field(default_factory=LiteRTConfig)

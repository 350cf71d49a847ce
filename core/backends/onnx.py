"""ONNX Runtime backend.

Execution providers are tried in the configured order; a provider that is not
installed, or that fails to create a session for this model, is skipped with one
log line, and the CPU provider is always the last resort. ``info.provider`` says
which provider actually runs the model.

An accelerator can also fail later, at run time (driver reset, device lost, an op
it mis-handles for some input). When an inference fails on a non-CPU provider the
same input is retried on a CPU session: if the CPU answers, the accelerator was
at fault and the model stays on the CPU from then on (logged once, recorded in
``info.runtime_fallback`` for the fleet); if the CPU fails too, the input was at
fault and the caller gets the CPU's error while the model stays on its accelerator.

Threads: ``intra_op_threads: 0`` means ``edgefleet.core.backends.threads.auto_threads``
(physical cores divided by the concurrent runs of this model), not ONNX Runtime's
own default, which would give every concurrent run a pool as wide as the box.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgefleet.core.backends.base import Backend
from edgefleet.core.backends.config import OnnxConfig
from edgefleet.core.backends.threads import auto_threads
from edgefleet.core.bundle.manifest import OIP_TO_NUMPY, Manifest
from edgefleet.core.errors import EdgeError, ModelLoadError

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


class OnnxBackend(Backend):
    runtime = "onnx"

    def __init__(
        self,
        model_path: Path,
        manifest: Manifest,
        config: OnnxConfig,
        instances: int | None = None,
    ) -> None:
        super().__init__(model_path, manifest)
        self.config = config
        # The runs at once the caller plans (batching.instances); sizes the threads.
        self._instances = instances or config.sessions
        self._session: ort.InferenceSession | None = None
        self._cpu_session: ort.InferenceSession | None = None
        self._fallback_lock = threading.Lock()
        self._output_names: list[str] = []
        self._input_dtypes: dict[str, np.dtype] = {}

    @property
    def max_concurrency(self) -> int:
        # InferenceSession.run is thread-safe; each concurrent run uses the
        # intra-op pool, so more than a few only adds contention.
        return self._instances

    @property
    def instance_limit(self) -> int | None:
        return None  # one session runs any number of calls at once

    @property
    def intra_op_threads(self) -> int:
        return self.config.intra_op_threads or auto_threads(self._instances)

    def _session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = self.config.inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        spin = "1" if self.config.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return opts

    def load(self) -> None:
        wanted = [p for p in self.config.providers if p != CPU] + [CPU]
        installed = set(available_providers())
        errors: list[str] = []
        for provider in wanted:
            self.info.providers_tried.append(provider)
            if provider not in installed:
                errors.append(f"{provider}: not available in this onnxruntime build")
                continue
            options = self.config.provider_options.get(provider, {})
            chain: list[str | tuple[str, dict[str, str]]] = [(provider, options)]
            if provider != CPU:
                chain.append(CPU)  # ops the accelerator lacks still run
            try:
                session = ort.InferenceSession(
                    str(self.model_path), sess_options=self._session_options(), providers=chain
                )
            except Exception as exc:
                errors.append(f"{provider}: {exc}")
                if provider == CPU:
                    raise ModelLoadError(
                        f"ONNX Runtime cannot load {self.model_path.name}: {exc}"
                    ) from exc
                continue
            if provider != wanted[0]:
                self.info.fallback_reason = "; ".join(errors)
                log.warning(
                    "%s:%s runs on %s, preferred provider unavailable (%s)",
                    self.manifest.name,
                    self.manifest.version,
                    provider,
                    self.info.fallback_reason,
                )
            self._session = session
            self.info.provider = session.get_providers()[0]
            break
        assert self._session is not None
        self._check_signature(self._session)
        log.info(
            "%s:%s loaded on %s (%d run(s) at once x %d intra-op thread(s))",
            self.manifest.name,
            self.manifest.version,
            self.info.provider,
            self._instances,
            self.intra_op_threads,
        )

    def _check_signature(self, session: ort.InferenceSession) -> None:
        """The manifest must describe the model it ships with."""
        model_inputs = {i.name: i for i in session.get_inputs()}
        model_outputs = {o.name for o in session.get_outputs()}
        for spec in self.manifest.inputs:
            if spec.name not in model_inputs:
                raise ModelLoadError(f"manifest input {spec.name!r} is not an input of the model")
            self._input_dtypes[spec.name] = np.dtype(OIP_TO_NUMPY[spec.datatype])
        for spec in self.manifest.outputs:
            if spec.name not in model_outputs:
                raise ModelLoadError(f"manifest output {spec.name!r} is not an output of the model")
        self._output_names = [o.name for o in self.manifest.outputs]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise ModelLoadError(f"{self.manifest.name}:{self.manifest.version} is not loaded")
        feed = {
            name: np.asarray(value, dtype=self._input_dtypes.get(name, value.dtype))
            for name, value in inputs.items()
        }
        try:
            return self._run(session, feed)
        except EdgeError:
            raise
        except Exception as exc:
            if session is self._cpu_session or self.info.provider == CPU:
                raise
            return self._fall_back(session, feed, exc)

    def _run(
        self, session: ort.InferenceSession, feed: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """One ``session.run``: the boundary where a provider's failure shows."""
        results = session.run(self._output_names, feed)
        return dict(zip(self._output_names, results, strict=True))

    def _fall_back(
        self, failed: ort.InferenceSession, feed: dict[str, np.ndarray], exc: Exception
    ) -> dict[str, np.ndarray]:
        """An inference failed on an accelerator: retry it on the CPU, stay there if it works."""
        with self._fallback_lock:
            cpu = self._cpu_session
            if cpu is None:
                try:
                    cpu = ort.InferenceSession(
                        str(self.model_path), sess_options=self._session_options(), providers=[CPU]
                    )
                except Exception:
                    raise exc from None  # no CPU to compare with: report the original error
                self._cpu_session = cpu
        # Raises if the CPU fails too: then the input, not the accelerator, is at fault.
        results = self._run(cpu, feed)
        with self._fallback_lock:
            if self._session is failed:
                reason = f"{self.info.provider} failed at run time ({exc}); running on {CPU}"
                self._session = cpu
                self.info.runtime_fallback = reason
                self.info.fallback_reason = reason
                self.info.provider = CPU
                log.error("%s:%s %s", self.manifest.name, self.manifest.version, reason)
        return results

    def unload(self) -> None:
        self._session = None
        self._cpu_session = None
        self.info.provider = "unloaded"

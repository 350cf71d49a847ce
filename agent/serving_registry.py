"""Which model versions are loaded, which one serves, and how a new one takes over.

Activation follows MLServer's rule: the new version is loaded and self-tested
while the old one keeps serving; only then does the pointer swap, and the old
version is unloaded once its in-flight requests have drained. A failed load or
self-test leaves the old version active and records the reason.

All blocking work (extraction, loading, self-test, state files) runs in the
executor; this module's coroutines only orchestrate, on the event loop.

Each loaded version is served by a ``DynamicBatcher`` (``runtime.batching``, with
``runtime.per_model.<name>.batching`` over it) or, with batching off, a plain
``ModelRunner``. Before a version may serve it is loaded, self-tested, checked to
answer a batch as it answers its rows one by one (else it runs unbatched), and
warmed up at the batch sizes it will see.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgefleet.agent.batcher import (
    DynamicBatcher,
    check_rows_independent,
    manifest_batchable,
    warm_up,
    warmup_batch_sizes,
)
from edgefleet.agent.config import BatchingConfig, ModelEntry, RuntimeConfig
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.runner import ModelRunner, ServingHandle
from edgefleet.agent.split import Split, SplitSource, to_canary
from edgefleet.agent.store import ModelState, ModelStore
from edgefleet.core.backends import Backend, accelerators, create_backend
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.bundle.selftest import run_self_test
from edgefleet.core.errors import EdgeError, ModelLoadError, NotFound, Unavailable
from edgefleet.core.names import check_label

log = logging.getLogger(__name__)
T = TypeVar("T")

DRAIN_TIMEOUT_S = 30.0


@dataclass
class LoadedVersion:
    manifest: Manifest
    directory: Path
    backend: Backend
    runner: ServingHandle  # DynamicBatcher, or ModelRunner with batching off
    self_test: str
    loaded_at: float

    @property
    def key(self) -> tuple[str, str]:
        return self.manifest.name, self.manifest.version


@dataclass
class ShadowVersion:
    """A shadow candidate (issue 11): installed, loaded and self-tested like any
    version, but not in the serving table: never resolved, activated or labelled.

    Only the shadow runner's worker thread (agent/shadow.py) runs ``backend``, while
    holding ``lock``; unloading takes the lock too and sets ``closed`` first, so a
    candidate is never unloaded under a running inference. ``sample_rate`` may change
    in place (the event loop writes it, the loop reads it).
    """

    manifest: Manifest
    directory: Path
    backend: Backend
    self_test: str
    loaded_at: float
    sample_rate: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    @property
    def version(self) -> str:
        return self.manifest.version


def _close_shadow(sv: ShadowVersion) -> None:
    # A worker thread (io executor): waits for the shadow runner's item in progress.
    with sv.lock:
        sv.closed = True
        sv.backend.unload()


@dataclass
class _Loaded:
    """What loading a version in a worker thread produced."""

    manifest: Manifest
    directory: Path
    backend: Backend
    summary: str
    batching: BatchingConfig
    can_batch: bool
    not_batched: str | None
    warm_up: str


def _batching_summary(runner: ServingHandle) -> str:
    d = runner.describe()
    if not d["enabled"]:
        return f"off ({d['instances']} instance(s))"
    if not d["batched"]:
        return f"on, one by one ({d['not_batched_because']}; {d['instances']} instance(s))"
    return (
        f"on (max {d['max_batch_size']}, delay {d['max_queue_delay_us']} us,"
        f" {d['instances']} instance(s))"
    )


class ModelRegistry:
    def __init__(
        self,
        store: ModelStore,
        runtime: RuntimeConfig,
        inference_executor: Executor,
        io_executor: Executor,
        metrics: Metrics,
        max_queue: int,
    ) -> None:
        self.store = store
        self.runtime = runtime
        # Inference gets its own pool sized to the cores; loading a model or
        # writing state must not hold up requests, nor wait behind them.
        self.inference_executor = inference_executor
        self.io_executor = io_executor
        self.metrics = metrics
        self.max_queue = max_queue
        self._loaded: dict[str, dict[str, LoadedVersion]] = {}
        self._states: dict[str, ModelState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # What the box offers (agent.backends.accelerators.detect), found at start.
        self.accelerators: dict[str, Any] = {}
        # Configured bundles (agent config ``models:``) refused at start: path -> why.
        self.config_errors: dict[str, str] = {}
        # Issue 11: shadow candidates (not served) and traffic splits, per model.
        self._shadows: dict[str, ShadowVersion] = {}
        self._splits: dict[str, Split] = {}
        self._rng = random.Random()
        # Called (event loop, model name) after a split is set or ended: the sync
        # reports it to the fleet.
        self.split_listeners: list[Callable[[str], None]] = []

    async def _blocking(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io_executor, functools.partial(fn, *args))

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # ---- start-up ------------------------------------------------------------

    async def start(self, entries: list[ModelEntry]) -> None:
        """Install configured bundles, then bring back every model's active version.

        A bundle or model that fails is logged and skipped: one bad model must not
        keep the others from serving. A configured bundle that cannot be installed is
        also kept in ``config_errors`` (bundle path -> reason); a model whose version
        cannot be activated keeps the reason in its state's ``last_error`` (shown by
        ``/v1/models``) and, having no active version, does not make the agent unready.
        """
        wanted: dict[str, tuple[str, ModelEntry]] = {}
        for entry in entries:
            try:
                manifest = await self.install(entry.bundle)
            except EdgeError as exc:
                self._config_error(entry, exc.message)
                continue
            except OSError as exc:
                self._config_error(entry, f"cannot read it: {exc}")
                continue
            except Exception as exc:  # a defect, but one bundle must not stop the agent
                log.exception("installing %s failed unexpectedly", entry.bundle)
                self._config_error(entry, f"{type(exc).__name__}: {exc}")
                continue
            wanted[manifest.name] = (manifest.version, entry)
        for name in await self._blocking(self.store.model_names):
            try:
                await self._start_model(name, wanted.get(name))
            except Exception:  # as above: the next model still starts
                log.exception("model %s could not be started", name)
        # After the models: a runtime only they import is then checked too.
        await self.detect_accelerators()
        log.info("accelerators: %s", accelerators.summary(self.accelerators))

    def _config_error(self, entry: ModelEntry, reason: str) -> None:
        self.config_errors[str(entry.bundle)] = reason
        log.error("configured bundle %s skipped: %s", entry.bundle, reason)

    async def _start_model(self, name: str, wanted: tuple[str, ModelEntry] | None) -> None:
        """Bring back ``name``'s active version (or activate the configured one)."""
        state = await self._state(name)
        target = state.active
        entry_version, entry = wanted if wanted is not None else (None, None)
        if target is None and entry is not None and entry.activate:
            target = entry_version
        for version in dict.fromkeys(v for v in (target, state.previous) if v):
            try:
                await self.activate(name, version)
                break
            except EdgeError as exc:
                log.error("%s:%s could not be activated: %s", name, version, exc.message)
        if entry is not None and entry_version is not None:
            for label in entry.labels:
                if label not in (await self._state(name)).labels:
                    try:
                        await self.set_label(name, label, entry_version)
                    except EdgeError as exc:
                        log.error("label %s of %s: %s", label, name, exc.message)
        for label, version in (await self._state(name)).labels.items():
            if version not in self._loaded.get(name, {}):
                try:
                    await self._ensure_loaded(name, version)
                except EdgeError as exc:
                    log.error("%s:%s (%s) not loaded: %s", name, version, label, exc.message)

    async def detect_accelerators(self) -> dict[str, Any]:
        """What the box offers, fresh (cheap: no runtime is imported for it)."""
        self.accelerators = await self._blocking(accelerators.detect, self.runtime)
        return self.accelerators

    def provider_report(self) -> dict[str, Any]:
        """Accelerators and, per loaded version, where it runs: for the fleet's ``reported``."""
        return {
            "accelerators": self.accelerators.get("accelerators", []),
            "models": {
                name: {v: lv.backend.info.as_dict() for v, lv in versions.items()}
                for name, versions in self._loaded.items()
            },
        }

    async def _state(self, name: str) -> ModelState:
        if name not in self._states:
            self._states[name] = await self._blocking(self.store.state, name)
        return self._states[name]

    async def _save_state(self, name: str, state: ModelState) -> None:
        self._states[name] = state
        await self._blocking(self.store.save_state, name, state)

    # ---- install / activate ----------------------------------------------------

    async def install(self, bundle: Path) -> Manifest:
        manifest = await self._blocking(self.store.install, bundle)
        await self._reload_state(manifest.name)  # install order changed on disk
        return manifest

    async def _reload_state(self, name: str) -> None:
        self._states[name] = await self._blocking(self.store.state, name)

    def _load_blocking(self, name: str, version: str) -> _Loaded:
        directory = self.store.version_dir(name, version)
        manifest = self.store.manifest(name, version)
        batching = self.runtime.batching_for(name)
        backend = create_backend(
            directory / manifest.model_file, manifest, self.runtime, batching.instances or None
        )
        not_batched: str | None = None
        surprising = False  # a fixed batch is normal; a failed check is worth a warning
        try:
            backend.load()
            summary = run_self_test(backend, manifest, directory)
            can_batch = batching.enabled and manifest_batchable(manifest)
            if batching.enabled and not can_batch:
                not_batched = "the manifest gives a fixed batch dimension"
            if can_batch:
                not_batched = check_rows_independent(
                    backend, manifest, directory, batching.max_batch_size
                )
                can_batch = not_batched is None
                surprising = not can_batch
            warm = warm_up(backend, manifest, directory, warmup_batch_sizes(batching, can_batch))
            if warm.batch_problem:
                can_batch, not_batched, surprising = False, warm.batch_problem, True
        except BaseException:
            backend.unload()
            raise
        if surprising:
            log.warning("%s:%s runs unbatched: %s", name, version, not_batched)
        return _Loaded(
            manifest, directory, backend, summary, batching, can_batch, not_batched, warm.summary
        )

    def _runner(self, loaded: _Loaded) -> ServingHandle:
        if not loaded.batching.enabled:
            executor, queue = self.inference_executor, self.max_queue
            return ModelRunner(loaded.backend, executor, self.metrics, queue)
        return DynamicBatcher(
            loaded.backend,
            self.inference_executor,
            self.metrics,
            self.max_queue,
            loaded.batching,
            can_batch=loaded.can_batch,
            not_batched_because=loaded.not_batched,
        )

    async def _ensure_loaded(self, name: str, version: str) -> LoadedVersion:
        already = self._loaded.get(name, {}).get(version)
        if already is not None:
            return already
        started = time.perf_counter()
        try:
            loaded = await self._blocking(self._load_blocking, name, version)
        except EdgeError:
            raise
        except Exception as exc:  # runtime-specific errors from a model file
            raise ModelLoadError(f"{name}:{version} failed to load: {exc}") from exc
        runner = self._runner(loaded)
        lv = LoadedVersion(
            loaded.manifest, loaded.directory, loaded.backend, runner, loaded.summary, time.time()
        )
        self._loaded.setdefault(name, {})[version] = lv
        log.info(
            "loaded %s:%s on %s in %.0f ms, self-test %s, %s, batching %s",
            name,
            version,
            loaded.backend.info.provider,
            (time.perf_counter() - started) * 1000,
            loaded.summary,
            loaded.warm_up,
            _batching_summary(runner),
        )
        self._publish_ready(name)
        onnx = self.accelerators.get("onnx")
        if onnx is not None and not onnx["checked"] and loaded.manifest.runtime == "onnx":
            # The first ONNX model since start: onnxruntime is imported now, look at it.
            await self.detect_accelerators()
            log.info("accelerators: %s", accelerators.summary(self.accelerators))
        return lv

    async def activate(self, name: str, version: str) -> LoadedVersion:
        """Make ``version`` the one that serves ``name``; the old one serves until then."""
        async with self._lock(name):
            state = await self._state(name)
            current = self._loaded.get(name, {}).get(state.active or "")
            if state.active == version and current is not None:
                return current
            try:
                lv = await self._ensure_loaded(name, version)
            except EdgeError as exc:
                state.last_error = f"activating {version}: {exc.message}"
                await self._save_state(name, state)
                self.metrics.activations.inc(name, "failed")
                log.error("%s:%s refused: %s", name, version, exc.message)
                raise
            old = state.active
            state.previous = old if old != version else state.previous
            state.active = version
            state.last_error = None
            await self._save_state(name, state)
            self.metrics.activations.inc(name, "succeeded")
            log.info("%s now serves version %s (was %s)", name, version, old)
            self._publish_ready(name)
            if old and old != version:
                await self._retire(name, old)
            await self._blocking(self.store.prune, name)
            await self._reload_state(name)
            return lv

    async def rollback(self, name: str) -> LoadedVersion:
        state = await self._state(name)
        if not state.previous:
            raise NotFound(f"model {name!r} has no previous version to roll back to")
        return await self.activate(name, state.previous)

    async def set_label(self, name: str, label: str, version: str) -> None:
        check_label(label)  # InvalidName: a 400
        async with self._lock(name):
            state = await self._state(name)
            await self._blocking(self.store.version_dir, name, version)  # 404 if absent
            await self._ensure_loaded(name, version)
            old = state.labels.get(label)
            state.labels[label] = version
            await self._save_state(name, state)
            if old and old != version:
                await self._retire(name, old)

    async def _retire(self, name: str, version: str) -> None:
        """Unload ``version`` unless it still serves (active, a label's or the split's
        canary), after it drains."""
        state = await self._state(name)
        if version == state.active or version in state.labels.values():
            return
        split = self._splits.get(name)
        if split is not None and split.version == version:
            return
        lv = self._loaded.get(name, {}).pop(version, None)
        if lv is None:
            return
        self._publish_ready(name, retired=lv)
        if not await lv.runner.drain(DRAIN_TIMEOUT_S):
            log.warning("%s:%s still busy after %.0f s; unloading", name, version, DRAIN_TIMEOUT_S)
        lv.runner.close()
        await self._blocking(lv.backend.unload)
        log.info("unloaded %s:%s", name, version)

    # ---- repository extension --------------------------------------------------

    async def load_model(self, name: str) -> LoadedVersion:
        state = await self._state(name)
        version = state.active or (state.installed[-1] if state.installed else None)
        if version is None:
            raise NotFound(f"model {name!r} has no installed version")
        return await self.activate(name, version)

    async def unload_model(self, name: str) -> None:
        async with self._lock(name):
            await self._state(name)  # 404 for unknown models
            versions = self._loaded.pop(name, {})
            for lv in versions.values():
                self._publish_ready(name, retired=lv)
                await lv.runner.drain(DRAIN_TIMEOUT_S)
                lv.runner.close()
                await self._blocking(lv.backend.unload)
            log.info("unloaded every version of %s", name)

    # ---- lookups (event loop, no I/O) ------------------------------------------

    def resolve(
        self, name: str, version: str | None = None, *, routing_key: str | None = None
    ) -> LoadedVersion:
        """The loaded version answering ``name`` at ``version`` (a version or a label).

        Without a version: the active one, or the split's canary for the split's share
        of requests (agent/split.py; sticky per ``routing_key``) while it is loaded.
        """
        state = self._states.get(name)
        versions = self._loaded.get(name)
        if state is None:
            raise NotFound(f"unknown model {name!r}")
        if version is None:
            target = state.active
            if target is None or not versions or target not in versions:
                raise Unavailable(f"model {name!r} has no version ready to serve")
            split = self._splits.get(name)
            if (
                split is not None
                and split.version != target
                and split.version in versions
                and to_canary(split, name, routing_key, self._rng)
            ):
                return versions[split.version]
        else:
            target = state.labels.get(version, version)
            if target not in (versions or {}):
                if target in state.installed:
                    raise Unavailable(f"{name} version {target} is installed but not loaded")
                raise NotFound(f"model {name!r} has no version or label {version!r}")
        assert versions is not None
        return versions[target]

    def known_state(self, name: str) -> ModelState:
        state = self._states.get(name)
        if state is None:
            raise NotFound(f"unknown model {name!r}")
        return state

    def loaded_versions(self, name: str) -> dict[str, LoadedVersion]:
        return dict(self._loaded.get(name, {}))

    def model_names(self) -> list[str]:
        return sorted(self._states)

    def ready(self) -> bool:
        """Readiness: every model that has an active version serves it.

        A model without an active version (installed but never activated, or its
        first version refused) is not served and does not hold the others back; the
        model list reports it (``active: null`` and its ``last_error``).
        """
        return not self.unready_models()

    def unready_models(self) -> list[str]:
        """Models whose active version is not loaded (the reason the agent is not ready)."""
        return [
            n
            for n, s in sorted(self._states.items())
            if s.active is not None and s.active not in self._loaded.get(n, {})
        ]

    def _publish_ready(self, name: str, retired: LoadedVersion | None = None) -> None:
        state = self._states.get(name)
        if retired is not None:
            for active in ("true", "false"):
                self.metrics.model_ready.remove(name, retired.manifest.version, active)
        for version in self._loaded.get(name, {}):
            is_active = state is not None and state.active == version
            self.metrics.model_ready.remove(name, version, "false" if is_active else "true")
            self.metrics.model_ready.set(name, version, "true" if is_active else "false", value=1)

    # ---- shadow candidates and traffic splits (issue 11) ----------------------

    def _load_shadow_blocking(self, name: str, version: str) -> tuple[Manifest, Path, Backend, str]:
        """Worker thread: load and self-test ``version`` for the shadow runner. One
        intra-op thread: the shadow runs on the runner's one worker thread, whose CPU
        time (``time.thread_time``) is its budget, and must not fan out over the cores
        the active version needs."""
        directory = self.store.version_dir(name, version)
        manifest = self.store.manifest(name, version)
        runtime = self.runtime.model_copy(
            update={
                "onnx": self.runtime.onnx.model_copy(update={"intra_op_threads": 1}),
                "litert": self.runtime.litert.model_copy(update={"num_threads": 1}),
            }
        )
        backend = create_backend(directory / manifest.model_file, manifest, runtime, 1)
        try:
            backend.load()
            summary = run_self_test(backend, manifest, directory)
        except BaseException:
            backend.unload()
            raise
        return manifest, directory, backend, summary

    async def load_shadow(self, name: str, version: str, sample_rate: float) -> ShadowVersion:
        """Load ``version`` (installed) as ``name``'s shadow candidate, replacing another
        one; the same version again only takes the new ``sample_rate``. Raises
        ``NotFound`` (not installed) or ``ModelLoadError`` (load or self-test failed);
        the previous candidate then stays."""
        async with self._lock(name):
            await self._state(name)  # NotFound for an unknown model
            current = self._shadows.get(name)
            if current is not None and current.version == version:
                current.sample_rate = sample_rate
                return current
            try:
                manifest, directory, backend, summary = await self._blocking(
                    self._load_shadow_blocking, name, version
                )
            except EdgeError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"{name}:{version} failed to load: {exc}") from exc
            sv = ShadowVersion(manifest, directory, backend, summary, time.time(), sample_rate)
            self._shadows[name] = sv
            log.info(
                "%s:%s loaded as shadow (sample rate %g), self-test %s",
                name,
                version,
                sample_rate,
                summary,
            )
            if current is not None:
                await self._blocking(_close_shadow, current)
            return sv

    async def unload_shadow(self, name: str) -> bool:
        """Drop ``name``'s shadow candidate; False when it had none."""
        async with self._lock(name):
            sv = self._shadows.pop(name, None)
            if sv is None:
                return False
            await self._blocking(_close_shadow, sv)
            log.info("unloaded shadow %s:%s", name, sv.version)
            return True

    def shadow_for(self, name: str) -> ShadowVersion | None:
        """The model's shadow candidate (event loop, no I/O)."""
        return self._shadows.get(name)

    async def set_split(
        self, name: str, version: str, weight: float, source: SplitSource = "fleet"
    ) -> Split:
        """Serve installed ``version`` to ``weight`` of ``name``'s requests (agent/split.py).

        The canary is loaded and self-tested like a labelled version first; until then
        (and if that fails: ``ModelLoadError``, the old split stays) nothing changes.
        """
        split = Split(version, weight, source)  # ValueError for a weight out of 0..1
        async with self._lock(name):
            state = await self._state(name)
            await self._blocking(self.store.version_dir, name, version)  # 404 if absent
            await self._ensure_loaded(name, version)
            old = self._splits.get(name)
            self._splits[name] = split
            log.info("%s: version %s serves %.3g of requests (%s)", name, version, weight, source)
            if old is not None and old.version not in (version, state.active):
                await self._retire(name, old.version)
        self._split_changed(name)
        return split

    async def clear_split(self, name: str) -> Split | None:
        """End ``name``'s split (its canary unloads unless it serves otherwise)."""
        async with self._lock(name):
            await self._state(name)
            old = self._splits.pop(name, None)
            if old is not None:
                log.info("%s: split to version %s ended", name, old.version)
                await self._retire(name, old.version)
        if old is not None:
            self._split_changed(name)
        return old

    def _split_changed(self, name: str) -> None:
        for listener in self.split_listeners:
            try:
                listener(name)
            except Exception:  # a listener's bug must not undo the split
                log.exception("split listener failed for %s", name)

    def split_for(self, name: str) -> Split | None:
        """The model's split (event loop, no I/O)."""
        return self._splits.get(name)

    async def close(self) -> None:
        for name in list(self._shadows):
            await self._blocking(_close_shadow, self._shadows.pop(name))
        for name in list(self._loaded):
            for lv in self._loaded.pop(name).values():
                await lv.runner.drain(5.0)
                lv.runner.close()
                await self._blocking(lv.backend.unload)

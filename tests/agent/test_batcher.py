"""The dynamic batcher with real ONNX Runtime models: who gets which rows, what may
share a batch, delays, timeouts, a full queue, and its place in the registry.

Timing is controlled, not measured: a real subclass of the ONNX backend can hold
executions at a gate, so "requests accumulate while the model is busy" is a state
the test sets up, not a race it hopes to win. Speed belongs in bench/.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgefleet.agent.serving_registry as registry_module
from edgefleet.agent.batcher import (
    DynamicBatcher,
    check_rows_independent,
    manifest_batchable,
    warm_up,
    warmup_batch_sizes,
)
from edgefleet.agent.config import BatchingConfig, OnnxConfig, RuntimeConfig, parse_config
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.runner import ModelRunner
from edgefleet.agent.server.context import SERVICES
from edgefleet.core.backends import Backend
from edgefleet.core.backends.onnx import OnnxBackend
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.bundle.selftest import save_vectors
from edgefleet.core.errors import BadRequest, ConfigError, Unavailable
from tests.support.tiny import (
    TEST_X,
    TINY_MANIFEST,
    TINY_W,
    agent_config,
    tiny_reference,
    write_tiny_onnx,
)

W2 = TINY_W[:, ::-1].copy()  # version 2 answers differently, so we can tell who answered
SENTINEL = 999.0  # a request holding this value fails in PickyBackend


class GatedBackend(OnnxBackend):
    """The real ONNX model, recording every execution; ``gate`` can hold executions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.calls: list[dict[str, tuple[tuple[int, ...], str]]] = []
        self.inputs: list[dict[str, np.ndarray]] = []
        self._record = threading.Lock()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._record:
            self.calls.append({k: (v.shape, v.dtype.str) for k, v in inputs.items()})
            self.inputs.append({k: v.copy() for k, v in inputs.items()})
        self.entered.release()
        assert self.gate.wait(10), "test left the gate closed"
        return super().infer(inputs)

    def rows(self) -> list[int]:
        return [next(iter(c.values()))[0][0] for c in self.calls]


class PickyBackend(GatedBackend):
    """Fails any execution that holds the sentinel value, as a runtime rejects bad input."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if any((v == SENTINEL).any() for v in inputs.values()):
            with self._record:
                self.calls.append({k: (v.shape, v.dtype.str) for k, v in inputs.items()})
            raise BadRequest("sentinel value in the input")
        return super().infer(inputs)


class ScalarOutputBackend(GatedBackend):
    """Adds an output without a batch dimension: such a model cannot be split by rows."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().infer(inputs)
        out["total"] = np.asarray(float(out["probs"].sum()), dtype=np.float32)
        return out


def manifest(**changes: Any) -> Manifest:
    files = {"model.onnx": {"sha256": "0" * 64, "size": 1}}
    if "self_test" in changes:
        files["selftest.npz"] = {"sha256": "0" * 64, "size": 1}
    doc = {**TINY_MANIFEST, "version": "1", "model_file": "model.onnx", "files": files, **changes}
    return Manifest.model_validate(doc)


def write_identity_onnx(path: Path) -> Path:
    """y = x for any [batch, n] FP32 tensor: a dynamic non-batch dimension."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


IDENTITY_IO: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
    "postprocessing": {"type": "raw"},
}


@pytest.fixture
def executor() -> Any:
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-infer")
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def tiny(tmp_path: Path) -> Callable[..., Backend]:
    def make(cls: type[OnnxBackend] = GatedBackend, identity: bool = False, **changes: Any):
        if identity:
            model = write_identity_onnx(tmp_path / "model.onnx")
            changes = {**IDENTITY_IO, **changes}
        else:
            model = write_tiny_onnx(tmp_path / "model.onnx")
        backend = cls(model, manifest(**changes), OnnxConfig(intra_op_threads=1))
        backend.load()
        return backend

    return make


def batcher(backend: Backend, executor: Any, max_queue: int = 256, **settings: Any):
    metrics = Metrics()
    return DynamicBatcher(backend, executor, metrics, max_queue, BatchingConfig(**settings))


async def until(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def entered(backend: GatedBackend) -> None:
    """Wait (off the loop) until an execution has entered the backend."""
    assert await asyncio.to_thread(backend.entered.acquire, True, 5.0)


async def hold_first(b: DynamicBatcher, backend: GatedBackend, x: np.ndarray) -> asyncio.Task:
    """Close the gate and start one request, which takes the (only) instance."""
    backend.gate.clear()
    first = asyncio.ensure_future(b.infer({"x": x}))
    await entered(backend)
    return first


# ---- results go to the right callers ------------------------------------------


@pytest.mark.parametrize(("instances", "delay_us"), [(1, 0), (2, 0), (1, 2000), (2, 2000)])
async def test_every_caller_gets_its_own_rows(tiny, executor, instances, delay_us):
    backend = tiny()
    b = batcher(
        backend,
        executor,
        max_queue=1000,
        max_batch_size=8,
        instances=instances,
        max_queue_delay_us=delay_us,
    )
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(300)]

    async def one(x: np.ndarray) -> None:
        out = await b.infer({"x": x})
        assert out["probs"].shape == (len(x), 3)
        np.testing.assert_allclose(out["probs"], tiny_reference(x), rtol=1e-5, atol=1e-6)

    first = await hold_first(b, backend, inputs[0])
    tasks = [asyncio.ensure_future(one(x)) for x in inputs[1:]]
    await until(lambda: b.pending == len(inputs))
    backend.gate.set()
    await first
    await asyncio.gather(*tasks)
    assert sum(backend.rows()) == sum(len(x) for x in inputs)
    assert max(backend.rows()) <= 8
    assert len(backend.calls) < len(inputs) / 2, "requests that waited were not batched"
    assert b.pending == 0 and await b.drain(1.0)


async def test_mixed_shapes_and_dtypes_never_share_a_batch(tiny, executor):
    backend = tiny(identity=True)
    b = batcher(backend, executor, max_batch_size=64)
    rng = np.random.default_rng(2)
    inputs = []
    for i in range(60):
        n = (3, 5, 7)[i % 3]
        dtype = np.float64 if i % 4 == 0 else np.float32
        inputs.append(rng.normal(size=(1 + i % 2, n)).astype(dtype))

    async def one(x: np.ndarray) -> None:
        out = await b.infer({"x": x})
        np.testing.assert_allclose(out["y"], x.astype(np.float32))

    first = await hold_first(b, backend, inputs[0])
    tasks = [asyncio.ensure_future(one(x)) for x in inputs[1:]]
    await until(lambda: b.pending == len(inputs))
    backend.gate.set()
    await first
    await asyncio.gather(*tasks)
    kinds = {(x.shape[1], x.dtype.str) for x in inputs}
    # The first ran alone; the rest went one batch per (width, dtype): 6 kinds.
    assert len(backend.calls) == 1 + len(kinds)
    for call in backend.calls:
        ((shape, dtype),) = call.values()
        assert (shape[1], dtype) in kinds


async def test_a_batch_never_exceeds_max_rows_and_a_big_request_runs_alone(tiny, executor):
    backend = tiny()
    b = batcher(backend, executor, max_batch_size=8)
    small = [np.full((3, 4), i, dtype=np.float32) for i in range(20)]
    big = np.ones((11, 4), dtype=np.float32)
    first = await hold_first(b, backend, small[0])
    tasks = [asyncio.ensure_future(b.infer({"x": x})) for x in [*small[1:], big]]
    await until(lambda: b.pending == len(small) + 1)
    backend.gate.set()
    await first
    outs = await asyncio.gather(*tasks)
    np.testing.assert_allclose(outs[-1]["probs"], tiny_reference(big), rtol=1e-5)
    assert backend.rows()[0] == 3
    assert backend.rows()[1:] == [6] * 9 + [3, 11]  # 3+3 fit in 8; 3+3+3 do not


# ---- delays -----------------------------------------------------------------------


async def test_no_delay_runs_a_lone_request_at_once(tiny, executor):
    backend = tiny()
    # A batch that can never fill (max 64 rows) and a delay of 0: nothing to wait for.
    b = batcher(backend, executor, max_batch_size=64, max_queue_delay_us=0)
    for _ in range(3):
        out = await asyncio.wait_for(b.infer({"x": TEST_X[:1]}), 5.0)
        np.testing.assert_allclose(out["probs"], tiny_reference(TEST_X[:1]), rtol=1e-5)
    assert backend.rows() == [1, 1, 1]
    assert b.metrics.queue_duration.series[("tiny", "1")].total == 0.0
    assert b._timer is None


async def test_a_lone_request_waits_the_delay_and_a_full_batch_does_not(tiny, executor):
    backend = tiny()
    b = batcher(backend, executor, max_batch_size=4, max_queue_delay_us=10_000_000)
    lone = asyncio.ensure_future(b.infer({"x": TEST_X[:1]}))
    await asyncio.sleep(0.05)
    assert not lone.done() and backend.calls == []  # waiting for company, 10 s at most
    # Three more rows fill the batch of 4: sent at once, long before the delay.
    rest = [asyncio.ensure_future(b.infer({"x": TEST_X[i : i + 1]})) for i in range(1, 4)]
    await asyncio.wait_for(asyncio.gather(lone, *rest), 5.0)
    assert backend.rows() == [4]


async def test_a_preferred_batch_is_sent_at_once(tiny, executor):
    backend = tiny()
    b = batcher(
        backend,
        executor,
        max_batch_size=8,
        preferred_batch_sizes=[3],
        max_queue_delay_us=10_000_000,
    )
    tasks = [asyncio.ensure_future(b.infer({"x": TEST_X[i : i + 1]})) for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    assert backend.rows() == [3]


async def test_the_delay_counts_from_the_oldest_request(tiny, executor):
    delay, gap = 0.4, 0.2
    backend = tiny()
    b = batcher(backend, executor, max_batch_size=8, max_queue_delay_us=int(delay * 1e6))
    done: dict[str, float] = {}

    async def one(name: str, x: np.ndarray) -> None:
        await b.infer({"x": x})
        done[name] = time.monotonic()

    t0 = time.monotonic()
    oldest = asyncio.ensure_future(one("oldest", TEST_X[:1]))
    await asyncio.sleep(gap)
    newest = asyncio.ensure_future(one("newest", TEST_X[1:2]))
    await asyncio.gather(oldest, newest)
    assert backend.rows() == [2]  # the newest joined the oldest's batch
    waited = done["oldest"] - t0
    assert waited >= delay * 0.95
    # Counted from the newest it would be gap + delay = 0.6 s.
    assert waited < delay + gap / 2, waited


# ---- overload ------------------------------------------------------------------------


async def test_a_full_queue_answers_503_with_retry_after(tiny, executor):
    backend = tiny()
    b = batcher(backend, executor, max_queue=4, max_batch_size=2)
    first = await hold_first(b, backend, TEST_X[:1])
    queued = [asyncio.ensure_future(b.infer({"x": TEST_X[i : i + 1]})) for i in range(1, 4)]
    await until(lambda: b.pending == 4)
    with pytest.raises(Unavailable) as err:
        await b.infer({"x": TEST_X[:1]})
    assert err.value.status == 503 and err.value.retry_after >= 1
    assert "queue is full" in err.value.message
    backend.gate.set()
    await asyncio.gather(first, *queued)
    assert b.metrics.inference_requests.values[("tiny", "1", "rejected")] == 1


async def test_a_request_that_waited_too_long_is_dropped_and_never_run(tiny, executor):
    backend = tiny()
    b = batcher(backend, executor, max_batch_size=8, queue_timeout_ms=100)
    first = await hold_first(b, backend, TEST_X[:1])
    late = np.full((1, 4), 7.0, dtype=np.float32)
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as err:
        # The gate is still closed: the answer comes from the timeout, not the model.
        await asyncio.wait_for(b.infer({"x": late}), 5.0)
    assert time.monotonic() - t0 >= 0.09
    assert err.value.status == 503 and err.value.retry_after == 1.0
    assert "not run" in err.value.message
    backend.gate.set()
    await first
    await b.infer({"x": TEST_X[:2]})
    assert not any((i["x"] == 7.0).all() for i in backend.inputs)
    assert b.metrics.inference_requests.values[("tiny", "1", "timeout")] == 1


async def test_a_caller_that_leaves_frees_nothing_early(tiny, executor):
    """A cancelled caller's execution still holds its instance until the thread ends,
    and a cancelled queued request is never run."""
    backend = tiny()
    b = batcher(backend, executor, max_batch_size=8, instances=1)
    first = await hold_first(b, backend, TEST_X[:1])
    queued = asyncio.ensure_future(b.infer({"x": np.full((1, 4), 5.0, np.float32)}))
    await until(lambda: b.pending == 2)
    first.cancel()
    queued.cancel()
    await asyncio.sleep(0.01)
    third = asyncio.ensure_future(b.infer({"x": TEST_X[2:3]}))
    await asyncio.sleep(0.05)
    assert len(backend.calls) == 1, "an instance was handed out while its thread still ran"
    assert not await b.drain(0.01)
    backend.gate.set()
    await asyncio.wait_for(third, 5.0)
    assert backend.rows() == [1, 1]
    assert not any((i["x"] == 5.0).all() for i in backend.inputs)
    assert await b.drain(1.0)


# ---- failures ------------------------------------------------------------------------


async def test_one_bad_request_fails_only_its_caller(tiny, executor):
    backend = tiny(PickyBackend)
    b = batcher(backend, executor, max_batch_size=8)
    first = await hold_first(b, backend, TEST_X[:1])
    bad = np.full((1, 4), SENTINEL, dtype=np.float32)
    xs = [TEST_X[i : i + 1] for i in range(1, 6)]
    tasks = [asyncio.ensure_future(b.infer({"x": x})) for x in [*xs[:2], bad, *xs[2:]]]
    await until(lambda: b.pending == 7)
    backend.gate.set()
    results = await asyncio.gather(first, *tasks, return_exceptions=True)
    assert isinstance(results[3], BadRequest)
    for x, r in zip(xs, [*results[1:3], *results[4:]], strict=True):
        np.testing.assert_allclose(r["probs"], tiny_reference(x), rtol=1e-5)
    assert b.can_batch  # a bad input is not a reason to stop batching


async def test_outputs_without_rows_turn_batching_off(tiny, executor, caplog):
    backend = tiny(ScalarOutputBackend)
    b = batcher(backend, executor, max_batch_size=8)
    first = await hold_first(b, backend, TEST_X[:1])
    tasks = [asyncio.ensure_future(b.infer({"x": TEST_X[i : i + 1]})) for i in range(1, 5)]
    await until(lambda: b.pending == 5)
    backend.gate.set()
    outs = await asyncio.gather(first, *tasks)
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out["probs"], tiny_reference(TEST_X[i : i + 1]), rtol=1e-5)
    assert not b.can_batch and "total" in b.not_batched_because
    assert sum("batching turned off" in r.message for r in caplog.records) == 1
    calls = len(backend.calls)
    await asyncio.gather(*(b.infer({"x": TEST_X[i : i + 1]}) for i in range(4)))
    assert backend.rows()[calls:] == [1, 1, 1, 1]


# ---- models that cannot batch --------------------------------------------------------


async def test_a_fixed_batch_model_runs_one_by_one(tiny, executor):
    fixed = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [1, 3]}],
    }
    backend = tiny(**fixed)
    assert not manifest_batchable(backend.manifest)
    b = batcher(backend, executor, max_batch_size=8, max_queue_delay_us=10_000_000)
    assert not b.can_batch and "fixed batch" in b.not_batched_because
    first = await hold_first(b, backend, TEST_X[:1])
    tasks = [asyncio.ensure_future(b.infer({"x": TEST_X[i : i + 1]})) for i in range(1, 6)]
    await until(lambda: b.pending == 6)
    backend.gate.set()
    # No waiting for company either: the 10 s delay does not apply.
    outs = await asyncio.wait_for(asyncio.gather(first, *tasks), 5.0)
    assert backend.rows() == [1] * 6
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out["probs"], tiny_reference(TEST_X[i : i + 1]), rtol=1e-5)


def test_rows_that_depend_on_each_other_keep_batching_off(tmp_path):
    """A dynamic batch in the manifest is not proof: y = x - mean over the batch."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["y"]),
        ],
        "centre",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    expected = TEST_X - TEST_X.mean(axis=0, keepdims=True)
    save_vectors(tmp_path / "selftest.npz", {"x": TEST_X}, {"y": expected})
    io = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "postprocessing": {"type": "raw"},
        "self_test": {"file": "selftest.npz"},
    }
    backend = OnnxBackend(tmp_path / "model.onnx", manifest(**io), OnnxConfig())
    backend.load()
    problem = check_rows_independent(backend, backend.manifest, tmp_path, 8)
    assert problem is not None and "differs batched vs one by one" in problem

    write_tiny_onnx(tmp_path / "model.onnx")
    save_vectors(tmp_path / "selftest.npz", {"x": TEST_X}, {"probs": tiny_reference(TEST_X)})
    good = OnnxBackend(
        tmp_path / "model.onnx", manifest(self_test={"file": "selftest.npz"}), OnnxConfig()
    )
    good.load()
    assert check_rows_independent(good, good.manifest, tmp_path, 8) is None


def test_warm_up_runs_every_batch_size_the_batcher_will_use(tiny, tmp_path):
    backend = tiny()
    save_vectors(tmp_path / "selftest.npz", {"x": TEST_X}, {"probs": tiny_reference(TEST_X)})
    m = manifest(self_test={"file": "selftest.npz"})
    sizes = warmup_batch_sizes(BatchingConfig(max_batch_size=16, preferred_batch_sizes=[4]), True)
    assert sizes == [1, 4, 16]
    result = warm_up(backend, m, tmp_path, sizes)
    assert backend.rows() == [1, 4, 16] and result.batch_problem is None
    assert warmup_batch_sizes(BatchingConfig(enabled=False), True) == [1]
    assert warmup_batch_sizes(BatchingConfig(max_batch_size=16), False) == [1]


# ---- metrics -----------------------------------------------------------------------


async def test_metrics_give_the_average_batch_size(tiny, executor):
    backend = tiny()
    b = batcher(backend, executor, max_batch_size=8)
    first = await hold_first(b, backend, TEST_X[:1])
    tasks = [asyncio.ensure_future(b.infer({"x": TEST_X[:2]})) for _ in range(4)]
    await until(lambda: b.pending == 5)
    backend.gate.set()
    await asyncio.gather(first, *tasks)
    m, key = b.metrics, ("tiny", "1")
    assert m.executions.values[key] == 2
    assert m.inference_rows.values[key] == 9  # average batch size 4.5
    assert m.inference_requests.values[(*key, "success")] == 5
    assert m.queue_duration.series[key].n == 5
    assert m.compute_duration.series[key].n == 2
    assert m.batch_size.series[key].total == 9
    text = m.render()
    assert 'edgefleet_inference_rows_total{model="tiny",version="1"} 9' in text
    assert 'edgefleet_batch_size_bucket{model="tiny",version="1",le="8"} 2' in text
    assert 'edgefleet_queue_waiting{model="tiny",version="1"} 0' in text


# ---- configuration ---------------------------------------------------------------------


def test_per_model_batching_overrides_only_what_it_names():
    config = parse_config("""
runtime:
  batching: {max_batch_size: 16, max_queue_delay_us: 500}
  per_model:
    digits-edge: {batching: {max_queue_delay_us: 0, preferred_batch_sizes: [8]}}
    face-detect: {batching: {enabled: false}}
""")
    rt = config.runtime
    assert rt.batching_for("digits-edge") == BatchingConfig(
        max_batch_size=16, max_queue_delay_us=0, preferred_batch_sizes=[8]
    )
    assert rt.batching_for("face-detect").enabled is False
    assert rt.batching_for("installed-later") == rt.batching
    assert RuntimeConfig().batching.enabled is True
    assert RuntimeConfig().batching.max_queue_delay_us == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "runtime: {batching: {max_batch_size: 4, preferred_batch_sizes: [8]}}",
            "preferred_batch_sizes [8] must lie in 1..max_batch_size (4)",
        ),
        (
            "runtime: {per_model: {m: {batching: {preferred_batch_sizes: [9]}}}}",
            "per_model.m.batching: preferred_batch_sizes [9]",
        ),
        ("runtime: {batching: {max_batch: 4}}", "runtime.batching.max_batch"),
        ("runtime: {batching: {max_queue_delay_us: -1}}", "max_queue_delay_us"),
    ],
)
def test_bad_batching_config_is_refused(text, message):
    with pytest.raises(
        ConfigError,
        match=message.replace("[", r"\[")
        .replace("]", r"\]")
        .replace("(", r"\(")
        .replace(")", r"\)"),
    ):
        parse_config(text)


# ---- in the agent: registry, HTTP, activation ------------------------------------------


async def _infer(session: aiohttp.ClientSession, url: str, x: np.ndarray) -> tuple[int, Any]:
    body = {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    async with session.post(url, json=body) as r:
        return r.status, (await r.json(), r.headers.get("Retry-After"))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_activation_swaps_under_load_without_losing_a_request(
    tmp_path, keys, make_tiny_bundle, start_agent, session
):
    v1, v2 = make_tiny_bundle("1"), make_tiny_bundle("2", weights=W2)
    config = agent_config(
        tmp_path,
        keys,
        [v1],
        runtime={"batching": {"max_batch_size": 8, "max_queue_delay_us": 1000}},
    )
    agent_ = await start_agent(config)
    registry = agent_.app[SERVICES].registry
    assert isinstance(registry.resolve("tiny").runner, DynamicBatcher)
    url = f"{agent_.base}/v2/models/tiny/infer"
    stop = asyncio.Event()
    answers: list[tuple[str, np.ndarray, np.ndarray]] = []
    rng = np.random.default_rng(3)

    async def client() -> None:
        while not stop.is_set():
            x = rng.normal(size=(1, 4)).astype(np.float32)
            status, (doc, _) = await _infer(session, url, x)
            assert status == 200, doc
            out = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(1, 3)
            answers.append((doc["model_version"], x, out))

    clients = [asyncio.ensure_future(client()) for _ in range(8)]
    await until(lambda: len(answers) >= 50)
    async with session.post(f"{agent_.base}/v1/bundles?activate=1", data=v2.read_bytes()) as r:
        assert r.status == 201, await r.text()
    n_at_swap = len(answers)
    await until(lambda: len(answers) >= n_at_swap + 50)
    stop.set()
    await asyncio.gather(*clients)
    versions = [v for v, _, _ in answers]
    assert "1" in versions and "2" in versions
    assert versions[-1] == "2"
    for version, x, out in answers:  # each answer is its own input's, by the version named
        np.testing.assert_allclose(
            out, tiny_reference(x, TINY_W if version == "1" else W2), rtol=1e-5, atol=1e-6
        )
    assert list(registry.loaded_versions("tiny")) == ["2"]  # 1 drained and unloaded


async def test_batching_off_serves_through_the_plain_runner(
    tmp_path, keys, make_tiny_bundle, start_agent, session
):
    config = agent_config(
        tmp_path, keys, [make_tiny_bundle("1")], runtime={"batching": {"enabled": False}}
    )
    agent_ = await start_agent(config)
    registry = agent_.app[SERVICES].registry
    assert isinstance(registry.resolve("tiny").runner, ModelRunner)
    status, _ = await _infer(session, f"{agent_.base}/v2/models/tiny/infer", TEST_X[:3])
    assert status == 200
    async with session.get(f"{agent_.base}/v1/models/tiny") as r:
        row = (await r.json())["versions"][0]
    assert row["batching"] == {"enabled": False, "instances": 1}


async def test_http_full_queue_and_per_model_settings(
    tmp_path, keys, make_tiny_bundle, start_agent, session, monkeypatch
):
    """Through the API: 503 + Retry-After when the queue is full; the model's own
    batching block wins over the global one."""
    made: list[GatedBackend] = []

    def gated(model_path: Path, m: Manifest, runtime: RuntimeConfig, instances: int | None = None):
        backend = GatedBackend(model_path, m, runtime.onnx, instances)
        made.append(backend)
        return backend

    monkeypatch.setattr(registry_module, "create_backend", gated)
    config = agent_config(
        tmp_path,
        keys,
        [make_tiny_bundle("1")],
        server={"max_queue_per_model": 3},
        runtime={
            "batching": {"max_batch_size": 2},
            "per_model": {"tiny": {"batching": {"max_batch_size": 4, "instances": 1}}},
        },
    )
    agent_ = await start_agent(config)
    lv = agent_.app[SERVICES].registry.resolve("tiny")
    assert lv.runner.describe()["max_batch_size"] == 4
    backend = made[0]
    assert lv.backend is backend
    backend.gate.clear()
    url = f"{agent_.base}/v2/models/tiny/infer"
    held = [asyncio.ensure_future(_infer(session, url, TEST_X[i : i + 1])) for i in range(3)]
    await until(lambda: lv.runner.pending == 3)
    status, (doc, retry_after) = await _infer(session, url, TEST_X[:1])
    assert status == 503 and "queue is full" in doc["error"]
    assert retry_after is not None and int(retry_after) >= 1
    backend.gate.set()
    for status, _ in await asyncio.gather(*held):
        assert status == 200
    async with session.get(f"{agent_.base}/metrics") as r:
        text = await r.text()
    assert (
        'edgefleet_inference_requests_total{model="tiny",version="1",outcome="rejected"} 1' in text
    )

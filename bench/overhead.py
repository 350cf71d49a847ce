"""``python -m bench overhead``: what the agent costs on top of the model itself.

One run measures, on this machine:

* ``json_small_p50_overhead_ms``: p50 of a JSON OIP infer request for digits-edge
  (1x64 FP32) over loopback, minus p50 of ``backend.infer`` on the same extracted
  model and input in this process.
* ``binary_224_p50_overhead_ms``: the same for a 1x3x224x224 FP32 tensor sent and
  answered with the binary tensor extension, to a small ONNX model built here
  (GlobalAveragePool + Gemm -> 10 logits) and signed with a throw-away bench key.
* ``idle_rss_mb``: VmRSS of ``edge-agent serve`` with digits-edge and face-detect
  loaded, idle after warm-up.
* ``start_to_ready_s``: spawn to ``/v2/health/ready`` = 200 with those models, the
  store already populated (median of a few restarts); the first start, which
  installs the bundles, is reported beside it.
* digits-edge int8 vs its fp32 reference: the converter's figures from the signed
  manifest, and the same two models re-measured here with the agent's backend.

Beside the agent, a do-nothing aiohttp server is measured with the same requests:
the floor any aiohttp-based server pays for HTTP on this box, which tells how much
of the overhead is the agent's own code.
"""

from __future__ import annotations

import argparse
import http.client
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.common import (
    BUSY_WARNING,
    MODELS_BUILD,
    AgentProcess,
    CpuMeter,
    HttpError,
    KeepAliveClient,
    Stats,
    add_run_options,
    ensure_models,
    free_port,
    machine_info,
    machine_markdown,
    process_cpu_s,
    rss_mb,
    time_calls,
    timed_requests,
    wait_http_ready,
    wait_until_quiet,
    warn_if_busy,
    write_doc_section,
    write_result,
)
from edgefleet.agent.config import RuntimeConfig, load_config
from edgefleet.agent.server.tensors import HEADER_LENGTH
from edgefleet.core.backends import Backend, create_backend
from edgefleet.core.bundle.archive import BundleContents, read_bundle
from edgefleet.core.bundle.manifest import OIP_TO_NUMPY, ClassificationPost, Manifest
from edgefleet.core.bundle.signing import TrustStore, generate_keypair, load_private_key

NAME = "overhead"
DIGITS = "digits-edge"
FACE = "face-detect"
POOL = "bench-pool224"
POOL_SHAPE = (1, 3, 224, 224)
POOL_CLASSES = 10
WARM_RESTARTS = 3
# Other work above this share of the box's CPU makes the figures pessimistic: say so.

GOALS: dict[str, float] = {
    "json_small_p50_overhead_ms": 0.3,
    "binary_224_p50_overhead_ms": 1.0,
    "idle_rss_mb": 120.0,
    "start_to_ready_s": 2.0,
}


# ---- the bench model -----------------------------------------------------------------


def write_pool_onnx(path: Path) -> Path:
    """image FP32 [N,3,224,224] -> GlobalAveragePool -> Flatten -> Gemm -> logits [N,10].

    Almost no compute, so what is left of a round trip is moving 588 KiB of tensor.
    """
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    w = rng.normal(size=(POOL_SHAPE[1], POOL_CLASSES)).astype(np.float32)
    b = rng.normal(size=(POOL_CLASSES,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        ],
        "bench_pool224",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", POOL_CLASSES])],
        [
            helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.flatten().tolist()),
            helper.make_tensor("B", TensorProto.FLOAT, b.shape, b.tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def build_pool_bundle(work: Path) -> tuple[Path, Path]:
    """The bench model as a bundle signed with a fresh bench key; (bundle, public key)."""
    from edgefleet.converters.bundler import build_bundle

    priv, pub = generate_keypair(work / "keys", "bench")
    model = write_pool_onnx(work / "pool224.onnx")
    out = work / f"{POOL}-1.bundle"
    build_bundle(
        out=out,
        model_file=model,
        manifest={
            "name": POOL,
            "version": "1",
            "runtime": "onnx",
            "description": "bench only: 3x224x224 -> global average pool -> 10 logits",
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, *POOL_SHAPE[1:]]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, POOL_CLASSES]}],
        },
        test_inputs={"image": np.random.default_rng(2).random(POOL_SHAPE, dtype=np.float32)},
        private_key=load_private_key(priv),
        self_test={"atol": 1e-4},
    )
    return out, pub


# ---- requests ------------------------------------------------------------------------


def json_request(client: KeepAliveClient, model: str, name: str, x: np.ndarray) -> bytes:
    doc = {
        "inputs": [
            {
                "name": name,
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.reshape(-1).tolist(),
            }
        ]
    }
    return client.prepare(
        "POST",
        f"/v2/models/{model}/infer",
        orjson.dumps(doc),
        {"Content-Type": "application/json"},
    )


def binary_body(manifest: Manifest, inputs: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """OIP binary-extension body for ``inputs``, every output asked for in binary."""
    raws = {k: np.ascontiguousarray(v).tobytes() for k, v in inputs.items()}
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": k,
                    "datatype": next(t.datatype for t in manifest.inputs if t.name == k),
                    "shape": list(v.shape),
                    "parameters": {"binary_data_size": len(raws[k])},
                }
                for k, v in inputs.items()
            ],
            "outputs": [
                {"name": t.name, "parameters": {"binary_data": True}} for t in manifest.outputs
            ],
        }
    )
    return header + b"".join(raws.values()), len(header)


def binary_request(
    client: KeepAliveClient, manifest: Manifest, inputs: dict[str, np.ndarray]
) -> bytes:
    body, header_len = binary_body(manifest, inputs)
    return client.prepare(
        "POST",
        f"/v2/models/{manifest.name}/infer",
        body,
        {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_len)},
    )


def split_binary_response(body: bytes, headers: dict[str, str]) -> tuple[dict[str, Any], bytes]:
    n = int(headers.get(HEADER_LENGTH.lower(), len(body)))
    return orjson.loads(body[:n]), body[n:]


def server_ms(bodies: list[bytes], binary_tail: int = 0) -> Stats | None:
    """The agent's own ``parameters.latency_ms`` (handler start to answer ready).

    ``binary_tail`` is the size of the binary outputs after the JSON header.
    """
    values: list[int] = []
    for body in bodies:
        head = orjson.loads(body[: len(body) - binary_tail])
        ms = head.get("parameters", {}).get("latency_ms")
        if ms is not None:
            values.append(int(ms * 1e6))
    return Stats.from_ns(values) if values else None


def zeros_for(manifest: Manifest) -> dict[str, np.ndarray]:
    """A batch-1 input of zeros for every model input (warm-up only)."""
    return {
        t.name: np.zeros([1 if d == -1 else d for d in t.shape], dtype=OIP_TO_NUMPY[t.datatype])
        for t in manifest.inputs
    }


def http_client_latencies(
    port: int, path: str, body: bytes, headers: dict[str, str], n: int, warmup: int
) -> list[int]:
    """The same request with the stdlib's http.client (for comparison with our client)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def once() -> None:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise HttpError(f"http.client request failed with {resp.status}: {data[:200]!r}")

    try:
        return time_calls(once, n, warmup)
    finally:
        conn.close()


# ---- the do-nothing server ---------------------------------------------------------


def serve_floor(port: int) -> None:
    """An aiohttp server whose infer route reads the body and returns a fixed answer.

    Same framework, same loop policy, same access-log setting as the agent: the
    difference between it and the agent is the agent's own request handling.
    """
    from aiohttp import web

    answer = orjson.dumps(
        {
            "model_name": "floor",
            "model_version": "1",
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10}
            ],
        }
    )

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=answer, content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(body=b'{"ready":true}', content_type="application/json")

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v2/models/{model}/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class FloorServer:
    """``serve_floor`` in its own process, like the agent."""

    def __init__(self) -> None:
        self.port = free_port()
        code = "import sys; from bench.overhead import serve_floor; serve_floor(int(sys.argv[1]))"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(self.port)],
            cwd=Path(__file__).resolve().parent.parent,
        )
        self.pid = self.proc.pid
        wait_http_ready(self.port, "/v2/health/ready", self.proc, timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def __enter__(self) -> FloorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- in-process ----------------------------------------------------------------------


def extract(bundle: Path, public_key: Path, dest: Path) -> BundleContents:
    """Verify and extract a bundle exactly as the agent's store would."""
    return read_bundle(bundle, dest, TrustStore.from_files([public_key]))


def open_backend(model_file: Path, manifest: Manifest, runtime: RuntimeConfig) -> Backend:
    backend = create_backend(model_file, manifest, runtime)
    backend.load()
    return backend


def in_process(backend: Backend, inputs: dict[str, np.ndarray], n: int, warmup: int) -> Stats:
    return Stats.from_ns(time_calls(lambda: backend.infer(inputs), n, warmup))


# ---- the run -------------------------------------------------------------------------


@dataclass
class Paths:
    build: Path
    public_key: Path
    digits_bundle: Path
    face_bundle: Path
    test_set: Path
    runtime: RuntimeConfig


def find_inputs() -> Paths:
    build = ensure_models([f"{DIGITS}-*.bundle", f"{FACE}-*.bundle", "digits-test.npz"])
    config = load_config(build / "agent.yaml")

    def bundle_of(name: str) -> Path:
        # agent.yaml lists what the build made; <name>-<version>.bundle with no '-' in
        # the version, so digits-edge does not pick up digits-edge-litert.
        for entry in config.models:
            stem = entry.bundle.name.removesuffix(".bundle")
            head, _, version = stem.rpartition("-")
            if head == name and version:
                return entry.bundle
        raise SystemExit(f"bench: {build / 'agent.yaml'} serves no {name} bundle")

    return Paths(
        build=build,
        public_key=config.trust.public_keys[0],
        digits_bundle=bundle_of(DIGITS),
        face_bundle=bundle_of(FACE),
        test_set=build / "digits-test.npz",
        runtime=config.runtime,
    )


def agent_config(
    store: Path, public_keys: list[Path], bundles: list[Path], runtime: RuntimeConfig
) -> dict[str, Any]:
    """An agent config like models/build/agent.yaml (same runtime section), own store."""
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": {"path": str(store)},
        "trust": {"public_keys": [str(k) for k in public_keys]},
        "runtime": runtime.model_dump(mode="json"),
        "models": [{"bundle": str(b), "labels": ["stable"]} for b in bundles],
        "logging": {"level": "INFO"},
    }


def _ready_breakdown(log: str) -> float | None:
    """The agent logs 'agent ready in X s' counted from create_app (after the imports)."""
    found = re.findall(r"agent ready in ([0-9.]+) s", log)
    return float(found[-1]) if found else None


def _load_times(log: str) -> dict[str, float]:
    """'loaded NAME:VERSION on PROVIDER in N ms' lines: load + self-test time per model."""
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"loaded (\S+) on \S+ in ([0-9.]+) ms", log)
    }


def accuracy_and_latency(
    model_file: Path,
    manifest: Manifest,
    runtime: RuntimeConfig,
    x: np.ndarray,
    y: np.ndarray,
    n: int,
) -> dict[str, Any]:
    """Held-out accuracy (one batched call) and batch-1 latency, via the agent's backend."""
    name = manifest.inputs[0].name
    post = manifest.postprocessing
    scores = post.output if isinstance(post, ClassificationPost) else manifest.outputs[0].name
    backend = open_backend(model_file, manifest, runtime)
    try:
        probs = backend.infer({name: x})[scores]
        acc = float((probs.argmax(axis=1) == y).mean())
        lat = in_process(backend, {name: x[:1]}, n, warmup=100)
    finally:
        backend.unload()
    return {
        "accuracy": round(acc, 4),
        "eval_samples": len(y),
        "latency_p50_ms": lat.p50_ms,
        "latency_mean_ms": lat.mean_ms,
        "size_bytes": model_file.stat().st_size,
    }


@dataclass
class Case:
    """One measured case; ``measure(k)`` runs ``k`` timed calls after its own warm-up."""

    name: str
    measure: Callable[[int], tuple[list[int], list[bytes]]]
    server_pid: int | None = None  # whose CPU time to count, for HTTP cases
    latencies: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    round_p50_ms: list[float] = field(default_factory=list)
    server_cpu_s: float = 0.0
    calls: int = 0

    def run_round(self, k: int) -> None:
        # Warm-up requests are inside measure(), so the CPU count includes them.
        cpu0 = process_cpu_s(self.server_pid) if self.server_pid else 0.0
        lat, bodies = self.measure(k)
        if self.server_pid:
            self.server_cpu_s += process_cpu_s(self.server_pid) - cpu0
        self.latencies += lat
        self.bodies += bodies
        self.calls += k
        self.round_p50_ms.append(round(float(np.median(lat)) / 1e6, 4))

    def summary(self, warmup: int, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stats": Stats.from_ns(self.latencies).as_dict(),
            "p50_by_round_ms": self.round_p50_ms,
        }
        if self.server_pid:
            per_request = self.server_cpu_s / (self.calls + warmup * len(self.round_p50_ms))
            out["server_cpu_us_per_request"] = round(per_request * 1e6, 1)
        return out | extra


def _in_process_case(
    name: str, backend: Backend, inputs: dict[str, np.ndarray], warmup: int
) -> Case:
    return Case(name, lambda k: (time_calls(lambda: backend.infer(inputs), k, warmup), []))


def _http_case(
    name: str, client: KeepAliveClient, request: bytes, warmup: int, server_pid: int
) -> Case:
    return Case(name, lambda k: timed_requests(client, request, k, warmup), server_pid)


def run(n: int, warmup: int, rounds: int, busy_before: float) -> dict[str, Any]:
    started = time.monotonic()
    paths = find_inputs()
    machine = machine_info()
    meter = CpuMeter()
    notes: list[str] = []
    per_round = max(1, n // rounds)
    round_warmup = max(1, warmup // rounds)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp_dir, ExitStack() as stack:
        tmp = Path(tmp_dir)
        pool_bundle, bench_pub = build_pool_bundle(tmp / "pool")
        digits = extract(paths.digits_bundle, paths.public_key, tmp / "x" / DIGITS)
        pool = extract(pool_bundle, bench_pub, tmp / "x" / POOL)
        dm, pm = digits.manifest, pool.manifest
        with np.load(paths.test_set, allow_pickle=False) as data:
            x_test, y_test = data["x"].astype(np.float32), data["y"]
        # A real held-out digit and a fixed random image: the same inputs on every path.
        x_small = np.ascontiguousarray(x_test[:1])
        x_big = np.random.default_rng(3).random(POOL_SHAPE, dtype=np.float32)

        # -- digits-edge int8 vs fp32 (before any agent runs: nothing else on the cores) --
        quant: dict[str, Any] = {"manifest_metrics": dict(dm.metrics)}
        quant["int8_measured_here"] = accuracy_and_latency(
            digits.directory / dm.model_file, dm, paths.runtime, x_test, y_test, n=1000
        )
        fp32_file = paths.build / "work" / "digits" / "digits-edge.fp32.onnx"
        if fp32_file.is_file():
            quant["fp32_measured_here"] = accuracy_and_latency(
                fp32_file, dm, paths.runtime, x_test, y_test, n=1000
            )
        else:
            notes.append(f"{fp32_file} not found: fp32 not re-measured here")

        # -- starts: the first installs both bundles, the restarts find them in the store --
        store = tmp / "store"
        cfg = agent_config(
            store, [paths.public_key], [paths.digits_bundle, paths.face_bundle], paths.runtime
        )
        first = AgentProcess(cfg, tmp, "agent-first-start")
        try:
            first_s = first.start()
        finally:
            first.stop()
        first_log = first.log_text()
        restarts: list[dict[str, Any]] = []
        agent: AgentProcess | None = None
        for i in range(WARM_RESTARTS):
            if agent is not None:
                agent.stop()
            agent = stack.enter_context(AgentProcess(cfg, tmp, f"agent-restart-{i}"))
            ready_s = agent.start()
            log = agent.log_text()
            restarts.append(
                {
                    "spawn_to_ready_s": round(ready_s, 3),
                    "create_app_to_ready_s": _ready_breakdown(log),
                    "model_load_ms": _load_times(log),
                }
            )
        assert agent is not None

        # -- idle memory: every loaded model has answered a few requests ------------------
        face_manifest = Manifest.model_validate_json(
            next((store / FACE).glob("*/manifest.json")).read_bytes()
        )
        with agent.client() as c:
            for req in (
                json_request(c, DIGITS, "pixels", x_small),
                binary_request(c, face_manifest, zeros_for(face_manifest)),
            ):
                timed_requests(c, req, 0, warmup=20)
        time.sleep(1.0)  # let inference threads go idle (ONNX Runtime spins after a run)
        rss_idle = rss_mb(agent.pid)

        # -- latency cases, interleaved ----------------------------------------------------
        # The bench model runs in its own agent so the RSS figure above is exactly
        # digits-edge + face-detect; the do-nothing server gives the HTTP floor.
        pool_agent = stack.enter_context(
            AgentProcess(
                agent_config(tmp / "store-pool", [bench_pub], [pool_bundle], paths.runtime),
                tmp,
                "agent-pool",
            )
        )
        pool_agent.start()
        floor = stack.enter_context(FloorServer())
        small_backend = open_backend(digits.directory / dm.model_file, dm, paths.runtime)
        stack.callback(small_backend.unload)
        big_backend = open_backend(pool.directory / pm.model_file, pm, paths.runtime)
        stack.callback(big_backend.unload)
        small_ref = small_backend.infer({"pixels": x_small})
        big_ref = big_backend.infer({"image": x_big})
        c_small = stack.enter_context(agent.client())
        c_big = stack.enter_context(pool_agent.client())
        c_floor = stack.enter_context(KeepAliveClient("127.0.0.1", floor.port))
        req_small = json_request(c_small, DIGITS, "pixels", x_small)
        req_big = binary_request(c_big, pm, {"image": x_big})
        small_body = req_small.split(b"\r\n\r\n", 1)[1]
        cases = [
            _in_process_case(
                "json_small_inprocess", small_backend, {"pixels": x_small}, round_warmup
            ),
            _http_case("json_small_agent", c_small, req_small, round_warmup, agent.pid),
            _http_case("json_small_floor", c_floor, req_small, round_warmup, floor.pid),
            Case(
                "json_small_agent_http_client",
                lambda k: (
                    http_client_latencies(
                        agent.port,
                        f"/v2/models/{DIGITS}/infer",
                        small_body,
                        {"Content-Type": "application/json"},
                        k,
                        round_warmup,
                    ),
                    [],
                ),
                agent.pid,
            ),
            _in_process_case("binary_224_inprocess", big_backend, {"image": x_big}, round_warmup),
            _http_case("binary_224_agent", c_big, req_big, round_warmup, pool_agent.pid),
            _http_case("binary_224_floor", c_floor, req_big, round_warmup, floor.pid),
        ]
        # Rounds of every case in turn: a burst of other work on the box then slows all
        # cases a little instead of one case a lot.
        for _ in range(rounds):
            for case in cases:
                case.run_round(per_round)
        by_name = {c.name: c for c in cases}

        # Same model, same input: the agent must give the in-process answer.
        answer = orjson.loads(by_name["json_small_agent"].bodies[-1])
        got = np.asarray(answer["outputs"][0]["data"], dtype=np.float32)
        if not np.allclose(got, small_ref["probabilities"].reshape(-1), atol=1e-6):
            raise RuntimeError("the agent's JSON answer differs from the in-process one")
        status, headers, last = c_big.roundtrip(req_big)
        _, raw = split_binary_response(last, headers)
        got_big = np.frombuffer(raw, dtype=np.float32).reshape(big_ref["logits"].shape)
        if status != 200 or not np.allclose(got_big, big_ref["logits"], atol=1e-5):
            raise RuntimeError("the agent's binary answer differs from the in-process one")
        rss_after = rss_mb(agent.pid)
        # OpenCV is imported on the first image request: say what that costs too.
        photo = (MODELS_BUILD / "demo" / "face-detect" / "astronaut.png").read_bytes()
        with agent.client() as c:
            status, _, _ = c.roundtrip(c.prepare("POST", f"/v1/predict/{FACE}", photo, {}))
            if status != 200:
                raise RuntimeError(f"image request to {FACE} answered {status}")
        time.sleep(1.0)
        rss_after_image = rss_mb(agent.pid)

        results: dict[str, dict[str, Any]] = {}
        for case in cases:
            extra: dict[str, Any] = {}
            if case.name.endswith(("_agent", "_floor")):
                extra["client"] = "bench KeepAliveClient"
            if case.name == "json_small_agent":
                extra |= {
                    "server_reported": _as_dict(server_ms(case.bodies)),
                    "request_bytes": len(req_small),
                    "response_bytes": len(case.bodies[-1]),
                }
            if case.name == "binary_224_agent":
                extra |= {
                    "server_reported": _as_dict(server_ms(case.bodies, len(raw))),
                    "request_bytes": len(req_big),
                    "response_bytes": len(last),
                }
            if case.name == "json_small_agent_http_client":
                extra["client"] = "http.client (stdlib)"
            results[case.name] = case.summary(round_warmup, **extra)
        # Every process this run started must be waited for before the CPU meter reads.
        stack.close()

    def p50(case: str) -> float:
        return float(results[case]["stats"]["p50_ms"])

    warm_ready = statistics.median(r["spawn_to_ready_s"] for r in restarts)
    figures = {
        "json_small_p50_overhead_ms": round(
            p50("json_small_agent") - p50("json_small_inprocess"), 3
        ),
        "binary_224_p50_overhead_ms": round(
            p50("binary_224_agent") - p50("binary_224_inprocess"), 3
        ),
        "idle_rss_mb": rss_idle["VmRSS"],
        "start_to_ready_s": round(warm_ready, 3),
    }
    return {
        "benchmark": NAME,
        "machine": machine,
        "goals": GOALS,
        **figures,
        "first_start_to_ready_s": round(first_s, 3),
        "goals_met": {k: bool(figures[k] <= GOALS[k]) for k in GOALS},
        "digits_edge_quantization": quant,
        "details": {
            "requests_per_case": per_round * rounds,
            "warmup_per_case": round_warmup * rounds,
            "rounds": rounds,
            "concurrency": 1,
            "cases": results,
            "floor_p50_ms": {
                "json_small": p50("json_small_floor"),
                "binary_224": p50("binary_224_floor"),
            },
            "agent_minus_floor_p50_ms": {
                "json_small": round(p50("json_small_agent") - p50("json_small_floor"), 3),
                "binary_224": round(p50("binary_224_agent") - p50("binary_224_floor"), 3),
            },
            "starts": {
                "first": {
                    "spawn_to_ready_s": round(first_s, 3),
                    "create_app_to_ready_s": _ready_breakdown(first_log),
                    "model_load_ms": _load_times(first_log),
                },
                "restarts": restarts,
            },
            "rss_mb": {
                "idle_after_warmup": rss_idle,
                "after_load": rss_after,
                "after_first_image": rss_after_image,
            },
            "runtime_config": paths.runtime.model_dump(mode="json"),
            "bundles": {
                DIGITS: paths.digits_bundle.name,
                FACE: paths.face_bundle.name,
                POOL: "built by the bench, signed with a throw-away key",
            },
            "notes": notes,
            "box_load": {"busy_share_before": round(busy_before, 3), **meter.stop()},
            "duration_s": round(time.monotonic() - started, 1),
        },
    }


def _as_dict(stats: Stats | None) -> dict[str, Any] | None:
    return stats.as_dict() if stats is not None else None


# ---- report --------------------------------------------------------------------------


def _fmt(value: float | None, unit: str, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f} {unit}"


def _where_time_goes(cases: dict[str, Any], agent_minus_floor: dict[str, float]) -> list[str]:
    """A data-driven paragraph: handler time, HTTP floor, server CPU per request."""
    lines = []
    for label, key in (("JSON small", "json_small"), ("binary 224", "binary_224")):
        agent, floor = cases[f"{key}_agent"], cases[f"{key}_floor"]
        srv = (agent.get("server_reported") or {}).get("p50_ms")
        cpu, floor_cpu = (
            agent.get("server_cpu_us_per_request"),
            floor.get("server_cpu_us_per_request"),
        )
        p50_us = agent["stats"]["p50_ms"] * 1000
        text = (
            f"- {label}: the agent's own `latency_ms` (handler start to answer ready, model"
            f" included) has p50 {_fmt(srv, 'ms')}; the agent is"
            f" {agent_minus_floor[key]:.3f} ms slower than the do-nothing aiohttp server,"
            " which is what the agent's code adds over HTTP + aiohttp."
        )
        if cpu is not None and floor_cpu is not None:
            text += f" Server CPU per request: {cpu:.0f} µs (do-nothing server {floor_cpu:.0f} µs)."
            if cpu > p50_us:
                text += (
                    " More CPU than wall-clock time per request: more than one agent thread"
                    " is busy per request (ONNX Runtime's intra-op threads spin-wait after"
                    " each run), taking a core the client and the event loop need."
                )
        lines.append(text)
    return ["Where the time goes (p50):", "", *lines]


def render_markdown(doc: dict[str, Any]) -> str:
    d = doc["details"]
    cases = d["cases"]
    met = doc["goals_met"]

    def row(label: str, key: str, unit: str, digits: int) -> str:
        ok = "yes" if met[key] else "**no**"
        return (
            f"| {label} | {_fmt(doc[key], unit, digits)} | ≤ {doc['goals'][key]:g} {unit} | {ok} |"
        )

    load = d["box_load"]
    lines = [
        "## Overhead (`python -m bench overhead`)",
        "",
        "What the agent costs on top of the model: loopback round trips against an",
        "`edge-agent serve` process compared with calling the same backend in-process,",
        "its resident memory, and how fast it is ready after a (re)start.",
        "",
    ]
    if load["others_share_of_box"] > BUSY_WARNING:
        lines += [
            f"> **Measured on a busy box:** other processes used"
            f" {load['others_share_of_box']:.0%} of its CPU during this run, so the latencies"
            " below are pessimistic. Rerun on an idle machine for comparable figures.",
            "",
        ]
    lines += [
        "| figure | measured | goal | met |",
        "|---|---|---|---|",
        row(
            "JSON infer, digits-edge 1×64 FP32: p50 overhead", "json_small_p50_overhead_ms", "ms", 3
        ),
        row("binary infer, 1×3×224×224 FP32: p50 overhead", "binary_224_p50_overhead_ms", "ms", 3),
        row("idle RSS, digits-edge + face-detect loaded", "idle_rss_mb", "MB", 1),
        row("spawn to ready, store populated (median of restarts)", "start_to_ready_s", "s", 2),
        f"| first start (installs both bundles) | {doc['first_start_to_ready_s']:.2f} s | - | - |",
        "",
        f"Latencies: {d['requests_per_case']} sequential requests per case (concurrency 1)"
        f" after {d['warmup_per_case']} warm-up requests, every one recorded.",
        "",
        "| case | p50 ms | p90 ms | p99 ms | mean ms | server CPU µs/request |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "json_small_inprocess": "digits-edge `backend.infer`, in-process",
        "json_small_agent": "digits-edge JSON infer via the agent",
        "json_small_agent_http_client": "same, client = stdlib http.client",
        "json_small_floor": "same request, do-nothing aiohttp server",
        "binary_224_inprocess": "pool224 `backend.infer`, in-process",
        "binary_224_agent": "pool224 binary infer via the agent",
        "binary_224_floor": "same request, do-nothing aiohttp server",
    }
    for key, label in labels.items():
        s = cases[key]["stats"]
        cpu = cases[key].get("server_cpu_us_per_request")
        lines.append(
            f"| {label} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f}"
            f" | {s['mean_ms']:.3f} | {'-' if cpu is None else f'{cpu:.0f}'} |"
        )
    lines += ["", *_where_time_goes(cases, d["agent_minus_floor_p50_ms"])]
    starts = d["starts"]
    rss = d["rss_mb"]["idle_after_warmup"]
    restart_s = ", ".join(f"{r['spawn_to_ready_s']:.2f}" for r in starts["restarts"])
    app_s = [r["create_app_to_ready_s"] for r in starts["restarts"]]
    lines += [
        "",
        f"Starts: restarts {restart_s} s (spawn to 200 from `/v2/health/ready`, polled every"
        " 5 ms); of that, the agent's own log puts create_app-to-ready at"
        f" {', '.join(_fmt(v, 's', 2) for v in app_s)}, the rest is the interpreter and"
        f" imports. First start {doc['first_start_to_ready_s']:.2f} s"
        f" (create_app to ready {_fmt(starts['first']['create_app_to_ready_s'], 's', 2)}).",
        "",
        f"RSS (VmRSS from /proc/PID/status): idle {rss['VmRSS']:.1f} MB, of which"
        f" {rss['RssAnon']:.1f} MB anonymous (Python objects, runtime arenas) and"
        f" {rss['RssFile']:.1f} MB file-backed (shared libraries: ONNX Runtime, LiteRT,"
        f" ...); {d['rss_mb']['after_load']['VmRSS']:.1f} MB after the latency runs;"
        f" {d['rss_mb']['after_first_image']['VmRSS']:.1f} MB after the first image request"
        " (OpenCV is imported then, not at start: a box whose apps send only tensors never"
        " pays for it).",
    ]
    q = doc["digits_edge_quantization"]
    mm = q["manifest_metrics"]
    i8, f32 = q.get("int8_measured_here", {}), q.get("fp32_measured_here", {})
    lines += [
        "",
        "### digits-edge: int8 vs fp32",
        "",
        "The converter's figures are read from the signed bundle manifest; the agent's",
        "ONNX backend re-measures both models here (held-out split, batch-1 p50).",
        "",
        "| | fp32 | int8 |",
        "|---|---|---|",
        f"| accuracy (converter, {mm.get('eval_samples', '?')} held-out digits)"
        f" | {mm.get('accuracy_fp32', '-')} | {mm.get('accuracy_int8', '-')} |",
        f"| accuracy (re-measured here) | {f32.get('accuracy', '-')} | {i8.get('accuracy', '-')} |",
        f"| latency ms, batch 1 (converter) | {mm.get('latency_ms_fp32', '-')}"
        f" | {mm.get('latency_ms_int8', '-')} |",
        f"| latency ms p50, batch 1 (here) | {f32.get('latency_p50_ms', '-')}"
        f" | {i8.get('latency_p50_ms', '-')} |",
        f"| model size bytes | {mm.get('size_bytes_fp32', '-')}"
        f" | {mm.get('size_bytes_int8', '-')} |",
        "",
        "### Machine and method",
        "",
        machine_markdown(doc["machine"]),
        f"Other processes used {load['others_share_of_box']:.0%} of the box's CPU during the"
        f" run ({load['others_cpu_s']:.1f} CPU-s of {load['wall_s']:.0f} s wall).",
        "",
        "- The agent runs as its own process (`edge-agent serve`), started from a config",
        "  like `models/build/agent.yaml` (same runtime section) with a fresh store; the",
        "  load generator is a separate process, so client and server never share a GIL.",
        f"- On this {doc['machine']['cores']}-core box the client, the agent's event loop and",
        "  ONNX Runtime's threads compete for the same cores: part of the overhead is that",
        "  contention, which a box with more cores (or a client on another core) would not see.",
        "- The in-process reference is `backend.infer` on the same extracted, verified model",
        "  with the same input, created with `edgefleet.core.backends.create_backend`.",
        "- The client is a minimal HTTP/1.1 keep-alive client (one `sendall` per request,",
        "  `bench/common.py`), so the figure is what the agent adds, not what a client",
        "  library adds; the stdlib http.client row shows the cost of a common client.",
        "- The binary case sends the input with the binary tensor extension",
        "  (`Inference-Header-Content-Length`) and asks for the output in binary too.",
        "",
        "Rerun: `make bench` or `.venv/bin/python -m bench overhead` (this run took"
        f" {d['duration_s']:.0f} s; the sample models are built first, about 40 s, if"
        " `models/build` lacks them). Options: `--requests N` per case, `--rounds R`,"
        " `--wait-quiet S` (how long to wait for other work on the box to stop first),"
        " `--no-doc`. Raw figures: `bench/results/overhead.json`.",
    ]
    if d["notes"]:
        lines += ["", "Notes: " + "; ".join(d["notes"])]
    return "\n".join(lines)


def summary(doc: dict[str, Any]) -> str:
    out = []
    for key, goal in doc["goals"].items():
        flag = "ok  " if doc["goals_met"][key] else "MISS"
        out.append(f"{flag} {key:<28} {doc[key]:>9.3f}  (goal <= {goal:g})")
    out.append(f"     {'first_start_to_ready_s':<28} {doc['first_start_to_ready_s']:>9.3f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per case")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests per case")
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="the cases take turns this many times (requests split evenly)",
    )
    add_run_options(parser)
    args = parser.parse_args(argv)
    busy = wait_until_quiet(args.wait_quiet)
    doc = run(args.requests, args.warmup, args.rounds, busy)
    others = doc["details"]["box_load"]["others_share_of_box"]
    warn_if_busy(others)
    path = write_result(NAME, doc)
    print(summary(doc))
    print(f"wrote {path}")
    if not args.no_doc:
        print(f"wrote {write_doc_section(NAME, render_markdown(doc))}")
    return 0

"""``python -m bench serving``: the agent against the servers teams install today.

One run, one machine, one load generator, the same model files:

* **edgefleet agent** (``edge-agent serve``), dynamic batching off and on;
* **MLServer 1.7.1** with a ~20-line ONNX Runtime ``MLModel`` (``bench/peers``), with
  ``parallel_workers: 0`` and with its default worker process, and with its adaptive
  batching on for the CNN;
* a minimal **FastAPI + uvicorn** app speaking OIP v2 JSON around the same session.

Models: a tiny 4->3 softmax (overhead-bound), ``digits-edge`` (the sample bundle), and
a MobileNetV1-size CNN at 224x224 in fp32 and int8 (``bench/cnn.py``). The peers run
in their own venv (``bench/.venv-peers``, made once from
``bench/peers-constraints.txt``), never in the project's.

The load is closed-loop: N keep-alive connections, each sending its next request as
soon as the previous answer is in, every latency recorded. Results:
``bench/results/serving.json`` (one row per server x model x concurrency x batching)
and a section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.cnn import (
    CNN_CLASSES,
    CNN_SHAPE,
    TINY_CLASSES,
    TINY_FEATURES,
    quantize_cnn,
    random_images,
    write_mobilenet_onnx,
    write_tiny_onnx,
)
from bench.common import (
    BUSY_WARNING,
    MODELS_BUILD,
    ROOT,
    AgentProcess,
    CpuMeter,
    HttpError,
    KeepAliveClient,
    Stats,
    add_run_options,
    box_busy_cpu_s,
    ensure_models,
    free_port,
    machine_info,
    machine_markdown,
    no_gc,
    process_cpu_s,
    rss_mb,
    time_calls,
    wait_http_ready,
    wait_until_quiet,
    warn_if_busy,
    write_doc_section,
    write_result,
)
from bench.overhead import (
    agent_config,
    binary_request,
    extract,
    json_request,
    split_binary_response,
)
from edgefleet.agent.config import RuntimeConfig, load_config
from edgefleet.core.backends import Backend, create_backend
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.bundle.signing import generate_keypair, load_private_key

NAME = "serving"
PEERS_DIR = ROOT / "bench" / "peers"
PEERS_VENV = ROOT / "bench" / ".venv-peers"
PEERS_CONSTRAINTS = ROOT / "bench" / "peers-constraints.txt"
# What the peers venv needs; exact versions come from PEERS_CONSTRAINTS. httptools is
# uvicorn's fast parser (what `uvicorn[standard]` adds): without it MLServer and the
# FastAPI app would run on the pure-Python h11 and look slower than a real deployment.
PEER_PACKAGES = (
    "mlserver",
    "uvloop",
    "fastapi",
    "uvicorn",
    "httptools",
    "onnxruntime",
    "numpy",
    "orjson",
)
PEER_VERSIONS_SHOWN = ("mlserver", "fastapi", "uvicorn", "starlette", "uvloop", "httptools")

TINY, DIGITS, CNN_FP32, CNN_INT8 = "tiny", "digits-edge", "cnn-fp32", "cnn-int8"
MODEL_ORDER = (TINY, DIGITS, CNN_FP32, CNN_INT8)
CNN_MODELS = (CNN_FP32, CNN_INT8)
CONCURRENCY = (1, 16, 64)

# The agent's batching when on: what the goals are stated for (delay 0: a lone
# request is never held back; under load whatever queued while the model ran goes in
# the next execution). Keys of agent/config.py's runtime.batching.
AGENT_BATCHING_ON: dict[str, Any] = {"enabled": True, "max_batch_size": 8, "max_queue_delay_us": 0}
AGENT_BATCHING_OFF: dict[str, Any] = {"enabled": False}
# MLServer's adaptive batching (model-settings.json). It has no "batch what already
# queued" mode: it waits up to max_batch_time for max_batch_size requests, so a short
# wait is its best setting for latency under closed-loop load.
MLSERVER_MAX_BATCH_SIZE = 8
MLSERVER_MAX_BATCH_TIME_S = 0.005

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
# A client using more than this share of one core may be what limits throughput.
CLIENT_BOTTLENECK = 0.85
DRAIN_TIMEOUT_S = 60.0
# Warm-up lasts until every connection has had an answer (steady state for slow
# servers at c64), but never longer than this.
MAX_WARMUP_S = 30.0


# ---- models ------------------------------------------------------------------------------


@dataclass
class BenchModel:
    """One model as every server sees it: the same .onnx file, the same input."""

    name: str  # served name, the same on every server
    onnx: Path  # the file the peers load (extracted from the agent's bundle)
    bundle: Path  # what the agent installs
    manifest: Manifest
    input_name: str
    output_name: str  # the output compared against the in-process reference
    sample: np.ndarray  # batch-1 request input
    reference: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # The agent gets the binary tensor extension for big tensors; peers without it
    # (MLServer's REST API, the FastAPI wrapper) get JSON.
    agent_binary: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def _bench_bundle(
    work: Path, name: str, model: Path, inputs: dict[str, Any], outputs: dict[str, Any], key: Path
) -> Path:
    from edgefleet.converters.bundler import build_bundle

    x_name, x_shape = next(iter(inputs.items()))
    out = work / f"{name}-1.bundle"
    build_bundle(
        out=out,
        model_file=model,
        manifest={
            "name": name,
            "version": "1",
            "runtime": "onnx",
            "description": "bench only (random weights)",
            "inputs": [{"name": x_name, "datatype": "FP32", "shape": [-1, *x_shape]}],
            "outputs": [
                {"name": n, "datatype": "FP32", "shape": [-1, *s]} for n, s in outputs.items()
            ],
        },
        test_inputs={x_name: np.random.default_rng(5).random((2, *x_shape), dtype=np.float32)},
        private_key=load_private_key(key),
        # int8 answers differ a little between batch sizes (per-batch accumulation order).
        self_test={"atol": 1e-3},
    )
    return out


def build_models(work: Path, runtime: RuntimeConfig) -> tuple[dict[str, BenchModel], list[Path]]:
    """Every bench model as a signed bundle and its extracted .onnx; (models, trusted keys)."""
    build = ensure_models(["digits-edge-*.bundle", "digits-test.npz"])
    dev_pub = load_config(build / "agent.yaml").trust.public_keys[0]
    priv, pub = generate_keypair(work / "keys", "bench")
    src = work / "src"
    src.mkdir()
    tiny_onnx = write_tiny_onnx(src / "tiny.onnx")
    cnn = write_mobilenet_onnx(src / "cnn-fp32.onnx")
    cnn_int8 = quantize_cnn(cnn.path, src / "cnn-int8.onnx")
    bundles = {
        TINY: _bench_bundle(
            work, TINY, tiny_onnx, {"x": (TINY_FEATURES,)}, {"probs": (TINY_CLASSES,)}, priv
        ),
        CNN_FP32: _bench_bundle(
            work, CNN_FP32, cnn.path, {"image": CNN_SHAPE}, {"logits": (CNN_CLASSES,)}, priv
        ),
        CNN_INT8: _bench_bundle(
            work, CNN_INT8, cnn_int8, {"image": CNN_SHAPE}, {"logits": (CNN_CLASSES,)}, priv
        ),
        DIGITS: _digits_bundle(build),
    }
    with np.load(build / "digits-test.npz", allow_pickle=False) as data:
        digit = np.ascontiguousarray(data["x"][:1], dtype=np.float32)
    samples = {
        TINY: np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32),
        DIGITS: digit,
        CNN_FP32: random_images(1, seed=3),
        CNN_INT8: random_images(1, seed=3),
    }
    models: dict[str, BenchModel] = {}
    for name, bundle in bundles.items():
        contents = extract(bundle, dev_pub if name == DIGITS else pub, work / "x" / name)
        m = contents.manifest
        models[name] = BenchModel(
            name=name,
            onnx=contents.directory / m.model_file,
            bundle=bundle,
            manifest=m,
            input_name=m.inputs[0].name,
            output_name=m.outputs[0].name,
            sample=samples[name],
            agent_binary=name in CNN_MODELS,
        )
    models[CNN_FP32].info = {"parameters": cnn.parameters, "macs_per_image": cnn.macs}
    models[CNN_INT8].info = {"parameters": cnn.parameters, "quantization": "static QDQ u8s8"}
    for m in models.values():
        backend = create_backend(m.onnx, m.manifest, runtime)
        backend.load()
        try:
            m.reference = backend.infer({m.input_name: m.sample})[m.output_name]
        finally:
            backend.unload()
    return models, [dev_pub, pub]


def _digits_bundle(build: Path) -> Path:
    """models/build/agent.yaml's digits-edge bundle (not digits-edge-litert)."""
    for entry in load_config(build / "agent.yaml").models:
        head, _, version = entry.bundle.name.removesuffix(".bundle").rpartition("-")
        if head == DIGITS and version:
            return entry.bundle
    raise SystemExit(f"bench: {build / 'agent.yaml'} serves no {DIGITS} bundle")


# ---- int8 vs fp32 (in-process, before any server runs) -----------------------------------


def _interleaved_speed(
    fns: dict[str, Callable[[], object]], batch: int, seconds: float, rounds: int = 6
) -> dict[str, dict[str, float]]:
    """Images per second of each ``fn`` (one call = ``batch`` images).

    The functions take turns in ``rounds`` rounds of ~seconds/rounds each, so other
    work on a shared box slows them alike and their ratio stays fair.
    """
    samples: dict[str, list[int]] = {name: [] for name in fns}
    for r in range(rounds):
        names = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in names:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            one = max(time.perf_counter() - t0, 1e-6)
            samples[name] += time_calls(fn, max(2, int(seconds / rounds / one)), warmup=1)
    out = {}
    for name, ns in samples.items():
        p50_ms = float(np.median(ns)) / 1e6
        out[name] = {
            "batch": batch,
            "calls": len(ns),
            "p50_ms_per_call": round(p50_ms, 3),
            "images_per_s": round(batch / (p50_ms / 1000), 1),
        }
    return out


def _infer_fn(backend: Backend, inputs: dict[str, np.ndarray]) -> Callable[[], object]:
    return lambda: backend.infer(inputs)


def quantization_figures(
    models: dict[str, BenchModel], runtime: RuntimeConfig, seconds: float
) -> dict[str, Any]:
    """CNN int8 vs fp32 speed at batch 1 and 8; digits-edge int8 vs fp32 top-1 agreement."""
    out: dict[str, Any] = {}
    fp32, int8 = models[CNN_FP32], models[CNN_INT8]
    images = random_images(64, seed=11)
    speed: dict[str, dict[str, Any]] = {fp32.name: {}, int8.name: {}}
    tops: dict[str, np.ndarray] = {}
    with ExitStack() as stack:
        backends = {}
        for m in (fp32, int8):
            backends[m.name] = create_backend(m.onnx, m.manifest, runtime)
            backends[m.name].load()
            stack.callback(backends[m.name].unload)
        for b in (1, 8):
            fns = {n: _infer_fn(be, {"image": images[:b]}) for n, be in backends.items()}
            for name, figures in _interleaved_speed(fns, b, seconds).items():
                speed[name][f"batch_{b}"] = figures
        for name, be in backends.items():
            tops[name] = be.infer({"image": images})["logits"].argmax(axis=1)
    ratio = {
        f"batch_{b}": round(
            speed[CNN_INT8][f"batch_{b}"]["images_per_s"]
            / speed[CNN_FP32][f"batch_{b}"]["images_per_s"],
            2,
        )
        for b in (1, 8)
    }
    out["cnn"] = {
        "speed": speed,
        "int8_over_fp32": ratio,
        "top1_agreement_random_images": round(float((tops[CNN_FP32] == tops[CNN_INT8]).mean()), 4),
        "random_images": len(images),
    }
    fp32_file = MODELS_BUILD / "work" / "digits" / "digits-edge.fp32.onnx"
    digits = models[DIGITS]
    if not fp32_file.is_file():
        out["digits"] = {"error": f"{fp32_file} not found (run `python -m models`)"}
        return out
    with np.load(MODELS_BUILD / "digits-test.npz", allow_pickle=False) as data:
        x, y = data["x"].astype(np.float32), data["y"]
    post = getattr(digits.manifest.postprocessing, "output", None) or digits.output_name
    preds: dict[str, np.ndarray] = {}
    for label, path in (("fp32", fp32_file), ("int8", digits.onnx)):
        backend = create_backend(path, digits.manifest, runtime)
        backend.load()
        try:
            preds[label] = backend.infer({digits.input_name: x})[post].argmax(axis=1)
        finally:
            backend.unload()
    out["digits"] = {
        "samples": len(y),
        "fp32_model": str(fp32_file.relative_to(ROOT)),
        "top1_agreement": round(float((preds["fp32"] == preds["int8"]).mean()), 4),
        "accuracy_fp32": round(float((preds["fp32"] == y).mean()), 4),
        "accuracy_int8": round(float((preds["int8"] == y).mean()), 4),
    }
    return out


# ---- processes -----------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (MLServer's workers), from /proc/*/stat."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def tree_cpu_s(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        try:
            total += process_cpu_s(p)
        except (OSError, ValueError):
            pass  # a worker that exited meanwhile
    return total


def tree_rss_mb(pid: int) -> float:
    """VmRSS summed over the process tree (shared libraries count once per process)."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += rss_mb(p).get("VmRSS", 0.0)
        except (OSError, ValueError):
            pass
    return round(total, 1)


class PeerProcess:
    """A peer server in the peers venv, in its own process group.

    Its own group because MLServer starts worker processes: stopping must take them
    down too, even when the main process is wedged.
    """

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], cwd: Path, port: int
    ) -> None:
        self.name, self.port = name, port
        self.log_path = cwd / f"{name}.log"
        env = {**os.environ, **env}
        env.pop("VIRTUAL_ENV", None)  # the peers venv's python is called by path
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
            )
        self.pid = self.proc.pid
        self.ready_s = float("nan")

    def wait_ready(self, timeout: float = 120.0) -> None:
        t0 = time.monotonic()
        try:
            wait_http_ready(self.port, "/v2/health/ready", self.proc, timeout, poll_s=0.05)
        except (RuntimeError, TimeoutError) as exc:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} did not become ready: {exc}\n{tail}") from exc
        self.ready_s = time.monotonic() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.pid, sig)  # the group this process leads, nothing else
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Workers that outlived their parent are still in the group.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---- peers venv ----------------------------------------------------------------------------


def _peers_stamp() -> str:
    digest = hashlib.sha256(PEERS_CONSTRAINTS.read_bytes())
    digest.update(" ".join(PEER_PACKAGES).encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def ensure_peers_venv(venv: Path = PEERS_VENV) -> Path:
    """The peers' python, creating or refreshing ``venv`` when the constraints changed."""
    python = venv / "bin" / "python"
    stamp = venv / ".edgefleet-peers"
    want = _peers_stamp()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return python
    print(f"bench: creating {venv} (MLServer, FastAPI; about a minute)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    log = venv / "install.log"
    with open(log, "wb") as out:
        done = subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-c",
                str(PEERS_CONSTRAINTS),
                *PEER_PACKAGES,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"bench: installing the peers into {venv} failed:\n{tail}")
    stamp.write_text(want + "\n")
    return python


def peer_versions() -> dict[str, str]:
    pins = {}
    for line in PEERS_CONSTRAINTS.read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and name.lower() in PEER_VERSIONS_SHOWN:
            pins[name.lower()] = version
    return pins


# ---- load generator ------------------------------------------------------------------------


_clock = time.perf_counter_ns


class _Conn(asyncio.Protocol):
    """One keep-alive connection of the closed loop: send, wait for the answer, repeat.

    A protocol rather than streams: per request it costs a few microseconds of the
    client's CPU, and on a 2-core box the client's CPU is taken from the server.
    Responses are framed by Content-Length only (every server here sends it).
    """

    def __init__(self, gen: LoadGenerator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # bytes of the current response once its head is parsed
        self.status = 0
        self.sent_at = 0
        self.busy = False
        self.answers = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self) -> None:
        assert self.transport is not None
        self.busy = True
        self.sent_at = _clock()
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self.gen.broken(self, "response without Content-Length")
                return
            stop = head.find(b"\r\n", at + 2)
            self.status = int(head[9:12])
            self.need = end + 4 + int(head[at + 17 : stop if stop > 0 else None])
        if len(buf) >= self.need:
            now = _clock()
            del buf[: self.need]
            self.need = -1
            self.busy = False
            self.answers += 1
            self.gen.answered(self, now - self.sent_at, self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.gen.lost(self)


@dataclass
class CellRun:
    latencies_ns: list[int]
    errors: Counter[str]
    window_s: float
    warmup_s: float
    client_cpu_s: float
    server_cpu_s: float
    server_rss_mb: float | None
    drained: bool
    box_busy_cpu_s: float  # every process on the box, during the window


class LoadGenerator:
    """Closed loop at fixed concurrency; records every answer inside the window.

    Throughput is answers completed in the measured window divided by its length;
    latencies are those answers' send-to-last-byte times. Warm-up lasts at least
    ``warmup_s`` and until every connection has had one answer (a server that takes
    seconds to clear 64 requests reaches steady state only then). After the window
    no new requests are sent and the ones in flight are awaited, so the next cell
    starts on an idle server.
    """

    def __init__(self, port: int, request: bytes, concurrency: int) -> None:
        self.port, self.request, self.concurrency = port, request, concurrency
        self.measuring = False
        self.stopping = False
        self.latencies: list[int] = []
        self.errors: Counter[str] = Counter()
        self.conns: list[_Conn] = []
        self._idle: asyncio.Event | None = None
        # Set once as many connections as the concurrency have had an answer.
        self._warm = asyncio.Event()
        self._answered_once = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def answered(self, conn: _Conn, latency_ns: int, status: int) -> None:
        if conn.answers == 1:
            self._answered_once += 1
            if self._answered_once >= self.concurrency:
                self._warm.set()
        if self.measuring:
            if status == 200:
                self.latencies.append(latency_ns)
            else:
                self.errors[f"HTTP {status}"] += 1
        if not self.stopping:
            conn.send()
        elif self._idle is not None and not any(c.busy for c in self.conns):
            self._idle.set()

    def broken(self, conn: _Conn, why: str) -> None:
        if self.measuring:
            self.errors[why] += 1
        conn.busy = False
        if conn.transport is not None:
            conn.transport.close()  # connection_lost reconnects

    def lost(self, conn: _Conn) -> None:
        if conn.busy and self.measuring:
            self.errors["connection lost"] += 1
        conn.busy = False
        if conn in self.conns:
            self.conns.remove(conn)
        if not self.stopping and self._loop is not None:
            task = self._loop.create_task(self._connect_and_send())
            self._tasks.add(task)  # a reference, or the task may be collected mid-way
            task.add_done_callback(self._tasks.discard)
        elif self._idle is not None and not any(c.busy for c in self.conns):
            self._idle.set()

    async def _connect(self) -> _Conn:
        assert self._loop is not None
        _, conn = await self._loop.create_connection(lambda: _Conn(self), "127.0.0.1", self.port)
        self.conns.append(conn)
        return conn

    async def _connect_and_send(self) -> None:
        while not self.stopping:
            try:
                conn = await self._connect()
            except OSError as exc:
                if self.measuring:
                    self.errors[f"connect: {exc.strerror or exc}"] += 1
                await asyncio.sleep(0.05)
                continue
            conn.send()
            return

    async def run(
        self, warmup_s: float, duration_s: float, server_pid: int, sample_rss: bool
    ) -> CellRun:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        conns = [await self._connect() for _ in range(self.concurrency)]
        started = time.monotonic()
        for c in conns:
            c.send()
        await asyncio.sleep(warmup_s)
        try:
            await asyncio.wait_for(self._warm.wait(), max(0.0, MAX_WARMUP_S - warmup_s))
        except TimeoutError:
            pass  # a server this slow is measured as it is; its rows show the few answers
        warmed = time.monotonic() - started
        cpu0, srv0, box0 = time.process_time(), tree_cpu_s(server_pid), box_busy_cpu_s()
        t0 = time.perf_counter()
        self.measuring = True
        await asyncio.sleep(duration_s / 2)
        # Mid-window: the server holds a full load's worth of requests and batches.
        rss = tree_rss_mb(server_pid) if sample_rss else None
        await asyncio.sleep(max(0.0, duration_s - (time.perf_counter() - t0)))
        self.stopping = True
        self.measuring = False
        window = time.perf_counter() - t0
        cpu1, srv1, box1 = time.process_time(), tree_cpu_s(server_pid), box_busy_cpu_s()
        drained = True
        if any(c.busy for c in self.conns):
            try:
                await asyncio.wait_for(self._idle.wait(), DRAIN_TIMEOUT_S)
            except TimeoutError:
                drained = False
                self.errors["no answer within the drain timeout"] += sum(c.busy for c in self.conns)
        for c in list(self.conns):
            if c.transport is not None:
                c.transport.close()
        await asyncio.sleep(0)  # let the transports close before the loop goes
        return CellRun(
            latencies_ns=self.latencies,
            errors=self.errors,
            window_s=window,
            warmup_s=warmed,
            client_cpu_s=cpu1 - cpu0,
            server_cpu_s=srv1 - srv0,
            server_rss_mb=rss,
            drained=drained,
            box_busy_cpu_s=box1 - box0,
        )


def run_cell(
    port: int,
    request: bytes,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    server_pid: int,
) -> CellRun:
    gen = LoadGenerator(port, request, concurrency)
    with no_gc():
        return asyncio.run(gen.run(warmup_s, duration_s, server_pid, sample_rss=True))


# ---- servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    key: str  # row value of "server" and what --only matches
    label: str
    kind: str  # agent | mlserver | fastapi
    batching: str  # off | on
    parallel_workers: int | None = None  # MLServer; None: its default


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("agent", "edgefleet agent", "agent", "off"),
    ServerSpec("agent-batching", "edgefleet agent", "agent", "on"),
    ServerSpec("mlserver-pw0", "MLServer, parallel_workers: 0", "mlserver", "off", 0),
    ServerSpec("mlserver", "MLServer, defaults (1 worker process)", "mlserver", "off"),
    ServerSpec("fastapi", "FastAPI + uvicorn", "fastapi", "off"),
)


@dataclass
class Running:
    port: int
    pid: int
    ready_s: float
    # served name per (model, batching variant); MLServer serves the CNNs twice,
    # once with its adaptive batching on under another name.
    served: dict[tuple[str, str], str]
    binary: bool  # supports the binary tensor extension
    log: Path


def batching_support() -> tuple[bool, str]:
    """Whether this tree's agent has dynamic batching (config section and batcher)."""
    import importlib.util

    fields = RuntimeConfig.model_fields
    if "batching" not in fields:
        return False, "agent/config.py has no runtime.batching section"
    if importlib.util.find_spec("agent.batcher") is None:
        return False, "agent/batcher.py is missing"
    keys = set(fields["batching"].annotation.model_fields)  # type: ignore[union-attr]
    unknown = set(AGENT_BATCHING_ON) - keys
    if unknown:
        return False, f"runtime.batching lacks {sorted(unknown)}"
    return True, ""


def peer_onnx_options(runtime: RuntimeConfig) -> dict[str, Any]:
    """The session options every peer gets: the agent's, with its thread count resolved.

    The agent turns ``intra_op_threads: 0`` into its own count for one run at a time
    (``edgefleet.core.backends.threads``, when present); the peers get that same
    number, so a difference in the table is the serving layer's, not a thread setting's.
    """
    threads = runtime.onnx.intra_op_threads
    if threads == 0:
        try:
            from edgefleet.core.backends.threads import auto_threads

            threads = auto_threads(runtime.onnx.sessions)
        except ImportError:
            threads = 0  # older agent: ONNX Runtime's default, as the agent used
    return {
        "intra_op_threads": threads,
        "inter_op_threads": runtime.onnx.inter_op_threads,
        "allow_spinning": runtime.onnx.allow_spinning,
    }


@contextmanager
def start_server(
    spec: ServerSpec,
    models: dict[str, BenchModel],
    keys: list[Path],
    runtime: RuntimeConfig,
    peers_python: Path | None,
    work: Path,
    batching_available: bool,
) -> Iterator[Running]:
    onnx_env = {
        "EDGEFLEET_BENCH_ORT": json.dumps(peer_onnx_options(runtime)),
        "PYTHONPATH": str(PEERS_DIR),
    }
    served = {(m, "off"): m for m in models}
    if spec.kind == "agent":
        cfg = agent_config(
            work / f"store-{spec.key}", keys, [m.bundle for m in models.values()], runtime
        )
        if batching_available:
            cfg["runtime"]["batching"] = dict(
                AGENT_BATCHING_ON if spec.batching == "on" else AGENT_BATCHING_OFF
            )
        agent = AgentProcess(cfg, work, spec.key)
        try:
            ready = agent.start(timeout=120)
            yield Running(
                agent.port,
                agent.pid,
                ready,
                {(m, spec.batching): m for m in models},
                True,
                agent.log_path,
            )
        finally:
            agent.stop()
        return
    assert peers_python is not None
    port = free_port()
    if spec.kind == "mlserver":
        repo = work / f"repo-{spec.key}"
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "http_port": port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            # No access log, as in production (the agent logs no requests either);
            # MLServer's default (debug: true) logs every request.
            "debug": False,
            "metrics_dir": str(repo / ".metrics"),
            "environments_dir": str(repo / ".envs"),
        }
        if spec.parallel_workers is not None:
            settings["parallel_workers"] = spec.parallel_workers
        repo.mkdir(parents=True)
        (repo / "settings.json").write_text(json.dumps(settings, indent=2))
        for m in models.values():
            variants = [("off", m.name, {})]
            if m.name in CNN_MODELS:
                served[(m.name, "adaptive")] = f"{m.name}-ab"
                variants.append(
                    (
                        "adaptive",
                        f"{m.name}-ab",
                        {
                            "max_batch_size": MLSERVER_MAX_BATCH_SIZE,
                            "max_batch_time": MLSERVER_MAX_BATCH_TIME_S,
                        },
                    )
                )
            for _, served_name, extra in variants:
                folder = repo / served_name
                folder.mkdir()
                (folder / "model-settings.json").write_text(
                    json.dumps(
                        {
                            "name": served_name,
                            "implementation": "mlserver_onnx.OnnxModel",
                            "parameters": {"uri": str(m.onnx)},
                            **extra,
                        },
                        indent=2,
                    )
                )
        mlserver = peers_python.parent / "mlserver"
        proc = PeerProcess(spec.key, [str(mlserver), "start", str(repo)], onnx_env, repo, port)
    else:
        app_env = {
            **onnx_env,
            "EDGEFLEET_BENCH_MODELS": json.dumps({m.name: str(m.onnx) for m in models.values()}),
        }
        cmd = [
            str(peers_python),
            "-m",
            "uvicorn",
            "fastapi_onnx:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        proc = PeerProcess(spec.key, cmd, app_env, work, port)
    try:
        proc.wait_ready()
        yield Running(port, proc.pid, proc.ready_s, served, False, proc.log_path)
    finally:
        proc.stop()


# ---- requests and answers ----------------------------------------------------------------


def make_request(client: KeepAliveClient, model: BenchModel, served: str, binary: bool) -> bytes:
    if binary:
        manifest = model.manifest.model_copy(update={"name": served})
        return binary_request(client, manifest, {model.input_name: model.sample})
    return json_request(client, served, model.input_name, model.sample)


def check_answer(
    status: int, headers: dict[str, str], body: bytes, model: BenchModel, binary: bool
) -> None:
    """The server computed what ONNX Runtime computes in-process for the same input."""
    if status != 200:
        raise HttpError(f"{model.name}: HTTP {status}: {body[:300]!r}")
    if binary:
        head, raw = split_binary_response(body, headers)
        offset = 0
        got = None
        for out in head["outputs"]:
            size = int(out.get("parameters", {}).get("binary_data_size", 0))
            if out["name"] == model.output_name:
                got = np.frombuffer(raw[offset : offset + size], dtype=np.float32)
            offset += size
    else:
        doc = orjson.loads(body)
        out = next((o for o in doc["outputs"] if o["name"] == model.output_name), None)
        got = None if out is None else np.asarray(out["data"], dtype=np.float32)
    if got is None:
        raise HttpError(f"{model.name}: answer lacks output {model.output_name}: {body[:300]!r}")
    ref = model.reference.reshape(-1)
    if got.shape != ref.shape or not np.allclose(got, ref, atol=2e-3, rtol=1e-3):
        raise HttpError(f"{model.name}: answer differs from the in-process reference")


_METRIC = re.compile(r"^(\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$")


def agent_counts(port: int, model: str) -> tuple[float, float]:
    """(successful inference requests, backend executions) of ``model`` from /metrics."""
    with KeepAliveClient("127.0.0.1", port) as c:
        status, _, body = c.roundtrip(c.prepare("GET", "/metrics"))
    requests = executions = 0.0
    if status != 200:
        return requests, executions
    for line in body.decode().splitlines():
        m = _METRIC.match(line)
        if not m or f'model="{model}"' not in m.group(2):
            continue
        if m.group(1) == "edgefleet_inference_requests_total" and 'outcome="success"' in m.group(2):
            requests += float(m.group(3))
        elif m.group(1) == "edgefleet_inference_executions_total":
            executions += float(m.group(3))
    return requests, executions


# ---- the run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    spec: ServerSpec
    model: str
    batching: str  # off | on | adaptive
    concurrency: int
    binary: bool

    @property
    def request_format(self) -> str:
        return "binary" if self.binary else "JSON"


def plan(
    specs: Sequence[ServerSpec],
    models: Sequence[str],
    concurrency: Sequence[int],
    agent_json_cnn: bool,
) -> dict[str, list[Cell]]:
    """Cells per server key, in the order they run."""
    out: dict[str, list[Cell]] = {}
    for spec in specs:
        cells: list[Cell] = []
        for model in models:
            binary = spec.kind == "agent" and model in CNN_MODELS
            for c in concurrency:
                cells.append(Cell(spec, model, spec.batching, c, binary))
            if spec.kind == "mlserver" and model in CNN_MODELS:
                cells += [Cell(spec, model, "adaptive", c, False) for c in concurrency]
            # The same CNN request as JSON: how much of the agent's lead is the format.
            if agent_json_cnn and spec.kind == "agent" and model == CNN_FP32 and 16 in concurrency:
                cells.append(Cell(spec, model, spec.batching, 16, False))
        out[spec.key] = cells
    return out


def _row(cell: Cell, label: str) -> dict[str, Any]:
    return {
        "server": cell.spec.key,
        "server_label": label,
        "model": cell.model,
        "request": cell.request_format,
        "concurrency": cell.concurrency,
        "batching": cell.batching,
    }


def _first_requests(
    cells: list[Cell], running: Running, models: dict[str, BenchModel]
) -> dict[tuple[str, str, bool], bytes]:
    """Each distinct request of ``cells``, after checking the server's answer to it."""
    requests: dict[tuple[str, str, bool], bytes] = {}
    with KeepAliveClient("127.0.0.1", running.port, timeout=120) as client:
        for cell in cells:
            key = (cell.model, cell.batching, cell.binary)
            if key in requests:
                continue
            served = running.served[(cell.model, cell.batching)]
            req = make_request(client, models[cell.model], served, cell.binary)
            # First answer: right model, right numbers (and the model is loaded and warm).
            for attempt in range(50):
                status, headers, body = client.roundtrip(req)
                if status == 200 or attempt == 49:
                    break
                time.sleep(0.2)  # MLServer may answer before every model is loaded
            check_answer(status, headers, body, models[cell.model], cell.binary)
            requests[key] = req
    return requests


@dataclass
class Tally:
    """One row's figures, summed over its rounds."""

    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    window_s: float = 0.0
    warmup_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    rss_mb: float | None = None
    box_busy_cpu_s: float = 0.0
    requests_done: float = 0.0  # the agent's own counters: requests and executions
    executions: float = 0.0

    def add(self, run: CellRun) -> None:
        self.latencies_ns += run.latencies_ns
        self.errors.update(run.errors)
        self.window_s += run.window_s
        self.warmup_s += run.warmup_s
        self.client_cpu_s += run.client_cpu_s
        self.server_cpu_s += run.server_cpu_s
        self.box_busy_cpu_s += run.box_busy_cpu_s
        if run.server_rss_mb is not None:
            self.rss_mb = max(self.rss_mb or 0.0, run.server_rss_mb)


def measure_group(
    group: list[tuple[ServerSpec, Running]],
    cells: dict[str, list[Cell]],
    models: dict[str, BenchModel],
    warmup_s: float,
    duration_s: float,
    rounds: Callable[[int], int],
) -> list[dict[str, Any]]:
    """Rows for servers running side by side, interleaved round by round.

    Rows are taken slot by slot (one model at one concurrency); inside a slot every
    server's rows take turns for ``rounds(concurrency)`` rounds, each a share of the
    row's window. A burst of other work on a shared box, or a slow drift, then hits
    every server alike instead of whichever ran at that moment, and the goals are
    ratios between servers. The servers not under load sit idle meanwhile.
    """
    requests = {spec.key: _first_requests(cells[spec.key], r, models) for spec, r in group}
    slots: dict[tuple[str, int], list[tuple[ServerSpec, Running, Cell]]] = {}
    for model in MODEL_ORDER:
        for spec, running in group:
            for cell in cells[spec.key]:
                if cell.model == model:
                    slots.setdefault((model, cell.concurrency), []).append((spec, running, cell))
    rows: list[dict[str, Any]] = []
    for (_, concurrency), members in sorted(
        slots.items(), key=lambda kv: (MODEL_ORDER.index(kv[0][0]), kv[0][1])
    ):
        n = rounds(concurrency)
        tallies = [Tally() for _ in members]
        for r in range(n):
            # Alternate who goes first, so no server always follows another's load.
            order = list(enumerate(members))
            for i, (spec, running, cell) in order if r % 2 == 0 else order[::-1]:
                req = requests[spec.key][(cell.model, cell.batching, cell.binary)]
                before = agent_counts(running.port, cell.model) if spec.kind == "agent" else None
                t = tallies[i]
                t.add(
                    run_cell(running.port, req, concurrency, warmup_s, duration_s / n, running.pid)
                )
                if before is not None:
                    after = agent_counts(running.port, cell.model)
                    t.requests_done += after[0] - before[0]
                    t.executions += after[1] - before[1]
        for (spec, _, cell), t in zip(members, tallies, strict=True):
            req = requests[spec.key][(cell.model, cell.batching, cell.binary)]
            rows.append(_measured_row(cell, spec, t, len(req), n))
    return rows


def _measured_row(
    cell: Cell, spec: ServerSpec, t: Tally, request_bytes: int, rounds: int
) -> dict[str, Any]:
    row = _row(cell, spec.label)
    ok = len(t.latencies_ns)
    stats = Stats.from_ns(t.latencies_ns) if ok else None
    row |= {
        "throughput_rps": round(ok / t.window_s, 1),
        "p50_ms": stats.p50_ms if stats else None,
        "p99_ms": stats.p99_ms if stats else None,
        "errors": sum(t.errors.values()),
        "requests": ok,
        "p90_ms": stats.p90_ms if stats else None,
        "mean_ms": stats.mean_ms if stats else None,
        "max_ms": stats.max_ms if stats else None,
        "window_s": round(t.window_s, 2),
        "rounds": rounds,
        "warmup_s": round(t.warmup_s, 2),
        "request_bytes": request_bytes,
        "server_cpu_us_per_request": round(t.server_cpu_s / ok * 1e6, 1) if ok else None,
        "server_cpu_cores": round(t.server_cpu_s / t.window_s, 2),
        "client_cpu_share_of_core": round(t.client_cpu_s / t.window_s, 2),
        "server_rss_mb": t.rss_mb,
        # What processes other than this client and this server used of the box
        # meanwhile: above ~0.1 the row is pessimistic.
        "others_cpu_share": round(
            max(0.0, t.box_busy_cpu_s - t.client_cpu_s - t.server_cpu_s) / (t.window_s * CORES),
            3,
        ),
    }
    if t.errors:
        row["error_kinds"] = dict(t.errors)
    if spec.kind == "agent":
        row["avg_batch_size"] = round(t.requests_done / t.executions, 2) if t.executions else None
    flag = "  CLIENT-BOUND?" if row["client_cpu_share_of_core"] > CLIENT_BOTTLENECK else ""
    if row["others_cpu_share"] > BUSY_WARNING:
        flag += f"  (others used {row['others_cpu_share']:.0%} of the box)"
    print(
        f"  {spec.key:<15} {cell.model:<12} {cell.request_format:<6} {cell.batching:<8}"
        f" c={cell.concurrency:<3} {row['throughput_rps']:>8.1f} rps"
        f"  p50 {_num(row['p50_ms'])} p99 {_num(row['p99_ms'])} ms"
        f"  err {row['errors']}{flag}",
        file=sys.stderr,
        flush=True,
    )
    return row


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _unavailable_rows(cells: list[Cell], label: str, why: str) -> list[dict[str, Any]]:
    return [
        _row(c, label)
        | {
            "throughput_rps": None,
            "p50_ms": None,
            "p99_ms": None,
            "errors": None,
            "status": f"not available: {why}",
        }
        for c in cells
    ]


def _groups(specs: Sequence[ServerSpec], one_at_a_time: bool) -> list[list[ServerSpec]]:
    """Servers measured side by side: all of them, or (``--one-at-a-time``) the agent's
    two configurations together and each peer alone."""
    if not one_at_a_time:
        return [list(specs)]
    agents = [s for s in specs if s.kind == "agent"]
    return ([agents] if agents else []) + [[s] for s in specs if s.kind != "agent"]


def _select(tokens: Sequence[str]) -> tuple[list[ServerSpec], list[str]]:
    """--only: server keys and model names, globs allowed; none of a kind means all."""
    servers = [s.key for s in SERVERS]
    want_s: set[str] = set()
    want_m: set[str] = set()
    for token in tokens:
        hit_s = fnmatch.filter(servers, token)
        hit_m = fnmatch.filter(MODEL_ORDER, token)
        if not hit_s and not hit_m:
            raise SystemExit(
                f"bench: --only {token!r} matches no server ({', '.join(servers)})"
                f" and no model ({', '.join(MODEL_ORDER)})"
            )
        want_s.update(hit_s)
        want_m.update(hit_m)
    specs = [s for s in SERVERS if not want_s or s.key in want_s]
    models = [m for m in MODEL_ORDER if not want_m or m in want_m]
    return specs, models


def run(args: argparse.Namespace, busy_before: float) -> dict[str, Any]:
    started = time.monotonic()
    specs, model_names = _select(args.only)
    runtime = load_config(ensure_models(["digits-edge-*.bundle"]) / "agent.yaml").runtime
    batching_ok, batching_why = batching_support()
    needs_peers = any(s.kind != "agent" for s in specs)
    peers_python = ensure_peers_venv(Path(args.peers_venv)) if needs_peers else None
    machine = machine_info() | {"peer_packages": peer_versions()}
    rows: list[dict[str, Any]] = []
    servers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_dir, ExitStack() as stack:
        work = Path(tmp_dir)
        t_models = time.monotonic()
        all_models, keys = build_models(work, runtime)
        models = {n: all_models[n] for n in model_names}
        built_s = time.monotonic() - t_models
        model_info = {
            n: {
                "file": m.onnx.name,
                "bytes": m.onnx.stat().st_size,
                "input": [m.input_name, list(m.sample.shape)],
                **m.info,
            }
            for n, m in all_models.items()
        }
        wait_until_quiet(args.wait_quiet)
        quant = (
            quantization_figures(all_models, runtime, args.quant_seconds)
            if not args.skip_quant
            else None
        )
        meter = CpuMeter()
        cells = plan(specs, model_names, args.concurrency, not args.no_agent_json)
        for group in _groups(specs, args.one_at_a_time):
            runnable = []
            for spec in group:
                if spec.kind == "agent" and spec.batching == "on" and not batching_ok:
                    rows += _unavailable_rows(cells[spec.key], spec.label, batching_why)
                    servers[spec.key] = {"status": f"not available: {batching_why}"}
                else:
                    runnable.append(spec)
            if not runnable:
                continue
            # Other work on the box (a test suite...) would hit one server and not the next.
            wait_until_quiet(args.wait_quiet)
            print(f"bench: {', '.join(s.label for s in runnable)}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            with ExitStack() as per_group:
                running = [
                    (
                        spec,
                        per_group.enter_context(
                            start_server(
                                spec, models, keys, runtime, peers_python, work, batching_ok
                            )
                        ),
                    )
                    for spec in runnable
                ]
                idle = {spec.key: tree_rss_mb(r.pid) for spec, r in running}
                together = len(running) > 1

                def rounds(concurrency: int, together: bool = together) -> int:
                    # c64 rows take seconds to warm up and drain on the slow servers,
                    # and no goal is stated at c64: one round there.
                    return args.rounds if together and concurrency <= 16 else 1

                warmup = max(0.3, args.warmup / args.rounds) if together else args.warmup
                rows += measure_group(running, cells, models, warmup, args.duration, rounds)
                for spec, r in running:
                    servers[spec.key] = {
                        "label": spec.label,
                        "start_to_ready_s": round(r.ready_s, 2),
                        "rss_mb_idle_after_start": idle[spec.key],
                        "rss_mb_after_load": tree_rss_mb(r.pid),
                        "processes": len(process_tree(r.pid)),
                        "measured_together_with": [s.key for s, _ in running if s is not spec],
                        "seconds": round(time.monotonic() - t0, 1),
                    }
                    if spec.kind == "agent":
                        servers[spec.key]["peak_rss_mb"] = rss_mb(r.pid).get("VmHWM")
        stack.close()
        load = meter.stop()
    agent_cfg: dict[str, Any] = {
        "runtime": runtime.model_dump(mode="json"),
        "peer_onnx_options": peer_onnx_options(runtime),
        "batching_on": AGENT_BATCHING_ON,
        "batching_off": AGENT_BATCHING_OFF,
        "batching_available": batching_ok,
    }
    if not batching_ok:
        agent_cfg["batching_missing_because"] = batching_why
    doc: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine,
        "complete": not args.only and not args.quick,
        "rows": rows,
        "goals": evaluate_goals(rows, quant),
        "quantization": quant,
        "servers": servers,
        "models": model_info,
        "method": {
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "one_at_a_time": args.one_at_a_time,
            "concurrency": list(args.concurrency),
            "agent": agent_cfg,
            "mlserver_adaptive_batching": {
                "max_batch_size": MLSERVER_MAX_BATCH_SIZE,
                "max_batch_time": MLSERVER_MAX_BATCH_TIME_S,
            },
            "client": "asyncio closed loop, one keep-alive connection per concurrent client,"
            " in one process separate from the servers",
        },
        "box_load": {"busy_share_before": round(busy_before, 3), **load},
        "models_built_s": round(built_s, 1),
        "duration_s": round(time.monotonic() - started, 1),
    }
    return doc


# ---- goals ------------------------------------------------------------------------------


def _find(rows: list[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    for r in rows:
        if r.get("throughput_rps") is not None and all(r.get(k) == v for k, v in want.items()):
            return r
    return None


def _x(ratio: float, target: float) -> str:
    """A ratio with enough digits that one just below its target does not print as it."""
    return f"{ratio:.3f}×" if abs(ratio - target) < 0.01 else f"{ratio:.2f}×"


def _short(ratio: float, target: float) -> str:
    """How far a ratio is below its target, as a share of the target."""
    missed = (target - ratio) / target
    by = f"{missed:.0%}" if missed >= 0.005 else "less than 1 %"
    return f"{_x(ratio, target)} of {target:g}×: missed by {by}"


def _goal(
    name: str, measured: str, target: str, met: bool | None, detail: str = ""
) -> dict[str, Any]:
    return {"goal": name, "measured": measured, "target": target, "met": met, "detail": detail}


def evaluate_goals(
    rows: list[dict[str, Any]], quant: dict[str, Any] | None
) -> list[dict[str, Any]]:
    goals: list[dict[str, Any]] = []
    # 1. tiny, c16: agent vs MLServer pw=0 and FastAPI.
    for key in ("agent", "agent-batching"):
        agent = _find(rows, server=key, model=TINY, concurrency=16)
        for peer, factor in (("mlserver-pw0", 2.0), ("fastapi", 1.5)):
            other = _find(rows, server=peer, model=TINY, concurrency=16)
            who = "agent, batching " + ("on" if key == "agent-batching" else "off")
            name = f"tiny c16: {who} ≥ {factor:g}× {SERVER_SHORT[peer]} throughput, lower p99"
            if agent is None or other is None:
                goals.append(_goal(name, "not measured", f"≥ {factor:g}×", None))
                continue
            ratio = agent["throughput_rps"] / max(other["throughput_rps"], 1e-9)
            lower = agent["p99_ms"] < other["p99_ms"]
            goals.append(
                _goal(
                    name,
                    f"{_x(ratio, factor)} ({agent['throughput_rps']:.0f} vs"
                    f" {other['throughput_rps']:.0f} rps); p99 {agent['p99_ms']:.2f} vs"
                    f" {other['p99_ms']:.2f} ms",
                    f"≥ {factor:g}×, p99 lower",
                    ratio >= factor and lower,
                    "; ".join(
                        ([] if ratio >= factor else [f"throughput {_short(ratio, factor)}"])
                        + ([] if lower else ["p99 not lower"])
                    ),
                )
            )
    # 2. CNN fp32 c16: batching vs the agent's own unbatched, and vs MLServer adaptive.
    off = _find(rows, server="agent", model=CNN_FP32, concurrency=16, request="binary")
    on = _find(rows, server="agent-batching", model=CNN_FP32, concurrency=16, request="binary")
    name = "CNN fp32 c16: batching ≥ 2× unbatched throughput, p99 ≤ 2× unbatched"
    if off and on:
        ratio = on["throughput_rps"] / max(off["throughput_rps"], 1e-9)
        p99 = on["p99_ms"] / max(off["p99_ms"], 1e-9)
        goals.append(
            _goal(
                name,
                f"{_x(ratio, 2.0)} throughput ({on['throughput_rps']:.0f} vs"
                f" {off['throughput_rps']:.0f} rps); p99 {p99:.2f}×",
                "≥ 2×; ≤ 2×",
                ratio >= 2.0 and p99 <= 2.0,
                "; ".join(
                    ([] if ratio >= 2.0 else [f"throughput {_short(ratio, 2.0)}"])
                    + ([] if p99 <= 2.0 else [f"p99 {p99:.2f}× > 2×"])
                ),
            )
        )
    else:
        goals.append(_goal(name, "not measured", "≥ 2×; ≤ 2×", None))
    adaptive = [
        r
        for r in rows
        if r.get("throughput_rps") is not None
        and r["batching"] == "adaptive"
        and r["model"] == CNN_FP32
        and r["concurrency"] == 16
    ]
    name = "CNN fp32 c16: agent batching ≥ 1.3× MLServer adaptive batching (its best config)"
    if on and adaptive:
        best = max(adaptive, key=lambda r: r["throughput_rps"])
        ratio = on["throughput_rps"] / max(best["throughput_rps"], 1e-9)
        goals.append(
            _goal(
                name,
                f"{ratio:.1f}× ({on['throughput_rps']:.0f} vs {best['throughput_rps']:.0f} rps,"
                f" {best['server']})",
                "≥ 1.3×",
                ratio >= 1.3,
                "" if ratio >= 1.3 else f"{_short(ratio, 1.3)}",
            )
        )
    else:
        goals.append(_goal(name, "not measured", "≥ 1.3×", None))
    # 3. c1: batching on (delay 0) vs off, p50 within 5 %.
    for model in MODEL_ORDER:
        fmt = "binary" if model in CNN_MODELS else "JSON"
        a = _find(rows, server="agent", model=model, concurrency=1, request=fmt)
        b = _find(rows, server="agent-batching", model=model, concurrency=1, request=fmt)
        name = f"c1 {model}: batching on (delay 0) p50 within 5 % of off"
        if a and b:
            delta = b["p50_ms"] / a["p50_ms"] - 1
            goals.append(
                _goal(
                    name,
                    f"{delta:+.1%} ({b['p50_ms']:.3f} vs {a['p50_ms']:.3f} ms)",
                    "≤ +5 %",
                    delta <= 0.05,
                    "" if delta <= 0.05 else f"{delta - 0.05:.1%} over",
                )
            )
        else:
            goals.append(_goal(name, "not measured", "≤ +5 %", None))
    # 4. int8 vs fp32.
    if quant:
        r = quant["cnn"]["int8_over_fp32"]["batch_8"]
        goals.append(
            _goal(
                "CNN int8 vs fp32 at batch 8 (in-process, agent backend): ≥ 1.7× throughput",
                f"{r:.2f}×",
                "≥ 1.7×",
                r >= 1.7,
                "" if r >= 1.7 else _short(r, 1.7),
            )
        )
        d = quant.get("digits", {})
        if "top1_agreement" in d:
            goals.append(
                _goal(
                    "digits-edge int8 vs fp32: top-1 agreement ≥ 99 %",
                    f"{d['top1_agreement']:.2%} of {d['samples']} held-out digits"
                    f" (accuracy {d['accuracy_fp32']:.4f} fp32, {d['accuracy_int8']:.4f} int8)",
                    "≥ 99 %",
                    d["top1_agreement"] >= 0.99,
                )
            )
    return goals


# ---- report -----------------------------------------------------------------------------


MODEL_TEXT = {
    TINY: "softmax(x·W + b), 4 features → 3 classes: the server's overhead, nothing else",
    DIGITS: "the sample bundle's int8 MLP on 8×8 digits",
    CNN_FP32: "MobileNetV1-shaped CNN (`bench/cnn.py`), 4.2 M parameters, 0.57 G MACs,"
    " random weights, fp32",
    CNN_INT8: "the same CNN, static QDQ u8s8 int8 (`converters.quantize`)",
}

SERVER_SHORT = {
    "agent": "agent",
    "agent-batching": "agent",
    "mlserver-pw0": "MLServer pw=0",
    "mlserver": "MLServer default",
    "fastapi": "FastAPI",
}


def _met(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


def render_markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    load = doc["box_load"]
    lines = [
        "## Serving: agent vs MLServer vs FastAPI (`python -m bench serving`)",
        "",
        "The same closed-loop load generator, the same ONNX files and the same ONNX Runtime"
        " session options against each server, in one run on this box.",
        "",
    ]
    if not doc["complete"]:
        lines += ["> Partial run (`--quick` or `--only`): not every row below was measured.", ""]
    if load["others_share_of_box"] > BUSY_WARNING:
        lines += [
            f"> **Measured on a busy box:** other processes used"
            f" {load['others_share_of_box']:.0%} of its CPU during this run, so the figures"
            " are pessimistic and noisier than on an idle machine.",
            "",
        ]
    lines += [
        "### Goals",
        "",
        "| goal | measured | target | met | |",
        "|---|---|---|---|---|",
    ]
    for g in doc["goals"]:
        lines.append(
            f"| {g['goal']} | {g['measured']} | {g['target']} | {_met(g['met'])} |"
            f" {g.get('detail', '')} |"
        )
    sizes = {
        r["request"]: r["request_bytes"] / 1e6
        for r in rows
        if r["model"] == CNN_FP32 and r.get("request_bytes")
    }
    json_mb, binary_mb = sizes.get("JSON", float("nan")), sizes.get("binary", float("nan"))
    lines += [
        "",
        "### Results",
        "",
        "Throughput in requests per second (each request is one item: batch 1), latency in"
        " ms over every answer in the window. *Request*: the agent gets the CNN image as the"
        " binary tensor extension; MLServer's REST API has no binary extension and the"
        " FastAPI wrapper speaks JSON only, so they get the same image as OIP JSON"
        f" ({json_mb:.1f} MB per request against {binary_mb:.2f} MB binary); the agent's JSON"
        " row shows what the format alone costs."
        " *Batching*: the agent's dynamic batcher (`on`), MLServer's adaptive batching"
        " (`adaptive`). *Avg batch*: requests ÷ backend executions from the agent's"
        " `/metrics`. *Server CPU*: CPU time of the server's processes per request. †: other"
        " processes on the box used more than 10 % of its CPU during that row.",
        "",
    ]
    for model in MODEL_ORDER:
        mrows = [r for r in rows if r["model"] == model]
        if not mrows:
            continue
        info = doc["models"].get(model, {})
        lines += [
            f"**{model}**: {MODEL_TEXT[model]}, input {info.get('input', ['', '?'])[1]}",
            "",
            "| c | server | batching | request | rps | p50 ms | p99 ms | errors | avg batch"
            " | server CPU µs/req | RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = {s.key: i for i, s in enumerate(SERVERS)}
        variant = {"off": 0, "on": 1, "adaptive": 2, "binary": 0, "JSON": 1}
        mrows.sort(
            key=lambda r: (
                r["concurrency"],
                order[r["server"]],
                variant[r["batching"]],
                variant[r["request"]],
            )
        )
        for r in mrows:
            if r.get("throughput_rps") is None:
                lines.append(
                    f"| {r['concurrency']} | {SERVER_SHORT[r['server']]} | {r['batching']}"
                    f" | {r['request']} | not available | | | | | | |"
                )
                continue
            busy = " †" if r.get("others_cpu_share", 0.0) > BUSY_WARNING else ""
            lines.append(
                f"| {r['concurrency']} | {SERVER_SHORT[r['server']]} | {r['batching']}"
                f" | {r['request']} | {r['throughput_rps']:.0f}{busy} | {_num(r['p50_ms'])}"
                f" | {_num(r['p99_ms'])} | {r['errors']} | {_num(r.get('avg_batch_size'))}"
                f" | {_num(r.get('server_cpu_us_per_request'), 0)}"
                f" | {_num(r.get('server_rss_mb'), 0)} |"
            )
        lines.append("")
    lines += _analysis_lines(doc)
    lines += _memory_lines(doc)
    lines += _quant_lines(doc.get("quantization"))
    lines += _method_lines(doc)
    return "\n".join(lines)


def _analysis_lines(doc: dict[str, Any]) -> list[str]:
    """Where the goals are decided, from this run's own figures."""
    rows = doc["rows"]
    out: list[str] = []

    def cpu(r: dict[str, Any] | None) -> str:
        return "-" if r is None else f"{r['server_cpu_us_per_request']:.0f} µs"

    a_off = _find(rows, server="agent", model=TINY, concurrency=16)
    a_on = _find(rows, server="agent-batching", model=TINY, concurrency=16)
    fa = _find(rows, server="fastapi", model=TINY, concurrency=16)
    ml = _find(rows, server="mlserver-pw0", model=TINY, concurrency=16)
    if a_off and fa:
        out.append(
            f"- **tiny, c16:** the agent's server CPU per request is {cpu(a_off)} unbatched and"
            f" {cpu(a_on)} batched (avg batch {_num((a_on or {}).get('avg_batch_size'))}),"
            f" FastAPI's {cpu(fa)}, MLServer pw=0's {cpu(ml)}. The agent without batching"
            f" keeps {a_off['server_cpu_cores']:.2f} cores busy: its one event-loop thread"
            " (HTTP parsing, JSON, the hop to the inference thread and back) is the limit,"
            " so throughput is 1 ÷ that CPU. FastAPI runs on uvloop + httptools; the agent"
            " on aiohttp with the stdlib asyncio loop."
        )
    off = _find(rows, server="agent", model=CNN_FP32, concurrency=16, request="binary")
    on = _find(rows, server="agent-batching", model=CNN_FP32, concurrency=16, request="binary")
    q = doc.get("quantization")
    if off and on and q:
        sp = q["cnn"]["speed"][CNN_FP32]
        b1, b8 = sp["batch_1"]["images_per_s"], sp["batch_8"]["images_per_s"]
        out.append(
            f"- **CNN fp32, c16:** in-process the model runs {b1:.0f} images/s at batch 1 and"
            f" {b8:.0f} at batch 8 ({b8 / b1:.2f}×), so batching can add at most that much"
            " compute efficiency plus what serving costs per request (decode, executor hop,"
            " encode), paid once per batch instead of once per request."
            f" Served: {off['throughput_rps']:.0f} rps unbatched"
            f" ({off['server_cpu_cores']:.2f} cores busy,"
            f" {1 - off['throughput_rps'] / b1:.0%} below the in-process batch-1 rate: the"
            " event loop's work per request, receiving and decoding 0.6 MB and answering,"
            " competes with ONNX Runtime's threads for the same cores),"
            f" {on['throughput_rps']:.0f} rps batched (avg batch"
            f" {_num(on.get('avg_batch_size'))}, {on['server_cpu_cores']:.2f} cores)."
            " int8 gains far more than batching here (see below)."
        )
    if not out:
        return []
    return ["### Why", "", *out, ""]


def _memory_lines(doc: dict[str, Any]) -> list[str]:
    servers = doc["servers"]
    out = ["### Resident memory", ""]
    out += [
        "VmRSS from /proc, summed over the server's processes (MLServer's default runs"
        " inference in a worker process; shared libraries then count once per process),"
        " with the four bench models loaded (the MLServer rows also hold the two"
        " adaptive-batching copies of the CNNs). The agent with batching on starts larger:"
        " it warms each model up at its batch sizes before it is ready, so ONNX Runtime's"
        " arenas already hold batch-8 buffers (a 224×224 CNN's are tens of MB).",
        "",
        "| server | processes | after start MB | under load, max MB | ready after s |",
        "|---|---|---|---|---|",
    ]
    for s in SERVERS:
        info = servers.get(s.key)
        if not info or "label" not in info:
            continue
        loaded = [
            r["server_rss_mb"]
            for r in doc["rows"]
            if r["server"] == s.key and r.get("server_rss_mb") is not None
        ]
        label = s.label + (f", batching {s.batching}" if s.kind == "agent" else "")
        out.append(
            f"| {label} | {info['processes']} | {info['rss_mb_idle_after_start']:.0f}"
            f" | {max(loaded) if loaded else float('nan'):.0f} | {info['start_to_ready_s']:.1f} |"
        )
    return [*out, ""]


def _quant_lines(q: dict[str, Any] | None) -> list[str]:
    if not q:
        return []
    cnn = q["cnn"]
    sp = cnn["speed"]
    out = [
        "### int8 vs fp32",
        "",
        "In-process, through the agent's ONNX backend (same session options as served):"
        " p50 per call on random 224×224 images, fp32 and int8 taking turns in six rounds.",
        "",
        "| CNN | batch 1 images/s | batch 8 images/s | ms per batch-8 call |",
        "|---|---|---|---|",
    ]
    for name in CNN_MODELS:
        out.append(
            f"| {name} | {sp[name]['batch_1']['images_per_s']:.0f}"
            f" | {sp[name]['batch_8']['images_per_s']:.0f}"
            f" | {sp[name]['batch_8']['p50_ms_per_call']:.1f} |"
        )
    r = cnn["int8_over_fp32"]
    out += [
        f"| int8 ÷ fp32 | {r['batch_1']:.2f}× | {r['batch_8']:.2f}× | |",
        "",
        f"fp32 batch 8 runs {sp[CNN_FP32]['batch_8']['images_per_s']:.0f} images/s against"
        f" {sp[CNN_FP32]['batch_1']['images_per_s']:.0f} at batch 1: that ratio is the most"
        " dynamic batching can add for this model when compute, not serving, is the limit.",
        f"Top-1 agreement of the random-weight CNN on {cnn['random_images']} random images:"
        f" {cnn['top1_agreement_random_images']:.0%} (informational only: random logits lie"
        " close together, so this is no accuracy figure).",
    ]
    d = q.get("digits", {})
    if "top1_agreement" in d:
        out += [
            f"digits-edge (the sample bundle's int8 model vs its fp32 model"
            f" `{d['fp32_model']}`) on {d['samples']} held-out digits: top-1 agreement"
            f" {d['top1_agreement']:.2%}, accuracy {d['accuracy_fp32']:.4f} (fp32) vs"
            f" {d['accuracy_int8']:.4f} (int8).",
        ]
    return [*out, ""]


def _method_lines(doc: dict[str, Any]) -> list[str]:
    m = doc["machine"]
    meth = doc["method"]
    load = doc["box_load"]
    pk = m.get("peer_packages", {})
    agent = meth["agent"]
    ab = meth["mlserver_adaptive_batching"]
    peer = agent["peer_onnx_options"]
    on = ", ".join(f"{k}: {json.dumps(v)}" for k, v in agent["batching_on"].items())
    peers = ", ".join(f"{k} {v}" for k, v in pk.items())
    out = [
        "### Machine and method",
        "",
        machine_markdown(m),
        f"Peers: {peers}. Other processes used {load['others_share_of_box']:.0%} of the box's"
        f" CPU during the measurements ({load['others_cpu_s']:.0f} CPU-s of"
        f" {load['wall_s']:.0f} s wall).",
        "",
        f"- **Load:** closed loop at fixed concurrency (1, 16, 64 clients), one keep-alive"
        " HTTP/1.1 connection per client, each sending its next request when its answer"
        f" is in; {meth['duration_s']:g} s measured per row after a warm-up (at least"
        f" {meth['warmup_s']:g} s, and until every connection has had an answer); every"
        " answer in the window is recorded. "
        + (
            "The agent's two configurations run side by side and each peer alone."
            if meth.get("one_at_a_time")
            else "All servers run side by side, idle but for the one under load."
        )
        + f" Rows at 1 and 16 clients take turns in {meth['rounds']} rounds (same total"
        " time) with the other servers' rows for the same model and concurrency, so all"
        " see the same box; a row at 64 is one round. The client is one asyncio process"
        " (a protocol that only frames responses by Content-Length), apart from the servers.",
        f"- **This box has {m['cores']} cores and the client shares them with the server**:"
        " the client's own CPU is part of the box's budget for every server alike. Its share"
        " of a core is in `bench/results/serving.json` per row (`client_cpu_share_of_core`);"
        " a row above 0.85 is flagged there as possibly client-bound.",
        "- **Same model, same session:** every server loads the same .onnx files (extracted"
        " from the agent's signed bundles) with the agent's ONNX Runtime session options"
        f" ({peer['intra_op_threads']} intra-op threads, {peer['inter_op_threads']} inter-op,"
        f" spin-waiting {'on' if peer['allow_spinning'] else 'off'}), and each server's first"
        " answer is checked against the in-process result.",
        f"- **Agent:** `edge-agent serve` with a config like `models/build/agent.yaml`;"
        f" batching off is `runtime.batching: {{enabled: false}}`, on is"
        f" `runtime.batching: {{{on}}}`.",
        "- **MLServer:** `mlserver start` on a model repository of `bench/peers/mlserver_onnx.py`"
        " (a ~20-line `MLModel` around the session, as MLServer has no ONNX runtime);"
        " `parallel_workers: 0` runs inference in the server process, the default (1) in a"
        " worker process. `debug: false` in both (no access log; the agent has none)."
        f" Adaptive batching: `max_batch_size: {ab['max_batch_size']}`,"
        f" `max_batch_time: {ab['max_batch_time']}` s.",
        "- **FastAPI:** `bench/peers/fastapi_onnx.py` under uvicorn (uvloop, httptools, one"
        " process): orjson, the session run in Starlette's thread pool, OIP v2 JSON on"
        " `/v2/models/{m}/infer`.",
        "- **Peers' venv:** `bench/.venv-peers`, created on first use from"
        " `bench/peers-constraints.txt` (MLServer needs `uvloop<0.22` for its worker"
        " processes); the project's venv never gets MLServer or FastAPI.",
        "",
        f"Rerun: `.venv/bin/python -m bench serving` (this run took {doc['duration_s']:.0f} s,"
        f" of which {doc['models_built_s']:.0f} s building the bench models; the first run"
        " also creates the peers' venv, about a minute). Options: `--quick`, `--only"
        " SERVER|MODEL` (e.g. `--only agent,tiny`), `--duration S`, `--warmup S`,"
        " `--concurrency 1,16,64`, `--no-doc`. Raw figures: `bench/results/serving.json`.",
    ]
    if not agent["batching_available"]:
        out += [
            "",
            f"Batching-on rows are not available in this run:"
            f" {agent.get('batching_missing_because')}.",
        ]
    return out


# ---- main --------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per row")
    parser.add_argument(
        "--concurrency", type=_ints, default=CONCURRENCY, help="comma-separated, e.g. 1,16,64"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rows at concurrency <= 16 alternate between the servers in this many rounds",
    )
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="start each peer alone (less memory) instead of all servers side by side",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 s per row, 0.3 s warm-up, 1 round: a smoke run"
    )
    parser.add_argument(
        "--only",
        type=lambda s: [t for t in s.split(",") if t],
        action="extend",
        default=[],
        metavar="NAMES",
        help="servers and/or models to run, globs allowed (servers: "
        + ", ".join(s.key for s in SERVERS)
        + "; models: "
        + ", ".join(MODEL_ORDER)
        + ")",
    )
    parser.add_argument(
        "--no-agent-json", action="store_true", help="skip the agent's JSON CNN rows"
    )
    parser.add_argument("--skip-quant", action="store_true", help="skip the int8 vs fp32 figures")
    parser.add_argument(
        "--quant-seconds", type=float, default=3.0, help="per batch size, fp32 and int8 each"
    )
    parser.add_argument("--peers-venv", default=str(PEERS_VENV), help="where the peers' venv lives")
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.quant_seconds, args.rounds = 1.0, 0.3, 0.5, 1
    busy = wait_until_quiet(args.wait_quiet)
    doc = run(args, busy)
    others = doc["box_load"]["others_share_of_box"]
    warn_if_busy(others)
    # A partial run must not replace the full run's figures or the doc's table.
    name = NAME if doc["complete"] else f"{NAME}-partial"
    path = write_result(name, doc)
    for g in doc["goals"]:
        print(f"{_met(g['met']).strip('*'):>4}  {g['goal']}: {g['measured']}")
    print(f"wrote {path} ({doc['duration_s']:.0f} s)")
    if not args.no_doc and doc["complete"]:
        print(f"wrote {write_doc_section(NAME, render_markdown(doc))}")
    return 0

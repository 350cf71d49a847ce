"""What every benchmark shares: a lean keep-alive HTTP client, latency statistics,
an agent run as its own process, the machine description, and the results files.

Benchmarks measure the agent as a local app sees it: a separate process on
loopback. The client and the server therefore never share a GIL, but on a small
box they do share the cores; the machine description says how many there were.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
DOC_PATH = ROOT / "docs" / "benchmarks.md"
MODELS_BUILD = ROOT / "models" / "build"

# ---- statistics ----------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Latency summary in milliseconds over every recorded sample."""

    n: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def from_ns(cls, samples_ns: Sequence[int]) -> Stats:
        if not samples_ns:
            raise ValueError("no samples")
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(
            n=int(ms.size),
            p50_ms=round(float(p50), 4),
            p90_ms=round(float(p90), 4),
            p99_ms=round(float(p99), 4),
            mean_ms=round(float(ms.mean()), 4),
            min_ms=round(float(ms.min()), 4),
            max_ms=round(float(ms.max()), 4),
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@contextmanager
def no_gc() -> Iterator[None]:
    """Keep the *client's* collector out of the timed loop (the server's runs as usual).

    A cyclic collection in the load generator would show up as server latency.
    """
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_calls(fn: Callable[[], object], n: int, warmup: int) -> list[int]:
    """Call ``fn`` ``warmup`` times untimed, then ``n`` times, returning each duration in ns."""
    for _ in range(warmup):
        fn()
    out = [0] * n
    clock = time.perf_counter_ns
    with no_gc():
        for i in range(n):
            t0 = clock()
            fn()
            out[i] = clock() - t0
    return out


# ---- HTTP client -----------------------------------------------------------------


class HttpError(RuntimeError):
    pass


class KeepAliveClient:
    """A minimal HTTP/1.1 client on one persistent loopback connection.

    Why not http.client or aiohttp: the figure we want is what the *agent* adds, so
    the client should add as little as possible. This one sends each prepared
    request with a single ``sendall`` and parses only the status line and
    ``Content-Length``; http.client sends head and body separately and parses the
    headers with the email package, which is tens of microseconds per request
    (``bench overhead`` reports it beside this client for comparison).
    """

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port), timeout=timeout)
        # Small requests must leave at once, not wait for Nagle.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    def prepare(
        self, method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> bytes:
        """The full request bytes, built once and sent many times."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def roundtrip(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one prepared request; return (status, lower-cased headers, body)."""
        sock, buf = self.sock, self._buf
        sock.sendall(request)
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = sock.recv(65536)
            if not chunk:
                raise HttpError("server closed the connection")
            buf += chunk
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        try:
            length = int(headers["content-length"])
        except (KeyError, ValueError) as exc:
            raise HttpError(f"response without a usable Content-Length: {headers}") from exc
        while len(buf) < length:
            chunk = sock.recv(max(65536, length - len(buf)))
            if not chunk:
                raise HttpError("server closed the connection mid-body")
            buf += chunk
        body = bytes(buf[:length])
        del buf[:length]
        return status, headers, body

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> KeepAliveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def timed_requests(
    client: KeepAliveClient, request: bytes, n: int, warmup: int
) -> tuple[list[int], list[bytes]]:
    """Send ``request`` sequentially (concurrency 1); every latency in ns, every body.

    Bodies are kept so the caller can check answers and read server-side timings
    after the loop, outside the timed region.
    """
    for _ in range(warmup):
        status, _, body = client.roundtrip(request)
        if status != 200:
            raise HttpError(f"warm-up request failed with {status}: {body[:300]!r}")
    lat = [0] * n
    bodies: list[bytes] = [b""] * n
    clock = time.perf_counter_ns
    roundtrip = client.roundtrip
    with no_gc():
        for i in range(n):
            t0 = clock()
            status, _, body = roundtrip(request)
            lat[i] = clock() - t0
            if status != 200:
                raise HttpError(f"request {i} failed with {status}: {body[:300]!r}")
            bodies[i] = body
    return lat, bodies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- processes -------------------------------------------------------------------


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS (now), VmHWM (peak) and RSS by kind of ``pid`` in MiB, from /proc/PID/status.

    RssFile is mostly shared-library code, which other processes may share.
    """
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)  # kB -> MiB
    return fields


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads) from /proc/PID/stat.

    CPU time per request does not depend on what else the box is doing, unlike
    latency, so it is the steadier measure of what the server's code costs.
    """
    raw = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the parenthesised command name (which may contain spaces).
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def wait_http_ready(
    port: int, path: str, proc: subprocess.Popen[bytes], timeout: float, poll_s: float = 0.005
) -> float:
    """Poll ``path`` until it answers 200; return ``time.monotonic()`` at that moment.

    A short poll interval, since the figure we report is only as fine as the poll.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before it was ready")
        try:
            with KeepAliveClient("127.0.0.1", port, timeout=2.0) as c:
                status, _, _ = c.roundtrip(c.prepare("GET", path))
            if status == 200:
                return time.monotonic()
        except (OSError, HttpError):
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"no 200 from {path} within {timeout} s")


def agent_command() -> list[str]:
    """``edge-agent`` as installed in this venv (the console script), else ``-m agent``."""
    script = Path(sys.executable).parent / "edge-agent"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "edgefleet.agent"]


class AgentProcess:
    """``edge-agent serve`` as a separate process; ``ready_s`` is spawn-to-ready time."""

    def __init__(self, config: Mapping[str, Any], workdir: Path, name: str = "agent") -> None:
        self.port = free_port()
        self.workdir = workdir
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s = float("nan")

    def start(self, timeout: float = 60.0) -> float:
        cmd = [
            *agent_command(),
            "serve",
            "--config",
            str(self.config_path),
            "--port",
            str(self.port),
        ]
        with open(self.log_path, "ab") as log:
            spawned = time.monotonic()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            ready_at = wait_http_ready(self.port, "/v2/health/ready", self.proc, timeout)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"agent did not become ready: {exc}\n{tail}") from exc
        self.ready_s = ready_at - spawned
        return self.ready_s

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self) -> KeepAliveClient:
        return KeepAliveClient("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _system_busy_s() -> tuple[float, float]:
    """(busy CPU seconds of the whole box, idle CPU seconds) from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / hz, (idle + iowait) / hz


def box_busy_cpu_s() -> float:
    """Busy CPU seconds of the whole box since boot, all cores (from /proc/stat).

    The difference over a measurement, minus the benchmark's own processes' CPU, is
    what other work on the box took from it.
    """
    return _system_busy_s()[0]


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """How much CPU *other* work on the box used while a benchmark ran.

    Client, agent and model share a few cores, so a compiler or a test suite running
    beside the benchmark inflates every latency; the result says so instead of
    silently reporting a slower agent. Own usage is this process plus the agent
    processes it started (stopped and waited for before ``stop``).
    """

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._busy, _ = _system_busy_s()
        self._own = _own_cpu_s()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._wall
        busy = _system_busy_s()[0] - self._busy
        own = _own_cpu_s() - self._own
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        others = max(0.0, busy - own)
        return {
            "wall_s": round(wall, 1),
            "box_busy_cpu_s": round(busy, 1),
            "bench_cpu_s": round(own, 1),
            "others_cpu_s": round(others, 1),
            "others_share_of_box": round(others / max(wall * (cores or 1), 1e-9), 3),
        }


def busy_share(interval: float = 1.0) -> float:
    """Share of the box's CPU time that was busy over ``interval`` seconds."""
    b0, i0 = _system_busy_s()
    time.sleep(interval)
    b1, i1 = _system_busy_s()
    total = (b1 - b0) + (i1 - i0)
    return (b1 - b0) / total if total > 0 else 0.0


def wait_until_quiet(max_wait_s: float, threshold: float = 0.15) -> float:
    """Wait up to ``max_wait_s`` for the box to be mostly idle; return the last busy share."""
    deadline = time.monotonic() + max_wait_s
    share = busy_share()
    while share > threshold and time.monotonic() < deadline:
        print(
            f"bench: box {share:.0%} busy with other work; waiting for it to calm down",
            file=sys.stderr,
        )
        share = busy_share(2.0)
    return share


# ---- models ------------------------------------------------------------------------


def ensure_models(required: Sequence[str]) -> Path:
    """models/build with the sample bundles; runs ``python -m models --if-missing`` if needed.

    ``required`` are bundle file globs (e.g. ``digits-edge-*.bundle``) that must exist.
    """

    def missing() -> list[str]:
        wanted = [*required, "agent.yaml", "keys/signing.pub"]
        return [g for g in wanted if not any(MODELS_BUILD.glob(g))]

    if missing():
        print(
            f"bench: sample models missing ({', '.join(missing())}); building them", file=sys.stderr
        )
        subprocess.run([sys.executable, "-m", "models", "--if-missing"], cwd=ROOT, check=True)
    still = missing()
    if still:
        raise SystemExit(f"bench: `python -m models` did not produce {still} in {MODELS_BUILD}")
    return MODELS_BUILD


# ---- machine -----------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return m.group(1).strip() if m else platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    """The SIMD features that decide ONNX Runtime's and XNNPACK's int8 speed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    m = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    flags = set(m.group(1).split()) if m else set()
    interesting = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd"]
    return [f for f in interesting if f in flags]


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": cores,
        "ram_gib": _ram_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "packages": {
            name: _version(name)
            for name in ("onnxruntime", "ai-edge-litert", "aiohttp", "numpy", "orjson")
        },
    }


def machine_markdown(m: Mapping[str, Any]) -> str:
    pk = m["packages"]
    return (
        f"{m['cpu']} ({', '.join(m['cpu_flags']) or 'no SIMD flags listed'}), "
        f"{m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']} {m['arch']}; "
        f"Python {m['python']}, onnxruntime {pk['onnxruntime']}, "
        f"ai-edge-litert {pk['ai-edge-litert']}, aiohttp {pk['aiohttp']}, "
        f"numpy {pk['numpy']}, orjson {pk['orjson']}; run {m['date']}."
    )


# ---- results -----------------------------------------------------------------------


def write_result(name: str, doc: Mapping[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


DOC_HEADER = """# Benchmarks

Each section below is written by its benchmark (`python -m bench NAME`, results in
`bench/results/NAME.json`). A run replaces only the text between its own
`<!-- bench:NAME begin/end -->` markers, so other benchmarks' sections and anything
written outside the markers stay as they are.
"""


def write_doc_section(name: str, markdown: str, path: Path = DOC_PATH) -> Path:
    """Replace (or append) the section between this benchmark's markers in ``path``."""
    begin, end = f"<!-- bench:{name} begin -->", f"<!-- bench:{name} end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else DOC_HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        # A function replacement: the section's backslashes are not regex escapes.
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# Other processes' share of the box above which figures are flagged as pessimistic.
BUSY_WARNING = 0.1


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark takes: leave the doc alone, wait for a quiet box."""
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        metavar="S",
        help="wait up to S seconds for other work on the box to stop first",
    )


def warn_if_busy(others_share: float) -> None:
    if others_share > BUSY_WARNING:
        print(
            f"bench: WARNING other processes used {others_share:.0%} of the box's CPU during"
            " the run; figures are pessimistic",
            file=sys.stderr,
        )

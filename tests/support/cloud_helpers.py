"""Helpers for the cloud-fallback tests: real cloud-profile agents on loopback, and
small real servers for the faults a real agent cannot produce (the fixtures that
use them are in tests/support/cloud_fixtures.py).

* ``Servers`` (the ``servers`` fixture): starts real agents (edge or cloud profile,
  optionally HTTPS) and plain aiohttp apps on loopback ports in the test's loop; all
  stopped at the end (what anyone left running fails the test: tests/support/leaks.py).
* ``FaultProxy``: a TCP proxy in front of a real cloud agent that passes traffic,
  hangs (accepts and never answers), delays the answer, or drops the connection
  part-way through the answer: a broken network, with the real server behind it.
* ``broken_oip_app``: an aiohttp server speaking just enough OIP to be believed,
  answering with malformed JSON, or correctly with JSON only (no binary extension),
  like an MLServer.
* ``make_tls``: a throwaway CA and a server certificate for 127.0.0.1.
* ``LagMonitor``: the longest the event loop was held, while a block ran.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
import yaml
from aiohttp import web
from onnx import TensorProto, helper

from edgefleet.agent.cloud.router import CloudRouter
from edgefleet.agent.config import parse_config
from edgefleet.agent.server.app import create_app
from edgefleet.agent.server.context import DATA_PLANE
from tests.support.tiny import agent_config, tiny_reference
from tests.support.tls import TlsFiles, make_tls  # noqa: F401 (re-exported)

TOKEN = "test-cloud-token-0123456789"
CLOUD_NAME = "tiny-cloud"
# The cloud model: same shape as the edge's tiny model, other weights, so tests can
# tell whose answer they got.
CLOUD_W = np.array(
    [[0.5, 1.0, -0.5], [1.5, -1.0, 0.0], [0.0, 1.0, 1.0], [-1.0, 0.5, 2.0]], dtype=np.float32
)


def cloud_reference(x: np.ndarray) -> np.ndarray:
    return tiny_reference(x, CLOUD_W)


# ---- models ----------------------------------------------------------------------------


def write_onnx(
    path: Path,
    w: np.ndarray,
    b: np.ndarray,
    out_name: str = "probs",
    poison: bool = False,
) -> Path:
    """softmax(x @ W + b). ``poison``: inference fails (ONNX Runtime raises) when any
    input value is 10 or more, as a real bug on a real cloud would: a 500."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["z0"]),
        helper.make_node("Add", ["z0", "B"], ["z"]),
        helper.make_node("Softmax", ["z"], ["p"], axis=1),
    ]
    inits = [
        helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.flatten().tolist()),
        helper.make_tensor("B", TensorProto.FLOAT, b.shape, b.tolist()),
    ]
    if poison:
        # Gather(table[10], int(max(x))) is out of bounds for max(x) >= 10; the
        # result, times zero, is added so the node cannot be optimised away.
        nodes += [
            helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
            helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64),
            helper.make_node("Gather", ["T", "mi"], ["g"], axis=0),
            helper.make_node("Mul", ["g", "Z"], ["g0"]),
            helper.make_node("Add", ["p", "g0"], [out_name]),
        ]
        inits += [
            helper.make_tensor("T", TensorProto.FLOAT, [10], [1.0] * 10),
            helper.make_tensor("Z", TensorProto.FLOAT, [], [0.0]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["p"], [out_name]))
    n = w.shape[1]
    graph = helper.make_graph(
        nodes,
        "tiny-variant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


# ---- configs -----------------------------------------------------------------------------


def cloud_config(tmp: Path, keys: tuple[Path, Path], bundle: Path, **server: Any) -> Any:
    """A cloud-profile agent (token required) serving ``bundle``."""
    doc = {
        "profile": "cloud",
        "server": {"host": "127.0.0.1", "port": 0, "auth_token": TOKEN, **server},
        "store": {"path": str(tmp / "cloud-store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(bundle)}],
        "runtime": {"executor_threads": 2},
    }
    return parse_config(yaml.safe_dump(doc))


def edge_config(
    tmp: Path,
    keys: tuple[Path, Path],
    bundle: Path,
    url: str | None,
    *,
    token: str | None = TOKEN,
    timeout_ms: int = 250,
    breaker: dict[str, Any] | None = None,
    tiny: dict[str, Any] | None = None,
    hard_examples: dict[str, Any] | None = None,
    **cloud: Any,
) -> Any:
    """An edge agent serving ``bundle`` (model ``tiny``) with its fallback to ``url``."""
    fallback: dict[str, Any] = {
        "cloud": {"url": url, "token": token, "timeout_ms": timeout_ms, **cloud},
        # Small back-offs and no jitter: the tests wait them out.
        "breaker": {"failures": 3, "backoff_ms": 300, "jitter": 0.0, **(breaker or {})},
        "hard_examples": {"retry_interval_s": 3600, **(hard_examples or {})},
    }
    if tiny:
        fallback["models"] = {"tiny": tiny}
    return agent_config(tmp / "edge", keys, [bundle], fallback=fallback)


# ---- servers -------------------------------------------------------------------------------


@dataclass
class Running:
    runner: web.AppRunner
    base: str
    port: int
    app: web.Application

    @property
    def router(self) -> CloudRouter:
        """The agent's cloud router (background work, hard examples, telemetry)."""
        return self.app[DATA_PLANE].router


class Servers:
    def __init__(self) -> None:
        self._runners: list[web.AppRunner] = []
        self._proxies: list[FaultProxy] = []

    async def agent(
        self, config: Any, *, port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> Running:
        return await self.app(create_app(config), port=port, ssl_context=ssl_context)

    async def app(
        self, app: web.Application, *, port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> Running:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context)
        await site.start()
        bound = runner.addresses[0][1]
        scheme = "https" if ssl_context else "http"
        return Running(runner, f"{scheme}://127.0.0.1:{bound}", bound, app)

    async def stop(self, running: Running) -> None:
        await running.runner.cleanup()
        if running.runner in self._runners:
            self._runners.remove(running.runner)

    async def proxy(self, upstream_port: int) -> FaultProxy:
        proxy = FaultProxy(upstream_port)
        await proxy.start()
        self._proxies.append(proxy)
        return proxy

    async def close(self) -> None:
        # Edge agents first (their clients hold connections to the others).
        for r in reversed(self._runners):
            await r.cleanup()
        for p in self._proxies:
            await p.close()


class FaultProxy:
    """TCP proxy to a real server; ``mode`` applies to the server-to-client direction.

    pass: forward; hang: accept and never answer; delay: hold the answer ``delay_s``;
    drop: forward ``drop_after`` bytes of each infer (POST) answer, then reset the link.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.delay_s = 0.0
        self.drop_after = 0
        self.connections = 0
        self.sent_to_server = bytearray()  # every request byte, for checking the wire format
        self.last_answer_bytes = 0  # size of the last infer answer forwarded
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _track(self, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track(writer)
        self.connections += 1
        mode = self.mode
        # Per connection: is the request in progress a POST (an infer), and how much
        # of its answer has been forwarded.
        conn = {"post": False, "answered": 0}
        try:
            if mode == "hang":
                while await reader.read(65536):
                    pass  # swallow the request; never a byte back
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._writers.add(up_writer)
            to_server = asyncio.create_task(self._pump(reader, up_writer, conn))
            self._tasks.add(to_server)
            to_server.add_done_callback(self._tasks.discard)
            await self._answer(up_reader, writer, mode, conn)
            to_server.cancel()
            up_writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: dict[str, Any]
    ) -> None:
        try:
            while data := await reader.read(65536):
                if data[:5] in (b"POST ", b"GET /"):
                    conn["post"] = data.startswith(b"POST ")
                    conn["answered"] = 0
                self.sent_to_server += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass

    async def _answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        mode: str,
        conn: dict[str, Any],
    ) -> None:
        first = True
        while data := await reader.read(65536):
            if first and mode == "delay":
                await asyncio.sleep(self.delay_s)
            first = False
            done = conn["answered"]
            if mode == "drop" and conn["post"] and done + len(data) >= self.drop_after:
                # Part of an infer answer, then the link dies (an RST, not a clean close).
                writer.write(data[: max(0, self.drop_after - done)])
                await writer.drain()
                writer.transport.abort()
                return
            conn["answered"] = done + len(data)
            if conn["post"]:
                self.last_answer_bytes = conn["answered"]
            writer.write(data)
            await writer.drain()


SEEN = web.AppKey("seen", list)


def broken_oip_app(mode: str) -> web.Application:
    """A small OIP server: ``malformed`` answers 200 with broken JSON; ``json`` answers
    correctly (the cloud model's maths) but lists no binary extension and accepts
    only JSON, as MLServer does; ``requests`` records what it was sent."""
    app = web.Application()
    seen: list[dict[str, Any]] = []
    app[SEEN] = seen

    async def server_meta(request: web.Request) -> web.Response:
        return web.json_response({"name": "fake-oip", "version": "0", "extensions": []})

    async def infer(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append({"content_type": request.content_type, "headers": dict(request.headers)})
        if mode == "malformed":
            return web.Response(
                body=b'{"model_name": "tiny-cloud", "outputs": [{"na',
                status=200,
                content_type="application/json",
            )
        if "Inference-Header-Content-Length" in request.headers:
            return web.Response(text="binary not supported", status=422)
        doc = orjson.loads(body)
        x = np.asarray(doc["inputs"][0]["data"], dtype=np.float32).reshape(
            doc["inputs"][0]["shape"]
        )
        probs = cloud_reference(x)
        return web.json_response(
            {
                "model_name": request.match_info["model"],
                "model_version": "7",
                "outputs": [
                    {
                        "name": "probs",
                        "datatype": "FP32",
                        "shape": list(probs.shape),
                        "data": probs.ravel().tolist(),
                    }
                ],
            }
        )

    app.router.add_get("/v2", server_meta)
    app.router.add_post("/v2/models/{model}/infer", infer)
    return app


# ---- TLS ----------------------------------------------------------------------------------


# ---- measuring -------------------------------------------------------------------------------


class LagMonitor:
    """``async with LagMonitor() as lag:`` ... ``lag.max_ms``: the event loop's worst stall."""

    def __init__(self, tick_s: float = 0.005) -> None:
        self.tick_s = tick_s
        self.max_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            late = (time.perf_counter() - t0 - self.tick_s) * 1000
            self.max_ms = max(self.max_ms, late)

    async def __aenter__(self) -> LagMonitor:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def tensor(x: np.ndarray) -> dict[str, Any]:
    return {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}


async def infer(
    session: Any, base: str, x: np.ndarray, **params: Any
) -> tuple[int, dict[str, Any], float]:
    """POST an OIP JSON request for model tiny; (status, body, client-side ms)."""
    body: dict[str, Any] = {"inputs": [tensor(x)]}
    if params:
        body["parameters"] = params
    t0 = time.perf_counter()
    async with session.post(f"{base}/v2/models/tiny/infer", json=body) as r:
        doc = await r.json()
    return r.status, doc, (time.perf_counter() - t0) * 1000


def probs_of(doc: dict[str, Any]) -> np.ndarray:
    out = next(o for o in doc["outputs"] if o["name"] == "probs")
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


async def wait_for(predicate: Callable[[], Any], within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not await _maybe_await(predicate()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value):
        return await value
    return value

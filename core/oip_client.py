"""An Open Inference Protocol (KServe v2) REST client for the cloud model.

It talks to any OIP server (the agent's own cloud profile, Triton, KServe,
MLServer): the binary tensor extension is used only when the server lists
``binary_tensor_data`` in ``GET /v2``, JSON otherwise. Connections are pooled and
kept alive (a TLS handshake per call would cost more than a small model's whole
inference), the bearer token goes in ``Authorization``, and every call has one
deadline covering connect, send, wait and read.

Every failure leaves as a ``CloudError`` whose ``reason`` is the fallback reason
the caller reports: ``offline`` when no connection could be made (refused, no
route, DNS, or the deadline passed before a connection existed), ``cloud_timeout``
when a connected cloud did not answer in time, ``cloud_error`` for everything
else (HTTP errors, 401, TLS failures, malformed or truncated answers, wrong
outputs).
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import numpy as np
import orjson

from edgefleet.core import __version__
from edgefleet.core.bundle.manifest import NUMPY_TO_OIP, OIP_TO_NUMPY
from edgefleet.core.errors import EdgefleetError

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_EXTENSION = "binary_tensor_data"
# Above this many payload bytes, JSON (de)serialisation moves off the event loop:
# orjson needs ~3 ms for a 224x224x3 float tensor, too long to hold the loop.
OFFLOAD_BYTES = 256 * 1024
_MAX_DIMS = 8
T = TypeVar("T")


class CloudError(EdgefleetError):
    """The cloud did not give a usable answer; ``reason`` is the fallback reason."""

    reason = "cloud_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CloudTimeout(CloudError):
    reason = "cloud_timeout"


class CloudUnreachable(CloudError):
    reason = "offline"


class CloudHTTPError(CloudError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class CloudProtocolError(CloudError):
    """The answer arrived but is not a valid OIP answer (or not the one asked for)."""


@dataclass(frozen=True)
class CloudAnswer:
    model_name: str
    model_version: str | None
    outputs: dict[str, np.ndarray]
    binary: bool


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def client_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the server against ``ca_file`` only when given, else the system's CAs."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


@dataclass
class CallTrace:
    """What aiohttp's trace hooks learn about one call's connection."""

    queued: bool = False  # waited for a free pooled connection
    connected: bool = False  # had a connection (new or reused)
    reused: bool = False  # the connection came from the pool

    def reset(self) -> None:
        self.queued = self.connected = self.reused = False


class OipClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        ca_file: Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 8,
        keepalive_s: float = 30.0,
        max_response_bytes: int = 64 * 1024 * 1024,
        executor: Executor | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.tls = parts.scheme == "https"
        self._token = token
        # Loading CA files (the system's bundle: tens of ms) is disk work: callers on
        # an event loop build the context in a thread and pass it in.
        self._ssl = ssl_context or (client_ssl_context(ca_file) if self.tls else None)
        self.max_connections = max_connections
        self.keepalive_s = keepalive_s
        self.max_response_bytes = max_response_bytes
        self._executor = executor
        self._session: aiohttp.ClientSession | None = None
        self._extensions: frozenset[str] | None = None
        if token and not self.tls and not _is_loopback(parts.hostname or ""):
            log.warning(
                "the cloud token goes to %s over plain HTTP: anyone on the path can read it;"
                " use https://",
                parts.hostname,
            )

    # ---- lifecycle -------------------------------------------------------------

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            trace = aiohttp.TraceConfig()
            trace.on_connection_queued_start.append(_mark("queued"))
            trace.on_connection_create_end.append(_mark("connected"))
            trace.on_connection_reuseconn.append(_mark("connected", "reused"))
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                keepalive_timeout=self.keepalive_s,
                ssl=self._ssl if self.tls and self._ssl is not None else False,
            )
            headers = {"User-Agent": f"edgefleet-agent/{__version__}"}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None),  # our own deadline rules
                trace_configs=[trace],
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def forget_server(self) -> None:
        """The server may have been replaced: ask for its extensions again next time."""
        self._extensions = None

    # ---- calls -------------------------------------------------------------------

    async def _extensions_now(self, state: CallTrace) -> frozenset[str]:
        if self._extensions is not None:
            return self._extensions
        session = self._open()
        # No redirects: a captive portal or a moved endpoint is an error, and the token
        # must never follow a redirect to another host.
        async with session.get(
            f"{self.base_url}/v2", trace_request_ctx=state, allow_redirects=False
        ) as resp:
            if resp.status in (401, 403):
                raise await _http_error(resp, "GET /v2")
            if resp.status != 200:
                # Not every OIP server implements server metadata: JSON always works.
                self._extensions = frozenset()
                return self._extensions
            raw = await self._read_body(resp)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise CloudProtocolError(f"GET /v2: malformed JSON ({exc})") from exc
        exts = doc.get("extensions") if isinstance(doc, dict) else None
        self._extensions = frozenset(e for e in exts or [] if isinstance(e, str))
        return self._extensions

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        version: str | None = None,
        timeout_s: float,
        request_id: str | None = None,
        trace: CallTrace | None = None,
    ) -> CloudAnswer:
        """POST ``.../infer`` and return the named ``outputs``; raises ``CloudError``.

        ``trace`` (filled in as the call goes) lets a caller who stops waiting before
        ``timeout_s`` tell an unreachable cloud from a slow one (``timeout_error``).
        """
        return await self._guard(
            lambda state: self._infer_now(model, version, inputs, outputs, request_id, state),
            timeout_s,
            trace or CallTrace(),
        )

    def timeout_error(self, trace: CallTrace, waited_s: float) -> CloudError:
        """What a call that ran out of time was: offline (never connected) or a timeout."""
        ms = round(waited_s * 1000)
        if not trace.connected and not trace.queued:
            self.forget_server()
            return CloudUnreachable(f"no connection to the cloud within {ms} ms")
        return CloudTimeout(f"the cloud did not answer within {ms} ms")

    async def _guard(
        self, call: Callable[[CallTrace], Awaitable[T]], timeout_s: float, state: CallTrace
    ) -> T:
        """Run ``call`` under the deadline; translate every failure into a CloudError."""
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    return await call(state)
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    if not state.reused:
                        raise
                    # A pooled connection the server had already closed (it restarted,
                    # or its keep-alive ran out first): once more on a fresh one.
                    state.reset()
                    return await call(state)
        except TimeoutError:
            raise self.timeout_error(state, timeout_s) from None
        except CloudError:
            raise
        except aiohttp.ClientConnectorCertificateError as exc:
            raise CloudError(
                f"TLS: the cloud's certificate was refused ({exc.certificate_error})"
            ) from exc
        except aiohttp.ClientSSLError as exc:
            raise CloudError(f"TLS handshake with the cloud failed: {exc}") from exc
        except aiohttp.ClientConnectorError as exc:
            self.forget_server()
            raise CloudUnreachable(f"cannot connect to the cloud: {exc.os_error}") from exc
        except aiohttp.ClientPayloadError as exc:
            raise CloudError(f"the answer was cut off: {exc}") from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise CloudError(f"the cloud closed the connection mid-answer: {exc}") from exc
        except (aiohttp.ClientError, ssl.SSLError, OSError, ValueError) as exc:
            # ValueError: aiohttp's parser on garbage that is not HTTP at all.
            raise CloudError(f"{type(exc).__name__}: {exc}") from exc

    async def _infer_now(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        request_id: str | None,
        state: CallTrace,
    ) -> CloudAnswer:
        binary = BINARY_EXTENSION in await self._extensions_now(state)
        size = sum(a.nbytes for a in inputs.values())
        rid = request_id or uuid.uuid4().hex
        body, headers = await self._offload(
            size and not binary and size > OFFLOAD_BYTES,
            encode_request,
            inputs,
            outputs,
            binary,
            rid,
        )
        path = f"/v2/models/{quote(model, safe='')}"
        if version:
            path += f"/versions/{quote(version, safe='')}"
        session = self._open()
        async with session.post(
            f"{self.base_url}{path}/infer",
            data=body,
            headers=headers,
            trace_request_ctx=state,
            allow_redirects=False,
        ) as resp:
            if resp.status != 200:
                raise await _http_error(resp, f"POST {path}/infer")
            raw = await self._read_body(resp)
            header_len = resp.headers.get(HEADER_LENGTH)
        doc, tensors = await self._offload(
            header_len is None and len(raw) > OFFLOAD_BYTES, decode_response, raw, header_len
        )
        missing = [n for n in outputs if n not in tensors]
        if missing:
            raise CloudProtocolError(
                f"the cloud's answer lacks output(s) {missing} (it sent {sorted(tensors)})"
            )
        name = doc.get("model_name")
        version_got = doc.get("model_version")
        return CloudAnswer(
            model_name=str(name) if name is not None else model,
            model_version=str(version_got) if version_got is not None else None,
            outputs={n: tensors[n] for n in outputs},
            binary=header_len is not None,
        )

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self.max_response_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise CloudProtocolError(f"answer of {resp.content_length} bytes is over {limit}")
        chunks: list[bytes] = []
        total = 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            total += len(chunk)
            if total > limit:
                raise CloudProtocolError(f"answer larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _offload(self, big: bool | int, fn: Callable[..., T], *args: Any) -> T:
        if not big:
            return fn(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)


def _mark(*attrs: str) -> Callable[..., Any]:
    async def hook(session: Any, ctx: SimpleNamespace, params: Any) -> None:
        state = ctx.trace_request_ctx
        if state is not None:
            for attr in attrs:
                setattr(state, attr, True)

    return hook


async def _http_error(resp: aiohttp.ClientResponse, what: str) -> CloudHTTPError:
    try:
        text = (await resp.content.read(2048)).decode("utf-8", "replace")
    except (aiohttp.ClientError, asyncio.IncompleteReadError):
        text = ""
    detail = text
    try:
        doc = orjson.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            detail = doc["error"]
    except orjson.JSONDecodeError:
        pass
    detail = " ".join(detail.split())[:300]
    if resp.status in (401, 403):
        return CloudHTTPError(f"{what}: the cloud refused our token ({resp.status})", resp.status)
    return CloudHTTPError(f"{what}: HTTP {resp.status} {detail}".rstrip(), resp.status)


# ---- wire format ---------------------------------------------------------------------


def encode_request(
    inputs: Mapping[str, np.ndarray], outputs: Sequence[str], binary: bool, request_id: str
) -> tuple[bytes, dict[str, str]]:
    """The request body and headers: binary tensors after a JSON header, or pure JSON."""
    items: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, value in inputs.items():
        arr = np.ascontiguousarray(value)
        datatype = NUMPY_TO_OIP.get(arr.dtype.name)
        if datatype is None:
            raise CloudProtocolError(f"input {name!r}: dtype {arr.dtype} has no OIP datatype")
        item: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype}
        if binary:
            raw = arr.tobytes()
            item["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            # orjson serialises float16 arrays poorly; widen them for JSON only.
            flat = arr.reshape(-1)
            item["data"] = flat.astype(np.float32) if datatype == "FP16" else flat
        items.append(item)
    doc: dict[str, Any] = {
        "id": request_id,
        "inputs": items,
        "outputs": [
            {"name": n, "parameters": {"binary_data": True}} if binary else {"name": n}
            for n in outputs
        ],
    }
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def decode_response(
    raw: bytes, header_length: str | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse an OIP infer answer (JSON, or a JSON header and binary tensors)."""
    view = memoryview(raw)
    binary: memoryview | None = None
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise CloudProtocolError(f"{HEADER_LENGTH} {header_length!r} is not a number") from None
        if not 0 < n <= len(raw):
            raise CloudProtocolError(f"{HEADER_LENGTH} {n} but the answer has {len(raw)} bytes")
        view, binary = view[:n], view[n:]
    try:
        doc = orjson.loads(view)
    except orjson.JSONDecodeError as exc:
        raise CloudProtocolError(f"malformed JSON from the cloud: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise CloudProtocolError("the cloud's answer has no 'outputs' list")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for item in doc["outputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise CloudProtocolError("an output in the cloud's answer has no name")
        name = item["name"]
        datatype = item.get("datatype")
        if datatype not in OIP_TO_NUMPY:
            raise CloudProtocolError(f"output {name!r}: unsupported datatype {datatype!r}")
        dtype = np.dtype(OIP_TO_NUMPY[datatype])
        shape = item.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise CloudProtocolError(f"output {name!r}: bad shape {shape!r}")
        count = math.prod(shape)
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if binary is None or not isinstance(size, int):
                raise CloudProtocolError(f"output {name!r}: binary_data_size without binary data")
            if size != count * dtype.itemsize or offset + size > len(binary):
                raise CloudProtocolError(f"output {name!r}: binary data does not fit its shape")
            arr = np.frombuffer(binary[offset : offset + size], dtype=dtype).copy()
            offset += size
        else:
            data = item.get("data")
            if not isinstance(data, list):
                raise CloudProtocolError(f"output {name!r} has no data")
            try:
                arr = np.asarray(data, dtype=dtype)
            except (ValueError, TypeError) as exc:
                raise CloudProtocolError(f"output {name!r}: unusable data ({exc})") from exc
            arr = arr.reshape(-1) if arr.ndim != 1 else arr
            if arr.size != count:
                raise CloudProtocolError(f"output {name!r}: {arr.size} values for shape {shape}")
        tensors[name] = arr.reshape(shape)
    return doc, tensors

"""The local API against hostile clients (issue 9, findings 4, 5, 6 and 13), over real HTTP.

- Cross-site requests (a web page in the store PC's browser) and DNS rebinding: a
  foreign ``Origin`` may not change anything, a foreign ``Host`` is not served, admin
  routes take only their own body type.
- Image decompression bombs: the decode memory is bounded by a budget, checked from the
  PNG/JPEG header before a pixel is decoded (a real agent process, its peak RSS read
  from /proc).
- Slow clients: stalled half-sent requests are closed after a timeout and cannot lock
  anyone out (a real agent process with the systemd default of 1024 open files).
- Client errors that used to be 500s: an empty batch, a broken multipart body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.brokers import free_port
from tests.support.images import BIG, IMAGE_PRE, png
from tests.support.tiny import TEST_X, agent_config
from tests.support.tls import make_tls

EVIL = "http://evil.example"


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


def tensor(data: np.ndarray) -> dict[str, Any]:
    return {
        "name": "x",
        "shape": list(data.shape),
        "datatype": "FP32",
        "data": data.ravel().tolist(),
    }


async def infer_ok(session: aiohttp.ClientSession, base: str) -> None:
    body = {"inputs": [tensor(TEST_X[:1])]}
    async with session.post(f"{base}/v2/models/tiny/infer", json=body) as r:
        assert r.status == 200, await r.text()


async def active_version(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(f"{base}/v1/models/tiny") as r:
        return (await r.json())["active"]


# ---- finding 4: cross-site requests and DNS rebinding ---------------------------------


@pytest.fixture
async def two_versions(start_agent, make_tiny_bundle, keys, tmp_path):
    """tiny:1 active, tiny:2 installed and not active."""
    agent = await start_agent(agent_config(tmp_path, keys, [make_tiny_bundle("1")]))
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{agent.base}/v1/bundles", data=make_tiny_bundle("2").read_bytes()) as r,
    ):
        assert r.status == 201, await r.text()
    return agent


async def test_foreign_origin_changes_nothing(session, two_versions):
    """A page on another site can send a "simple" POST (text/plain, no preflight):
    every state-changing route refuses it, and nothing changed."""
    base = two_versions.base
    foreign = {"Origin": EVIL, "Content-Type": "text/plain"}
    calls = [
        ("POST", "/v1/models/tiny/versions/2/activate", "{}"),
        ("POST", "/v1/models/tiny/rollback", ""),
        ("PUT", "/v1/models/tiny/labels/stable", '{"version": "2"}'),
        ("POST", "/v2/repository/models/tiny/unload", ""),
        ("POST", "/v1/bundles?activate=1", "junk"),
    ]
    for method, path, body in calls:
        async with session.request(method, base + path, data=body, headers=foreign) as r:
            assert r.status == 403, (path, await r.text())
            assert "Origin" in (await r.json())["error"], path
    # Even with the right body type: the origin is what is refused.
    async with session.put(
        f"{base}/v1/models/tiny/labels/stable", json={"version": "2"}, headers={"Origin": EVIL}
    ) as r:
        assert r.status == 403
    assert await active_version(session, base) == "1"
    async with session.get(f"{base}/v1/models/tiny") as r:
        assert (await r.json())["labels"] == {}
    async with session.get(f"{base}/v2/health/ready") as r:
        assert r.status == 200  # not unloaded
    # A foreign page may not even run inference (it could not read the answer anyway).
    async with session.post(
        f"{base}/v2/models/tiny/infer", json={"inputs": [tensor(TEST_X[:1])]}, headers=foreign
    ) as r:
        assert r.status == 403


async def test_own_origin_and_clients_without_origin_still_work(session, two_versions):
    base = two_versions.base
    own = {"Origin": base}  # a page served by the agent itself: same origin
    async with session.post(f"{base}/v1/models/tiny/versions/2/activate", headers=own) as r:
        assert r.status == 200, await r.text()
    async with session.post(f"{base}/v1/models/tiny/rollback") as r:  # the CLI, tritonclient
        assert r.status == 200, await r.text()
    assert await active_version(session, base) == "1"
    async with session.put(
        f"{base}/v1/models/tiny/labels/canary", json={"version": "2"}, headers=own
    ) as r:
        assert r.status == 200, await r.text()


async def test_configured_cors_origin_may_change_state(
    start_agent, make_tiny_bundle, keys, tmp_path, session
):
    shop = "http://shop.example:8080"
    agent = await start_agent(
        agent_config(tmp_path, keys, [make_tiny_bundle("1")], server={"cors_origins": [shop]})
    )
    async with session.post(
        f"{agent.base}/v2/models/tiny/infer",
        json={"inputs": [tensor(TEST_X[:1])]},
        headers={"Origin": shop},
    ) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == shop
    async with session.post(
        f"{agent.base}/v2/repository/models/tiny/unload", headers={"Origin": EVIL}
    ) as r:
        assert r.status == 403


async def test_admin_routes_take_only_their_body_type(session, two_versions, make_tiny_bundle):
    """Without an Origin header (an old browser, a plugin): a form or text/plain body is
    what a cross-site page can send without a preflight; admin routes refuse it."""
    base = two_versions.base
    async with session.put(
        f"{base}/v1/models/tiny/labels/stable",
        data='{"version": "2"}',
        headers={"Content-Type": "text/plain"},
    ) as r:
        assert r.status == 415
        assert "application/json" in (await r.json())["error"]
    async with session.post(
        f"{base}/v1/models/tiny/versions/2/activate",
        data="x=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as r:
        assert r.status == 415
    assert await active_version(session, base) == "1"
    bundle = make_tiny_bundle("3").read_bytes()
    form = aiohttp.FormData()
    form.add_field("bundle", bundle, filename="tiny-3.bundle")
    async with session.post(f"{base}/v1/bundles", data=form) as r:
        assert r.status == 415
        assert "application/octet-stream" in (await r.json())["error"]
    async with session.post(
        f"{base}/v1/bundles", data=bundle, headers={"Content-Type": "text/plain"}
    ) as r:
        assert r.status == 415
    # What the edge-agent CLI sends (bytes: application/octet-stream) still installs.
    async with session.post(f"{base}/v1/bundles", data=bundle) as r:
        assert r.status == 201, await r.text()
    async with session.put(f"{base}/v1/models/tiny/labels/stable", json={"version": "3"}) as r:
        assert r.status == 200, await r.text()


@pytest.mark.parametrize("path", ["/v1/models", "/v2/health/ready", "/metrics"])
async def test_foreign_host_is_not_served(session, two_versions, path):
    """DNS rebinding: evil.example now resolves to 127.0.0.1, so the page is "same
    origin" with the agent, but its requests carry Host: evil.example."""
    port = two_versions.base.rsplit(":", 1)[1]
    async with session.get(two_versions.base + path, headers={"Host": f"evil.example:{port}"}) as r:
        assert r.status == 403
        assert "evil.example" in (await r.json())["error"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "10.1.2.3"):
        async with session.get(two_versions.base + path, headers={"Host": host}) as r:
            assert r.status == 200, host


async def test_allowed_hosts_and_token_protected_agents(
    start_agent, make_tiny_bundle, keys, tmp_path, session
):
    bundle = make_tiny_bundle("1")
    named = await start_agent(
        agent_config(tmp_path / "a", keys, [bundle], server={"allowed_hosts": ["Store-PC.local"]})
    )
    async with session.get(f"{named.base}/v1/models", headers={"Host": "store-pc.local:8470"}) as r:
        assert r.status == 200
    async with session.get(f"{named.base}/v1/models", headers={"Host": "other.local"}) as r:
        assert r.status == 403
        assert "server.allowed_hosts" in (await r.json())["error"]
    # A token-protected agent (the cloud profile on 0.0.0.0) is reached by any DNS name:
    # a rebinding page cannot attach the bearer token, which is what protects it.
    tokened = await start_agent(
        agent_config(tmp_path / "b", keys, [bundle], server={"auth_token": "s3cret"})
    )
    auth = {"Authorization": "Bearer s3cret"}
    async with session.get(
        f"{tokened.base}/v1/models", headers={**auth, "Host": "cloud.example.com"}
    ) as r:
        assert r.status == 200
    async with session.get(f"{tokened.base}/v1/models", headers={"Host": "cloud.example.com"}) as r:
        assert r.status == 401


# ---- finding 13: client errors that were 500s ------------------------------------------


@pytest.fixture
async def image_agent(start_agent, make_tiny_bundle, keys, tmp_path):
    bundle = make_tiny_bundle("img1", preprocessing=IMAGE_PRE)
    return await start_agent(agent_config(tmp_path, keys, [bundle]))


async def test_a_batch_of_zero_rows_is_400(session, image_agent):
    base = image_agent.base
    body = {"inputs": [{"name": "x", "shape": [0, 4], "datatype": "FP32", "data": []}]}
    async with session.post(f"{base}/v2/models/tiny/infer", json=body) as r:
        assert r.status == 400, await r.text()
        assert "no rows" in (await r.json())["error"]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [0, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 0},
                }
            ]
        }
    ).encode()
    async with session.post(
        f"{base}/v2/models/tiny/infer",
        data=header,
        headers={"Inference-Header-Content-Length": str(len(header))},
    ) as r:
        assert r.status == 400, await r.text()
    await infer_ok(session, base)


@pytest.mark.parametrize(
    ("what", "body", "content_type"),
    [
        (
            "no closing boundary",
            b'--XYZ\r\nContent-Disposition: form-data; name="image"\r\n\r\nab',
            "multipart/form-data; boundary=XYZ",
        ),
        ("garbage", b"this is not multipart at all", "multipart/form-data; boundary=XYZ"),
        ("no boundary", b"--XYZ\r\n\r\n--XYZ--\r\n", "multipart/form-data"),
        (
            "bad part headers",
            b"--XYZ\r\nno colon here\r\n\r\nab\r\n--XYZ--\r\n",
            "multipart/form-data; boundary=XYZ",
        ),
        ("empty", b"", "multipart/form-data; boundary=XYZ"),
    ],
)
async def test_broken_multipart_is_400(session, image_agent, what, body, content_type):
    async with session.post(
        f"{image_agent.base}/v1/predict/tiny", data=body, headers={"Content-Type": content_type}
    ) as r:
        assert 400 <= r.status < 500, (what, r.status, await r.text())
        assert "multipart" in (await r.json())["error"], what
    form = aiohttp.FormData()
    form.add_field("image", png(BIG), filename="x.png", content_type="image/png")
    async with session.post(f"{image_agent.base}/v1/predict/tiny", data=form) as r:
        assert r.status == 200, await r.text()


# ---- real agent processes: memory and connections ------------------------------------


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) / 1024


def solid_png(width: int, height: int, gray: bool = True) -> bytes:
    """A real, valid PNG of one colour: tiny on the wire, ``width*height`` pixels decoded.

    Compressed row by row, so building it never holds the image in memory.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    channels, color_type = (1, 0) if gray else (3, 2)
    row = b"\0" + b"\x80" * (width * channels)  # filter byte "none", then the pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _image_agent_process(
    tmp_path: Path, keys, bundle: Path, threads: int = 4, **server: Any
) -> AgentProcess:
    config = {
        "store": {"path": str(tmp_path / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(bundle)}],
        "runtime": {"executor_threads": threads},
        "server": {"max_body_bytes": 1024 * 1024, **server},
    }
    return AgentProcess(config, tmp_path, free_port())


def _post(url: str, body: bytes, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_image_decoding_stays_within_its_memory_budget(tmp_path, keys, make_tiny_bundle):
    """Eight concurrent 7500x7500 PNGs (~80 KiB each: a solid colour), 8 worker threads.

    Decoding one takes ~115 MiB (2 bytes per grey pixel in OpenCV), under the default
    share of one decode (256 MiB / 2), so each is served; decoded all at once they took
    up to ~900 MiB (four on a 4-thread agent: 1.47 GiB in colour). With at most two
    decodes at a time the agent's peak RSS grows by the budget at most.
    """
    bomb = solid_png(7500, 7500)
    assert len(bomb) < 200 * 1024
    agent = _image_agent_process(
        tmp_path, keys, make_tiny_bundle("img1", preprocessing=IMAGE_PRE), threads=8
    )
    try:
        url = f"{agent.base}/v1/predict/tiny"
        assert _post(url, png(BIG))[0] == 200  # warm: OpenCV loaded, first decode done
        before = _peak_rss_mib(agent.proc.pid)
        results = await asyncio.gather(*(asyncio.to_thread(_post, url, bomb) for _ in range(8)))
        grown = _peak_rss_mib(agent.proc.pid) - before
        assert [status for status, _ in results] == [200] * 8, results
        assert grown < 256 + 64, f"peak RSS grew by {grown:.0f} MiB"
        assert _post(url, png(BIG))[0] == 200
    finally:
        agent.stop()


async def test_image_over_the_budget_is_refused_from_its_header(tmp_path, keys, make_tiny_bundle):
    """A small PNG claiming a huge size is refused before decoding: 413, the size named,
    and the agent's peak memory does not move."""
    bundle = make_tiny_bundle("img1", preprocessing=IMAGE_PRE)
    agent = _image_agent_process(
        tmp_path, keys, bundle, image_decode_memory_mb=64, image_decode_concurrency=2
    )
    try:
        url = f"{agent.base}/v1/predict/tiny"
        assert _post(url, png(BIG))[0] == 200
        before = _peak_rss_mib(agent.proc.pid)
        status, doc = _post(url, claiming_png(40_000, 30_000))
        assert status == 413, doc
        assert "40000x30000" in doc["error"]
        assert "server.image_decode_memory_mb" in doc["error"]
        # 6000x6000 grey: 72 MiB to decode, over the 32 MiB share of one decode.
        status, doc = _post(url, solid_png(6000, 6000))
        assert status == 413, doc
        status, doc = _post(url, claiming_jpeg(20_000, 20_000))
        assert status == 413, doc
        assert "20000x20000" in doc["error"]
        assert _peak_rss_mib(agent.proc.pid) - before < 16
        assert _post(url, png(BIG))[0] == 200
    finally:
        agent.stop()


def claiming_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def claiming_jpeg(width: int, height: int) -> bytes:
    """SOI, a JFIF APP0, a baseline SOF0 announcing ``width`` x ``height``, then junk."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3)
    sof += b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + sof + b"\x00" * 200


# ---- finding 6: slow clients ----------------------------------------------------------


@contextlib.contextmanager
def _open_files(at_least: int):
    """This test process may hold ``at_least`` sockets (skip if the hard limit forbids)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= at_least:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < at_least:
        pytest.skip(f"needs {at_least} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (at_least, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _stall(port: int, kind: str) -> socket.socket:
    """A connection that sends half a request and then nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if kind == "head":
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
    elif kind == "body":
        s.sendall(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inputs": ['
        )
    # "idle": connect and send nothing at all.
    return s


def _closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True  # EOF: the server closed it
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _health_and_inference(base: str) -> None:
    """Fresh connections, as a health probe and a POS client would open them."""
    with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    body = json.dumps({"inputs": [tensor(TEST_X[:1])]}).encode()
    request = urllib.request.Request(
        f"{base}/v2/models/tiny/infer",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200


async def test_stalled_clients_lock_nobody_out(tmp_path, keys, make_tiny_bundle):
    """1,100 half-sent requests against an agent with the usual 1024 open files
    (systemd's default soft limit): health probes and inference still get answers, and
    the server closes the stalled connections itself (default timeouts)."""
    config = {
        "store": {"path": str(tmp_path / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(make_tiny_bundle("1"))}],
    }
    with _open_files(1400):
        agent = AgentProcess(config, tmp_path, free_port())
        stalled: list[socket.socket] = []
        try:
            _, hard = resource.prlimit(agent.proc.pid, resource.RLIMIT_NOFILE)
            resource.prlimit(agent.proc.pid, resource.RLIMIT_NOFILE, (1024, hard))
            for i in range(1100):
                stalled.append(_stall(agent.port, ("head", "body", "idle")[i % 3]))
            await asyncio.to_thread(_health_and_inference, agent.base)
            # The default head timeout (10 s) closes what eviction left of the head
            # stalls; bodies (30 s of silence) are the next test's, with short timeouts.
            heads = [s for i, s in enumerate(stalled) if i % 3 != 1]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                still_open = [s for s in heads if not _closed_by_server(s)]
                if not still_open:
                    break
                await asyncio.sleep(0.5)
            assert not still_open, f"{len(still_open)} stalled connections still open"
            await asyncio.to_thread(_health_and_inference, agent.base)
        finally:
            for s in stalled:
                s.close()
            agent.stop()


async def test_stalls_time_out_but_slow_uploads_do_not(tmp_path, keys, make_tiny_bundle):
    """Header and body timeouts count silence, not total time: a body that trickles in
    slower than the timeout in total, but never pauses that long, is served."""
    config = {
        "store": {"path": str(tmp_path / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(make_tiny_bundle("1"))}],
        "server": {"header_timeout_s": 1.0, "body_timeout_s": 1.0},
    }
    agent = AgentProcess(config, tmp_path, free_port())
    stalled = [_stall(agent.port, kind) for kind in ("head", "body", "idle") for _ in range(20)]
    try:
        body = json.dumps({"inputs": [tensor(TEST_X[:1])]}).encode()
        slow = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
        slow.sendall(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        started = time.monotonic()
        pieces = [body[i : i + len(body) // 6 + 1] for i in range(0, len(body), len(body) // 6 + 1)]
        for piece in pieces:
            await asyncio.sleep(0.4)
            slow.sendall(piece)
        assert time.monotonic() - started > 2.0  # longer than the timeouts in total
        answer = slow.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        slow.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            still_open = [s for s in stalled if not _closed_by_server(s)]
            if not still_open:
                break
            await asyncio.sleep(0.2)
        assert not still_open, f"{len(still_open)} stalled connections still open"
        await asyncio.to_thread(_health_and_inference, agent.base)
    finally:
        for s in stalled:
            s.close()
        agent.stop()


async def test_connection_cap_keeps_room_for_health_checks(tmp_path, keys, make_tiny_bundle):
    """At the connection cap, a new client evicts the connection that has waited
    longest for its request: 300 stalled sockets against a cap of 16 leave the newest
    16 open, and a health probe and a POS client get in."""
    config = {
        "store": {"path": str(tmp_path / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(make_tiny_bundle("1"))}],
        "server": {"max_connections": 16},
    }
    agent = AgentProcess(config, tmp_path, free_port())
    stalled = [_stall(agent.port, "head") for _ in range(300)]
    try:
        await asyncio.to_thread(_health_and_inference, agent.base)
        await asyncio.sleep(0.5)
        closed = sum(_closed_by_server(s) for s in stalled)
        assert closed >= 300 - 16, f"only {closed} of 300 stalled connections evicted"
        # The newest stalled connections were kept, the oldest evicted.
        assert not _closed_by_server(stalled[-1])
    finally:
        for s in stalled:
            s.close()
        agent.stop()


def test_https_agent_times_out_stalled_heads_and_handshakes(tmp_path, keys, make_tiny_bundle):
    """The same guard behind TLS (the cloud profile's HTTPS): a stalled head inside TLS
    gets its 408, a client that never finishes the handshake is closed too."""
    tls = make_tls(tmp_path / "tls")
    config = {
        "store": {"path": str(tmp_path / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(make_tiny_bundle("1"))}],
        "server": {
            "header_timeout_s": 1.0,
            "tls_cert_file": str(tls.cert),
            "tls_key_file": str(tls.key),
        },
    }
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgefleet.agent",
            "serve",
            "--config",
            str(_write(tmp_path, config)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    context = ssl.create_default_context(cafile=str(tls.ca))
    try:
        base = f"https://127.0.0.1:{config['server']['port']}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", context=context) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "agent.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()
                time.sleep(0.1)
        port = config["server"]["port"]
        raw = socket.create_connection(("127.0.0.1", port))  # no handshake at all
        wrapped = context.wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1"
        )
        wrapped.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a head
        wrapped.settimeout(10)
        answer = wrapped.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        raw.settimeout(10)
        assert raw.recv(100) == b""  # closed by the server after the handshake timeout
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    config["server"]["port"] = free_port()
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path

"""The fleet's HTTP API for real: aiohttp on a loopback port, a real FleetDB in tmp_path,
real signed bundles (tests/conftest.py), real HTTP clients. Registry, devices,
enrolment, auth and bundle downloads here; the routes that go through the MQTT side
(assignments, rollouts, telemetry) are tested against a real broker at the end.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import sqlite3
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edgefleet.core.bundle.archive import resign_bundle
from edgefleet.core.bundle.signing import TrustStore, load_private_key
from edgefleet.core.errors import BadRequest
from edgefleet.fleet.api import Authenticator, FleetApi, create_app, parse_range
from edgefleet.fleet.bundle_registry import Registry, verify_bundle_file
from edgefleet.fleet.db import FleetDB
from edgefleet.fleet.desired import insert_assignment
from edgefleet.fleet.devices import Devices, EnrolmentInfo, create_device
from tests.support.tiny import TINY_W

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Fleet:
    def __init__(
        self,
        base: str,
        db: FleetDB,
        registry: Registry,
        devices: Devices,
        api: FleetApi,
        session: aiohttp.ClientSession,
        data: Path,
    ) -> None:
        self.base, self.db, self.registry, self.devices = base, db, registry, devices
        self.api, self.session, self.data = api, session, data
        self.refreshed: list[list[str]] = []

    async def call(self, method: str, path: str, *, auth: Any = AUTH, **kw: Any) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if auth is not None:
            headers.update(auth)
        async with self.session.request(method, self.base + path, headers=headers, **kw) as resp:
            body = await resp.read()
            try:
                doc = await resp.json(content_type=None) if body else None
            except ValueError:
                doc = body
            return resp.status, doc

    async def upload(self, bundle: Path, **kw: Any) -> tuple[int, Any]:
        return await self.call("POST", "/v1/models", data=bundle.read_bytes(), **kw)


@pytest.fixture
async def make_fleet(tmp_path: Path, keys: tuple[Path, Path]) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[web.AppRunner, FleetDB, aiohttp.ClientSession]] = []

    async def make(
        *,
        bus: Any = None,
        max_upload_bytes: int = 64 * 1024 * 1024,
        allow_unsigned: bool = False,
        **devices_kw: Any,
    ) -> Fleet:
        data = tmp_path / f"fleet-{len(made)}"
        db = await FleetDB(data / "fleet.sqlite").open()
        trust = TrustStore.from_files([keys[1]], allow_unsigned)
        registry = Registry(db, data / "bundles", trust, max_upload_bytes=max_upload_bytes)
        registry.prepare()
        holder: list[Fleet] = []

        async def refreshed(ids: list[str]) -> None:
            holder[0].refreshed.append(ids)

        devices = Devices(
            db,
            EnrolmentInfo(
                "mqtt.example", 1883, False, "http://fleet.example:8480", [keys[1].read_text()]
            ),
            on_groups_changed=refreshed,
            **devices_kw,
        )
        api = FleetApi(registry, devices, Authenticator.single_admin(TOKEN), bus=bus)
        runner = web.AppRunner(create_app(api), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        session = aiohttp.ClientSession()
        made.append((runner, db, session))
        fleet = Fleet(
            f"http://127.0.0.1:{runner.addresses[0][1]}", db, registry, devices, api, session, data
        )
        holder.append(fleet)
        return fleet

    yield make
    for runner, db, session in reversed(made):
        await session.close()
        await runner.cleanup()
        await db.close()


@pytest.fixture
async def fleet(make_fleet: Callable[..., Any]) -> Fleet:
    return await make_fleet()


def rewrite_bundle(src: Path, dst: Path, mutate: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a bundle member by member through ``mutate`` (None drops the member)."""
    with tarfile.open(src, "r:*") as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            f = tin.extractfile(m)
            assert f is not None
            data = mutate(m.name, f.read())
            if data is None:
                continue
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


def flip_byte(name: str, data: bytes, target: str = "model.onnx") -> bytes:
    if name != target:
        return data
    mid = len(data) // 2
    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]


def basic(device: str, secret: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(device, secret)}


# ------------------------------------------------------------------ health, auth


async def test_health_is_open(fleet: Fleet) -> None:
    status, doc = await fleet.call("GET", "/v1/health", auth=None)
    assert status == 200
    assert doc["status"] == "ok" and doc["mqtt"] == "absent"


MANAGEMENT = [
    ("POST", "/v1/models"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/tiny"),
    ("PUT", "/v1/models/tiny/labels/stable"),
    ("GET", "/v1/bundles/tiny/1"),
    ("POST", "/v1/enrolment-tokens"),
    ("GET", "/v1/devices"),
    ("GET", "/v1/devices/d1"),
    ("PUT", "/v1/devices/d1/groups"),
    ("POST", "/v1/devices/d1/commands"),
    ("POST", "/v1/assignments"),
    ("GET", "/v1/rollouts"),
    ("GET", "/v1/rollouts/r1"),
    ("POST", "/v1/rollouts/r1/pause"),
    ("POST", "/v1/rollouts/r1/resume"),
    ("POST", "/v1/rollouts/r1/rollback"),
    ("GET", "/v1/telemetry/models"),
    ("GET", "/v1/telemetry/devices/d1"),
    ("GET", "/v1/events"),
    ("GET", "/v1/no-such-route"),
]


@pytest.mark.parametrize(("method", "path"), MANAGEMENT)
async def test_auth_required_everywhere_but_health_and_enrol(
    fleet: Fleet, method: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-token-abcdefghijklmnop"
    for auth in (
        None,
        {"Authorization": f"Bearer {wrong}"},
        {"Authorization": "Basic !!"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ):
        status, doc = await fleet.call(method, path, auth=auth, json={})
        assert status == 401, (auth, doc)
        assert "error" in doc
    assert wrong not in caplog.text and TOKEN not in caplog.text


async def test_basic_device_auth_does_not_open_management_routes(fleet: Fleet) -> None:
    secret = await create_device(fleet.db, "store-1")
    status, _ = await fleet.call("GET", "/v1/devices", auth=basic("store-1", secret))
    assert status == 401


def test_parse_range() -> None:
    assert parse_range("bytes=0-99", 1000) == (0, 99)
    assert parse_range("bytes=100-", 1000) == (100, 999)
    assert parse_range("bytes=-10", 1000) == (990, 999)
    assert parse_range("bytes=900-5000", 1000) == (900, 999)
    assert parse_range("bytes=5-1", 1000) is None  # invalid: ignored
    assert parse_range("bytes=0-1,5-6", 1000) is None  # multi-range: whole file
    assert parse_range("items=0-1", 1000) is None
    for malformed in ("bytes=abc", "bytes=-", "bytes=1-2-3", "bytes= 1 - 2", "bytes=١-٢"):
        with pytest.raises(BadRequest):
            parse_range(malformed, 1000)
    with pytest.raises(Exception, match="range starts at 1000"):
        parse_range("bytes=1000-", 1000)
    assert parse_range("bytes=" + "9" * 18 + "-", 10**19) == (10**18 - 1, 10**19 - 1)
    for huge in ("bytes=" + "9" * 19 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "1" * 5000):
        with pytest.raises(BadRequest, match="more than 18 digits"):
            parse_range(huge, 1000)


async def test_a_range_header_with_thousands_of_digits_is_a_400(
    fleet: Fleet, make_tiny_bundle: Callable[..., Path]
) -> None:
    """It was a 500 (int() of > 4300 digits raises ValueError); now every bad Range is
    a 4xx with a JSON error, and the service keeps serving."""
    await fleet.upload(make_tiny_bundle("1"))
    url = fleet.base + "/v1/bundles/tiny/1"
    for header in ("bytes=" + "1" * 5000 + "-", "bytes=0-" + "7" * 8000, "bytes=x-y"):
        async with fleet.session.get(url, headers={**AUTH, "Range": header}) as resp:
            assert resp.status == 400
            assert "error" in await resp.json()
    async with fleet.session.get(url, headers={**AUTH, "Range": "bytes=99999999-"}) as resp:
        assert resp.status == 416 and "error" in await resp.json()
    async with fleet.session.get(url, headers={**AUTH, "Range": "bytes=0-9"}) as resp:
        assert resp.status == 206 and len(await resp.read()) == 10


# ------------------------------------------------------------------------ uploads


async def test_upload_list_get(fleet: Fleet, make_tiny_bundle: Callable[..., Path]) -> None:
    bundle = make_tiny_bundle("1", metrics={"accuracy_int8": 0.97})
    raw = bundle.read_bytes()
    status, doc = await fleet.upload(bundle)
    assert status == 201, doc
    assert doc["name"] == "tiny" and doc["version"] == "1"
    assert doc["sha256"] == hashlib.sha256(raw).hexdigest() and doc["size"] == len(raw)
    assert doc["runtime"] == "onnx" and doc["key_id"]
    assert doc["metrics"] == {"accuracy_int8": 0.97}
    stored = fleet.data / "bundles" / "tiny" / "1.bundle"
    assert stored.read_bytes() == raw
    assert list((fleet.data / "bundles" / ".incoming").iterdir()) == []

    status, listing = await fleet.call("GET", "/v1/models")
    assert status == 200
    [model] = listing["models"]
    assert model["name"] == "tiny" and [v["version"] for v in model["versions"]] == ["1"]
    status, one = await fleet.call("GET", "/v1/models/tiny")
    assert status == 200 and one["versions"][0]["sha256"] == doc["sha256"]
    status, err = await fleet.call("GET", "/v1/models/nope")
    assert status == 404 and "unknown model" in err["error"]


async def test_duplicate_upload_is_idempotent_and_other_bytes_conflict(
    fleet: Fleet, make_tiny_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    first = make_tiny_bundle("7")
    kept = tmp_path / "first.bundle"
    kept.write_bytes(first.read_bytes())
    assert (await fleet.upload(kept))[0] == 201
    status, doc = await fleet.upload(kept)
    assert status == 200 and doc["version"] == "7"
    other = make_tiny_bundle("7", weights=TINY_W * 2)  # same name/version, other bytes
    status, err = await fleet.upload(other)
    assert status == 409 and "already exists with other bytes" in err["error"]
    assert (fleet.data / "bundles" / "tiny" / "7.bundle").read_bytes() == kept.read_bytes()


async def test_concurrent_uploads_of_one_version_store_one(
    fleet: Fleet, make_tiny_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    a = tmp_path / "a.bundle"
    a.write_bytes(make_tiny_bundle("9").read_bytes())
    b = make_tiny_bundle("9", weights=TINY_W * 3)
    results = await asyncio.gather(*(fleet.upload(p) for p in (a, b, a, b)))
    statuses = sorted(s for s, _ in results)
    assert statuses.count(201) == 1 and statuses.count(409) == 2 and statuses.count(200) == 1
    winner = next(d for s, d in results if s == 201)
    stored = (fleet.data / "bundles" / "tiny" / "9.bundle").read_bytes()
    assert hashlib.sha256(stored).hexdigest() == winner["sha256"]


@pytest.mark.parametrize(
    ("mutation", "reason"),
    [
        ("tamper", "model.onnx: sha256 mismatch"),
        ("unsigned", "bundle is not signed"),
        ("wrong_key", "untrusted key"),
        ("manifest", "bad signature"),
        ("truncated", "truncated"),
        ("garbage", "not a readable archive"),
        ("extra", "does not list"),
        ("missing", "lacks files"),
        ("no_manifest", "no manifest.json"),
    ],
)
async def test_bad_bundles_are_refused_with_the_reason(
    fleet: Fleet,
    make_tiny_bundle: Callable[..., Path],
    other_keys: tuple[Path, Path],
    tmp_path: Path,
    mutation: str,
    reason: str,
) -> None:
    good = make_tiny_bundle("3")
    bad = tmp_path / "bad.bundle"
    if mutation == "tamper":
        rewrite_bundle(good, bad, flip_byte)
    elif mutation == "unsigned":
        resign_bundle(good, None, bad)
    elif mutation == "wrong_key":
        resign_bundle(good, load_private_key(other_keys[0]), bad)
    elif mutation == "manifest":
        rewrite_bundle(
            good, bad, lambda n, d: d.replace(b'"3"', b'"4"') if n == "manifest.json" else d
        )
    elif mutation == "truncated":
        raw = good.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
    elif mutation == "garbage":
        bad.write_bytes(b"this is not a tar file at all" * 50)
    elif mutation == "extra":
        with tarfile.open(good, "r:*") as tin, tarfile.open(bad, "w:gz") as tout:
            for m in tin.getmembers():
                tout.addfile(m, tin.extractfile(m))
            info = tarfile.TarInfo("payload.sh")
            info.size = 4
            tout.addfile(info, io.BytesIO(b"boom"))
    elif mutation == "missing":
        rewrite_bundle(good, bad, lambda n, d: None if n == "model.onnx" else d)
    elif mutation == "no_manifest":
        rewrite_bundle(good, bad, lambda n, d: None if n == "manifest.json" else d)
    status, err = await fleet.upload(bad)
    assert status == 400, err
    assert reason in err["error"]
    status, listing = await fleet.call("GET", "/v1/models")
    assert listing["models"] == []
    assert list((fleet.data / "bundles" / ".incoming").iterdir()) == []


async def test_unsafe_members_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    for name, expect in (("../evil", "escapes"), ("/etc/passwd", "absolute")):
        bad = tmp_path / "evil.bundle"
        with tarfile.open(bad, "w:gz") as tout:
            info = tarfile.TarInfo(name)
            info.size = 1
            tout.addfile(info, io.BytesIO(b"x"))
        status, err = await fleet.upload(bad)
        assert status == 400 and expect in err["error"], err
    link = tmp_path / "link.bundle"
    with tarfile.open(link, "w:gz") as tout:
        info = tarfile.TarInfo("model.onnx")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tout.addfile(info)
    status, err = await fleet.upload(link)
    assert status == 400 and "is a link" in err["error"]


async def test_unsigned_accepted_only_when_allowed(
    make_fleet: Callable[..., Any], make_tiny_bundle: Callable[..., Path], tmp_path: Path
) -> None:
    unsigned = tmp_path / "u.bundle"
    resign_bundle(make_tiny_bundle("5"), None, unsigned)
    dev = await make_fleet(allow_unsigned=True)
    status, doc = await dev.upload(unsigned)
    assert status == 201 and doc["key_id"] is None
    # ...but a bundle signed by an unknown key is still refused.
    strict = await make_fleet()
    assert (await strict.upload(unsigned))[0] == 400


async def test_empty_upload(fleet: Fleet) -> None:
    status, err = await fleet.call("POST", "/v1/models", data=b"")
    assert status == 400 and "empty body" in err["error"]


async def test_oversized_upload_413(
    make_fleet: Callable[..., Any], make_tiny_bundle: Callable[..., Path]
) -> None:
    small = await make_fleet(max_upload_bytes=1000)
    bundle = make_tiny_bundle("2")
    assert bundle.stat().st_size > 1000
    # Declared length over the cap: refused before a byte is read.
    status, err = await small.upload(bundle)
    assert status == 413 and "1000 byte limit" in err["error"]

    # No length (chunked): refused once the cap is passed while streaming.
    async def body() -> AsyncIterator[bytes]:
        data = bundle.read_bytes()
        for i in range(0, len(data), 256):
            yield data[i : i + 256]

    try:
        status, err = await small.call("POST", "/v1/models", data=body())
    except aiohttp.ClientError:
        pass  # the server may close the connection under a client still sending
    else:
        assert status == 413 and "upload limit" in err["error"]
    assert list((small.data / "bundles" / ".incoming").iterdir()) == []
    assert (await small.call("GET", "/v1/models"))[1]["models"] == []


def test_verify_bundle_file_directly(
    make_tiny_bundle: Callable[..., Path], keys: tuple[Path, Path]
) -> None:
    bundle = make_tiny_bundle("11")
    raw = bundle.read_bytes()
    v = verify_bundle_file(
        bundle, TrustStore.from_files([keys[1]]), 1 << 20, sha256="x", size=len(raw)
    )
    assert v.manifest.name == "tiny" and v.key_id
    with pytest.raises(Exception, match="over the 10 limit"):
        verify_bundle_file(bundle, TrustStore.from_files([keys[1]]), 10, sha256="x", size=1)


# ------------------------------------------------------------------------- labels


async def test_labels(fleet: Fleet, make_tiny_bundle: Callable[..., Path]) -> None:
    await fleet.upload(make_tiny_bundle("1"))
    await fleet.upload(make_tiny_bundle("2", weights=TINY_W * 2))
    status, doc = await fleet.call("PUT", "/v1/models/tiny/labels/stable", json={"version": "1"})
    assert status == 200 and doc["version"] == "1"
    status, doc = await fleet.call("PUT", "/v1/models/tiny/labels/stable", json={"version": "2"})
    assert status == 200
    await fleet.call("PUT", "/v1/models/tiny/labels/canary", json={"version": "2"})
    status, model = await fleet.call("GET", "/v1/models/tiny")
    assert model["labels"] == {"stable": "2", "canary": "2"}
    assert {v["version"]: v["labels"] for v in model["versions"]} == {
        "1": [],
        "2": ["canary", "stable"],
    }
    status, err = await fleet.call("PUT", "/v1/models/tiny/labels/stable", json={"version": "9"})
    assert status == 404 and "tiny:9" in err["error"]
    status, err = await fleet.call("PUT", "/v1/models/nope/labels/stable", json={"version": "1"})
    assert status == 404
    status, err = await fleet.call(
        "PUT", "/v1/models/tiny/labels/bad%20label", json={"version": "1"}
    )
    assert status == 400 and "label" in err["error"]
    status, err = await fleet.call("PUT", "/v1/models/tiny/labels/stable", json={})
    assert status == 400 and "version" in err["error"]
    status, err = await fleet.call("PUT", "/v1/models/tiny/labels/stable", data=b"{oops")
    assert status == 400 and "malformed JSON" in err["error"]


# ---------------------------------------------------------------------- downloads


async def test_range_downloads_with_device_credentials(
    fleet: Fleet, make_tiny_bundle: Callable[..., Path]
) -> None:
    bundle = make_tiny_bundle("1")
    raw = bundle.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    await fleet.upload(bundle)
    secret = await create_device(fleet.db, "store-7", ["north"])
    await assign(fleet, "tiny", "1", "group", "north")
    dev = basic("store-7", secret)
    url = fleet.base + "/v1/bundles/tiny/1"

    async with fleet.session.get(url, headers=dev) as resp:
        assert resp.status == 200
        assert await resp.read() == raw
        assert resp.headers["ETag"] == f'"{sha}"'
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert int(resp.headers["Content-Length"]) == len(raw)

    async with fleet.session.get(url, headers={**dev, "Range": "bytes=0-99"}) as resp:
        assert resp.status == 206
        assert await resp.read() == raw[:100]
        assert resp.headers["Content-Range"] == f"bytes 0-99/{len(raw)}"

    async with fleet.session.get(url, headers={**dev, "Range": "bytes=100-"}) as resp:
        assert resp.status == 206
        assert await resp.read() == raw[100:]
        assert resp.headers["Content-Range"] == f"bytes 100-{len(raw) - 1}/{len(raw)}"

    async with fleet.session.get(url, headers={**dev, "Range": "bytes=-10"}) as resp:
        assert resp.status == 206 and await resp.read() == raw[-10:]

    async with fleet.session.get(url, headers={**dev, "Range": f"bytes={len(raw)}-"}) as resp:
        assert resp.status == 416
        assert resp.headers["Content-Range"] == f"bytes */{len(raw)}"
        assert "error" in await resp.json()

    # If-Range with the right ETag: the range; with another: the whole file.
    async with fleet.session.get(
        url, headers={**dev, "Range": "bytes=10-19", "If-Range": f'"{sha}"'}
    ) as resp:
        assert resp.status == 206 and await resp.read() == raw[10:20]
    async with fleet.session.get(
        url, headers={**dev, "Range": "bytes=10-19", "If-Range": '"other"'}
    ) as resp:
        assert resp.status == 200 and await resp.read() == raw
    async with fleet.session.get(url, headers={**dev, "If-None-Match": f'"{sha}"'}) as resp:
        assert resp.status == 304
    async with fleet.session.head(url, headers=dev) as resp:
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(raw)

    # The admin token works too.
    status, body = await fleet.call("GET", "/v1/bundles/tiny/1")
    assert status == 200 and body == raw


async def test_download_refuses_wrong_credentials(
    fleet: Fleet, make_tiny_bundle: Callable[..., Path]
) -> None:
    await fleet.upload(make_tiny_bundle("1"))
    secret = await create_device(fleet.db, "store-8")
    url = fleet.base + "/v1/bundles/tiny/1"
    for auth in (
        basic("store-8", secret + "x"),
        basic("store-9", secret),
        basic("store-8", ""),
        basic("bad/id", secret),
    ):
        async with fleet.session.get(url, headers=auth) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Basic")
            assert (await resp.json())["error"] == "wrong device id or secret"
    async with fleet.session.get(url) as resp:
        assert resp.status == 401
    raw = base64.b64encode(b"no-colon").decode()
    async with fleet.session.get(url, headers={"Authorization": f"Basic {raw}"}) as resp:
        assert resp.status == 401
    async with fleet.session.get(
        fleet.base + "/v1/bundles/tiny/2", headers=basic("store-8", secret)
    ) as resp:
        assert resp.status == 404


async def assign(
    fleet: Fleet, model: str, version: str, kind: str, target: str, rollout: str | None = None
) -> None:
    """An assignment row as the MQTT side records it (fleet/desired.py)."""
    await fleet.db.write(
        lambda conn: insert_assignment(conn, model, version, kind, target, rollout)
    )


async def test_a_device_downloads_only_what_its_desired_state_names(
    fleet: Fleet, make_tiny_bundle: Callable[..., Path]
) -> None:
    """Issue 9, finding 3: any enrolled device's credentials used to download every
    bundle in the registry. Now: the versions assigned to it (directly, through a
    group, to all, or by a rollout once it reached the device), current or earlier."""
    for v in ("1", "2", "3", "4", "5"):
        await fleet.upload(make_tiny_bundle(v, weights=TINY_W * int(v)))
    a = basic("store-a", await create_device(fleet.db, "store-a", ["north"]))
    b = basic("store-b", await create_device(fleet.db, "store-b", ["south"]))

    async def status(creds: dict[str, str], version: str) -> int:
        async with fleet.session.get(
            f"{fleet.base}/v1/bundles/tiny/{version}", headers=creds
        ) as resp:
            if resp.status != 200:
                assert "error" in await resp.json()
            return resp.status

    # Nothing assigned: nothing to download (the operator's token still can).
    assert await status(a, "1") == 403
    assert await status(AUTH, "1") == 200
    await assign(fleet, "tiny", "1", "device", "store-a")
    await assign(fleet, "tiny", "2", "group", "north")
    await assign(fleet, "tiny", "3", "all", "")
    assert [await status(a, v) for v in "123"] == [200, 200, 200]
    assert [await status(b, v) for v in "123"] == [403, 403, 200]

    # A staged rollout: only the devices it reached, or all once it completed.
    def rollout(conn: sqlite3.Connection, state: str, device_state: str) -> None:
        conn.execute(
            "INSERT INTO rollouts (id, model, version, target_kind, target, waves,"
            " max_failure_share, state, current_wave, created_at, updated_at)"
            " VALUES ('r-1', 'tiny', '4', 'group', 'south', '[1]', 0.2, ?, 1, 0, 0)",
            (state,),
        )
        conn.execute(
            "INSERT INTO rollout_devices (rollout_id, device_id, wave, state, updated_at)"
            " VALUES ('r-1', 'store-b', 1, ?, 0)",
            (device_state,),
        )

    await fleet.db.write(lambda conn: rollout(conn, "running", "waiting"))
    await assign(fleet, "tiny", "4", "group", "south", rollout="r-1")
    assert await status(b, "4") == 403
    await fleet.db.write(lambda conn: conn.execute("UPDATE rollout_devices SET state = 'pending'"))
    assert await status(b, "4") == 200
    assert await status(a, "4") == 403  # not in the rollout's target
    # The current desired document counts, whatever made it.
    doc = {"schema": 1, "device_id": "store-b", "revision": 9, "models": {
        "tiny": {"version": "5", "url": "u", "sha256": "0" * 64, "size": 1}}}  # fmt: skip
    await fleet.db.write(
        lambda conn: conn.execute(
            "UPDATE devices SET desired = ? WHERE id = 'store-b'", (json.dumps(doc),)
        )
    )
    assert await status(b, "5") == 200
    assert await status(a, "5") == 403
    # Unknown versions stay 404; a revoked device downloads nothing.
    assert await status(a, "9") == 404
    await fleet.devices.revoke("store-a")
    assert await status(a, "1") == 401


# ----------------------------------------------------------------------- enrolment


async def test_enrolment_token_is_one_time(fleet: Fleet) -> None:
    status, tok = await fleet.call(
        "POST",
        "/v1/enrolment-tokens",
        json={"device_id": "store-0042", "groups": ["north", "pilot"]},
    )
    assert status == 201 and tok["device_id"] == "store-0042"
    # Prefixed: a bare token_urlsafe starts with "-" one time in 64, which a CLI reads
    # as an option (`edge-agent enroll --token -Xy…` failed so in CI).
    assert tok["token"].startswith("efe_")
    status, doc = await fleet.call("POST", "/v1/enrol", auth=None, json={"token": tok["token"]})
    assert status == 200, doc
    assert doc["device_id"] == "store-0042"
    assert doc["mqtt"] == {
        "host": "mqtt.example",
        "port": 1883,
        "tls": False,
        "ca_cert": None,
        "username": "store-0042",
        "password": doc["mqtt"]["password"],
    }
    assert len(doc["mqtt"]["password"]) >= 40
    assert doc["fleet_url"] == "http://fleet.example:8480"
    assert doc["trusted_keys"] and "BEGIN PUBLIC KEY" in doc["trusted_keys"][0]
    assert fleet.refreshed == [["store-0042"]]

    status, err = await fleet.call("POST", "/v1/enrol", auth=None, json={"token": tok["token"]})
    assert status == 401 and err["error"] == "enrolment token already used"

    # The secret it handed out is the device's download credential; nothing stores it.
    assert await fleet.devices.check_secret("store-0042", doc["mqtt"]["password"])

    def stored(conn: sqlite3.Connection) -> list[str]:
        rows = conn.execute("SELECT secret_hash FROM devices").fetchall()
        rows += conn.execute("SELECT token_hash FROM enrolment_tokens").fetchall()
        return [r[0] for r in rows]

    hashes = await fleet.db.read(stored)
    assert doc["mqtt"]["password"] not in hashes and tok["token"] not in hashes

    status, dev = await fleet.call("GET", "/v1/devices/store-0042")
    assert status == 200 and dev["groups"] == ["north", "pilot"]


async def test_enrolment_generates_ids_and_refuses_bad_tokens(fleet: Fleet) -> None:
    status, tok = await fleet.call("POST", "/v1/enrolment-tokens", json={})
    assert status == 201 and tok["device_id"] is None
    status, doc = await fleet.call("POST", "/v1/enrol", auth=None, json={"token": tok["token"]})
    assert status == 200
    assert doc["device_id"].startswith("dev-") and len(doc["device_id"]) == 12

    status, err = await fleet.call("POST", "/v1/enrol", auth=None, json={"token": "nope"})
    assert status == 401 and err["error"] == "unknown enrolment token"
    status, err = await fleet.call("POST", "/v1/enrol", auth=None, json={})
    assert status == 400
    status, err = await fleet.call("POST", "/v1/enrolment-tokens", json={"ttl_s": -1})
    assert status == 400 and "ttl_s" in err["error"]
    status, err = await fleet.call("POST", "/v1/enrolment-tokens", json={"ttl_s": 10**9})
    assert status == 400 and "maximum" in err["error"]
    status, err = await fleet.call("POST", "/v1/enrolment-tokens", json={"device_id": "a/b"})
    assert status == 400 and "device id" in err["error"]
    status, err = await fleet.call("POST", "/v1/enrolment-tokens", json={"groups": "north"})
    assert status == 400 and "groups" in err["error"]


async def test_enrolment_token_expires(fleet: Fleet) -> None:
    status, tok = await fleet.call("POST", "/v1/enrolment-tokens", json={"ttl_s": 0.05})
    assert status == 201
    await asyncio.sleep(0.1)
    status, err = await fleet.call("POST", "/v1/enrol", auth=None, json={"token": tok["token"]})
    assert status == 401 and err["error"] == "enrolment token expired"
    status, devices = await fleet.call("GET", "/v1/devices")
    assert devices["devices"] == []


async def test_re_enrolment_rotates_the_secret(fleet: Fleet) -> None:
    old = await create_device(fleet.db, "store-5", ["south"])
    _, tok = await fleet.call("POST", "/v1/enrolment-tokens", json={"device_id": "store-5"})
    _, doc = await fleet.call("POST", "/v1/enrol", auth=None, json={"token": tok["token"]})
    new = doc["mqtt"]["password"]
    assert new != old
    assert await fleet.devices.check_secret("store-5", new)
    assert not await fleet.devices.check_secret("store-5", old)
    _, dev = await fleet.call("GET", "/v1/devices/store-5")
    assert dev["groups"] == ["south"]  # a token without groups leaves them alone


# ------------------------------------------------------------------------ devices


async def seed_device_state(db: FleetDB) -> None:
    def job(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE devices SET online = 1, last_seen = 100.0, agent_version = '0.1.0',"
            ' accelerators = \'{"onnx":["CPUExecutionProvider"]}\','
            " desired = '{\"revision\":3}', reported = '{\"revision\":3}',"
            " desired_revision = 3, reported_revision = 3 WHERE id = 'store-1'"
        )
        conn.execute(
            "INSERT INTO device_models (device_id, model, active, previous, desired, state,"
            " last_error, updated_at) VALUES ('store-1', 'tiny', '2', '1', '2', 'active', NULL,"
            " 100.0)"
        )
        conn.execute(
            "INSERT INTO events (id, device_id, at, received_at, kind, model, version, data)"
            " VALUES ('e1', 'store-1', 99.0, 100.0, 'activated', 'tiny', '2',"
            ' \'{"id":"e1","kind":"activated","model":"tiny","version":"2"}\')'
        )

    await db.write(job)


async def test_device_list_detail_and_groups(fleet: Fleet) -> None:
    await create_device(fleet.db, "store-1", ["north"])
    await create_device(fleet.db, "store-2", ["south", "pilot"])
    await seed_device_state(fleet.db)

    status, doc = await fleet.call("GET", "/v1/devices")
    assert status == 200
    by_id = {d["id"]: d for d in doc["devices"]}
    assert set(by_id) == {"store-1", "store-2"}
    one = by_id["store-1"]
    assert one["online"] is True and one["last_seen"] == 100.0
    assert one["agent_version"] == "0.1.0"
    assert one["accelerators"] == {"onnx": ["CPUExecutionProvider"]}
    assert one["models"]["tiny"]["active"] == "2" and one["models"]["tiny"]["previous"] == "1"
    assert by_id["store-2"]["online"] is False and by_id["store-2"]["groups"] == ["pilot", "south"]

    status, doc = await fleet.call("GET", "/v1/devices", params={"group": "pilot"})
    assert [d["id"] for d in doc["devices"]] == ["store-2"]

    status, dev = await fleet.call("GET", "/v1/devices/store-1")
    assert status == 200
    assert dev["desired"] == {"revision": 3} and dev["reported"] == {"revision": 3}
    assert dev["events"][0]["kind"] == "activated" and dev["events"][0]["received_at"] == 100.0
    assert "secret_hash" not in dev

    status, doc = await fleet.call(
        "PUT", "/v1/devices/store-1/groups", json={"groups": ["west", "pilot", "west"]}
    )
    assert status == 200 and doc["groups"] == ["pilot", "west"]
    assert fleet.refreshed == [["store-1"]]
    status, err = await fleet.call("PUT", "/v1/devices/nope/groups", json={"groups": []})
    assert status == 404
    status, err = await fleet.call("PUT", "/v1/devices/store-1/groups", json={"groups": ["a b"]})
    assert status == 400
    status, err = await fleet.call("GET", "/v1/devices/nope")
    assert status == 404 and "unknown device" in err["error"]


async def test_routes_needing_the_mqtt_side_say_503_without_it(fleet: Fleet) -> None:
    await create_device(fleet.db, "d1")
    for method, path, body in (
        ("POST", "/v1/assignments", {"model": "tiny", "version": "1", "target": {"all": True}}),
        ("GET", "/v1/rollouts", None),
        ("GET", "/v1/telemetry/models", None),
        ("POST", "/v1/devices/d1/commands", {"command": "resync"}),
    ):
        status, err = await fleet.call(method, path, json=body)
        assert status == 503, (path, err)
        assert "MQTT side" in err["error"]


async def test_assignment_validation(fleet: Fleet) -> None:
    cases = [
        ({"version": "1", "target": {"all": True}}, "model"),
        ({"model": "tiny", "version": "1"}, "target"),
        ({"model": "tiny", "version": "1", "target": {"all": True, "group": "g"}}, "target"),
        ({"model": "tiny", "version": "1", "target": {"shop": "x"}}, "unknown target"),
        ({"model": "tiny", "version": "1", "target": {"all": False}}, "target.all"),
        ({"model": "tiny", "version": "1", "target": {"group": ""}}, "target.group"),
        (
            {"model": "tiny", "version": "1", "target": {"all": True}, "max_failure_share": 2},
            "max_failure_share",
        ),
    ]
    for body, fragment in cases:
        status, err = await fleet.call("POST", "/v1/assignments", json=body)
        assert status == 400 and fragment in err["error"], (body, err)


# ------------------------------------------------ the whole service, real Mosquitto


def desired_docs(peer: Any, device: str) -> list[dict[str, Any]]:
    import json

    topic = f"edgefleet/v1/devices/{device}/desired"
    return [json.loads(p) for t, p, _ in peer.received(topic)]


async def test_service_end_to_end_through_mosquitto(
    mosquitto: Any,
    tmp_path: Path,
    keys: tuple[Path, Path],
    make_tiny_bundle: Callable[..., Path],
) -> None:
    """config → FleetDB → FleetBus on a real Mosquitto → HTTP API: assignments publish
    retained desired documents with download URLs that work with the enrolled
    device's credentials; rollouts, commands, events and telemetry views answer."""
    import json

    from edgefleet.fleet.config import parse_fleet_config
    from edgefleet.fleet.service import FleetService
    from tests.support.brokers import Peer, eventually

    cfg = parse_fleet_config(
        json.dumps(
            {
                "data_dir": str(tmp_path / "fleet"),
                "http": {"port": 0},
                "auth": {"token": TOKEN},
                "trust": {"public_keys": [str(keys[1])]},
                "broker": {
                    "host": "127.0.0.1",
                    "port": mosquitto.port,
                    "reconnect_min_s": 0.05,
                    "reconnect_max_s": 0.5,
                },
                "enrolment": {"mqtt_host": "mqtt.store.example"},
            }
        )
    )
    svc = await FleetService(cfg).start()
    peer = Peer(mosquitto.port, "store-peer")
    try:
        async with asyncio.timeout(20):
            await svc.bus.wait_connected()
        peer.subscribe("edgefleet/v1/devices/+/desired")
        peer.subscribe("edgefleet/v1/devices/+/commands")
        async with aiohttp.ClientSession(headers=AUTH) as http:

            async def call(method: str, path: str, **kw: Any) -> tuple[int, Any]:
                async with http.request(method, svc.url + path, **kw) as resp:
                    return resp.status, await resp.json(content_type=None)

            status, health = await call("GET", "/v1/health")
            assert health["mqtt"] == "connected"
            bundle = make_tiny_bundle("1")
            status, record = await call("POST", "/v1/models", data=bundle.read_bytes())
            assert status == 201
            _, tok = await call(
                "POST", "/v1/enrolment-tokens", json={"device_id": "store-1", "groups": ["north"]}
            )
            status, enrolled = await call("POST", "/v1/enrol", json={"token": tok["token"]})
            assert status == 200
            assert enrolled["mqtt"]["host"] == "mqtt.store.example"
            assert enrolled["mqtt"]["port"] == mosquitto.port
            assert enrolled["fleet_url"] == svc.url

            status, doc = await call(
                "POST",
                "/v1/assignments",
                json={"model": "tiny", "version": "1", "target": {"device": "store-1"}},
            )
            assert status == 201 and doc["assignment_id"]
            await eventually(
                lambda: any("tiny" in d["models"] for d in desired_docs(peer, "store-1"))
            )
            entry = desired_docs(peer, "store-1")[-1]["models"]["tiny"]
            assert entry["url"] == f"{svc.url}/v1/bundles/tiny/1"
            assert entry["sha256"] == record["sha256"] and entry["size"] == record["size"]
            creds = aiohttp.encode_basic_auth("store-1", enrolled["mqtt"]["password"])
            async with (
                aiohttp.ClientSession() as device,
                device.get(
                    entry["url"], headers={"Authorization": creds, "Range": "bytes=100-"}
                ) as resp,
            ):
                assert resp.status == 206
                assert await resp.read() == bundle.read_bytes()[100:]

            # A label moves: devices running that version get it in a new revision.
            status, _ = await call("PUT", "/v1/models/tiny/labels/stable", json={"version": "1"})
            assert status == 200
            await eventually(
                lambda: (
                    desired_docs(peer, "store-1")[-1]["models"]["tiny"].get("labels")
                    == {"stable": "1"}
                )
            )

            status, err = await call(
                "POST",
                "/v1/assignments",
                json={"model": "tiny", "version": "9", "target": {"device": "store-1"}},
            )
            assert status == 404, err
            status, err = await call(
                "POST",
                "/v1/assignments",
                json={"model": "tiny", "version": "1", "target": {"device": "nobody"}},
            )
            assert status == 404, err

            # A staged rollout over the group, then the operator's actions.
            for d in ("store-2", "store-3"):
                await create_device(svc.db, d, ["north"])
            await make_tiny_bundle_upload(call, make_tiny_bundle("2", weights=TINY_W * 2))
            status, rollout = await call(
                "POST",
                "/v1/assignments",
                json={
                    "model": "tiny",
                    "version": "2",
                    "target": {"group": "north"},
                    "waves": [1, "100%"],
                    "max_failure_share": 0.5,
                },
            )
            assert status == 201, rollout
            rid = rollout["id"]
            assert rollout["state"] == "running" and rollout["current_wave"] == 1
            status, listing = await call("GET", "/v1/rollouts")
            assert [r["id"] for r in listing["rollouts"]] == [rid]
            status, err = await call(
                "POST",
                "/v1/assignments",
                json={
                    "model": "tiny",
                    "version": "2",
                    "target": {"group": "north"},
                    "waves": ["0%"],
                },
            )
            assert status == 400, err
            status, err = await call(
                "POST",
                "/v1/assignments",
                json={"model": "tiny", "version": "2", "target": {"group": "north"}, "waves": [1]},
            )
            assert status == 409, err  # another rollout of tiny is not finished
            for action, state in (
                ("pause", "paused"),
                ("resume", "running"),
                ("rollback", "rolled_back"),
            ):
                status, doc = await call("POST", f"/v1/rollouts/{rid}/{action}")
                assert status == 200 and doc["state"] == state, doc
            status, err = await call("GET", "/v1/rollouts/r-nope")
            assert status == 404

            # Commands reach the device's topic; events the device sends are listed.
            status, sent = await call(
                "POST",
                "/v1/devices/store-1/commands",
                json={"command": "rollback", "model": "tiny"},
            )
            assert status == 202
            await eventually(
                lambda: any(
                    json.loads(p).get("id") == sent["id"]
                    for _, p, _ in peer.received("edgefleet/v1/devices/store-1/commands")
                )
            )
            status, err = await call(
                "POST", "/v1/devices/nobody/commands", json={"command": "resync"}
            )
            assert status == 404
            # resync names the fleet's current revision for the device (the device
            # rewinds a processed revision ahead of it: agent/sync.py), and the
            # device's document goes out again first.
            _, dev = await call("GET", "/v1/devices/store-1")
            docs_before = len(desired_docs(peer, "store-1"))
            status, sent = await call(
                "POST", "/v1/devices/store-1/commands", json={"command": "resync"}
            )
            assert status == 202

            def resync_cmd() -> dict[str, Any] | None:
                for _, p, _ in peer.received("edgefleet/v1/devices/store-1/commands"):
                    doc = json.loads(p)
                    if doc.get("id") == sent["id"]:
                        return dict(doc)
                return None

            await eventually(lambda: resync_cmd() is not None)
            assert resync_cmd() == {
                "schema": 1,
                "id": sent["id"],
                "command": "resync",
                "revision": dev["desired_revision"],
            }
            await eventually(lambda: len(desired_docs(peer, "store-1")) > docs_before)
            assert desired_docs(peer, "store-1")[-1]["revision"] == dev["desired_revision"]
            event = {
                "schema": 1,
                "id": "0" * 31 + "1",
                "device_id": "store-1",
                "at": 1.0,
                "kind": "activated",
                "model": "tiny",
                "version": "1",
                "previous": None,
                "revision": 1,
                "rollout": None,
                "reason": None,
            }
            peer.publish("edgefleet/v1/devices/store-1/events", json.dumps(event))

            async def event_listed() -> bool:
                _, found = await call("GET", "/v1/events", params={"device": "store-1"})
                return any(e["id"] == event["id"] for e in found["events"])

            for _ in range(200):  # the ingest stores it asynchronously
                if await event_listed():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the event never appeared in /v1/events")
            status, tel = await call("GET", "/v1/telemetry/models")
            assert status == 200 and tel == {"models": []}
            status, tel = await call("GET", "/v1/telemetry/devices/store-1")
            assert status == 200 and tel == {"device_id": "store-1", "models": []}
            status, err = await call("GET", "/v1/telemetry/devices/nobody")
            assert status == 404
            status, dev = await call("GET", "/v1/devices/store-1")
            assert dev["desired"]["models"]["tiny"]["version"] in ("1", "2")
    finally:
        peer.close()
        await svc.stop()


async def make_tiny_bundle_upload(call: Callable[..., Any], bundle: Path) -> None:
    status, doc = await call("POST", "/v1/models", data=bundle.read_bytes())
    assert status == 201, doc

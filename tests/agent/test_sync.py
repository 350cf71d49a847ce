"""The agent's desired-state sync end to end: a real Mosquitto, a real agent (in-process
or as a separate process), real HTTP downloads from tests/support/bundle_server.py, real
signed bundles, and a plain paho peer playing the fleet (retained ``desired`` in,
``reported``/``events`` out). Every wait is on a condition, never on a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
import tarfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgefleet.agent.download import BundleSpec
from edgefleet.agent.fleet_link import FLEET, FleetConnection
from edgefleet.agent.sync import DesiredStateSync, parse_command, parse_desired
from edgefleet.core.mqtt import topics
from tests.support.agent_process import AgentProcess
from tests.support.brokers import Mosquitto, Peer, eventually, free_port
from tests.support.bundle_server import BundleServer, Fault
from tests.support.tiny import TEST_X, W2, agent_config, broken_bundle

DEV = "store-0042"
SECRET = "s3cret-device-password"
WITHIN = 60.0  # generous: a busy CI box loads ONNX Runtime slowly


# ----------------------------------------------------------------- helpers


def fleet_section(port: int, tmp: Path, **sync: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "password": SECRET,
        "keepalive_s": 5,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "outbox": {"path": str(tmp / "outbox.sqlite")},
        "telemetry": {"flush_interval_s": 0.2, "ack_timeout_s": 5},
        "sync": {
            "retry_min_s": 0.05,
            "retry_max_s": 0.2,
            "download_attempts": 3,
            "download_timeout_s": 10,
            **sync,
        },
    }


def bundle_bytes(path: Path) -> bytes:
    # make_tiny_bundle writes to a session-wide file name: copy the bytes at once.
    return path.read_bytes()


def model_entry(server: BundleServer, data: bytes, version: str, **extra: Any) -> dict[str, Any]:
    name = f"tiny-{version}-{hashlib.sha256(data).hexdigest()[:8]}.bundle"
    return {
        "version": version,
        "url": server.add(name, data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        **extra,
    }


def desired(revision: int, models: dict[str, Any]) -> bytes:
    doc = {"schema": 1, "device_id": DEV, "revision": revision, "issued_at": 1.0, "models": models}
    return json.dumps(doc).encode()


def tampered(data: bytes) -> bytes:
    """The bundle with one manifest field changed after signing: the signature breaks."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as src,
        tarfile.open(fileobj=out, mode="w:gz") as dst,
    ):
        for member in src.getmembers():
            content = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "manifest.json":
                doc = json.loads(content)
                doc["description"] = "evil twin"
                content = json.dumps(doc).encode()
            member.size = len(content)
            dst.addfile(member, io.BytesIO(content))
    return out.getvalue()


class Fleet:
    """The fleet's side of one device, as a plain paho client."""

    def __init__(self, port: int) -> None:
        self.peer = Peer(port, "fleet-peer")
        self.peer.subscribe(topics.device_topic(DEV, "reported"))
        self.peer.subscribe(topics.device_topic(DEV, "events"))

    def publish_desired(self, payload: bytes, retain: bool = True) -> None:
        self.peer.publish(topics.device_topic(DEV, "desired"), payload, retain=retain)

    def command(self, payload: dict[str, Any] | bytes) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.peer.publish(topics.device_topic(DEV, "commands"), body)

    def reports(self) -> list[dict[str, Any]]:
        return [
            json.loads(p) for _, p, _ in self.peer.received(topics.device_topic(DEV, "reported"))
        ]

    def last_report(self) -> dict[str, Any] | None:
        reports = self.reports()
        return reports[-1] if reports else None

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        docs = [json.loads(p) for _, p, _ in self.peer.received(topics.device_topic(DEV, "events"))]
        return [d for d in docs if kind is None or d["kind"] == kind]

    async def wait_report(
        self, check: Callable[[dict[str, Any]], bool], within: float = WITHIN
    ) -> dict[str, Any]:
        def ok() -> bool:
            last = self.last_report()
            return last is not None and check(last)

        try:
            await eventually(ok, within=within)
        except TimeoutError:
            raise AssertionError(f"reported never matched; last: {self.last_report()}") from None
        last = self.last_report()
        assert last is not None
        return last

    async def wait_event(self, kind: str, within: float = WITHIN, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for e in self.events(kind):
                if all(e.get(k) == v for k, v in match.items()):
                    return e
            return None

        try:
            await eventually(lambda: found() is not None, within=within)
        except TimeoutError:
            raise AssertionError(f"no {kind} event {match}; got {self.events()}") from None
        event = found()
        assert event is not None
        return event

    def close(self) -> None:
        self.peer.close()


def tiny(report: dict[str, Any]) -> dict[str, Any]:
    return report["models"].get("tiny", {})


async def infer(session: aiohttp.ClientSession, base: str) -> tuple[int, str | None]:
    x = TEST_X[:1]
    body = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    async with session.post(f"{base}/v2/models/tiny/infer", json=body) as r:
        doc = await r.json()
        return r.status, doc.get("model_version")


def sync_of(agent: Any) -> DesiredStateSync:
    fleet: FleetConnection = agent.app[FLEET]
    assert fleet.sync is not None
    return fleet.sync


# ---------------------------------------------------------------- fixtures


@pytest.fixture
async def bundles(start_agent: Any) -> AsyncIterator[BundleServer]:
    # Depends on start_agent so that it stops first: start_agent's teardown then finds
    # no lingering server tasks.
    server = await BundleServer(DEV, SECRET).start()
    yield server
    await server.stop()


@pytest.fixture
def fleet(mosquitto: Mosquitto) -> Iterator[Fleet]:
    peer = Fleet(mosquitto.port)
    yield peer
    peer.close()


@pytest.fixture
def v1(make_tiny_bundle: Any) -> Path:
    return make_tiny_bundle("1")


@pytest.fixture
async def agent(
    mosquitto: Mosquitto, fleet: Fleet, start_agent: Any, v1: Path, keys: Any, tmp_path: Path
) -> Any:
    """An agent serving tiny:1 from its config, connected (it has reported once).

    The broker comes first, so it is stopped after the agent (a clean goodbye).
    """
    cfg = agent_config(
        tmp_path, keys, [v1], device_id=DEV, fleet=fleet_section(mosquitto.port, tmp_path)
    )
    running = await start_agent(cfg)
    first = await fleet.wait_report(lambda r: "tiny" in r["models"])
    assert first["revision"] == 0
    assert (tiny(first)["active"], tiny(first)["state"]) == ("1", "unmanaged")
    return running


# ------------------------------------------------------------------- tests


def test_payload_validation_is_strict() -> None:
    good = desired(
        3, {"tiny": {"version": "2", "url": "http://h/b", "sha256": "a" * 64, "size": 5}}
    )
    assert parse_desired(good, DEV).revision == 3
    bad = [
        b"\xff\xfe not json",
        b"[1, 2]",
        json.dumps({"schema": 2, "device_id": DEV, "revision": 1, "models": {}}).encode(),
        json.dumps({"schema": True, "device_id": DEV, "revision": 1, "models": {}}).encode(),
        json.dumps({"schema": 1, "device_id": "other", "revision": 1, "models": {}}).encode(),
        json.dumps({"schema": 1, "device_id": DEV, "revision": "1", "models": {}}).encode(),
        json.dumps({"schema": 1, "device_id": DEV, "revision": -1, "models": {}}).encode(),
        desired(
            1, {"../etc": {"version": "2", "url": "http://h/b", "sha256": "a" * 64, "size": 5}}
        ),
        desired(
            1,
            {"tiny": {"version": "2", "url": "file:///etc/passwd", "sha256": "a" * 64, "size": 5}},
        ),
        desired(1, {"tiny": {"version": "2", "url": "http://h/b", "sha256": "xyz", "size": 5}}),
        desired(1, {"tiny": {"version": "2", "url": "http://h/b", "sha256": "a" * 64, "size": 0}}),
        desired(
            1, {"tiny": {"version": "a/b", "url": "http://h/b", "sha256": "a" * 64, "size": 5}}
        ),
        b"{" + b" " * 300_000 + b"}",
    ]
    for payload in bad:
        with pytest.raises(ValueError):
            parse_desired(payload, DEV)
    assert parse_command(b'{"schema": 1, "id": "c-1", "command": "resync"}').command == "resync"
    for payload in (
        b"{}",
        b'{"schema": 1, "command": "resync"}',
        b'{"schema": 1, "id": 5, "command": "x"}',
    ):
        with pytest.raises(ValueError):
            parse_command(payload)


async def test_v1_to_v2_switch_under_traffic(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any, tmp_path: Path
) -> None:
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    entry = model_entry(bundles, v2, "2", labels={"stable": "2"}, rollout="r-1")
    versions: list[tuple[int, str | None]] = []
    stop = asyncio.Event()

    async with aiohttp.ClientSession() as session:

        async def traffic() -> None:
            while not stop.is_set():
                versions.append(await infer(session, agent.base))

        task = asyncio.create_task(traffic())
        try:
            await eventually(lambda: len(versions) >= 5, within=WITHIN)
            fleet.publish_desired(desired(1, {"tiny": entry}))
            report = await fleet.wait_report(
                lambda r: r["revision"] == 1 and tiny(r).get("state") == "active"
            )
            seen_before = len(versions)
            await eventually(lambda: len(versions) >= seen_before + 5, within=WITHIN)
        finally:
            stop.set()
            await task

        assert {status for status, _ in versions} == {200}, "a request failed during the swap"
        assert versions[0][1] == "1" and versions[-1][1] == "2"
        plain = {k: v for k, v in tiny(report).items() if not k.startswith("fallback_")}
        assert plain | {"provider": None} == {
            "active": "2",
            "previous": "1",
            "desired": "2",
            "state": "active",
            "rollout": "r-1",
            "provider": None,
            "last_error": None,
            "labels": {"stable": "2"},
        }
        assert tiny(report)["provider"] == "CPUExecutionProvider"
        assert report["device_id"] == DEV and report["agent_version"]
        assert "CPUExecutionProvider" in report["accelerators"]["onnx"]
        # The states went by in order, each one reported.
        states = [tiny(r).get("state") for r in fleet.reports()]
        order = [s for s in ("downloading", "verifying", "activating", "active") if s in states]
        assert order == ["downloading", "verifying", "activating", "active"]

        event = await fleet.wait_event("activated", version="2")
        assert (event["model"], event["previous"], event["revision"]) == ("tiny", "1", 1)
        assert event["rollout"] == "r-1" and event["device_id"] == DEV and len(event["id"]) == 32

        # Basic auth with the device's id and secret; the download dir is cleaned up.
        requests = bundles.requests
        assert requests and all(r.authorized for r in requests)
        sync = sync_of(agent)
        assert list(sync.download_dir.iterdir()) == []
        state = json.loads(sync.state_file.read_text())
        assert state["revision"] == 1 and state["models"]["tiny"]["state"] == "active"
        # The event also waits in the outbox (HIGH priority), for the telemetry path.
        outbox = agent.app[FLEET].outbox
        assert (await outbox.stats()).records >= 1

        async with session.get(f"{agent.base}/v1/fleet") as r:
            local = await r.json()
        assert local["link"]["connected"] is True
        assert local["sync"]["revision"] == 1
        assert local["sync"]["models"]["tiny"]["state"] == "active"


async def test_same_revision_twice_and_older_revisions_do_nothing(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    v3 = bundle_bytes(make_tiny_bundle("3"))
    fleet.publish_desired(desired(5, {"tiny": model_entry(bundles, v2, "2")}))
    await fleet.wait_report(lambda r: r["revision"] == 5 and tiny(r)["active"] == "2")
    sync = sync_of(agent)
    downloads = len(bundles.requests)
    stale = sync.stats.desired_stale

    # The same revision again (even with other content), then an older one: ignored.
    fleet.publish_desired(desired(5, {"tiny": model_entry(bundles, v3, "3")}))
    fleet.publish_desired(desired(4, {"tiny": model_entry(bundles, v3, "3")}))
    await eventually(lambda: sync.stats.desired_stale >= stale + 2, within=WITHIN)
    await sync.wait_idle()
    assert len(bundles.requests) == downloads
    assert agent.app[FLEET].sync.revision == 5
    async with aiohttp.ClientSession() as session:
        assert await infer(session, agent.base) == (200, "2")
    assert fleet.last_report()["revision"] == 5  # type: ignore[index]

    # A newer one applies; an empty models map is valid and leaves tiny alone.
    fleet.publish_desired(desired(6, {}))
    report = await fleet.wait_report(lambda r: r["revision"] == 6)
    assert (tiny(report)["active"], tiny(report)["state"]) == ("2", "unmanaged")


async def test_restart_keeps_the_processed_revision(
    mosquitto: Mosquitto,
    start_agent: Any,
    fleet: Fleet,
    bundles: BundleServer,
    make_tiny_bundle: Any,
    v1: Path,
    keys: Any,
    tmp_path: Path,
) -> None:
    cfg = agent_config(
        tmp_path, keys, [v1], device_id=DEV, fleet=fleet_section(mosquitto.port, tmp_path)
    )
    first = await start_agent(cfg)
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    fleet.publish_desired(desired(1, {"tiny": model_entry(bundles, v2, "2")}))
    await fleet.wait_report(lambda r: r["revision"] == 1 and tiny(r)["active"] == "2")
    await first.runner.cleanup()
    downloads = len(bundles.requests)
    reports = len(fleet.reports())

    second = await start_agent(cfg)
    # Reported again on connect; the retained desired arrives again and is not re-applied.
    await eventually(lambda: len(fleet.reports()) > reports, within=WITHIN)
    report = fleet.last_report()
    assert report is not None and report["revision"] == 1
    assert (tiny(report)["active"], tiny(report)["state"]) == ("2", "active")
    sync = sync_of(second)
    await eventually(lambda: sync.stats.desired_stale >= 1, within=WITHIN)
    await sync.wait_idle()
    assert len(bundles.requests) == downloads


async def test_tampered_bundle_is_refused_and_v1_keeps_serving(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    bad = tampered(bundle_bytes(make_tiny_bundle("2", weights=W2)))
    fleet.publish_desired(desired(1, {"tiny": model_entry(bundles, bad, "2")}))
    report = await fleet.wait_report(lambda r: r["revision"] == 1)
    model = tiny(report)
    assert (model["state"], model["active"], model["desired"]) == ("failed", "1", "2")
    assert "signature" in model["last_error"]
    event = await fleet.wait_event("verify_failed")
    assert event["reason"] == model["last_error"] and event["version"] == "2"
    async with aiohttp.ClientSession() as session:
        assert await infer(session, agent.base) == (200, "1")


async def test_wrong_sha256_is_refused(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    entry = model_entry(bundles, v2, "2") | {"sha256": "ab" * 32}
    fleet.publish_desired(desired(1, {"tiny": entry}))
    report = await fleet.wait_report(lambda r: r["revision"] == 1)
    model = tiny(report)
    assert (model["state"], model["active"]) == ("failed", "1")
    expected = f"sha256 mismatch: expected {'ab' * 32}, got {hashlib.sha256(v2).hexdigest()}"
    assert model["last_error"] == expected
    assert (await fleet.wait_event("verify_failed"))["reason"] == expected
    assert list(sync_of(agent).download_dir.iterdir()) == []  # no poisoned part kept


async def test_wrong_size_is_refused(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    entry = model_entry(bundles, v2, "2") | {"size": len(v2) - 10}
    fleet.publish_desired(desired(1, {"tiny": entry}))
    report = await fleet.wait_report(lambda r: r["revision"] == 1)
    assert tiny(report)["state"] == "failed"
    assert tiny(report)["last_error"].startswith("size mismatch")


async def test_missing_bundle_fails_then_resync_succeeds(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    entry = model_entry(bundles, v2, "2")
    name = entry["url"].rsplit("/", 1)[1]
    del bundles.files[name]  # the fleet has not got the file (yet)
    fleet.publish_desired(desired(1, {"tiny": entry}))
    report = await fleet.wait_report(lambda r: r["revision"] == 1)
    reason = f"download: HTTP 404 from {entry['url']}"
    assert (tiny(report)["state"], tiny(report)["last_error"]) == ("failed", reason)
    assert (await fleet.wait_event("download_failed"))["reason"] == reason
    assert len(bundles.requests_for(name)) == 1  # a 404 is not retried

    bundles.add(name, v2)
    fleet.command({"schema": 1, "id": "c-7", "command": "resync"})
    await fleet.wait_event("command_done", command_id="c-7")
    report = await fleet.wait_report(lambda r: tiny(r).get("state") == "active")
    assert tiny(report)["active"] == "2" and report["revision"] == 1


async def test_unreachable_url_fails_after_retries(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    dead = free_port()  # nothing listens there
    entry = model_entry(bundles, v2, "2") | {"url": f"http://127.0.0.1:{dead}/bundles/x"}
    fleet.publish_desired(desired(1, {"tiny": entry}))
    report = await fleet.wait_report(lambda r: r["revision"] == 1)
    error = tiny(report)["last_error"]
    assert tiny(report)["state"] == "failed" and "gave up after 3 attempts" in error
    assert error.startswith("download: cannot connect") and f"127.0.0.1:{dead}" in error
    assert sync_of(agent).downloader.stats.retries == 2


async def test_server_errors_are_retried(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    entry = model_entry(bundles, v2, "2")
    name = entry["url"].rsplit("/", 1)[1]
    bundles.fault(name, Fault(status=503))
    bundles.fault(name, Fault(status=500))
    fleet.publish_desired(desired(1, {"tiny": entry}))
    report = await fleet.wait_report(lambda r: r["revision"] == 1)
    assert (tiny(report)["state"], tiny(report)["active"]) == ("active", "2")
    assert [r.status for r in bundles.requests_for(name)] == [503, 500, 200]


async def test_self_test_failure_keeps_v1(
    agent: Any, fleet: Fleet, bundles: BundleServer, keys: Any, tmp_path: Path
) -> None:
    bad = bundle_bytes(broken_bundle(tmp_path, keys, "9", "selftest"))
    fleet.publish_desired(desired(1, {"tiny": model_entry(bundles, bad, "9")}))
    report = await fleet.wait_report(lambda r: r["revision"] == 1)
    model = tiny(report)
    assert (model["state"], model["active"], model["desired"]) == ("failed", "1", "9")
    assert "self-test" in model["last_error"]
    event = await fleet.wait_event("activation_failed")
    assert event["version"] == "9" and "self-test" in event["reason"]
    async with aiohttp.ClientSession() as session:
        assert await infer(session, agent.base) == (200, "1")


async def test_bundle_of_another_version_is_refused(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    v3 = bundle_bytes(make_tiny_bundle("3"))
    fleet.publish_desired(desired(1, {"tiny": model_entry(bundles, v3, "2")}))
    report = await fleet.wait_report(lambda r: r["revision"] == 1)
    assert tiny(report)["state"] == "failed"
    assert "holds tiny:3, desired is tiny:2" in tiny(report)["last_error"]


@pytest.mark.parametrize("second", ["resumes", "server_ignores_range"])
async def test_interrupted_download_resumes(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any, second: str
) -> None:
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    entry = model_entry(bundles, v2, "2")
    name = entry["url"].rsplit("/", 1)[1]
    half = len(v2) // 2
    cut = bundles.fault(name, Fault(hold_after=half, then_cut=True))
    if second == "server_ignores_range":
        bundles.fault(name, Fault(ignore_range=True))
    fleet.publish_desired(desired(1, {"tiny": entry}))
    # Cut the connection once the first half is on the agent's disk.
    sync = sync_of(agent)
    spec = BundleSpec("tiny", "2", entry["url"], entry["sha256"], entry["size"])
    part = sync.downloader.part_path(spec)
    await eventually(lambda: part.exists() and part.stat().st_size == half, within=WITHIN)
    cut.release.set()
    report = await fleet.wait_report(lambda r: r["revision"] == 1)
    assert (tiny(report)["state"], tiny(report)["active"]) == ("active", "2")
    requests = bundles.requests_for(name)
    assert [r.range for r in requests] == [None, f"bytes={half}-"]
    stats = sync_of(agent).downloader.stats
    if second == "resumes":
        assert [r.status for r in requests] == [200, 206]
        assert (stats.resumed, stats.restarted) == (1, 0)
    else:
        assert [r.status for r in requests] == [200, 200]
        assert (stats.resumed, stats.restarted) == (0, 1)


async def test_garbage_on_desired_and_commands_is_ignored(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    sync = sync_of(agent)
    link = agent.app[FLEET].link
    garbage = [
        b"\x00\x01 binary junk",
        b"not json at all",
        b"[]",
        b'{"schema": 2, "device_id": "store-0042", "revision": 9, "models": {}}',
        json.dumps({"schema": 1, "device_id": "store-0099", "revision": 9, "models": {}}).encode(),
        json.dumps(
            {"schema": 1, "device_id": DEV, "revision": 9, "models": {"tiny": {"version": "2"}}}
        ).encode(),
        b'{"schema": 1, "pad": "' + b"x" * 300_000 + b'"}',  # over the sync's own limit
    ]
    for payload in garbage:
        fleet.publish_desired(payload, retain=False)
    fleet.publish_desired(b"x" * (1024 * 1024 + 10), retain=False)  # over the link's limit
    for payload in (b"junk", b"{}", b'{"schema": 1, "command": "resync"}', b"[" * 10_000):
        fleet.command(payload)
    fleet.command({"schema": 1, "id": "c-1", "command": "format-disk"})
    await eventually(
        lambda: (
            sync.stats.desired_bad == len(garbage)
            and sync.stats.commands_bad == 5
            and link.stats.messages_dropped >= 1
        ),
        within=WITHIN,
    )
    failed = await fleet.wait_event("command_failed", command_id="c-1")
    assert "unknown command" in failed["reason"]
    assert sync.revision == 0 and sync.stats.revisions_processed == 0
    # Counted by reason: a fleet on a newer schema is refused as such, not guessed at.
    assert sync.stats.refused == {
        "not_json": 2 + 2,  # and two commands ("[" * 10_000 is too deep for orjson)
        "schema": 1 + 1,  # [] (not an object), a command {} (no schema)
        "newer_schema": 1,
        "device_mismatch": 1,
        "invalid": 1 + 1,  # a model without url..., a command without id
        "oversized": 1,
    }

    # Still serving, still syncing.
    async with aiohttp.ClientSession() as session:
        assert await infer(session, agent.base) == (200, "1")
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    fleet.publish_desired(desired(1, {"tiny": model_entry(bundles, v2, "2")}))
    await fleet.wait_report(lambda r: r["revision"] == 1 and tiny(r)["active"] == "2")


async def test_commands_rollback_and_resync(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    fleet.publish_desired(desired(1, {"tiny": model_entry(bundles, v2, "2")}))
    await fleet.wait_report(lambda r: r["revision"] == 1 and tiny(r)["active"] == "2")

    fleet.command({"schema": 1, "id": "c-1", "command": "rollback", "model": "tiny"})
    done = await fleet.wait_event("command_done", command_id="c-1")
    assert done["version"] == "1"
    back = await fleet.wait_event("rolled_back")
    assert (back["model"], back["version"], back["previous"]) == ("tiny", "1", "2")
    report = await fleet.wait_report(lambda r: tiny(r)["active"] == "1")
    assert tiny(report)["state"] == "failed" and "rolled back to 1" in tiny(report)["last_error"]
    async with aiohttp.ClientSession() as session:
        assert await infer(session, agent.base) == (200, "1")

        fleet.command({"schema": 1, "id": "c-2", "command": "rollback", "model": "nope"})
        assert "nope" in (await fleet.wait_event("command_failed", command_id="c-2"))["reason"]

        # resync re-applies the (already processed) desired: back on 2.
        fleet.command({"schema": 1, "id": "c-3", "command": "resync"})
        await fleet.wait_event("command_done", command_id="c-3")
        report = await fleet.wait_report(
            lambda r: tiny(r)["active"] == "2" and tiny(r)["state"] == "active"
        )
        assert report["revision"] == 1
        assert await infer(session, agent.base) == (200, "2")


async def test_newest_pending_desired_wins(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    """While revision 1 downloads, revisions 2 and 3 arrive: 2 is never applied."""
    v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
    v3 = bundle_bytes(make_tiny_bundle("3"))
    e2 = model_entry(bundles, v2, "2")
    hold = bundles.fault(e2["url"].rsplit("/", 1)[1], Fault(hold_after=100))
    fleet.publish_desired(desired(1, {"tiny": e2}))
    await asyncio.wait_for(hold.holding.wait(), WITHIN)
    sync = sync_of(agent)
    e3 = model_entry(bundles, v3, "3")
    fleet.publish_desired(desired(2, {"tiny": model_entry(bundles, v2, "2") | {"rollout": "x"}}))
    fleet.publish_desired(desired(3, {"tiny": e3}))
    await eventually(lambda: sync.stats.desired_superseded == 1, within=WITHIN)
    hold.release.set()
    report = await fleet.wait_report(lambda r: r["revision"] == 3)
    assert (tiny(report)["active"], tiny(report)["state"]) == ("3", "active")
    assert not any(r["revision"] == 2 for r in fleet.reports())
    activated = [e["version"] for e in fleet.events("activated")]
    assert activated == ["2", "3"]


# ------------------------------------------------- a real process, SIGKILLed


def process_config(tmp: Path, keys: Any, v1: Path, broker_port: int) -> dict[str, Any]:
    return {
        "device_id": DEV,
        "store": {"path": str(tmp / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(v1)}],
        "runtime": {"executor_threads": 2},
        "fleet": fleet_section(broker_port, tmp),
    }


def kill(proc: AgentProcess) -> None:
    os.kill(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(30)
    proc.log.close()


async def test_sigkill_mid_download_resumes_after_restart(
    mosquitto: Mosquitto,
    fleet: Fleet,
    make_tiny_bundle: Any,
    v1: Path,
    keys: Any,
    tmp_path: Path,
) -> None:
    server = await BundleServer(DEV, SECRET).start()
    procs: list[AgentProcess] = []
    try:
        v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
        entry = model_entry(server, v2, "2")
        name = entry["url"].rsplit("/", 1)[1]
        half = len(v2) // 2
        hold = server.fault(name, Fault(hold_after=half))
        config = process_config(tmp_path, keys, v1, mosquitto.port)
        port = free_port()
        procs.append(await asyncio.to_thread(AgentProcess, config, tmp_path, port))
        await fleet.wait_report(lambda r: "tiny" in r["models"])
        fleet.publish_desired(desired(1, {"tiny": entry}))

        # Half the bundle is on the agent's disk, the rest is held back: kill it now.
        await asyncio.wait_for(hold.holding.wait(), WITHIN)
        downloads = tmp_path / "store" / ".downloads"
        parts = lambda: list(downloads.glob("*.part"))  # noqa: E731
        await eventually(lambda: parts() and parts()[0].stat().st_size == half, within=WITHIN)
        await fleet.wait_report(lambda r: tiny(r).get("state") == "downloading")
        await asyncio.to_thread(kill, procs.pop())
        hold.release.set()
        assert not (tmp_path / "store" / ".sync-state.json").exists()  # revision 1 unprocessed
        assert [p.stat().st_size for p in parts()] == [half]

        # A new life: the retained desired comes back, the download resumes at `half`.
        procs.append(await asyncio.to_thread(AgentProcess, config, tmp_path, port))
        report = await fleet.wait_report(
            lambda r: r["revision"] == 1 and tiny(r).get("state") == "active"
        )
        assert tiny(report)["active"] == "2"
        ranges = [r.range for r in server.requests_for(name)]
        assert ranges == [None, f"bytes={half}-"]
        assert [r.status for r in server.requests_for(name)][-1] == 206
        state = json.loads((tmp_path / "store" / ".sync-state.json").read_text())
        assert state["revision"] == 1
        async with aiohttp.ClientSession() as session:
            assert await infer(session, procs[0].base) == (200, "2")
    finally:
        for p in procs:
            await asyncio.to_thread(p.stop)
        with contextlib.suppress(Exception):
            await server.stop()


# ------------------------------------------------------------ smaller pieces


async def test_a_model_new_to_the_device_is_installed(
    agent: Any, fleet: Fleet, bundles: BundleServer, make_tiny_bundle: Any
) -> None:
    other = bundle_bytes(make_tiny_bundle("7", name="other"))
    fleet.publish_desired(desired(1, {"other": model_entry(bundles, other, "7")}))
    report = await fleet.wait_report(lambda r: r["revision"] == 1)
    other = {k: v for k, v in report["models"]["other"].items() if not k.startswith("fallback_")}
    assert other | {"provider": None} == {
        "active": "7",
        "previous": None,
        "desired": "7",
        "state": "active",
        "rollout": None,
        "provider": None,
        "last_error": None,
        "labels": {},
    }
    # tiny, from the agent's own config, is not in desired: left alone.
    assert (tiny(report)["active"], tiny(report)["state"]) == ("1", "unmanaged")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{agent.base}/v2/models/other/ready") as r:
            assert r.status == 200


async def test_reported_again_after_a_broker_restart(
    agent: Any, fleet: Fleet, mosquitto: Mosquitto
) -> None:
    sync = sync_of(agent)
    link = agent.app[FLEET].link
    published, connects = sync.stats.reported_published, link.stats.connects
    await asyncio.to_thread(mosquitto.restart)
    await eventually(lambda: link.stats.connects > connects and link.connected, within=WITHIN)
    await eventually(lambda: sync.stats.reported_published > published, within=WITHIN)


async def test_downloader_auth_and_size_limits(bundles: BundleServer, tmp_path: Path) -> None:
    from edgefleet.agent.download import (
        BundleDownloader,
        Credentials,
        CredentialScope,
        DownloadHTTPError,
        DownloadTooLarge,
        basic_auth,
    )

    data = os.urandom(10_000)
    url = bundles.add("blob", data)
    spec = BundleSpec("blob", "1", url, hashlib.sha256(data).hexdigest(), len(data))
    scope = CredentialScope.for_fleet(f"http://127.0.0.1:{bundles.port}", None)
    wrong = BundleDownloader(
        tmp_path / "a", credentials=Credentials(basic_auth(DEV, "wrong"), scope), retry_min_s=0.01
    )
    creds = Credentials(basic_auth(DEV, SECRET), scope)
    small = BundleDownloader(tmp_path / "b", credentials=creds, max_bytes=9_999)
    good = BundleDownloader(tmp_path / "c", credentials=creds, chunk_bytes=1000)
    for d in (wrong, small, good):
        await d.open()
    try:
        with pytest.raises(DownloadHTTPError, match=f"^download: HTTP 401 from {url}$"):
            await wrong.fetch(spec)
        assert len(bundles.requests) == 1  # a 4xx is not retried
        with pytest.raises(DownloadTooLarge, match="over the 9999 byte limit"):
            await small.fetch(spec)
        assert len(bundles.requests) == 1  # refused before any request
        path = await good.fetch(spec)
        assert path.read_bytes() == data and path.name.endswith(".bundle")
        assert not good.part_path(spec).exists()
        # Already there (a stop between download and install): no new request.
        assert await good.fetch(spec) == path and len(bundles.requests) == 2
    finally:
        for d in (wrong, small, good):
            await d.close()


async def test_https_downloads_trust_the_configured_ca_only(tmp_path: Path) -> None:
    """A fleet on https with the operator's own CA: trusted with ``fleet.sync.ca_file``,
    refused (not retried forever) with the system store or another CA."""
    from edgefleet.agent.download import (
        BundleDownloader,
        Credentials,
        CredentialScope,
        DownloadError,
        basic_auth,
    )
    from tests.support.tls import make_tls

    tls = make_tls(tmp_path / "tls")
    server = await BundleServer(DEV, SECRET).start(ssl_context=tls.server_context())
    data = os.urandom(5_000)
    url = server.add("blob", data)
    assert url.startswith("https://")
    spec = BundleSpec("blob", "1", url, hashlib.sha256(data).hexdigest(), len(data))
    auth = Credentials(basic_auth(DEV, SECRET), CredentialScope.for_fleet(url, None))
    made = [
        BundleDownloader(
            tmp_path / name, credentials=auth, ca_file=ca, attempts=1, retry_min_s=0.01
        )
        for name, ca in (("ok", tls.ca), ("system", None), ("other", tls.other_ca))
    ]
    try:
        ok, system, other = [await d.open() for d in made]
        assert (await ok.fetch(spec)).read_bytes() == data
        for refused in (system, other):
            with pytest.raises(DownloadError, match="(?i)certificate"):
                await refused.fetch(spec)
    finally:
        for d in made:
            await d.close()
        await server.stop()


def test_sync_config_section(tmp_path: Path) -> None:
    from edgefleet.agent.config import load_config
    from edgefleet.core.errors import ConfigError

    cfg_file = tmp_path / "agent.yaml"
    cfg_file.write_text(
        "device_id: s1\nfleet:\n  host: b\n  sync:\n    download_dir: dl\n"
        "    state_file: st.json\n    max_bundle_bytes: 1000\n"
    )
    sync = load_config(cfg_file).fleet.sync  # type: ignore[union-attr]
    assert sync.download_dir == tmp_path / "dl" and sync.state_file == tmp_path / "st.json"
    assert sync.max_bundle_bytes == 1000 and sync.download_attempts == 8
    cfg_file.write_text("device_id: s1\nfleet:\n  host: b\n  sync:\n    download_dri: x\n")
    with pytest.raises(ConfigError, match="fleet.sync.download_dri"):
        load_config(cfg_file)
    cfg_file.write_text(
        "device_id: s1\nfleet:\n  host: b\n  sync:\n    retry_min_s: 5\n    retry_max_s: 1\n"
    )
    with pytest.raises(ConfigError, match="retry_max_s"):
        load_config(cfg_file)


# ------------------------------------- link security (issue 9, findings 2 and 7)


class RecordingServer:
    """Any HTTP server a ``desired`` document might name: serves its files (to anyone,
    or only with some Authorization when ``require_auth``) and records the
    Authorization header of every request, so a test sees exactly what was sent."""

    def __init__(self, host: str = "127.0.0.1", *, require_auth: bool = False) -> None:
        self.host = host
        self.require_auth = require_auth
        self.files: dict[str, bytes] = {}
        self.seen: list[tuple[str, str | None]] = []  # (file name, Authorization)
        self.port = 0
        self._runner: Any = None

    async def start(self) -> RecordingServer:
        from aiohttp import web

        async def handle(request: web.Request) -> web.StreamResponse:
            name = request.match_info["name"]
            auth = request.headers.get("Authorization")
            self.seen.append((name, auth))
            if self.require_auth and auth is None:
                return web.Response(status=401, headers={"WWW-Authenticate": "Basic"})
            data = self.files.get(name)
            return web.Response(status=404) if data is None else web.Response(body=data)

        app = web.Application()
        app.router.add_get("/bundles/{name}", handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.origin}/bundles/{name}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def entry_at(server: RecordingServer, data: bytes, version: str) -> dict[str, Any]:
    return {
        "version": version,
        "url": server.add(f"tiny-{version}.bundle", data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if any."""
    import ipaddress
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the outgoing interface
            address = str(s.getsockname()[0])
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_loopback else address


async def test_credentials_go_only_to_the_enrolled_fleet_origin(
    mosquitto: Mosquitto,
    fleet: Fleet,
    bundles: BundleServer,
    start_agent: Any,
    make_tiny_bundle: Any,
    v1: Path,
    keys: Any,
    tmp_path: Path,
) -> None:
    """A desired naming another origin (here: another port on the same host) is
    downloaded *without* the device secret, and still verified (sha256, signature);
    the enrolled fleet's origin gets the credentials."""
    other = await RecordingServer().start()
    try:
        enrolled = f"http://127.0.0.1:{bundles.port}"
        section = fleet_section(mosquitto.port, tmp_path, fleet_url=enrolled)
        agent = await start_agent(agent_config(tmp_path, keys, [v1], device_id=DEV, fleet=section))
        await fleet.wait_report(lambda r: "tiny" in r["models"])

        v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
        fleet.publish_desired(desired(1, {"tiny": entry_at(other, v2, "2")}))
        report = await fleet.wait_report(lambda r: r["revision"] == 1)
        assert other.seen, "the agent never asked the other server"
        assert [auth for _, auth in other.seen] == [None] * len(other.seen)
        # No secret needed there, and the bundle checks out: it is installed.
        assert (tiny(report)["active"], tiny(report)["state"]) == ("2", "active")
        assert sync_of(agent).downloader.stats.without_credentials == len(other.seen)

        v3 = bundle_bytes(make_tiny_bundle("3"))
        fleet.publish_desired(desired(2, {"tiny": model_entry(bundles, v3, "3")}))
        report = await fleet.wait_report(lambda r: r["revision"] == 2)
        assert (tiny(report)["active"], tiny(report)["state"]) == ("3", "active")
        assert bundles.requests and all(r.authorized for r in bundles.requests)
        # A tampered bundle from the other origin is refused like any other.
        bad = tampered(bundle_bytes(make_tiny_bundle("4")))
        fleet.publish_desired(desired(3, {"tiny": entry_at(other, bad, "4")}))
        report = await fleet.wait_report(lambda r: r["revision"] == 3)
        assert (tiny(report)["active"], tiny(report)["state"]) == ("3", "failed")
        assert [auth for _, auth in other.seen] == [None] * len(other.seen)
    finally:
        await other.stop()


async def test_no_credentials_over_plain_http_outside_loopback(
    mosquitto: Mosquitto,
    fleet: Fleet,
    start_agent: Any,
    make_tiny_bundle: Any,
    v1: Path,
    keys: Any,
    tmp_path: Path,
) -> None:
    """Even the enrolled origin gets no secret over plain http once it is not loopback:
    the download fails with the reason, the secret never leaves the box."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    server = await RecordingServer(address, require_auth=True).start()
    try:
        section = fleet_section(mosquitto.port, tmp_path, fleet_url=server.origin)
        await start_agent(agent_config(tmp_path, keys, [v1], device_id=DEV, fleet=section))
        await fleet.wait_report(lambda r: "tiny" in r["models"])
        v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
        fleet.publish_desired(desired(1, {"tiny": entry_at(server, v2, "2")}))
        report = await fleet.wait_report(lambda r: r["revision"] == 1)
        assert server.seen and [auth for _, auth in server.seen] == [None] * len(server.seen)
        model = tiny(report)
        assert (model["state"], model["active"]) == ("failed", "1")
        assert "HTTP 401" in model["last_error"]
        assert "plain http outside loopback" in model["last_error"]
    finally:
        await server.stop()


def test_credential_scope_rules() -> None:
    from edgefleet.agent.download import CredentialScope

    enrolled = CredentialScope.for_fleet("https://fleet.example:8480/", "mqtt.example")
    assert enrolled.refusal("https://fleet.example:8480/v1/bundles/tiny/2") is None
    assert enrolled.refusal("https://FLEET.example:8480/v1/bundles/tiny/2") is None
    for url in (
        "https://fleet.example:8481/v1/bundles/tiny/2",  # another port
        "http://fleet.example:8480/v1/bundles/tiny/2",  # another scheme
        "https://evil.example:8480/v1/bundles/tiny/2",
        "https://fleet.example.evil.example:8480/x",
        "https://fleet.example:8480@evil.example/x",  # userinfo: the host is evil.example
        "ftp://fleet.example:8480/x",
    ):
        assert enrolled.refusal(url) is not None, url
    loopback = CredentialScope.for_fleet("http://127.0.0.1:8480", None)
    assert loopback.refusal("http://127.0.0.1:8480/v1/bundles/t/1") is None
    lan = CredentialScope.for_fleet("http://10.1.2.3:8480", None)
    assert lan.refusal("http://10.1.2.3:8480/v1/bundles/t/1") == "plain http outside loopback"
    # A config from before fleet_url: the broker's host, https (any port), or loopback.
    legacy = CredentialScope.for_fleet(None, "Fleet.example")
    assert legacy.refusal("https://fleet.example:8480/v1/bundles/t/1") is None
    assert legacy.refusal("http://fleet.example:8480/v1/bundles/t/1") is not None
    assert legacy.refusal("https://other.example/v1/bundles/t/1") is not None
    assert CredentialScope.for_fleet(None, None).refusal("https://a.example/x") is not None
    with pytest.raises(ValueError):
        CredentialScope.for_fleet("fleet.example:8480", None)


async def test_a_revision_ahead_of_the_fleet_is_rewound_by_resync(
    mosquitto: Mosquitto,
    fleet: Fleet,
    make_tiny_bundle: Any,
    v1: Path,
    keys: Any,
    tmp_path: Path,
) -> None:
    """A desired with a huge revision (bounded now: one past the bound is refused) used
    to freeze the device for good, across restarts; the fleet's resync names its own
    revision, and the device rewinds to it and follows the fleet again."""
    from edgefleet.agent.sync import MAX_REVISION

    server = await BundleServer(DEV, SECRET).start()
    procs: list[AgentProcess] = []
    try:
        config = process_config(tmp_path, keys, v1, mosquitto.port)
        port = free_port()
        procs.append(await asyncio.to_thread(AgentProcess, config, tmp_path, port))
        await fleet.wait_report(lambda r: "tiny" in r["models"])

        fleet.publish_desired(desired(MAX_REVISION + 1, {}), retain=False)  # refused
        fleet.publish_desired(desired(MAX_REVISION, {}))  # the bound itself: accepted
        await fleet.wait_report(lambda r: r["revision"] == MAX_REVISION)
        v2 = bundle_bytes(make_tiny_bundle("2", weights=W2))
        fleet.publish_desired(desired(5, {"tiny": model_entry(server, v2, "2")}))

        async def local(proc: AgentProcess) -> dict[str, Any]:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{proc.base}/v1/fleet") as r:
                    return dict((await r.json())["sync"])

        for _ in range(int(WITHIN / 0.05)):  # until revision 5 arrived and was found stale
            if (doc := await local(procs[0]))["stats"]["desired_stale"] >= 1:
                break
            await asyncio.sleep(0.05)
        assert doc["stats"]["desired_bad"] == 1
        assert doc["revision"] == MAX_REVISION  # the fleet's revision 5 was ignored

        # The frozen revision survives a restart.
        await asyncio.to_thread(procs.pop().stop)
        reports = len(fleet.reports())
        procs.append(await asyncio.to_thread(AgentProcess, config, tmp_path, port))
        await eventually(lambda: len(fleet.reports()) > reports, within=WITHIN)
        assert (await local(procs[0]))["revision"] == MAX_REVISION

        fleet.command({"schema": 1, "id": "c-r", "command": "resync", "revision": 5})
        await fleet.wait_event("command_done", command_id="c-r")
        report = await fleet.wait_report(
            lambda r: r["revision"] == 5 and tiny(r).get("state") == "active"
        )
        assert tiny(report)["active"] == "2"
        # And the fleet's next documents apply as usual, also after another restart.
        v3 = bundle_bytes(make_tiny_bundle("3"))
        fleet.publish_desired(desired(6, {"tiny": model_entry(server, v3, "3")}))
        await fleet.wait_report(lambda r: r["revision"] == 6 and tiny(r)["active"] == "3")
        state = json.loads((tmp_path / "store" / ".sync-state.json").read_text())
        assert state["revision"] == 6
    finally:
        for p in procs:
            await asyncio.to_thread(p.stop)
        await server.stop()

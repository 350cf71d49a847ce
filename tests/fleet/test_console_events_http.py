"""The console's fleet-wide events page (``/ui/timeline``, the CLI's ``events``): real
events from a simulated device over a real Mosquitto, filtered by device and model,
newest first, escaped, a bad limit refused; and the audit log's JSON (``/v1/audit``):
paging and precise 400s."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgefleet.core import protocol
from edgefleet.core.mqtt import topics
from tests.support.brokers import Mosquitto, Peer
from tests.support.quality_fleet import TOKEN, Fleet, fleet_config, running_fleet, until


@pytest.fixture
async def fleet(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto
) -> AsyncIterator[Fleet]:
    async with running_fleet(fleet_config(tmp_path, keys, mosquitto.port), cookies=True) as client:
        yield client


def event(device: str, n: int, kind: str, model: str, reason: str) -> bytes:
    return protocol.Event(
        id=secrets.token_hex(16),
        device_id=device,
        at=1_800_000_000.0 + n,
        kind=kind,
        model=model,
        version="2",
        previous="1",
        reason=reason,
    ).to_json()


async def test_events_page_lists_filters_and_escapes(fleet: Fleet, mosquitto: Mosquitto) -> None:
    await fleet.enrol("store-a", [])
    await fleet.enrol("store-b", [])
    peers = {d: Peer(mosquitto.port, f"sim-{d}") for d in ("store-a", "store-b")}
    try:
        # Peer.publish waits for the broker's ack: off the loop the fleet runs on.
        await asyncio.to_thread(
            peers["store-a"].publish,
            topics.device_topic("store-a", topics.EVENTS),
            event("store-a", 1, "activated", "digits", "ok"),
        )
        await asyncio.to_thread(
            peers["store-b"].publish,
            topics.device_topic("store-b", topics.EVENTS),
            event("store-b", 2, "install_failed", "faces", "<script>alert(1)</script>"),
        )
        await until(lambda: fleet.call("GET", "/v1/events"), lambda d: len(d["events"]) == 2)
    finally:
        for peer in peers.values():
            peer.close()

    async with fleet.session.post(
        fleet.base + "/ui/login", data={"token": TOKEN, "next": "/ui/timeline"}
    ) as r:
        assert r.status == 200 and r.url.path == "/ui/timeline"
        html = await r.text()
    kinds = re.findall(r'<tr class="[^"]*" data-kind="(\w+)">', html)
    assert kinds == ["install_failed", "activated"]  # newest first
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert '<tr class="bad" data-kind="install_failed">' in html

    async with fleet.session.get(fleet.base + "/ui/timeline?device=store-a") as r:
        html = await r.text()
    assert re.findall(r'data-kind="(\w+)">', html) == ["activated"]
    async with fleet.session.get(
        fleet.base + "/ui/timeline?model=faces", headers={"HX-Request": "true"}
    ) as r:
        fragment = await r.text()
    assert "<html" not in fragment and re.findall(r'data-kind="(\w+)">', fragment) == [
        "install_failed"
    ]
    async with fleet.session.get(fleet.base + "/ui/timeline?limit=7") as r:
        assert r.status == 400 and "limit must be one of" in (await r.json())["error"]


async def test_the_audit_log_pages_and_refuses_bad_numbers(fleet: Fleet) -> None:
    for label in ("a", "b", "c"):  # three audited changes (404s: still audited)
        status, _ = await fleet.raw("PUT", f"/v1/devices/nope-{label}/groups", json={"groups": []})
        assert status == 404
    entries = (await fleet.call("GET", "/v1/audit"))["entries"]
    assert [e["target"] for e in entries] == ["id=nope-c", "id=nope-b", "id=nope-a"]
    newest = entries[0]["id"]
    page = (await fleet.call("GET", f"/v1/audit?limit=1&before={newest}"))["entries"]
    assert [e["target"] for e in page] == ["id=nope-b"]
    for query in ("limit=0", "limit=1001", "limit=x", "before=0", "before=-1"):
        status, doc = await fleet.raw("GET", f"/v1/audit?{query}")
        assert status == 400, (query, doc)
        assert query.split("=")[0] in doc["error"]

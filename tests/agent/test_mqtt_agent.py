"""The whole agent (aiohttp app) with a ``fleet`` section, against a real Mosquitto.

conftest's ``start_agent`` fails the test on tasks left running after cleanup, so
these also prove that the fleet connection shuts down cleanly in cleanup_ctx.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from edgefleet.agent.config import parse_config
from edgefleet.agent.fleet_link import FLEET
from edgefleet.agent.outbox import NewRecord
from edgefleet.core.errors import ConfigError
from edgefleet.core.mqtt import topics
from tests.support.brokers import Mosquitto, Peer, agent_fleet_section, eventually
from tests.support.tiny import TEST_X, agent_config

DEV = "store-0042"


async def infer(session: aiohttp.ClientSession, base: str) -> None:
    x: np.ndarray = TEST_X[:1]
    body = {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    async with session.post(f"{base}/v2/models/tiny/infer", json=body) as r:
        assert r.status == 200, await r.text()


def test_fleet_section_needs_a_device_id() -> None:
    with pytest.raises(ConfigError, match="device_id"):
        parse_config("fleet:\n  host: broker.example\n")
    cfg = parse_config("device_id: s1\nfleet:\n  host: b\n  protocol: 5\n")
    assert cfg.fleet is not None and cfg.fleet.protocol == "5" and cfg.fleet.port is None
    with pytest.raises(ConfigError, match="password_file"):
        parse_config("device_id: s1\nfleet:\n  host: b\n  password: x\n  password_file: f\n")
    with pytest.raises(ConfigError, match="fleet.keepalive"):
        parse_config("device_id: s1\nfleet:\n  host: b\n  keepalive: 5\n")


async def test_agent_boots_and_serves_without_broker_then_connects(
    mosquitto_factory: Callable[..., Mosquitto],
    start_agent: Any,
    make_tiny_bundle: Any,
    keys: Any,
    tmp_path: Path,
) -> None:
    broker = mosquitto_factory(start=False)  # the store's network is down at boot
    cfg = agent_config(
        tmp_path,
        keys,
        [make_tiny_bundle("1")],
        device_id=DEV,
        fleet=agent_fleet_section(broker.port, tmp_path),
    )
    t0 = time.monotonic()
    agent = await start_agent(cfg)
    assert time.monotonic() - t0 < 5
    fleet = agent.app[FLEET]
    async with aiohttp.ClientSession() as session:
        await infer(session, agent.base)  # serving, with no broker anywhere
        assert not fleet.link.connected
        # what the agent wants to tell the fleet waits in the outbox meanwhile
        await fleet.outbox.add([NewRecord("sample", {"i": i}) for i in range(5)])
        await asyncio.to_thread(broker.start)
        peer = await asyncio.to_thread(Peer, broker.port, "fleet-peer")
        try:
            await asyncio.to_thread(peer.subscribe, topics.device_topic(DEV, "status"))
            await eventually(lambda: peer.received(), within=5)
            doc = json.loads(peer.received()[-1][1])
            assert doc["state"] == "online" and doc["agent_version"]
            await infer(session, agent.base)
        finally:
            await asyncio.to_thread(peer.close)
    # no fleet acks in this test: the records stay put until one comes
    assert (await fleet.outbox.stats()).records == 5


async def test_agent_without_fleet_section_has_no_fleet_connection(
    start_agent: Any,
    make_tiny_bundle: Any,
    keys: Any,
    tmp_path: Path,
) -> None:
    agent = await start_agent(agent_config(tmp_path, keys, [make_tiny_bundle("1")]))
    assert FLEET not in agent.app
    async with aiohttp.ClientSession() as session:
        await infer(session, agent.base)

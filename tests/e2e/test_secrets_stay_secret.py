"""No secret leaves the agent through its logs, its API or its telemetry (issue 6 §3).

A real agent with every secret it can hold: its own API bearer token, the MQTT
password (a Mosquitto that checks it), and the cloud token (a cloud that is down, so
the failure paths log too). Logging at DEBUG through startup, requests with wrong
and right tokens, every read-only endpoint, a stop; then none of the three strings
may appear in the captured logs, in any response body, or in the outbox file the
telemetry leaves from.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgefleet.agent.fleet_link import FLEET
from tests.support.brokers import eventually, free_port
from tests.support.tiny import TEST_X, agent_config

DEV = "store-secret"


async def test_no_secret_in_logs_api_or_telemetry(
    mosquitto_factory: Any,
    start_agent: Any,
    make_tiny_bundle: Any,
    keys: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api_token = "api-" + secrets.token_hex(16)
    mqtt_password = "mqtt-" + secrets.token_hex(16)
    cloud_token = "cloud-" + secrets.token_hex(16)
    broker = mosquitto_factory(users={DEV: mqtt_password})
    caplog.set_level(logging.DEBUG)
    outbox = tmp_path / "outbox.sqlite"
    config = agent_config(
        tmp_path,
        keys,
        [
            make_tiny_bundle(
                "1",
                labels=["a", "b", "c"],
                postprocessing={"type": "classification", "output": "probs"},
                fallback={"mode": "cloud_when_unsure", "threshold": 1.0, "cloud_model": "big"},
            )
        ],
        device_id=DEV,
        server={"auth_token": api_token},
        fleet={
            "host": "127.0.0.1",
            "port": broker.port,
            "password": mqtt_password,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.3,
            "outbox": {"path": str(outbox)},
            "telemetry": {"flush_interval_s": 0.05, "stats_interval_s": 0.1},
        },
        fallback={
            "cloud": {
                "url": f"http://127.0.0.1:{free_port()}",  # nobody listens: cloud errors
                "token": cloud_token,
                "timeout_ms": 200,
            },
            # The bundle's threshold 1.0: every answer is "unsure" and tries the cloud.
        },
    )
    agent = await start_agent(config)
    fleet = agent.app[FLEET]
    async with asyncio.timeout(10):
        await fleet.link.wait_connected()  # the password was right

    bodies: list[str] = []
    good = {"Authorization": f"Bearer {api_token}"}
    body = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": TEST_X[0].tolist()}]
    }
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": api_token}):
            async with session.get(f"{agent.base}/v1/models", headers=headers) as r:
                assert r.status == 401
                bodies.append(await r.text())
        for _ in range(5):  # every answer asks the (dead) cloud and falls back
            async with session.post(
                f"{agent.base}/v2/models/tiny/infer", json=body, headers=good
            ) as r:
                assert r.status == 200
                bodies.append(await r.text())
        for path in (
            "/v2",
            "/v2/models/tiny",
            "/v1/models",
            "/v1/models/tiny",
            "/v1/system",
            "/v1/fallback",
            "/v1/hard-examples",
            "/v1/fleet",
            "/metrics",
            "/openapi.json",
        ):
            async with session.get(agent.base + path, headers=good) as r:
                assert r.status == 200, path
                bodies.append(await r.text())
    # The cloud was really asked (and failed): its error paths ran and logged.
    assert all('"fallback"' in b for b in bodies[3:8]), bodies[3]
    # Let a stats window and its telemetry batch reach the outbox.
    await eventually(lambda: fleet.sender.stats.batches_sent > 0, within=10)
    await agent.runner.cleanup()

    stored = outbox.read_bytes() + (
        Path(f"{outbox}-wal").read_bytes() if Path(f"{outbox}-wal").exists() else b""
    )
    logs = caplog.text
    for name, secret in (("api", api_token), ("mqtt", mqtt_password), ("cloud", cloud_token)):
        assert secret not in logs, f"{name} secret in the logs"
        assert all(secret not in b for b in bodies), f"{name} secret in an API response"
        assert secret.encode() not in stored, f"{name} secret in the outbox"

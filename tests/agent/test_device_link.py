"""The agent's device link (agent/mqtt_link.py): the core connection plus the device's
retained ``status`` — ``online`` at every connect, ``offline`` said at a clean stop,
and ``offline`` as the Last Will when the process dies. Real Mosquitto and amqtt.

The connection underneath (reconnects, acks, handlers, TLS) is tested in
tests/core/test_mqtt_link.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from edgefleet.agent.config import FleetConfig
from edgefleet.agent.mqtt_link import MqttLink
from edgefleet.core.mqtt import topics
from edgefleet.core.mqtt.errors import LinkClosed
from edgefleet.fleet.embedded_broker import EmbeddedBroker
from tests.support.brokers import ROOT, Inbox, Mosquitto, Peer, link_config

DEV = "store-0042"


@pytest.fixture
async def links() -> AsyncIterator[Callable[..., Any]]:
    """Start device links; every one is stopped at the end, even when the test fails."""
    made: list[MqttLink] = []

    async def make(config: FleetConfig, device_id: str = DEV, start: bool = True) -> MqttLink:
        link = MqttLink(config, device_id, agent_version="test")
        made.append(link)
        if start:
            await link.start()
        return link

    yield make
    for link in made:
        await link.stop()


def status_docs(peer: Peer) -> list[dict[str, Any]]:
    return [json.loads(p) for _, p, _ in peer.received(topics.device_topic(DEV, "status"))]


def test_the_client_id_defaults_to_the_device_id() -> None:
    assert MqttLink(link_config(1), DEV).client_id == DEV
    assert MqttLink(link_config(1, client_id="other"), DEV).client_id == "other"
    with pytest.raises(ValueError):
        MqttLink(link_config(1), "a/b")


async def test_retained_status_online_then_offline_at_a_clean_stop(
    mosquitto: Mosquitto, links: Any, peers: Any
) -> None:
    peer = peers(mosquitto.port)
    peer.subscribe(topics.device_topic(DEV, "status"))
    link = await links(link_config(mosquitto.port), start=False)
    inbox = Inbox()
    await link.subscribe(topics.device_topic(DEV, "commands"), inbox)
    await link.start()
    async with asyncio.timeout(5):
        await link.wait_connected()

    # retained birth message
    await peer.wait_for(lambda: any(d["state"] == "online" for d in status_docs(peer)))
    late = peers(mosquitto.port, client_id="late-peer")
    late.subscribe(topics.device_topic(DEV, "status"))
    await late.wait_for(lambda: len(late.received()) == 1)
    _, payload, retained = late.received()[0]
    doc = json.loads(payload)
    assert retained and doc["state"] == "online" and doc["schema"] == 1
    assert doc["device_id"] == DEV and doc["agent_version"] == "test"
    assert doc["protocol"] == "3.1.1"

    # the device's subscriptions work as the core connection's do
    peer.publish(topics.device_topic(DEV, "commands"), b'{"schema":1,"command":"resync"}')
    await inbox.wait_for(1)

    # a clean stop says offline itself (a clean DISCONNECT suppresses the Will)
    await link.stop()
    await peer.wait_for(lambda: status_docs(peer)[-1]["state"] == "offline")
    assert status_docs(peer)[-1]["reason"] == "shutdown"
    with pytest.raises(LinkClosed):
        await link.publish(topics.device_topic(DEV, "telemetry"), b"{}")


LINK_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from edgefleet.agent.config import FleetConfig
    from edgefleet.agent.mqtt_link import MqttLink

    async def main() -> None:
        cfg = FleetConfig(host="127.0.0.1", port=int(sys.argv[1]), keepalive_s=30)
        link = MqttLink(cfg, sys.argv[2])
        await link.start()
        await link.wait_connected()
        print("connected", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_last_will_says_offline_when_the_agent_dies(mosquitto: Mosquitto, peers: Any) -> None:
    peer = peers(mosquitto.port)
    peer.subscribe(topics.device_topic(DEV, "status"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LINK_SCRIPT,
        str(mosquitto.port),
        DEV,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"connected"
        await peer.wait_for(lambda: any(d["state"] == "online" for d in status_docs(peer)))
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        await peer.wait_for(lambda: status_docs(peer)[-1]["state"] == "offline", within=5)
        # The broker saw the socket close: the Will goes out at once, not after keepalive.
        assert time.monotonic() - killed_at < 2
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    doc = status_docs(peer)[-1]
    assert doc == {"schema": 1, "state": "offline", "device_id": DEV, "reason": "connection lost"}
    # ...and it is retained: a fleet process that starts now still sees it.
    late = peers(mosquitto.port, client_id="late-peer")
    late.subscribe(topics.device_topic(DEV, "status"))
    await late.wait_for(lambda: len(late.received()) == 1)
    assert late.received()[0][2] is True and json.loads(late.received()[0][1])["state"] == "offline"


async def test_status_and_will_on_the_embedded_amqtt_broker(
    amqtt_broker: EmbeddedBroker, links: Any, peers: Any
) -> None:
    """amqtt has no MQTT 5: the link falls back to 3.1.1 and says so in its status; the
    Will goes out when the connection drops, and the next connect says online again."""
    port = amqtt_broker.port
    # The broker runs in this loop: the peer's blocking calls go to a thread.
    peer = await asyncio.to_thread(peers, port)
    await asyncio.to_thread(peer.subscribe, topics.device_topic(DEV, "status"))
    link = await links(link_config(port, protocol="5"))
    async with asyncio.timeout(10):
        await link.wait_connected()
    await peer.wait_for(lambda: any(d["state"] == "online" for d in status_docs(peer)))
    assert status_docs(peer)[-1]["protocol"] == "3.1.1"
    # the Will: drop the connection without DISCONNECT
    link._abort_socket()
    await peer.wait_for(lambda: status_docs(peer)[-1]["state"] == "offline")
    assert status_docs(peer)[-1]["reason"] == "connection lost"
    async with asyncio.timeout(5):
        await link.wait_connected()
    await peer.wait_for(lambda: status_docs(peer)[-1]["state"] == "online")

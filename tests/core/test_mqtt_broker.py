"""deploy/mosquitto/edgefleet.conf itself: why its queue settings are what they are."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.support.brokers import Mosquitto, Peer

N = 3000
TOPIC = "edgefleet/v1/devices/store-1/telemetry"


def queued_for_offline_fleet(broker: Mosquitto) -> int:
    """A fleet with a persistent session goes away; a device publishes N QoS 1
    messages (each PUBACKed by the broker); the fleet comes back: how many arrive?"""
    fleet = Peer(broker.port, client_id="fleet", clean_session=False)
    fleet.subscribe("edgefleet/v1/devices/+/telemetry")
    fleet.close()
    device = Peer(broker.port, client_id="store-1")
    try:
        infos = [device.client.publish(TOPIC, str(i), qos=1) for i in range(N)]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()  # the broker acknowledged every one
    finally:
        device.close()
    fleet = Peer(broker.port, client_id="fleet", clean_session=False)
    try:
        deadline = time.monotonic() + 10
        last, stable_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = len(fleet.received())
            if n == N:
                break
            if n != last:
                last, stable_since = n, time.monotonic()
            elif time.monotonic() - stable_since > 1.0:
                break  # nothing more is coming
            time.sleep(0.02)
        return len(fleet.received())
    finally:
        fleet.close()


def test_edgefleet_conf_queues_everything_for_an_offline_fleet(
    mosquitto_factory: Callable[..., Mosquitto],
) -> None:
    assert queued_for_offline_fleet(mosquitto_factory("ours")) == N


@pytest.mark.parametrize("limit", [1000])
def test_mosquittos_default_queue_limit_drops_acknowledged_messages(
    mosquitto_factory: Callable[..., Mosquitto], limit: int
) -> None:
    """The FIELD-NOTES fact, reproduced: with the default limit the broker PUBACKs
    every message and silently drops the ones past the limit — which is why a record
    leaves the agent's outbox only on the fleet's own ack."""
    broker = mosquitto_factory("default-limit", extra_conf=f"max_queued_messages {limit}")
    got = queued_for_offline_fleet(broker)
    assert got < N and got <= limit + 20  # + messages in flight, not queued

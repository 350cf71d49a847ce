"""The device's MQTT link to the fleet: the core connection plus the device's presence.

:class:`MqttLink` is :class:`edgefleet.core.mqtt.connection.MqttConnection` (paho on
the asyncio loop, acks as futures, jittered reconnect, resubscription; every call on
the loop thread) with what makes it a *device*: its client id defaults to the
``device_id``, and it keeps the retained ``status`` topic true (docs/mqtt.md) —
``online`` (with the agent version and MQTT version) on every connect, ``offline``
as its Last Will when the connection is lost, and ``offline`` with reason
``shutdown`` said by itself at a clean stop (a clean DISCONNECT suppresses the Will).

The outbox and the telemetry sender that publish through it are wired up in
``agent/fleet_link.py``.
"""

from __future__ import annotations

import random
import time
from typing import Literal

from edgefleet.agent.config import FleetConfig
from edgefleet.core import protocol
from edgefleet.core.mqtt import topics
from edgefleet.core.mqtt.connection import MqttConnection, OutgoingMessage


class MqttLink(MqttConnection):
    """One device's connection to the fleet broker (see the module doc)."""

    def __init__(
        self,
        config: FleetConfig,
        device_id: str,
        *,
        agent_version: str = "",
        rng: random.Random | None = None,
    ) -> None:
        self.device_id = topics.check_device_id(device_id)
        self.agent_version = agent_version
        self.status_topic = topics.device_topic(device_id, topics.STATUS)
        super().__init__(config, client_id=config.client_id or device_id, rng=rng)

    def last_will(self) -> OutgoingMessage:
        # No timestamp: the broker publishes it later, at a time the device cannot know.
        payload = self._status_payload("offline", reason="connection lost", at=False)
        return OutgoingMessage(self.status_topic, payload, qos=1, retain=True)

    def birth_message(self) -> OutgoingMessage:
        return OutgoingMessage(self.status_topic, self._status_payload("online"), 1, True)

    def farewell_message(self) -> OutgoingMessage:
        payload = self._status_payload("offline", reason="shutdown")
        return OutgoingMessage(self.status_topic, payload, qos=1, retain=True)

    def _status_payload(
        self, state: Literal["online", "offline"], reason: str | None = None, at: bool = True
    ) -> bytes:
        online = state == "online"
        return protocol.Status(
            state=state,
            device_id=self.device_id,
            agent_version=self.agent_version if online else None,
            protocol=self.protocol_version if online else None,
            reason=reason,
            # The device's wall clock: may be wrong (the fleet uses its own receive time).
            at=round(time.time(), 3) if at else None,
        ).to_json()

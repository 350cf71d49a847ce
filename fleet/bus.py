"""The fleet's MQTT side: one connection to the broker and the parts that use it.

``FleetBus`` owns a plain ``edgefleet.core.mqtt.connection.MqttConnection``
(asyncio-driven paho, persistent session, jittered reconnect) under its own client id:
the fleet is no device, so it has no ``status``, birth message or Last Will. On it:

- the ingest (``fleet/ingest.py``) subscribes to ``status``, ``reported``, ``events``
  and ``telemetry`` of every device and publishes telemetry ``acks``;
- ``desired`` (``fleet/desired.py``) publishes retained ``desired`` documents;
- ``rollouts`` (``fleet/rollouts.py``) decides waves from ingested reports;
- ``telemetry`` (``fleet/telemetry.py``) serves the read-only views;
- ``send_command`` publishes on a device's ``commands`` topic.

Several fleet workers (DESIGN.md, Scale) pass ``shared_group``: ``telemetry`` and
``events`` are then subscribed as ``$share/{group}/...`` so each message is handled
by one worker. ``status`` and ``reported`` stay plain subscriptions on purpose: they
are retained, and brokers do not deliver retained messages to shared subscriptions,
so every worker needs them to learn the state at connect; storing them is
idempotent, and rollout decisions are made inside database transactions, so two
workers handling the same report agree. Each worker needs its own ``client_id``.

Background tasks (all on the event loop, all ended by ``stop()``): the link's own
tasks, one ingest task per leaf, a connection watcher, and a rollout ticker.

- On every (re)connect the watcher publishes every stored ``desired`` document
  again (``DesiredStates.republish``): a broker that restarted without its
  persistence has lost the retained ones, and a device that connects later must find
  its document. Devices ignore a revision they have processed, so repeats are
  harmless. On the first connect it first runs ``DesiredStates.refresh()`` for every
  device, which finishes any push a crashed fleet left between deciding and publishing.
- The ticker calls ``Rollouts.tick()`` every ``tick_s`` (wave timeouts).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from edgefleet.core import protocol
from edgefleet.core.mqtt import topics
from edgefleet.core.mqtt.config import MqttConnectionConfig
from edgefleet.core.mqtt.connection import MqttConnection
from edgefleet.core.mqtt.errors import LinkClosed, LinkRefused, PublishTimeout
from edgefleet.fleet.db import FleetDB
from edgefleet.fleet.desired import DesiredStates
from edgefleet.fleet.ingest import DEVICE_BURST, DEVICE_RATE_PER_S, Ingest, IngestStats
from edgefleet.fleet.rollouts import Rollouts
from edgefleet.fleet.telemetry import TelemetryViews

log = logging.getLogger(__name__)

# Messages waiting in the link per subscription before it drops: at connect the
# broker delivers every device's retained status and reported at once.
_LINK_QUEUE = 50_000
# The link accepts what the broker accepts (deploy/mosquitto: max_packet_size 4 MiB);
# the ingest applies its own per-leaf limits, so an over-size message is counted and
# logged there with its device and leaf.
_LINK_MAX_PAYLOAD = 4 * 1024 * 1024
_COMMAND_FIELDS_RESERVED = frozenset({"schema", "id", "command"})


def new_command_id() -> str:
    return f"c-{time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF:012x}{secrets.token_hex(10)}"


class FleetBus:
    def __init__(
        self,
        db: FleetDB,
        broker: MqttConnectionConfig,
        *,
        client_id: str = "edgefleet-fleet",
        bundle_url: Callable[[str, str], str],
        shared_group: str | None = None,
        tick_s: float = 5.0,
        device_rate_per_s: float = DEVICE_RATE_PER_S,
        device_burst: int = DEVICE_BURST,
    ) -> None:
        self.db = db
        self.shared_group = shared_group
        self.tick_s = tick_s
        # The fleet's own client id (each worker its own: a persistent session each);
        # the username stays the configured one (the broker ACL's `fleet` user).
        config = broker.model_copy(
            update={"max_payload_bytes": max(broker.max_payload_bytes, _LINK_MAX_PAYLOAD)}
        )
        self.link = MqttConnection(config, client_id=client_id)
        self.desired = DesiredStates(db, self._publish_retained, bundle_url)
        self.rollouts = Rollouts(db, self.desired)
        self.telemetry = TelemetryViews(db)
        self.ingest = Ingest(
            db,
            self._publish_ack,
            self.rollouts,
            device_rate_per_s=device_rate_per_s,
            device_burst=device_burst,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    @property
    def stats(self) -> IngestStats:
        return self.ingest.stats

    @property
    def connected(self) -> bool:
        return self.link.connected

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Subscribe, then connect in the background; returns without waiting."""
        if self._started:
            raise RuntimeError("FleetBus already started (make a new one to restart)")
        self._started = True
        for leaf in (topics.STATUS, topics.REPORTED, topics.EVENTS, topics.TELEMETRY):
            topic_filter = topics.all_devices(leaf)
            if self.shared_group and leaf in (topics.EVENTS, topics.TELEMETRY):
                topic_filter = topics.shared(self.shared_group, topic_filter)
            await self.link.subscribe(
                topic_filter, self.ingest.handler(leaf), qos=1, queue_size=_LINK_QUEUE
            )
        await self.ingest.start()
        await self.link.start()
        self._tasks = [
            asyncio.create_task(self._watch_connection(), name="fleet-bus-connection"),
            asyncio.create_task(self._tick(), name="fleet-bus-rollout-tick"),
        ]

    async def wait_connected(self) -> None:
        """Until connected and subscribed (bound it with ``asyncio.timeout``)."""
        await self.link.wait_connected()

    async def stop(self) -> None:
        """Disconnect and end every task. Messages not yet stored are safe elsewhere
        (see fleet/ingest.py); the database stays open (the caller owns it)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.link.stop()
        await self.ingest.stop()

    # ------------------------------------------------------------------ commands

    async def send_command(self, device_id: str, command: str, **fields: Any) -> str:
        """Publish a ``core.protocol.Command`` (``fields``: its optional ones, ``model``
        or ``revision``) on the device's ``commands`` topic and wait for the broker's
        PUBACK; returns the command id. ``ValueError`` for fields the protocol lacks.

        Raises ``LinkClosed`` when the bus is not running and ``PublishTimeout`` when
        the broker did not confirm in time (the message may still go out after a
        reconnect). The result comes back as a ``command_done``/``command_failed``
        event carrying ``command_id``.
        """
        topics.check_device_id(device_id)
        if not isinstance(command, str) or not command or len(command) > 64:
            raise ValueError("command must be a name of 1..64 characters")
        clash = _COMMAND_FIELDS_RESERVED & fields.keys()
        if clash:
            raise ValueError(f"command fields may not override {sorted(clash)}")
        unknown = fields.keys() - protocol.Command.model_fields.keys()
        if unknown:
            raise ValueError(f"commands have no fields {sorted(unknown)}")
        cid = new_command_id()
        try:
            payload = protocol.Command(id=cid, command=command, **fields).to_json()
        except ValidationError as exc:
            raise ValueError(protocol.one_line(exc)) from None
        await self.link.publish(topics.device_topic(device_id, topics.COMMANDS), payload, qos=1)
        log.info("command %s (%s) sent to %s", cid, command, device_id)
        return cid

    # ------------------------------------------------------------------ publishing

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        self._queue(topic, payload, retain=True)

    def _publish_ack(self, topic: str, payload: bytes) -> None:
        self._queue(topic, payload, retain=False)

    def _queue(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Loop thread. Queue now (paho keeps QoS 1 messages across a reconnect);
        the PUBACK is not awaited: the database is the truth, and the connection
        watcher republishes desired documents after every reconnect."""
        try:
            fut = self.link.publish_nowait(topic, payload, qos=1, retain=retain)
        except LinkClosed:
            log.debug("not published (bus not running): %s", topic)
            return
        fut.add_done_callback(_report_publish)

    # ------------------------------------------------------------------ background

    async def _watch_connection(self) -> None:
        first = True
        while True:
            try:
                await self.link.wait_connected()
            except LinkRefused as exc:
                log.error("fleet MQTT login refused: %s", exc.reason)
                return
            except LinkClosed:
                return
            try:
                if first:
                    changed = await self.desired.refresh()
                    if changed:
                        log.info("desired: %d devices had a pending change", changed)
                    first = False
                n = await self.desired.republish()
                log.info("connected to the broker; %d desired documents republished", n)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("republishing desired documents failed")
            await self.link.wait_disconnected()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.rollouts.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("rollout tick failed")


def _report_publish(fut: asyncio.Future[None]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is None:
        return
    if isinstance(exc, PublishTimeout):
        log.debug("publish not confirmed yet: %s", exc)  # paho still holds it
    elif isinstance(exc, LinkClosed):
        log.debug("publish dropped at stop: %s", exc)
    else:
        log.warning("publish failed: %s", exc)

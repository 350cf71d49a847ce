"""The telemetry sender: outbox → ``.../telemetry`` (QoS 1) → the fleet's ack → delete.

Runs as one task on the agent's event loop. While the link is connected it takes
batches from the outbox and publishes them; a batch's records are deleted only
when the fleet acknowledges them on ``edgefleet/v1/devices/{id}/acks`` (end-to-end:
a broker PUBACK proves nothing about delivery to the fleet, see docs/mqtt.md). A
batch without an ack within ``ack_timeout_s`` is released and sent again; the fleet
stores records idempotently by id, so a resend is harmless.

When to send: at once for HIGH-priority records (events) or a full batch; otherwise
every ``flush_interval_s``, so low-priority samples travel in few, large batches.
Up to ``max_in_flight`` batches wait for their acks at once (a window, so one slow
ack does not stall the pipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from edgefleet.agent.config import FleetTelemetryConfig
from edgefleet.agent.mqtt_link import MqttLink
from edgefleet.agent.outbox import Batch, Outbox
from edgefleet.core import protocol
from edgefleet.core.mqtt import topics
from edgefleet.core.mqtt.errors import LinkError
from edgefleet.core.mqtt.messages import Message, Subscription

log = logging.getLogger(__name__)

# After a reconnect, how long batches sent on the old connection may still wait for
# their ack (paho's redelivery plus the fleet's store-and-ack) before a resend.
RECONNECT_ACK_GRACE_S = 3.0


@dataclass
class SenderStats:
    batches_sent: int = 0
    records_sent: int = 0
    batches_acked: int = 0
    records_acked: int = 0
    resends: int = 0  # batches released after an ack timeout or a failed publish
    bad_acks: int = 0  # ack messages that were not valid JSON of our schema


@dataclass
class _Flight:
    batch: Batch
    deadline: float
    sent_at: float = field(default_factory=time.monotonic)


def encode_batch(device_id: str, batch: Batch, waiting: int) -> bytes:
    """The ``telemetry`` message for one batch (``core.protocol.TelemetryBatch``)."""
    return protocol.encode_telemetry(
        device_id,
        batch.id,
        round(time.time(), 3),
        protocol.OutboxCounts(
            dropped_low=batch.dropped_low, dropped_high=batch.dropped_high, waiting=waiting
        ),
        ((r.id, r.seq, r.kind, r.priority, r.ts, r.data) for r in batch.records),
    )


def parse_ack(payload: bytes) -> tuple[str, list[str] | None]:
    """``(batch_id, record_ids or None)`` of an ack message (``core.protocol.Ack``);
    ``WireError`` (a ValueError) if it is not one."""
    ack = protocol.decode(protocol.Ack, payload, max_bytes=protocol.MAX_BYTES["acks"])
    return ack.batch_id, None if ack.record_ids is None else list(ack.record_ids)


class TelemetrySender:
    def __init__(
        self,
        outbox: Outbox,
        link: MqttLink,
        config: FleetTelemetryConfig,
    ) -> None:
        self.outbox = outbox
        self.link = link
        self.config = config
        self.device_id = link.device_id
        self.telemetry_topic = topics.device_topic(self.device_id, topics.TELEMETRY)
        self.acks_topic = topics.device_topic(self.device_id, topics.ACKS)
        self.stats = SenderStats()
        self._in_flight: dict[str, _Flight] = {}
        self._changed = asyncio.Event()  # an ack arrived or the link came up
        self._task: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Subscribe to acks (before the link connects, so the first connect has it)."""
        if self._task is not None:
            raise RuntimeError("sender already started")
        self._sub = await self.link.subscribe(self.acks_topic, self._on_ack)
        self._task = asyncio.create_task(self._run(), name="telemetry-sender")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._sub is not None:
            await self.link.unsubscribe(self._sub)
            self._sub = None
        # Whatever is still in flight goes back in line for the next start.
        for flight in list(self._in_flight.values()):
            with contextlib.suppress(Exception):
                await self.outbox.release(flight.batch.id)
        self._in_flight.clear()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # ----------------------------------------------------------------- the loop

    async def _run(self) -> None:
        last_flush = 0.0
        was_down = False
        while True:
            try:
                await self._expire(time.monotonic())
                if not self.link.connected:
                    was_down = True
                    await self._wait(self.config.flush_interval_s, self._link_up())
                    continue
                if was_down:
                    was_down = False
                    self._after_reconnect(time.monotonic())
                due = (
                    self.outbox.urgent.is_set()
                    or self.outbox.waiting_hint >= self.config.batch_max_records
                    or time.monotonic() - last_flush >= self.config.flush_interval_s
                )
                if due and len(self._in_flight) < self.config.max_in_flight:
                    self.outbox.urgent.clear()
                    self.outbox.added.clear()
                    sent = await self._send_some()
                    last_flush = time.monotonic()
                    if sent:
                        continue
                await self._idle(last_flush)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The outbox or the link misbehaved: log, wait, go on. The sender must
                # outlive any single failure; unsent records stay in the outbox.
                log.exception("telemetry sender: unexpected error; retrying")
                await asyncio.sleep(min(5.0, self.config.flush_interval_s))

    async def _send_some(self) -> int:
        """Send batches until the outbox is empty, the window is full or the link drops."""
        sent = 0
        while len(self._in_flight) < self.config.max_in_flight and self.link.connected:
            batch = await self.outbox.next_batch(
                self.config.batch_max_records, self.config.batch_max_bytes
            )
            if batch is None:
                break
            payload = encode_batch(self.device_id, batch, self.outbox.waiting_hint)
            self._in_flight[batch.id] = _Flight(batch, time.monotonic() + self.config.ack_timeout_s)
            try:
                await self.link.publish(self.telemetry_topic, payload, qos=1)
            except LinkError as exc:
                # Not confirmed by the broker. paho may still deliver it after a
                # reconnect; the fleet's dedup by id makes the resend harmless.
                log.info("telemetry batch %s not sent (%s); will resend", batch.id, exc)
                if self._in_flight.pop(batch.id, None) is not None:
                    await self.outbox.release(batch.id)
                    self.stats.resends += 1
                break
            self.stats.batches_sent += 1
            self.stats.records_sent += len(batch.records)
            sent += 1
        return sent

    def _after_reconnect(self, now: float) -> None:
        """Batches sent before the link dropped: expect their acks soon or resend.

        paho resends what the broker had not PUBACKed, but a broker that crashed (or
        lost its queue to a slow fleet) may have PUBACKed batches it never delivered;
        waiting the whole ``ack_timeout_s`` for those would hold records back for
        nothing. A resend is harmless: the fleet stores by record id.
        """
        deadline = now + min(self.config.ack_timeout_s, RECONNECT_ACK_GRACE_S)
        for flight in self._in_flight.values():
            flight.deadline = min(flight.deadline, deadline)

    async def _expire(self, now: float) -> None:
        for batch_id, flight in list(self._in_flight.items()):
            if flight.deadline <= now:
                del self._in_flight[batch_id]
                released = await self.outbox.release(batch_id)
                self.stats.resends += 1
                log.info(
                    "telemetry batch %s: no ack from the fleet in %.0f s; %d records resent",
                    batch_id,
                    self.config.ack_timeout_s,
                    released,
                )

    async def _idle(self, last_flush: float) -> None:
        """Sleep until the next flush, an urgent record, an ack, or an ack deadline."""
        now = time.monotonic()
        wake = last_flush + self.config.flush_interval_s
        if self._in_flight:
            wake = min(wake, *(f.deadline for f in self._in_flight.values()))
        if len(self._in_flight) >= self.config.max_in_flight:
            # Window full: only an ack or a deadline helps.
            await self._wait(max(0.0, wake - now), None)
        else:
            # Any add wakes us to re-check "due" (urgent, or a full batch waiting).
            self.outbox.added.clear()
            await self._wait(max(0.0, wake - now), self.outbox.added.wait())

    async def _link_up(self) -> None:
        try:
            await self.link.wait_connected()
        except LinkError:
            # Refused or stopped: nothing to wait for; the caller's timeout ends this.
            await asyncio.Event().wait()

    async def _wait(self, seconds: float, extra: Any) -> None:
        self._changed.clear()
        waiters = [asyncio.ensure_future(self._changed.wait())]
        if extra is not None:
            waiters.append(asyncio.ensure_future(extra))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    # ---------------------------------------------------------------- acks

    async def _on_ack(self, msg: Message) -> None:
        # The link's delivery task for the acks subscription (loop thread).
        try:
            batch_id, record_ids = parse_ack(msg.payload)
        except ValueError as exc:
            self.stats.bad_acks += 1
            log.warning("ignored a malformed ack on %s: %s", msg.topic, exc)
            return
        if record_ids is not None:
            # By record id: right even for an ack of a batch we already gave up on
            # and re-batched (the fleet's ack may arrive after our timeout).
            deleted = await self.outbox.ack(record_ids)
        else:
            deleted = await self.outbox.ack_batch(batch_id)
        flight = self._in_flight.pop(batch_id, None)
        self.stats.records_acked += deleted
        if flight is not None:
            self.stats.batches_acked += 1
        self._changed.set()

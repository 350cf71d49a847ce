"""Simulated devices for ``python -m bench fleet``: thousands of real MQTT 3.1.1 sessions.

Each simulated device holds its own TCP connection to the broker, logs in with its
own client id, subscribes to its ``desired`` and ``acks`` topics, sets the same Last
Will as the agent, and publishes ``status``, ``reported`` and ``telemetry`` at QoS 1
with the agent's payloads (docs/mqtt.md, docs/fleet.md). What it leaves out is the
model work: on a new desired state it downloads the bundle (the real file, over
HTTP with the device's credentials) but does not load it.

Why not 2,000 instances of the agent's paho-based link: paho spends most of its
time in per-client Python bookkeeping; a few hundred lines of asyncio protocol are
enough to keep 2,000 sessions in one process on a 2-core box and leave the CPU to
the fleet and the broker, which are what is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

PREFIX = "edgefleet/v1/devices"

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _remaining_length(len(body)) + body


class MqttError(Exception):
    pass


Handler = Callable[[str, bytes], Awaitable[None] | None]


@dataclass
class SimStats:
    published: int = 0
    received: int = 0


@dataclass
class SimClient:
    """A minimal MQTT 3.1.1 client: QoS 0/1 in, QoS 1 out with PUBACK futures."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    keepalive: int = 0  # no pings: 2,000 idle sessions would otherwise chatter
    will: tuple[str, bytes] | None = None
    clean_session: bool = False
    on_message: Handler | None = None
    stats: SimStats = field(default_factory=SimStats)
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _task: asyncio.Task[None] | None = None
    _next_id: int = 0
    _pending: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    _connack: asyncio.Future[int] | None = None

    async def connect(self, within_s: float = 30.0) -> None:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), within_s
        )
        flags = 0x02 if self.clean_session else 0
        payload = _str(self.client_id)
        if self.will is not None:
            flags |= 0x04 | 0x08 | 0x20  # will, will QoS 1, will retain
            payload += _str(self.will[0]) + _str(self.will[1])
        if self.username is not None:
            flags |= 0x80
            payload += _str(self.username)
            if self.password is not None:
                flags |= 0x40
                payload += _str(self.password)
        body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", self.keepalive) + payload
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self._writer.write(_packet(CONNECT, 0, body))
        self._task = asyncio.create_task(self._read_loop(), name=f"sim-{self.client_id}")
        rc = await asyncio.wait_for(self._connack, within_s)
        if rc != 0:
            raise MqttError(f"{self.client_id}: CONNACK return code {rc}")

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def subscribe(self, topics: list[str], within_s: float = 30.0) -> None:
        assert self._writer is not None
        pid = self._packet_id()
        body = struct.pack("!H", pid) + b"".join(_str(t) + b"\x01" for t in topics)
        fut = asyncio.get_running_loop().create_future()
        self._pending[pid] = fut
        self._writer.write(_packet(SUBSCRIBE, 0x02, body))
        await asyncio.wait_for(fut, within_s)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> asyncio.Future[None]:
        """QoS 1; the future resolves on PUBACK."""
        assert self._writer is not None
        pid = self._packet_id()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[pid] = fut
        body = _str(topic) + struct.pack("!H", pid) + payload
        self._writer.write(_packet(PUBLISH, 0x02 | (1 if retain else 0), body))
        self.stats.published += 1
        return fut

    async def drain(self) -> None:
        if self._writer is not None:
            await self._writer.drain()

    async def _read_loop(self) -> None:
        assert self._reader is not None and self._writer is not None
        reader = self._reader
        try:
            while True:
                head = await reader.readexactly(1)
                mult, length = 1, 0
                while True:
                    b = (await reader.readexactly(1))[0]
                    length += (b & 0x7F) * mult
                    if not b & 0x80:
                        break
                    mult *= 128
                body = await reader.readexactly(length) if length else b""
                kind, flags = head[0] >> 4, head[0] & 0x0F
                if kind == CONNACK and self._connack is not None:
                    if not self._connack.done():
                        self._connack.set_result(body[1])
                elif kind in (PUBACK, SUBACK):
                    fut = self._pending.pop(struct.unpack("!H", body[:2])[0], None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                elif kind == PUBLISH:
                    tlen = struct.unpack("!H", body[:2])[0]
                    topic = body[2 : 2 + tlen].decode()
                    pos = 2 + tlen
                    qos = (flags >> 1) & 0x03
                    if qos:
                        pid = body[pos : pos + 2]
                        pos += 2
                        self._writer.write(_packet(PUBACK, 0, pid))
                    self.stats.received += 1
                    if self.on_message is not None:
                        result = self.on_message(topic, body[pos:])
                        if result is not None:
                            await result
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(MqttError(f"{self.client_id}: connection lost ({exc})"))
            self._pending.clear()

    async def close(self, *, clean: bool = True) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                if clean:
                    self._writer.write(_packet(DISCONNECT, 0, b""))
                    await self._writer.drain()
                self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def topic(device_id: str, leaf: str) -> str:
    return f"{PREFIX}/{device_id}/{leaf}"


def status_payload(device_id: str, state: str) -> bytes:
    doc = {"schema": 1, "state": state, "device_id": device_id}
    if state == "online":
        doc |= {"agent_version": "sim", "protocol": "3.1.1", "at": time.time()}
    else:
        doc["reason"] = "connection lost"
    return orjson.dumps(doc)


def reported_payload(device_id: str, revision: int, models: dict[str, dict[str, object]]) -> bytes:
    return orjson.dumps(
        {
            "schema": 1,
            "device_id": device_id,
            "revision": revision,
            "agent_version": "sim",
            "at": time.time(),
            "accelerators": {"onnx": ["CPUExecutionProvider"]},
            "models": models,
        }
    )

"""Helpers for the fleet MQTT tests: a real FleetDB, real FleetBus, simulated devices.

A simulated device is the agent's real MQTT link (``edgefleet.agent.mqtt_link``:
birth message, Last Will, persistent session) plus a minimal stand-in for the agent's
sync: it answers every ``desired`` document with a ``reported`` one, succeeding, failing or
holding per model version as the test decides. No mocks: everything goes through a
real broker.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from edgefleet.agent.mqtt_link import MqttLink
from edgefleet.core.mqtt import topics
from edgefleet.core.mqtt.config import MqttConnectionConfig
from edgefleet.core.mqtt.messages import Message
from edgefleet.fleet.db import FleetDB, dumps, now
from tests.support.brokers import connection_config, link_config

BUNDLE_BASE = "http://fleet.test:8480/v1/bundles"


def bundle_url(name: str, version: str) -> str:
    return f"{BUNDLE_BASE}/{name}/{version}"


def fleet_config(port: int) -> MqttConnectionConfig:
    """The fleet's broker connection (a plain MQTT connection, no device settings)."""
    return connection_config(port, username="fleet")


def new_id() -> str:
    return f"{time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF:012x}{secrets.token_hex(10)}"


async def add_device(db: FleetDB, device_id: str, groups: tuple[str, ...] = ()) -> None:
    def job(conn: Any) -> None:
        conn.execute("INSERT INTO devices (id, created_at) VALUES (?, ?)", (device_id, now()))
        conn.executemany(
            "INSERT INTO device_groups (device_id, grp) VALUES (?, ?)",
            [(device_id, g) for g in groups],
        )

    await db.write(job)


async def add_version(db: FleetDB, name: str, version: str, size: int = 1000) -> str:
    sha = (name + version).encode().hex().ljust(64, "0")[:64]

    def job(conn: Any) -> None:
        conn.execute(
            "INSERT INTO model_versions (name, version, sha256, size, path, runtime, manifest,"
            " key_id, uploaded_at) VALUES (?, ?, ?, ?, ?, 'onnx', '{}', NULL, ?)",
            (name, version, sha, size, f"{name}/{version}.bundle", now()),
        )

    await db.write(job)
    return sha


async def query(db: FleetDB, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return await db.read(lambda conn: [tuple(r) for r in conn.execute(sql, args)])


async def until(
    check: Callable[[], Awaitable[Any]] | Callable[[], Any], within: float = 20.0
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that."""
    async with asyncio.timeout(within):
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.02)


Outcome = Callable[[str, str, str], str]  # (device, model, version) → active|failed|hold


class SimDevice:
    def __init__(
        self, port: int, device_id: str, outcome: Outcome | None = None, **link: Any
    ) -> None:
        self.device_id = device_id
        self.link = MqttLink(link_config(port, **link), device_id, agent_version="sim-1")
        self.outcome: Outcome = outcome or (lambda d, m, v: "active")
        self.desired: list[dict[str, Any]] = []
        self.acks: list[dict[str, Any]] = []
        self.commands: list[dict[str, Any]] = []
        self.active: dict[str, str] = {}
        self.previous: dict[str, str | None] = {}
        self.revision = 0

    def topic(self, leaf: topics.Leaf) -> str:
        return topics.device_topic(self.device_id, leaf)

    async def start(self) -> SimDevice:
        await self.link.subscribe(self.topic("desired"), self._on_desired)
        await self.link.subscribe(self.topic("acks"), self._on_ack)
        await self.link.subscribe(self.topic("commands"), self._on_command)
        await self.link.start()
        return self

    async def stop(self) -> None:
        await self.link.stop()

    async def connected(self, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            await self.link.wait_connected()

    async def _on_desired(self, msg: Message) -> None:
        doc = msg.json()
        self.desired.append(doc)
        await self.apply(doc)

    async def _on_ack(self, msg: Message) -> None:
        self.acks.append(msg.json())

    async def _on_command(self, msg: Message) -> None:
        self.commands.append(msg.json())

    def versions_seen(self, model: str) -> list[str]:
        return [d["models"][model]["version"] for d in self.desired if model in d["models"]]

    def desired_version(self, model: str) -> str | None:
        if not self.desired:
            return None
        return self.desired[-1]["models"].get(model, {}).get("version")

    async def apply(self, doc: dict[str, Any], force: str | None = None) -> None:
        """Answer a desired document: each model ends active, failed or held."""
        if doc["revision"] <= self.revision and force is None:
            return
        models: dict[str, Any] = {}
        events = []
        for name, m in doc["models"].items():
            v = m["version"]
            result = force or self.outcome(self.device_id, name, v)
            if result == "hold":
                return  # not processed: no reported, the revision stays unprocessed
            entry = {
                "desired": v,
                "rollout": m.get("rollout"),
                "provider": "CPUExecutionProvider",
                "labels": m.get("labels", {}),
            }
            if result == "active":
                if self.active.get(name) != v:
                    self.previous[name] = self.active.get(name)
                self.active[name] = v
                entry.update(state="active", last_error=None)
            else:
                reason = f"self-test failed: output 0 differs by 0.31 on version {v}"
                entry.update(state="failed", last_error=reason)
                events.append(
                    {
                        "schema": 1,
                        "id": new_id(),
                        "device_id": self.device_id,
                        "at": time.time(),
                        "kind": "activation_failed",
                        "model": name,
                        "version": v,
                        "previous": self.active.get(name),
                        "revision": doc["revision"],
                        "rollout": m.get("rollout"),
                        "reason": reason,
                    }
                )
            entry.update(active=self.active.get(name), previous=self.previous.get(name))
            models[name] = entry
        self.revision = doc["revision"]
        for e in events:
            await self.link.publish(self.topic("events"), dumps(e))
        await self.report(models)

    async def report(self, models: dict[str, Any]) -> None:
        doc = {
            "schema": 1,
            "device_id": self.device_id,
            "revision": self.revision,
            "agent_version": "sim-1",
            "at": time.time(),
            "accelerators": {"onnx": ["CPUExecutionProvider"]},
            "models": models,
        }
        await self.link.publish(self.topic("reported"), dumps(doc), retain=True)

    async def reapply(self, force: str) -> None:
        """Process the newest desired document again with this outcome (a held one)."""
        await self.apply(self.desired[-1], force=force)


def stats_data(
    model: str, version: str, latency: list[int], confidence: list[int] | None = None
) -> dict[str, Any]:
    """A valid inference_stats record's data (docs/fleet.md) with these latency counts."""
    count = sum(latency)
    conf = confidence or [0] * 9 + [count, 0]
    return {
        "model": model,
        "version": version,
        "window_start": time.time() - 60,
        "window_s": 60.0,
        "count": count,
        "errors": 0,
        "latency_ms": {"le": [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], "counts": latency},
        "confidence": {"le": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], "counts": conf},
        "sources": {"edge": count},
        "fallback": {},
    }


def batch(device_id: str, records: list[tuple[str, Any]], seq0: int = 1) -> dict[str, Any]:
    return {
        "schema": 1,
        "device_id": device_id,
        "batch_id": new_id(),
        "sent_at": time.time(),
        "outbox": {"dropped_low": 0, "dropped_high": 0, "waiting": 0},
        "records": [
            {
                "id": new_id(),
                "seq": seq0 + i,
                "kind": kind,
                "priority": 0,
                "ts": time.time(),
                "data": data,
            }
            for i, (kind, data) in enumerate(records)
        ],
    }

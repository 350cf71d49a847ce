"""Outbox → sender → real Mosquitto → a minimal real fleet ingest → ack → delete.

The fleet side here is a stand-in for the fleet service (a later part of issue 3):
plain paho on its own thread, records stored in SQLite idempotently by id, then an
ack published on the device's ``acks`` topic — the contract in docs/mqtt.md.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.config import FleetConfig
from edgefleet.agent.mqtt_link import MqttLink
from edgefleet.agent.outbox import NewRecord, Outbox, Priority
from edgefleet.agent.telemetry_sender import TelemetrySender, parse_ack
from edgefleet.core.mqtt import topics
from tests.support.brokers import (
    Mosquitto,
    Peer,
)

DEV = "store-0042"


class FleetSink:
    """Minimal fleet ingest: store each record once (by id), then ack the batch."""

    def __init__(
        self, port: int, db: Path, *, ack: bool = True, ignore_first: int = 0, ack_ids: bool = True
    ) -> None:
        self.db = sqlite3.connect(db, check_same_thread=False)
        self.db.execute(
            "CREATE TABLE records (id TEXT PRIMARY KEY, device TEXT, seq INTEGER,"
            " kind TEXT, data TEXT)"
        )
        self.lock = threading.Lock()
        self.deliveries = 0  # records received, duplicates included
        self.batches: list[dict[str, Any]] = []
        self.ack, self.ignore_first, self.ack_ids = ack, ignore_first, ack_ids
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="fleet-ingest", clean_session=False
        )
        self.client.username_pw_set("fleet")
        self.client.reconnect_delay_set(0.05, 0.3)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._up = threading.Event()
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        assert self._up.wait(10)

    def _on_connect(self, *args: Any) -> None:
        # paho's network thread; resubscribe after every reconnect.
        self.client.subscribe(topics.all_devices("telemetry"), qos=1)
        self._up.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        # paho's network thread.
        doc = orjson.loads(msg.payload)
        device, _ = topics.parse_device_topic(msg.topic) or ("?", "")
        with self.lock:
            self.batches.append(doc)
            if len(self.batches) <= self.ignore_first:
                return  # a fleet that crashed before storing: no ack
            self.deliveries += len(doc["records"])
            with self.db:  # one transaction: stored (once) before the ack goes out
                self.db.executemany(
                    "INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?, ?)",
                    [
                        (r["id"], device, r["seq"], r["kind"], orjson.dumps(r["data"]).decode())
                        for r in doc["records"]
                    ],
                )
        if self.ack:
            ack: dict[str, Any] = {"schema": 1, "batch_id": doc["batch_id"]}
            if self.ack_ids:
                ack["record_ids"] = [r["id"] for r in doc["records"]]
            client.publish(topics.device_topic(device, "acks"), orjson.dumps(ack), qos=1)

    def ids(self) -> list[str]:
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT id FROM records ORDER BY rowid")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.db.close()


def fleet_config(port: int, tmp: Path, **telemetry: Any) -> FleetConfig:
    return FleetConfig.model_validate(
        {
            "host": "127.0.0.1",
            "port": port,
            "keepalive_s": 2,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.3,
            "connect_timeout_s": 3,
            "publish_timeout_s": 2,
            "outbox": {"path": str(tmp / "outbox.sqlite"), "max_bytes": 50_000_000},
            "telemetry": {
                "flush_interval_s": 0.05,
                "batch_max_records": 50,
                "ack_timeout_s": 1.0,
                "max_in_flight": 4,
                **telemetry,
            },
        }
    )


class Device:
    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self.outbox = Outbox(cfg.outbox.path, cfg.outbox.max_bytes)
        self.link = MqttLink(cfg, DEV, agent_version="test")
        self.sender = TelemetrySender(self.outbox, self.link, cfg.telemetry)

    async def start(self) -> Device:
        await self.outbox.open()
        await self.sender.start()
        await self.link.start()
        return self

    async def stop(self) -> None:
        await self.sender.stop()
        await self.link.stop()
        await self.outbox.close()

    async def drained(self, within: float = 15.0) -> None:
        async with asyncio.timeout(within):
            while True:
                if not (await self.outbox.stats()).records:
                    return
                await asyncio.sleep(0.02)


@pytest.fixture
async def device(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Device] = []

    async def make(cfg: FleetConfig, start: bool = True) -> Device:
        d = Device(cfg)
        made.append(d)
        return await d.start() if start else d

    yield make
    for d in made:
        await d.stop()


@pytest.fixture
def sinks(tmp_path: Path) -> Any:
    made: list[FleetSink] = []

    def make(port: int, **kw: Any) -> FleetSink:
        s = FleetSink(port, tmp_path / f"fleet-{len(made)}.sqlite", **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_ack_parsing() -> None:
    assert parse_ack(b'{"schema":1,"batch_id":"b"}') == ("b", None)
    assert parse_ack(b'{"schema":1,"batch_id":"b","record_ids":["x"]}') == ("b", ["x"])
    for bad in [
        b"",
        b"[]",
        b'{"schema":2,"batch_id":"b"}',
        b'{"schema":1}',
        b'{"schema":1,"batch_id":"b","record_ids":[1]}',
        b'{"schema":1,"batch_id":"b","record_ids":"x"}',
    ]:
        with pytest.raises(ValueError):
            parse_ack(bad)


async def test_records_reach_the_fleet_once_and_leave_the_outbox_on_its_ack(
    mosquitto: Mosquitto, tmp_path: Path, device: Any, sinks: Any
) -> None:
    fleet = sinks(mosquitto.port)
    dev = await device(fleet_config(mosquitto.port, tmp_path))
    ids = await dev.outbox.add([NewRecord("sample", {"i": i}) for i in range(120)])
    ids += await dev.outbox.add([NewRecord("event", {"what": "activated"}, Priority.HIGH)])
    await dev.drained()
    assert sorted(fleet.ids()) == sorted(ids)
    batch = fleet.batches[0]
    assert batch["schema"] == 1 and batch["device_id"] == DEV
    assert set(batch["outbox"]) == {"dropped_low", "dropped_high", "waiting"}
    rec = batch["records"][0]
    assert set(rec) == {"id", "seq", "kind", "priority", "ts", "data"}
    assert all(len(b["records"]) <= 50 for b in fleet.batches)
    st = dev.sender.stats
    assert st.records_acked == 121 and st.resends == 0 and st.bad_acks == 0


async def test_unacked_batches_are_resent_and_stored_once(
    mosquitto: Mosquitto, tmp_path: Path, device: Any, sinks: Any
) -> None:
    """The fleet "crashes" before storing the first two batches: no ack comes, the
    sender resends after ack_timeout, the fleet stores each record exactly once."""
    fleet = sinks(mosquitto.port, ignore_first=2)
    dev = await device(fleet_config(mosquitto.port, tmp_path, ack_timeout_s=0.3))
    ids = await dev.outbox.add([NewRecord("sample", {"i": i}) for i in range(100)])
    await dev.drained()
    assert sorted(fleet.ids()) == sorted(ids)
    assert dev.sender.stats.resends >= 2


async def test_ack_by_batch_id_only_and_garbage_acks(
    mosquitto: Mosquitto, tmp_path: Path, device: Any, sinks: Any
) -> None:
    fleet = sinks(mosquitto.port, ack_ids=False)
    dev = await device(fleet_config(mosquitto.port, tmp_path))
    async with asyncio.timeout(5):
        await dev.link.wait_connected()
    evil = Peer(mosquitto.port, client_id="evil")
    try:
        acks = topics.device_topic(DEV, "acks")
        for junk in [
            b"",
            b"\x00\xff",
            b"{}",
            b'{"schema":1,"batch_id":"nope"}',
            b'{"schema":1,"batch_id":"x","record_ids":[null]}',
            b"[" * 10000,
        ]:
            evil.publish(acks, junk)
    finally:
        evil.close()
    ids = await dev.outbox.add([NewRecord("sample", {"i": i}) for i in range(60)])
    await dev.drained()
    assert sorted(fleet.ids()) == sorted(ids)
    assert dev.sender.stats.bad_acks == 5  # the unknown batch id is a valid, harmless ack
    assert dev.link.connected


async def test_offline_boot_then_everything_arrives(
    mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path, device: Any, sinks: Any
) -> None:
    broker = mosquitto_factory(start=False)
    dev = await device(fleet_config(broker.port, tmp_path))
    ids = []
    for i in range(10):  # produced while no broker exists
        ids += await dev.outbox.add([NewRecord("sample", {"i": i, "k": k}) for k in range(30)])
        await asyncio.sleep(0.02)
    assert not dev.link.connected and (await dev.outbox.stats()).records == 300
    await asyncio.to_thread(broker.start)
    fleet = sinks(broker.port)
    await dev.drained()
    assert sorted(fleet.ids()) == sorted(ids)


@pytest.mark.parametrize("kill", [True, False], ids=["broker-sigkill", "broker-sigterm"])
async def test_broker_outage_under_steady_load_loses_and_duplicates_nothing(
    mosquitto: Mosquitto, tmp_path: Path, device: Any, sinks: Any, kill: bool
) -> None:
    """Issue 3's fault test: telemetry produced at a steady rate while the broker is
    stopped for a while and restarted. Afterwards the fleet holds exactly the records
    produced (count and ids), none twice."""
    fleet = sinks(mosquitto.port)
    dev = await device(fleet_config(mosquitto.port, tmp_path))
    async with asyncio.timeout(5):
        await dev.link.wait_connected()
    produced: list[str] = []
    stop = asyncio.Event()
    progress = asyncio.Condition()

    async def produce() -> None:
        i = 0
        while not stop.is_set():
            prio = Priority.HIGH if i % 25 == 0 else Priority.LOW
            produced.extend(await dev.outbox.add([NewRecord("sample", {"i": i}, prio)]))
            async with progress:
                progress.notify_all()
            i += 1
            await asyncio.sleep(0.004)  # ~200 records/s

    async def until_produced(n: int) -> None:
        # Phases are counted in records, not seconds: a slow CI box produces fewer
        # records per second, and the test is about what happens to them.
        async with asyncio.timeout(30), progress:
            await progress.wait_for(lambda: len(produced) >= n)

    producer = asyncio.create_task(produce())
    try:
        await until_produced(150)
        await asyncio.to_thread(mosquitto.stop, kill)
        async with asyncio.timeout(5):
            await dev.link.wait_disconnected()
        before = len(produced)
        await until_produced(before + 200)  # outage: records keep coming, into the outbox
        during = len(produced)
        await asyncio.to_thread(mosquitto.start)
        async with asyncio.timeout(10):
            await dev.link.wait_connected()
        await until_produced(during + 100)
    finally:
        stop.set()
        await producer
    await dev.drained(within=20)
    stored = fleet.ids()
    assert len(stored) == len(produced) > during >= before + 200
    assert set(stored) == set(produced)
    with fleet.lock:
        assert fleet.db.execute("SELECT count(DISTINCT id) FROM records").fetchone()[0] == len(
            produced
        )
    print(
        f"\noutage({'kill' if kill else 'term'}): {len(produced)} records, "
        f"{fleet.deliveries - len(produced)} duplicate deliveries absorbed, "
        f"{dev.sender.stats.resends} batch resends"
    )


async def test_a_backlog_goes_out_in_full_batches_through_mosquitto(
    mosquitto: Mosquitto, tmp_path: Path, device: Any, sinks: Any
) -> None:
    """Records queued faster than they are sent all reach the fleet DB once, in batches
    of ``batch_max_records``. Speed: ``python -m bench mqtt``."""
    fleet = sinks(mosquitto.port)
    dev = await device(
        fleet_config(mosquitto.port, tmp_path, batch_max_records=500, ack_timeout_s=5)
    )
    async with asyncio.timeout(5):
        await dev.link.wait_connected()
    n = 3000
    rec = {"model": "digits-edge", "version": "3", "count": 120, "p50_ms": 0.8}
    for _ in range(0, n, 1000):
        await dev.outbox.add([NewRecord("inference_stats", rec)] * 1000)
    await dev.drained(within=60)
    assert len(fleet.ids()) == len(set(fleet.ids())) == n

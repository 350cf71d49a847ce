"""``python -m bench mqtt``: the device ⇄ fleet data path, one piece at a time.

The figures docs/mqtt.md and docs/fleet.md quote, measured in one process on this
machine against a real Mosquitto on loopback (bench/mosquitto.py):

1. **outbox**: ``Outbox.add`` in batches of 100 records, concurrent single-record adds
   (the writer thread commits them in groups), and the drain (``next_batch`` + ``ack``).
2. **link**: QoS 1 publishes through the core MQTT connection, pipelined (each future
   resolves on the broker's PUBACK), and messages from a plain paho client delivered
   to an async handler.
3. **telemetry end to end**: ``inference_stats`` records already in a device's outbox
   go through the agent's ``TelemetrySender`` and device link, Mosquitto, the fleet's
   ``FleetBus`` ingest into the fleet's SQLite, and back as acks that delete them from
   the outbox. The figure is records stored per second; every record must arrive.

Each phase checks that nothing was lost (the tests check the same paths for
correctness with few records; speed is measured here, never asserted in a test).
Writes ``bench/results/mqtt.json`` and a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    CpuMeter,
    add_run_options,
    machine_info,
    machine_markdown,
    wait_until_quiet,
    warn_if_busy,
    write_doc_section,
    write_result,
)
from bench.mosquitto import Mosquitto

DEVICE = "bench-device"
MODEL = "digits-edge"


def inference_stats(version: str) -> dict[str, Any]:
    """One ``inference_stats`` record's data (docs/fleet.md), checked by the fleet's own
    validator: a record the fleet would store raw only is no figure for its ingest."""
    from edgefleet.fleet.telemetry_math import validate_inference_stats

    latency = [0, 3, 10, 40, 50, 17, 0, 0, 0, 0, 0, 0]
    count = sum(latency)
    data = {
        "model": MODEL,
        "version": version,
        "window_start": time.time() - 60,
        "window_s": 60.0,
        "count": count,
        "errors": 0,
        "latency_ms": {"le": [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], "counts": latency},
        "confidence": {
            "le": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
            "counts": [0] * 9 + [count, 0],
        },
        "sources": {"edge": count},
        "fallback": {},
    }
    validate_inference_stats(data)
    return data


def connection_settings(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "keepalive_s": 10,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
        "publish_timeout_s": 30,
        **extra,
    }


# ---- 1. outbox ----------------------------------------------------------------------


async def outbox_phase(workdir: Path, records: int) -> dict[str, Any]:
    from edgefleet.agent.outbox import NewRecord, Outbox

    data = inference_stats("3")
    singles = records // 4
    async with Outbox(workdir / "outbox-phase.sqlite", 1_000_000_000) as ob:
        t0 = time.perf_counter()
        for _ in range(0, records, 100):
            await ob.add([NewRecord("inference_stats", data)] * 100)
        batched = records / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        await asyncio.gather(
            *(ob.add([NewRecord("inference_stats", data)]) for _ in range(singles))
        )
        concurrent = singles / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        drained = 0
        while (b := await ob.next_batch(500, 256 * 1024)) is not None:
            await ob.ack(b.record_ids)
            drained += len(b.records)
        drain = drained / (time.perf_counter() - t0)
    if drained != records + singles:
        raise RuntimeError(f"outbox: {drained} drained of {records + singles} added")
    return {
        "records": records,
        "add_batched_per_s": round(batched),
        "concurrent_single_adds": singles,
        "add_concurrent_single_per_s": round(concurrent),
        "drain_per_s": round(drain),
    }


# ---- 2. link ------------------------------------------------------------------------


class _Peer:
    """A plain paho client on its own network thread: the far side of the link."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-peer")
        self.client.on_connect = lambda *a: connected.set()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not connected.wait(10):
            self.close()
            raise TimeoutError("the peer could not connect")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def link_phase(port: int, publishes: int, deliveries: int) -> dict[str, Any]:
    from edgefleet.core.mqtt import topics
    from edgefleet.core.mqtt.config import MqttConnectionConfig
    from edgefleet.core.mqtt.connection import MqttConnection
    from edgefleet.core.mqtt.messages import Message

    got = 0
    all_in = asyncio.Event()

    async def handler(msg: Message) -> None:
        nonlocal got
        got += 1
        if got == deliveries:
            all_in.set()

    config = MqttConnectionConfig.model_validate(connection_settings(port))
    link = MqttConnection(config, client_id=DEVICE)
    inbound = topics.device_topic(DEVICE, "commands")
    await link.subscribe(inbound, handler, queue_size=deliveries)
    await link.start()
    peer: _Peer | None = None
    try:
        async with asyncio.timeout(10):
            await link.wait_connected()
        payload = orjson.dumps({"schema": 1, "pad": "x" * 200})
        outbound = topics.device_topic(DEVICE, "events")
        t0 = time.perf_counter()
        await asyncio.gather(*(link.publish_nowait(outbound, payload) for _ in range(publishes)))
        out_rate = publishes / (time.perf_counter() - t0)
        peer = await asyncio.to_thread(_Peer, port)
        t0 = time.perf_counter()
        for _ in range(deliveries):
            peer.client.publish(inbound, payload, qos=1)
        async with asyncio.timeout(60):
            await all_in.wait()
        in_rate = deliveries / (time.perf_counter() - t0)
    finally:
        if peer is not None:
            await asyncio.to_thread(peer.close)
        await link.stop()
    return {
        "publishes": publishes,
        "qos1_publishes_acked_per_s": round(out_rate),
        "deliveries": deliveries,
        "delivered_to_handler_per_s": round(in_rate),
    }


# ---- 3. telemetry end to end --------------------------------------------------------


async def telemetry_phase(workdir: Path, port: int, records: int, batch: int) -> dict[str, Any]:
    from edgefleet.agent.config import FleetConfig
    from edgefleet.agent.mqtt_link import MqttLink
    from edgefleet.agent.outbox import NewRecord, Outbox
    from edgefleet.agent.telemetry_sender import TelemetrySender
    from edgefleet.core.mqtt.config import MqttConnectionConfig
    from edgefleet.fleet.bus import FleetBus
    from edgefleet.fleet.db import FleetDB
    from edgefleet.fleet.devices import create_device

    db = await FleetDB(workdir / "fleet.sqlite").open()
    try:
        await create_device(db, DEVICE)
        bus = FleetBus(
            db,
            MqttConnectionConfig.model_validate(connection_settings(port)),
            client_id="bench-fleet",
            bundle_url=lambda name, version: f"http://127.0.0.1:1/bundles/{name}/{version}",
        )
        cfg = FleetConfig.model_validate(
            connection_settings(
                port,
                outbox={"path": str(workdir / "outbox.sqlite"), "max_bytes": 1_000_000_000},
                telemetry={
                    "flush_interval_s": 0.05,
                    "batch_max_records": batch,
                    "ack_timeout_s": 30,
                },
            )
        )
        outbox = await Outbox(cfg.outbox.path, cfg.outbox.max_bytes).open()
        link = MqttLink(cfg, DEVICE)
        sender = TelemetrySender(outbox, link, cfg.telemetry)
        data = inference_stats("4")
        try:
            for _ in range(0, records, 1000):
                await outbox.add([NewRecord("inference_stats", data)] * 1000)
            await bus.start()
            async with asyncio.timeout(10):
                await bus.wait_connected()
            t0 = time.perf_counter()
            await sender.start()
            await link.start()
            async with asyncio.timeout(300):  # every record stored, acked and deleted
                while bus.stats.records < records or await outbox.record_ids():  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            seconds = time.perf_counter() - t0
        finally:
            await sender.stop()
            await link.stop()
            await outbox.close()
            await bus.stop()
        (stored,) = await db.read(
            lambda conn: conn.execute("SELECT count(*) FROM inference_stats").fetchone()
        )
    finally:
        await db.close()
    if stored != records or bus.stats.bad_stats:
        raise RuntimeError(
            f"telemetry: {stored} stored of {records} sent, {bus.stats.bad_stats} invalid"
        )
    return {
        "records": records,
        "batch_records": batch,
        "seconds": round(seconds, 2),
        "stored_and_acked_per_s": round(records / seconds),
    }


# ---- run ----------------------------------------------------------------------------


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"loop": type(asyncio.get_running_loop()).__module__.split(".")[0]}
    print("outbox …", flush=True)
    res["outbox"] = await outbox_phase(workdir, args.records)
    broker = Mosquitto(workdir / "mosquitto")
    await asyncio.to_thread(broker.start)
    try:
        print("link …", flush=True)
        res["link"] = await link_phase(broker.port, args.publishes, args.deliveries)
        print("telemetry end to end …", flush=True)
        res["telemetry"] = await telemetry_phase(workdir, broker.port, args.records, args.batch)
    finally:
        await asyncio.to_thread(broker.stop)
    return res


def render(res: dict[str, Any]) -> str:
    o, li, t = res["outbox"], res["link"], res["telemetry"]
    return "\n".join(
        [
            "## Device ⇄ fleet data path (`python -m bench mqtt`)",
            "",
            machine_markdown(res["machine"]),
            f"One process on the {res['loop']} event loop, Mosquitto on loopback"
            " (deploy/mosquitto/edgefleet.conf).",
            "",
            "| what | figure |",
            "|---|---|",
            f"| outbox `add`, batches of 100 records | {o['add_batched_per_s']:,} records/s |",
            "| outbox `add`, concurrent single-record adds (group commit) | "
            f"{o['add_concurrent_single_per_s']:,} records/s |",
            f"| outbox `next_batch` + `ack` (drain) | {o['drain_per_s']:,} records/s |",
            "| link: QoS 1 publishes with PUBACK futures, pipelined | "
            f"{li['qos1_publishes_acked_per_s']:,} msg/s |",
            "| link: messages from a paho client delivered to an async handler | "
            f"{li['delivered_to_handler_per_s']:,} msg/s |",
            "| telemetry end to end: outbox → sender → Mosquitto → fleet ingest → fleet SQLite"
            f" → ack → delete (batches of {t['batch_records']}) | "
            f"{t['stored_and_acked_per_s']:,} records/s ({t['records']:,} records, none lost) |",
        ]
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench mqtt", description=__doc__)
    parser.add_argument("--records", type=int, default=20_000, help="outbox and telemetry")
    parser.add_argument("--batch", type=int, default=500, help="telemetry records per batch")
    parser.add_argument("--publishes", type=int, default=10_000)
    parser.add_argument("--deliveries", type=int, default=5_000)
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="the event loop (auto: the agent's default, uvloop when installed)",
    )
    add_run_options(parser)
    args = parser.parse_args(argv)
    from edgefleet.core.aio import event_loop_factory

    busy_before = wait_until_quiet(args.wait_quiet)
    meter = CpuMeter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    try:
        with asyncio.Runner(loop_factory=event_loop_factory(args.loop)) as runner:
            res = runner.run(run(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = meter.stop()
    res["box_load"] = {"busy_share_before": round(busy_before, 3), **load}
    warn_if_busy(load["others_share_of_box"])
    res["machine"] = machine_info()
    write_result("mqtt", res)
    if not args.no_doc:
        write_doc_section("mqtt", render(res))
    print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())
    return 0

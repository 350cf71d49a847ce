"""The device link under attack (issue 9, findings 2 and 14), with real processes: the
fleet as ``edge-fleet serve`` (its embedded amqtt broker, or a real Mosquitto), plain
paho clients for the attackers and for the well-behaved device.

- The embedded broker authenticates: nobody without an enrolled device's secret (or
  the fleet's own password) logs in, so nobody can publish a retained ``desired``;
  and an enrolled device touches only its own topics.
- A device flooding telemetry does not hold up another device's acks: its messages
  are dropped by the fleet's per-device rate limit before they cost a parse or a
  database write.
"""

from __future__ import annotations

import json
import queue
import secrets
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgefleet.core.mqtt import topics
from tests.support.brokers import Mosquitto, Peer, free_port
from tests.support.fleet_server import ServedFleet


def api(fleet: ServedFleet, token: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        fleet.url + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def enrol(fleet: ServedFleet, token: str, device_id: str) -> dict[str, Any]:
    tok = api(fleet, token, "POST", "/v1/enrolment-tokens", {"device_id": device_id})
    req = urllib.request.Request(
        fleet.url + "/v1/enrol",
        data=json.dumps({"token": tok["token"]}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return dict(json.load(resp))


def connack(
    port: int, client_id: str, username: str | None = None, password: str | None = None
) -> int:
    """The broker's answer to a CONNECT: 0 accepted, anything else refused (-1: the
    connection was closed without an answer)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    answers: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    if username is not None:
        client.username_pw_set(username, password)
    client.on_connect = lambda c, u, f, rc, p: answers.put(int(rc.value))
    client.on_disconnect = lambda c, u, f, rc, p: answers.put(-1)
    client.reconnect_delay_set(30, 60)  # one attempt is the point
    client.connect("127.0.0.1", port, keepalive=5)
    client.loop_start()
    try:
        return answers.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


def suback(peer: Peer, topic_filter: str) -> list[int]:
    """SUBACK reason codes for one subscription (0x80 = refused)."""
    done: queue.Queue[list[int]] = queue.Queue()
    peer.client.on_subscribe = lambda c, u, mid, rcs, p: done.put([int(r.value) for r in rcs])
    peer.client.subscribe(topic_filter, 1)
    return done.get(timeout=10)


@pytest.fixture
def served(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[ServedFleet]:
    """``edge-fleet serve`` with its defaults: the embedded broker, on any free port."""
    fleet = ServedFleet(
        tmp_path,
        free_port(),
        ["--data-dir", str(tmp_path / "data"), "--mqtt-port", "0", "--trust-key", str(keys[1])],
    )
    yield fleet
    fleet.stop()


def test_the_embedded_broker_authenticates_devices_and_checks_their_topics(
    served: ServedFleet, tmp_path: Path
) -> None:
    token = (tmp_path / "data" / "admin.token").read_text().strip()
    a = enrol(served, token, "store-a")
    b = enrol(served, token, "store-b")
    port = a["mqtt"]["port"]
    secret_a, secret_b = a["mqtt"]["password"], b["mqtt"]["password"]

    # Nobody logs in without an enrolled device's secret (it used to take any username).
    assert connack(port, "anyone", "anyone") != 0
    assert connack(port, "anon") != 0
    assert connack(port, "store-a", "store-a", secret_a + "x") != 0
    assert connack(port, "store-a", "store-a", secret_b) != 0
    assert connack(port, "fleet", "fleet", "") != 0  # the fleet's account has a password
    assert connack(port, "not-store-a", "store-a", secret_a) != 0  # client id = device id
    assert connack(port, "store-a", "store-a", secret_a) == 0

    # Enrolled device B cannot reach A's topics: its retained desired never arrives.
    dev_a = Peer(port, "store-a", username="store-a", password=secret_a)
    dev_b = Peer(port, "store-b", username="store-b", password=secret_b)
    try:
        desired_a = topics.device_topic("store-a", topics.DESIRED)
        commands_a = topics.device_topic("store-a", topics.COMMANDS)
        assert suback(dev_a, desired_a) == [1]
        assert suback(dev_a, commands_a) == [1]
        assert suback(dev_b, desired_a) == [0x80]
        assert suback(dev_b, "edgefleet/v1/devices/+/telemetry") == [0x80]
        assert suback(dev_a, topics.device_topic("store-a", topics.TELEMETRY)) == [0x80]
        forged = {"schema": 1, "device_id": "store-a", "revision": 2**53 - 1, "models": {}}
        dev_b.publish(desired_a, json.dumps(forged), retain=True)
        dev_b.publish(commands_a, json.dumps({"schema": 1, "id": "c-x", "command": "resync"}))
        dev_a.publish(desired_a, json.dumps(forged), retain=True)  # nor A itself
        # The fleet's command goes through after them: it is what A receives, alone.
        sent = api(served, token, "POST", "/v1/devices/store-a/commands", {"command": "resync"})
        deadline = time.monotonic() + 20
        while not dev_a.received(commands_a) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [json.loads(p)["id"] for _, p, _ in dev_a.received(commands_a)] == [sent["id"]]
        assert dev_a.received(desired_a) == []
    finally:
        dev_a.close()
        dev_b.close()
    # A fresh session finds no retained desired either.
    again = Peer(port, "store-a", username="store-a", password=secret_a)
    try:
        assert suback(again, desired_a) == [1]
        assert suback(again, commands_a) == [1]
        sent = api(served, token, "POST", "/v1/devices/store-a/commands", {"command": "resync"})
        deadline = time.monotonic() + 20
        while not again.received(commands_a) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert again.received(commands_a) and again.received(desired_a) == []
    finally:
        again.close()


def test_an_enrolled_agent_follows_its_fleet_over_the_authenticated_broker(
    served: ServedFleet, tmp_path: Path, make_tiny_bundle: Any
) -> None:
    """The positive side, all real: ``edge-agent enroll`` records the fleet's URL, the
    agent logs in to the (now authenticating) embedded broker with its secret, and
    downloads what the fleet assigns from the enrolled origin, with its credentials."""
    import subprocess
    import sys

    import yaml

    from edgefleet.agent.config import load_config
    from tests.support.agent_process import AgentProcess

    token = (tmp_path / "data" / "admin.token").read_text().strip()
    tok = api(served, token, "POST", "/v1/enrolment-tokens", {"device_id": "store-e"})
    etc = tmp_path / "etc"
    config = etc / "agent.yaml"
    args = ["--fleet", served.url, "--token", tok["token"], "--config", str(config)]
    args += ["--data-dir", str(tmp_path / "var"), "--owner", ""]
    r = subprocess.run(
        [sys.executable, "-m", "edgefleet.agent", "enroll", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    cfg = load_config(config)
    assert cfg.fleet is not None and cfg.fleet.sync.fleet_url == served.url

    bundle = make_tiny_bundle("1").read_bytes()
    req = urllib.request.Request(
        served.url + "/v1/models",
        data=bundle,
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 201
    agent = AgentProcess(yaml.safe_load(config.read_text()), etc, free_port())
    try:
        deadline = time.monotonic() + 30
        while not api(served, token, "GET", "/v1/devices/store-e")["online"]:
            assert time.monotonic() < deadline, "the agent never came online"
            time.sleep(0.1)
        body = {"model": "tiny", "version": "1", "target": {"device": "store-e"}}
        api(served, token, "POST", "/v1/assignments", body)
        deadline = time.monotonic() + 60
        while True:
            model = api(served, token, "GET", "/v1/devices/store-e")["models"].get("tiny") or {}
            if model.get("state") in ("active", "failed"):
                break
            assert time.monotonic() < deadline, f"tiny never became active: {model}"
            time.sleep(0.1)
        assert (model["state"], model["active"]) == ("active", "1"), model
    finally:
        agent.stop()


# ----------------------------------------------------------------------- flooding

# 200 batches a second for 20 s, 500 new records each (the agent's batch_max_records):
# far more than the fleet can store, far less than it can drop. The good device sends
# halfway through, behind 2,000 flood batches.
FLOOD_BATCHES = 4_000
FLOOD_PER_TICK = 2  # every 10 ms
FLOOD_RECORDS = 500
GOOD_BATCHES = 5


def telemetry_batch(device_id: str, records: int, n: int | None = None) -> bytes:
    """A valid batch; record ids from batch number ``n`` (cheap), else random."""
    prefix = f"{n:016x}" if n is not None else secrets.token_hex(8)
    return orjson.dumps(
        {
            "schema": 1,
            "device_id": device_id,
            "batch_id": secrets.token_hex(16),
            "sent_at": time.time(),
            "outbox": {"dropped_low": 0, "dropped_high": 0, "waiting": 0},
            "records": [
                {
                    "id": f"{prefix}{i:016x}",
                    "seq": i,
                    "kind": "sample",
                    "priority": 0,
                    "ts": time.time(),
                    "data": {"i": i, "note": "flood"},
                }
                for i in range(records)
            ],
        }
    )


class Flood(threading.Thread):
    """A device publishing valid telemetry batches at QoS 1, paced, as fast as a broken
    or hostile agent might (raw paho: no outbox, no ack window)."""

    def __init__(self, port: int, device_id: str) -> None:
        super().__init__(name="flood", daemon=True)
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.device_id = device_id
        self.sent = 0
        self.stop = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.username_pw_set(device_id)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def run(self) -> None:
        topic = topics.device_topic(self.device_id, topics.TELEMETRY)
        tick = time.monotonic()
        while self.sent < FLOOD_BATCHES and not self.stop.is_set():
            for _ in range(FLOOD_PER_TICK):
                payload = telemetry_batch(self.device_id, FLOOD_RECORDS, self.sent)
                self.client.publish(topic, payload, qos=1)
                self.sent += 1
            tick += 0.01
            time.sleep(max(0.0, tick - time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        self.join(30)
        self.client.disconnect()
        self.client.loop_stop()


def test_a_flooding_device_does_not_hold_up_another_devices_acks(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """Issue 9, finding 14: 20,000 batches in 30 s from one device delayed every other
    device's acks to about 21 s. Measured by order, not by seconds: the good device's
    batches are all acked while the flood is still being sent."""
    token = "flood-test-admin-token"
    config = tmp_path / "fleet.yaml"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(tmp_path / "data"),
                "auth": {"token": token},
                "broker": {"host": "127.0.0.1", "port": mosquitto.port, "reconnect_min_s": 0.05},
            }
        )
    )
    fleet = ServedFleet(tmp_path, free_port(), ["--config", str(config)])
    flood: Flood | None = None
    good: Peer | None = None
    try:
        for device_id in ("store-flood", "store-good"):
            enrol(fleet, token, device_id)
        good = Peer(mosquitto.port, "store-good", username="store-good")
        acks_topic = topics.device_topic("store-good", topics.ACKS)
        good.subscribe(acks_topic)
        flood = Flood(mosquitto.port, "store-flood")
        flood.start()
        deadline = time.monotonic() + 60
        while flood.sent < FLOOD_BATCHES // 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flood.is_alive(), "the flood ended before the good device sent anything"

        sent_ids = []
        for _ in range(GOOD_BATCHES):
            payload = telemetry_batch("store-good", 1)
            sent_ids.append(orjson.loads(payload)["batch_id"])
            good.publish(topics.device_topic("store-good", topics.TELEMETRY), payload)
        deadline = time.monotonic() + 120
        while len(good.received(acks_topic)) < GOOD_BATCHES and time.monotonic() < deadline:
            time.sleep(0.01)
        flood_sent_at_acks = flood.sent
        acked = sorted(json.loads(p)["batch_id"] for _, p, _ in good.received(acks_topic))
        assert acked == sorted(sent_ids)
        assert flood_sent_at_acks < FLOOD_BATCHES, "the good device waited out the whole flood"
        flood.close()

        db = sqlite3.connect(f"file:{tmp_path / 'data' / 'fleet.sqlite'}?mode=ro", uri=True)
        try:
            stored = dict(
                db.execute("SELECT device_id, count(*) FROM telemetry GROUP BY device_id")
            )
        finally:
            db.close()
        assert stored["store-good"] == GOOD_BATCHES
        # The flood's batches past its rate were dropped unacked, and said so.
        assert "store-flood over its rate" in fleet.log_path.read_text()
    finally:
        if flood is not None:
            flood.close()
        if good is not None:
            good.close()
        fleet.stop()


def listener_blocks(conf: Path) -> dict[str, list[str]]:
    """Each ``listener`` line of a Mosquitto config → the directives right after it
    (up to the next listener or the first global one)."""
    scoped = ("protocol", "certfile", "keyfile", "cafile", "tls_version", "max_qos")
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in conf.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        if name == "listener":
            current = blocks.setdefault(value, [])
        elif current is not None and name in scoped:
            current.append(line)
        else:
            current = None
    return blocks


def test_the_shipped_listeners_cut_off_qos_2_publishers(
    mosquitto_factory: Any,
) -> None:
    """deploy/mosquitto production.conf and docker.conf: every listener has ``max_qos
    1``. A client publishing at QoS 2 (edgefleet never does; it costs the broker four
    packets and state per message) is disconnected; QoS 1 goes through. Run with the
    shipped loopback listener's own directives."""
    deploy = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
    for name in ("production.conf", "docker.conf"):
        blocks = listener_blocks(deploy / name)
        assert len(blocks) == 2 and all("max_qos 1" in b for b in blocks.values()), name
    port = free_port()
    block = listener_blocks(deploy / "production.conf")["1883 127.0.0.1"]
    broker = mosquitto_factory(extra_conf="\n".join([f"listener {port} 127.0.0.1", *block]))
    assert broker.port != port
    peer = Peer(port, "store-q")
    try:
        topic = topics.device_topic("store-q", topics.TELEMETRY)
        peer.publish(topic, b"{}", qos=1)
        gone = threading.Event()
        peer.client.on_disconnect = lambda *a: gone.set()
        peer.client.reconnect_delay_set(30, 60)
        peer.client.publish(topic, b"{}", qos=2)
        assert gone.wait(10), "a QoS 2 publisher stayed connected"
    finally:
        peer.close()

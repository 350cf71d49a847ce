"""The core MQTT connection (edgefleet.core.mqtt) against a real Mosquitto (and amqtt).

Every test starts its own broker on a free loopback port; keepalive and backoff
are short so outages resolve in well under a second. What the agent's device link
adds on top (retained status, Last Will) is tested in tests/agent/test_device_link.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgefleet.core.mqtt import topics
from edgefleet.core.mqtt.config import MqttConnectionConfig
from edgefleet.core.mqtt.connection import LinkState, MqttConnection
from edgefleet.core.mqtt.errors import LinkClosed, LinkRefused, PublishTimeout
from edgefleet.core.mqtt.filters import check_filter
from edgefleet.core.mqtt.messages import Message
from edgefleet.fleet.embedded_broker import EmbeddedBroker
from tests.support.brokers import (
    ROOT,
    Inbox,
    Mosquitto,
    TlsTerminator,
    connection_config,
    eventually,
    free_port,
)
from tests.support.tls import make_tls

DEV = "store-0042"
fleet_config = connection_config


@pytest.fixture
async def links() -> AsyncIterator[Callable[..., Any]]:
    """Start connections; every one is stopped at the end, even when the test fails."""
    made: list[MqttConnection] = []

    async def make(
        config: MqttConnectionConfig, client_id: str = DEV, start: bool = True
    ) -> MqttConnection:
        link = MqttConnection(config, client_id=client_id)
        made.append(link)
        if start:
            await link.start()
        return link

    yield make
    for link in made:
        await link.stop()


# ----------------------------------------------------------------------- basics


def test_topics_and_filters() -> None:
    assert topics.device_topic("d1", "telemetry") == "edgefleet/v1/devices/d1/telemetry"
    assert topics.all_devices("acks") == "edgefleet/v1/devices/+/acks"
    assert topics.parse_device_topic("edgefleet/v1/devices/d1/events") == ("d1", "events")
    assert topics.parse_device_topic("edgefleet/v1/devices/d1/nope") is None
    assert topics.parse_device_topic("other/v1/devices/d1/events") is None
    assert topics.shared("fleet", "a/+") == "$share/fleet/a/+"
    for bad in ("", "a/b", "a+", "#"):
        with pytest.raises(ValueError):
            topics.device_topic(bad, "status")
    for good in ("a/b", "a/+/c", "#", "a/#", "+"):
        assert check_filter(good) == good
    for bad in ("", "a/#/b", "a/b#", "a+/b", "$share/g", "$share//a", "$share/+/a"):
        with pytest.raises(ValueError):
            check_filter(bad)
    assert check_filter("$share/fleet/a/+") == "$share/fleet/a/+"


def test_a_connection_needs_a_valid_client_id() -> None:
    with pytest.raises(ValueError, match="client id"):
        MqttConnection(fleet_config(1))
    with pytest.raises(ValueError, match="client id"):
        MqttConnection(fleet_config(1), client_id="a/b")
    assert MqttConnection(fleet_config(1, client_id="x"), client_id="y").client_id == "y"
    assert MqttConnection(fleet_config(1, client_id="x")).client_id == "x"


def test_backoff_is_jittered_exponential_and_capped() -> None:
    link = MqttConnection(
        fleet_config(1, reconnect_min_s=1, reconnect_max_s=30),
        client_id=DEV,
        rng=random.Random(1),
    )
    for failures, cap in [(0, 1), (1, 2), (2, 4), (3, 8), (4, 16), (5, 30), (12, 30)]:
        delays = [link._backoff(failures) for _ in range(200)]
        assert all(cap / 2 <= d <= cap for d in delays), (failures, min(delays), max(delays))
        assert max(delays) - min(delays) > cap / 4  # really jittered


async def test_round_trip_qos1_and_nothing_said_about_itself(
    mosquitto: Mosquitto, links: Any, peers: Any
) -> None:
    """Acks as futures both ways; a plain connection (the fleet's) publishes nothing on
    its own: no birth, no farewell, no Will (the device link adds those)."""
    peer = peers(mosquitto.port)
    peer.subscribe("#")
    link = await links(fleet_config(mosquitto.port), start=False)
    inbox = Inbox()
    await link.subscribe(topics.device_topic(DEV, "commands"), inbox)
    await link.start()
    async with asyncio.timeout(5):
        await link.wait_connected()
    assert link.state is LinkState.CONNECTED and link.negotiated_protocol == "3.1.1"

    # out, QoS 1: the future resolves on the broker's PUBACK
    await link.publish(topics.device_topic(DEV, "telemetry"), b'{"schema":1}')
    await peer.wait_for(lambda: len(peer.received(topics.device_topic(DEV, "telemetry"))) == 1)
    # in, through the handler
    peer.publish(topics.device_topic(DEV, "commands"), b'{"schema":1,"command":"resync"}')
    await inbox.wait_for(1)
    assert inbox.got[0].json() == {"schema": 1, "command": "resync"}
    assert inbox.got[0].topic == topics.device_topic(DEV, "commands")

    link._abort_socket()  # a lost connection: a Will would go out now
    async with asyncio.timeout(5):
        await link.wait_disconnected()
        await link.wait_connected()
    await link.stop()
    await asyncio.sleep(0.2)
    assert {t for t, _, _ in peer.received()} == {
        topics.device_topic(DEV, "telemetry"),
        topics.device_topic(DEV, "commands"),
    }
    with pytest.raises(LinkClosed):
        await link.publish(topics.device_topic(DEV, "telemetry"), b"{}")


# ----------------------------------------------------------------- outages


@pytest.mark.parametrize("kill", [True, False], ids=["sigkill", "sigterm"])
async def test_resubscribes_after_every_broker_restart(
    mosquitto: Mosquitto, links: Any, peers: Any, kill: bool
) -> None:
    """SIGKILL loses the broker's session state (no autosave yet): only our own
    resubscription brings the handler back. SIGTERM keeps it (persistence)."""
    link = await links(fleet_config(mosquitto.port), start=False)
    inbox = Inbox()
    await link.subscribe(topics.device_topic(DEV, "commands"), inbox)
    await link.start()
    async with asyncio.timeout(5):
        await link.wait_connected()
    for round_ in range(2):
        await asyncio.to_thread(mosquitto.restart, kill)
        async with asyncio.timeout(5):
            await link.wait_disconnected()
            await link.wait_connected()
        peer = peers(mosquitto.port, client_id=f"peer-{round_}")
        peer.publish(topics.device_topic(DEV, "commands"), f'{{"n": {round_}}}')
        await inbox.wait_for(round_ + 1)
    assert [m.json()["n"] for m in inbox.got] == [0, 1]
    assert link.stats.connects == 3


async def test_boots_without_broker_and_connects_when_it_appears(
    mosquitto_factory: Callable[..., Mosquitto], links: Any
) -> None:
    broker = mosquitto_factory(start=False)
    link = await links(fleet_config(broker.port))
    await eventually(lambda: link.last_error is not None, within=5)
    assert "cannot reach broker" in link.last_error
    assert not link.connected
    await asyncio.sleep(0.5)  # several failed attempts, none of them blocking the loop
    assert link.state in (LinkState.WAITING, LinkState.CONNECTING)
    await asyncio.to_thread(broker.start)
    t0 = time.monotonic()
    async with asyncio.timeout(5):
        await link.wait_connected()
    # reconnect_max_s is 0.4: it must come up within one backoff step of the broker.
    assert time.monotonic() - t0 < 3
    assert link.last_error is None


async def test_the_loop_stays_responsive_while_the_broker_is_unreachable(links: Any) -> None:
    """A host that swallows SYNs: connect attempts time out without blocking the loop."""
    # 10.255.255.1 would go off-machine; a listening socket with a full backlog does
    # not reliably drop SYNs either. A port nobody listens on refuses at once instead,
    # so measure the loop's latency across many refused attempts.
    link = await links(fleet_config(free_port(), reconnect_min_s=0.01, reconnect_max_s=0.02))
    worst = 0.0
    for _ in range(50):
        t0 = time.monotonic()
        await asyncio.sleep(0.005)
        worst = max(worst, time.monotonic() - t0 - 0.005)
    assert worst < 0.25, f"event loop stalled {worst * 1000:.1f} ms"
    assert link.last_error and "cannot reach broker" in link.last_error


async def test_refused_login_stops_retrying_and_says_why(
    mosquitto_factory: Callable[..., Mosquitto], links: Any
) -> None:
    broker = mosquitto_factory(users={DEV: "right-password"})
    link = await links(fleet_config(broker.port, password="wrong"))
    with pytest.raises(LinkRefused) as info:
        async with asyncio.timeout(5):
            await link.wait_connected()
    assert "not authorized" in info.value.reason
    assert link.state is LinkState.REFUSED and link.last_error == info.value.reason
    await asyncio.sleep(0.5)  # ~10 backoff periods: it must not have tried again
    assert broker.log().count("not authorised") == 1
    assert link.stats.connects == 0
    # the right password (from a file, username defaulting to the client id) works
    pw = broker.workdir / "device.password"
    pw.write_text("right-password\n")
    ok = await links(fleet_config(broker.port, password_file=str(pw)), client_id=DEV)
    async with asyncio.timeout(5):
        await ok.wait_connected()


async def test_publish_while_broker_down_times_out_then_is_delivered(
    mosquitto: Mosquitto, links: Any, peers: Any
) -> None:
    """paho keeps an unacknowledged QoS 1 message and resends it after the reconnect:
    a PublishTimeout means "not confirmed yet", not "lost" (hence the outbox's own ids)."""
    fleet = peers(mosquitto.port, client_id="fleet", clean_session=False)
    fleet.subscribe(topics.all_devices("events"))
    link = await links(fleet_config(mosquitto.port))
    async with asyncio.timeout(5):
        await link.wait_connected()
    await asyncio.to_thread(mosquitto.stop)
    async with asyncio.timeout(5):
        await link.wait_disconnected()
    with pytest.raises(PublishTimeout):
        await link.publish(topics.device_topic(DEV, "events"), b'{"n":1}', puback_timeout_s=0.3)
    assert link.stats.publish_timeouts == 1
    await asyncio.to_thread(mosquitto.start)
    await fleet.wait_for(lambda: len(fleet.received()) == 1)
    assert fleet.received()[0][1] == b'{"n":1}'


# -------------------------------------------------------------- bad input


async def test_garbage_and_failing_handlers_do_not_break_the_link(
    mosquitto: Mosquitto, links: Any, peers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    link = await links(fleet_config(mosquitto.port, max_payload_bytes=1000), start=False)
    parsed: list[Any] = []

    async def strict(msg: Message) -> None:
        doc = msg.json()  # raises on garbage: the handler's business, logged by the link
        if not isinstance(doc, dict) or doc.get("schema") != 1:
            raise ValueError(f"wrong schema: {doc!r}")
        parsed.append(doc)

    slow_done: list[Message] = []

    async def slow(msg: Message) -> None:
        await asyncio.sleep(0.5)
        slow_done.append(msg)

    await link.subscribe(topics.device_topic(DEV, "commands"), strict)
    await link.subscribe(topics.device_topic(DEV, "desired"), slow)
    await link.start()
    async with asyncio.timeout(5):
        await link.wait_connected()
    peer = peers(mosquitto.port)
    cmd = topics.device_topic(DEV, "commands")
    peer.publish(topics.device_topic(DEV, "desired"), b'{"schema":1}')
    for junk in [
        b"",
        b"\xff\xfe\x00garbage",
        b"[1,2",
        b"null",
        b'{"schema":99}',
        b"x" * 5000,
        orjson.dumps({"schema": 1, "n": "x" * 2000}),
    ]:
        peer.publish(cmd, junk)
    peer.publish(cmd, b'{"schema":1,"n":1}')
    await eventually(lambda: parsed, within=5)
    # The slow handler on another topic did not hold the commands up.
    assert not slow_done
    assert parsed == [{"schema": 1, "n": 1}]
    assert link.connected
    assert link.stats.handler_errors == 5
    assert link.stats.messages_dropped == 2  # the two payloads over max_payload_bytes
    assert "handler for edgefleet/v1/devices/store-0042/commands failed" in caplog.text
    # still a working link in both directions
    await link.publish(topics.device_topic(DEV, "events"), b"{}")
    await eventually(lambda: slow_done, within=5)


async def test_handler_queue_bound_drops_a_flood(
    mosquitto: Mosquitto, links: Any, peers: Any
) -> None:
    link = await links(fleet_config(mosquitto.port), start=False)
    release = asyncio.Event()
    got: list[Message] = []

    async def stuck(msg: Message) -> None:
        await release.wait()
        got.append(msg)

    sub = await link.subscribe(topics.device_topic(DEV, "commands"), stuck)
    await link.start()
    async with asyncio.timeout(5):
        await link.wait_connected()
    peer = peers(mosquitto.port)
    for i in range(1200):
        peer.client.publish(topics.device_topic(DEV, "commands"), str(i), qos=1)
    await eventually(lambda: link.stats.messages_in >= 1200, within=10)
    assert sub.dropped == 1200 - 1000 - 1  # the queue holds 1000, the handler has one
    release.set()
    await eventually(lambda: len(got) >= 1001, within=5)
    assert link.connected


# ------------------------------------------------- protocols and other brokers


async def test_mqtt5_is_used_when_configured_and_negotiated(
    mosquitto: Mosquitto, links: Any, peers: Any
) -> None:
    link = await links(fleet_config(mosquitto.port, protocol=5))
    inbox = Inbox()
    await link.subscribe(topics.device_topic(DEV, "commands"), inbox)
    async with asyncio.timeout(5):
        await link.wait_connected()
    assert link.negotiated_protocol == "5"
    assert "(p5, c0" in mosquitto.log()  # MQTT 5, clean_start false: a persistent session
    peer = peers(mosquitto.port)
    peer.publish(topics.device_topic(DEV, "commands"), b"{}")
    await inbox.wait_for(1)


async def test_same_behaviour_on_the_embedded_amqtt_broker(
    amqtt_broker: EmbeddedBroker, links: Any, peers: Any
) -> None:
    """amqtt has no MQTT 5: a link configured for 5 falls back to 3.1.1 by itself; the
    rest (round trip, reconnect, resubscribe) is as on Mosquitto."""
    port = amqtt_broker.port
    # The broker runs in this loop: the peer's blocking calls go to a thread.
    peer = await asyncio.to_thread(peers, port)
    await asyncio.to_thread(peer.subscribe, topics.device_topic(DEV, "telemetry"))
    link = await links(fleet_config(port, protocol="5"), start=False)
    inbox = Inbox()
    await link.subscribe(topics.device_topic(DEV, "commands"), inbox)
    await link.start()
    async with asyncio.timeout(10):
        await link.wait_connected()
    assert link.negotiated_protocol == "3.1.1"
    await link.publish(topics.device_topic(DEV, "telemetry"), b'{"schema":1}')
    await peer.wait_for(lambda: len(peer.received(topics.device_topic(DEV, "telemetry"))) == 1)
    await asyncio.to_thread(peer.publish, topics.device_topic(DEV, "commands"), b'{"schema":1}')
    await inbox.wait_for(1)
    # drop the connection without DISCONNECT: it comes back and resubscribes
    link._abort_socket()
    async with asyncio.timeout(5):
        await link.wait_disconnected()
        await link.wait_connected()
    await asyncio.to_thread(peer.publish, topics.device_topic(DEV, "commands"), b'{"schema":1}')
    await inbox.wait_for(2)


async def test_embedded_broker_checks_passwords(links: Any) -> None:
    broker = EmbeddedBroker(users={DEV: "s3cret"})
    await broker.start()
    try:
        bad = await links(fleet_config(broker.port, password="nope"))
        with pytest.raises(LinkRefused):
            async with asyncio.timeout(5):
                await bad.wait_connected()
        good = await links(fleet_config(broker.port, password="s3cret"))
        async with asyncio.timeout(5):
            await good.wait_connected()
        await bad.stop()
        await good.stop()
    finally:
        await broker.stop()


async def test_device_acl_confines_a_device_to_its_subtree(
    mosquitto_factory: Callable[..., Mosquitto], links: Any, peers: Any
) -> None:
    broker = mosquitto_factory(
        users={"fleet": "fleet-pw", DEV: "dev-pw", "store-0043": "other-pw"},
        acl_file=Path(ROOT / "deploy" / "mosquitto" / "acl"),
    )
    fleet = peers(broker.port, client_id="fleet", username="fleet", password="fleet-pw")
    fleet.subscribe(topics.all_devices("telemetry"))
    link = await links(fleet_config(broker.port, password="dev-pw"), start=False)
    inbox = Inbox()
    await link.subscribe(topics.device_topic(DEV, "desired"), inbox)
    # Mosquitto 2.0.11 grants a 3.1.1 SUBSCRIBE outside the ACL but delivers nothing.
    await link.subscribe(topics.device_topic("store-0043", "desired"), inbox)
    await link.start()
    async with asyncio.timeout(5):
        await link.wait_connected()
    # Pretending to be another store: Mosquitto 2.0.11 drops the message *and the
    # connection* of a 3.1.1 client; the link reconnects by itself.
    with contextlib.suppress(PublishTimeout):
        await link.publish(
            topics.device_topic("store-0043", "telemetry"), b'{"forged":true}', puback_timeout_s=1
        )
    async with asyncio.timeout(5):
        await link.wait_connected()
    await link.publish(topics.device_topic(DEV, "telemetry"), b'{"own":true}')
    await fleet.wait_for(lambda: len(fleet.received()) >= 1)
    fleet.publish(topics.device_topic("store-0043", "desired"), b'{"theirs":true}')
    fleet.publish(topics.device_topic(DEV, "desired"), b'{"ours":true}')
    await inbox.wait_for(1)
    await asyncio.sleep(0.2)
    assert [t for t, _, _ in fleet.received()] == [topics.device_topic(DEV, "telemetry")]
    assert [m.json() for m in inbox.got] == [{"ours": True}]


async def test_pipelined_publishes_and_deliveries_all_complete(
    mosquitto: Mosquitto, links: Any, peers: Any
) -> None:
    """Pipelined QoS 1 publishes all get their PUBACK, and a burst from a peer all reaches
    the handler, through a real Mosquitto on loopback. Speed: ``python -m bench mqtt``."""
    link = await links(fleet_config(mosquitto.port), start=False)
    inbox = Inbox()
    await link.subscribe(topics.device_topic(DEV, "commands"), inbox)
    await link.start()
    async with asyncio.timeout(5):
        await link.wait_connected()
    n = 1000
    payload = orjson.dumps({"schema": 1, "pad": "x" * 200})
    futures = [link.publish_nowait(topics.device_topic(DEV, "events"), payload) for _ in range(n)]
    await asyncio.gather(*futures)
    peer = peers(mosquitto.port)
    infos = [
        peer.client.publish(topics.device_topic(DEV, "commands"), payload, qos=1)
        for _ in range(500)
    ]
    await inbox.wait_for(500, within=30)
    assert all(i.rc == 0 for i in infos)
    assert link.stats.published >= n


def make_tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for the name ``localhost`` only."""
    f = make_tls(d, names=("localhost",))
    return f.ca, f.cert, f.key


async def test_tls_with_hostname_check(
    mosquitto_factory: Callable[..., Mosquitto], links: Any, tmp_path: Path
) -> None:
    """TLS made by asyncio (non-blocking handshake), then handed to paho."""
    ca, cert, key = make_tls_files(tmp_path / "tls")
    broker = mosquitto_factory(start=False)
    broker.extra_conf = f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    broker.start()
    link = await links(fleet_config(broker.port, host="localhost", tls={"ca_file": str(ca)}))
    inbox = Inbox()
    await link.subscribe(topics.device_topic(DEV, "commands"), inbox)
    async with asyncio.timeout(5):
        await link.wait_connected()
    await link.publish(topics.device_topic(DEV, "commands"), b'{"schema":1}')
    await inbox.wait_for(1)
    # the right server under a name its certificate does not carry is refused...
    bad = await links(fleet_config(broker.port, host="127.0.0.1", tls={"ca_file": str(ca)}))
    await eventually(lambda: bad.last_error is not None, within=5)
    assert "certificate" in bad.last_error.lower() or "hostname" in bad.last_error.lower()
    assert not bad.connected
    # ...unless hostname checks are off (a lab broker)
    lab = await links(
        fleet_config(
            broker.port, host="127.0.0.1", tls={"ca_file": str(ca), "verify_hostname": False}
        )
    )
    async with asyncio.timeout(5):
        await lab.wait_connected()


async def test_tls_burst_is_delivered_without_waiting_for_more_bytes(
    mosquitto: Mosquitto, links: Any, peers: Any, tmp_path: Path
) -> None:
    """paho issue 131: behind TLS, several MQTT packets may share one TLS record. paho
    handles one packet per ``loop_read``; the rest sits decrypted in the SSL object,
    where no socket event announces it. A burst followed by silence (here: the
    retained documents every fleet process gets at connect, QoS 1) must still arrive
    whole, not wait for the next keepalive.

    The broker is a real Mosquitto behind a TLS terminator (as with HAProxy or a cloud
    load balancer): Mosquitto's own TLS listener writes one record per packet, which
    hides the bug; a terminator relays whatever arrived in one record."""
    n = 2000
    peer = peers(mosquitto.port)
    for i in range(n):
        peer.client.publish(f"burst/{i}", f'{{"n":{i}}}', qos=1, retain=True)
    peer.publish("burst/done", b"{}", retain=True)  # acked: the broker has them all

    tls = make_tls(tmp_path / "tls", names=("localhost",))
    terminator = TlsTerminator(tls.server_context(), mosquitto.port)
    try:
        # keepalive 60: no PINGRESP (a socket event) comes within the test's deadline.
        cfg = fleet_config(
            terminator.port, host="localhost", tls={"ca_file": str(tls.ca)}, keepalive_s=60
        )
        link = await links(cfg, start=False)
        inbox = Inbox()
        await link.subscribe("burst/#", inbox, qos=1, queue_size=n + 1)
        await link.start()
        async with asyncio.timeout(5):
            await link.wait_connected()
        with contextlib.suppress(TimeoutError):
            await inbox.wait_for(n + 1, within=10)
        assert len(inbox.got) == n + 1, f"{len(inbox.got)} of {n + 1} delivered"
        assert len({m.topic for m in inbox.got}) == n + 1
        await link.stop()
    finally:
        await asyncio.to_thread(terminator.close)

"""Real MQTT brokers for tests: Mosquitto as a subprocess, amqtt in-process.

``Mosquitto`` (bench/mosquitto.py, shared with the benchmarks) runs ``mosquitto -c
CONF`` with deploy/mosquitto/edgefleet.conf on a free loopback port in its own
directory, and can be stopped (cleanly or SIGKILL) and started again on the same port
with the same persistence file, for outage tests. ``TlsTerminator`` puts TLS in front
of a plain broker the way a load balancer does. The fixtures are in
tests/support/broker_fixtures.py (loaded by tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgefleet.agent.config import FleetConfig
    from edgefleet.core.mqtt.config import MqttConnectionConfig
    from edgefleet.core.mqtt.messages import Message

# The Mosquitto runner lives in bench (a benchmark must not import test code); the
# tests use the same class, re-exported here with the config directory.
from bench.mosquitto import DEPLOY, Mosquitto  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Peer:
    """A plain paho client on its own network thread: the far side of a test.

    Deliberately *not* our link: the fleet side is another codebase, and a test that
    used our own client on both ends could hide a shared mistake.
    """

    def __init__(
        self,
        port: int,
        client_id: str = "test-peer",
        *,
        username: str | None = "test-peer",
        password: str | None = None,
        clean_session: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self.subscriptions: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self._connected.clear()
        self.client.connect(host, port, keepalive=5)
        self.client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise TimeoutError("peer could not connect")

    def _on_connect(
        self, client: object, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        # Network thread. Re-subscribe after every reconnect, as a real fleet must.
        for topic_filter, qos in self.subscriptions:
            self.client.subscribe(topic_filter, qos)
        self._connected.set()

    def _on_message(self, client: object, userdata: object, msg: object) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))  # type: ignore[attr-defined]

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        import threading

        done = threading.Event()
        self.subscriptions.append((topic_filter, qos))
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(topic_filter, qos)
        if not done.wait(10):
            raise TimeoutError(f"no SUBACK for {topic_filter}")

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(10)

    def received(self, topic: str | None = None) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return [m for m in self.messages if topic is None or m[0] == topic]

    async def wait_for(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        import asyncio

        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met in {within} s; got {self.messages[-5:]}")
            await asyncio.sleep(0.01)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def eventually(
    predicate: Callable[[], object], within: float = 10.0, every: float = 0.01
) -> None:
    """Poll ``predicate`` (sync) until true; TimeoutError after ``within`` seconds."""
    import asyncio

    async with asyncio.timeout(within):
        while True:
            if predicate():
                return
            await asyncio.sleep(every)


def _test_link_settings(port: int, overrides: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "keepalive_s": 2,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.4,
        "connect_timeout_s": 3,
        "publish_timeout_s": 5,
    }
    doc.update(overrides)
    return doc


def connection_config(port: int, **overrides: Any) -> MqttConnectionConfig:
    """A core MQTT connection config for tests: loopback, short keepalive and backoff."""
    from edgefleet.core.mqtt.config import MqttConnectionConfig

    return MqttConnectionConfig.model_validate(_test_link_settings(port, overrides))


def link_config(port: int, **overrides: Any) -> FleetConfig:
    """A device link config (the agent's ``fleet:`` section) with the same test timers."""
    from edgefleet.agent.config import FleetConfig

    return FleetConfig.model_validate(_test_link_settings(port, overrides))


class Inbox:
    """An MQTT message handler that records what it got (loop thread)."""

    def __init__(self) -> None:
        self.got: list[Message] = []
        self.event = asyncio.Event()

    async def __call__(self, msg: Message) -> None:
        self.got.append(msg)
        self.event.set()

    async def wait_for(self, n: int, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while len(self.got) < n:
                self.event.clear()
                await self.event.wait()


class TlsTerminator:
    """TLS in front of a plain-TCP broker, as HAProxy, nginx or a cloud load balancer
    terminate it: real TLS on ``port``, bytes relayed to and from ``upstream_port``.

    Like those proxies it relays whatever has arrived in one write, so one TLS record
    may carry several MQTT packets (Mosquitto's own TLS listener writes one record
    per packet). Runs its own event loop on a thread of its own, so it behaves the
    same whatever the test's loop does; ``close()`` ends it.
    """

    def __init__(self, context: ssl.SSLContext, upstream_port: int) -> None:
        self.context = context
        self.upstream_port = upstream_port
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-terminator", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("TLS terminator did not start")

    def _run(self) -> None:
        # Its own thread and loop: everything below runs here.
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, ssl=self.context
        )

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        self._conns |= {client_w, up_w}
        await asyncio.gather(self._pump(client_r, up_w), self._pump(up_r, client_w))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._conns):
            w.close()  # the relays see EOF and end by themselves
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=5)
            for t in late:
                t.cancel()

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def agent_fleet_section(port: int, tmp: Path) -> dict[str, Any]:
    """An agent config's ``fleet:`` section for a local test broker, with short timers."""
    return {
        "host": "127.0.0.1",
        "port": port,
        "keepalive_s": 2,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.3,
        "outbox": {"path": str(tmp / "outbox.sqlite")},
        "telemetry": {"flush_interval_s": 0.05, "ack_timeout_s": 1},
    }

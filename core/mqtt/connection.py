"""An MQTT client connection: paho-mqtt 2.x driven by the asyncio event loop.

Threading model (the one rule everything here follows): **every paho call and every
paho callback runs on the event loop's thread.** paho never gets a thread of its
own (no ``loop_start``/``loop_forever``); instead, as in aiomqtt 2.x's client, its
socket callbacks register the socket with the loop (``add_reader``/``add_writer``)
and the loop calls ``loop_read``/``loop_write`` when the socket is ready, and a
timer calls ``loop_misc`` for keepalive. paho calls our ``on_*`` callbacks
synchronously from inside those calls, so they may touch asyncio futures, events
and queues directly — they are on the loop thread.

paho's own ``connect()`` is blocking (DNS, TCP connect, TLS handshake: seconds on
a bad network) and would freeze the inference server. So the TCP connection and
the TLS handshake are made with asyncio here, and :class:`_Client` hands the
ready socket to paho through ``_create_socket`` (a private paho hook, stable in
2.x; paho is pinned in constraints.txt and the tests exercise it).

Contract (docs/mqtt.md): MQTT 3.1.1 baseline, v5 only when configured *and* the
broker negotiates it; persistent session (clean_session False, stable client id);
acks as futures (a QoS 1 publish resolves on the PUBACK); subscriptions re-made
after every reconnect (the broker may have lost the session); jittered exponential
backoff; no retry after a refused login.

What a connection says about itself is its owner's business: a subclass may give a
Last Will (:meth:`MqttConnection.last_will`), a message published on every connect
before the subscriptions (:meth:`~MqttConnection.birth_message`) and one published
at a clean stop (:meth:`~MqttConnection.farewell_message`). The agent's device link
(``agent/mqtt_link.py``) uses them for its retained ``status``; the fleet uses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.core.mqtt.config import MqttConnectionConfig
from edgefleet.core.mqtt.errors import (
    LinkClosed,
    LinkError,
    LinkRefused,
    PublishRefused,
    PublishTimeout,
)
from edgefleet.core.mqtt.filters import check_filter
from edgefleet.core.mqtt.messages import Handler, Message, Subscription

log = logging.getLogger(__name__)

# CONNACK reasons that another attempt with the same settings cannot fix (the v3.1.1
# return codes 2, 4 and 5 arrive mapped to these v5 values by paho).
_REFUSED_FOR_GOOD = {
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized (wrong credentials, or the broker's ACL refuses this client)",
    0x8A: "banned",
    0x8C: "bad authentication method",
}
_UNSUPPORTED_PROTOCOL = 0x84


class LinkState(enum.StrEnum):
    STOPPED = "stopped"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    WAITING = "waiting"  # backing off before the next attempt
    REFUSED = "refused"  # the broker refused the login; no more attempts


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message a connection sends on its own (Last Will, birth, farewell)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass
class LinkStats:
    connects: int = 0
    disconnects: int = 0
    messages_in: int = 0
    messages_dropped: int = 0  # oversized, undecodable topic, or a full handler queue
    handler_errors: int = 0
    published: int = 0
    publish_timeouts: int = 0


@dataclass
class _Attempt:
    """One connection attempt: resolved by paho's callbacks on the loop thread."""

    connack: asyncio.Future[ReasonCode]
    closed: asyncio.Future[str]
    started: float = field(default_factory=time.monotonic)
    suback_mid: int | None = None


class _Client(mqtt.Client):
    """paho's client, fed a socket that asyncio already connected (see module doc)."""

    next_socket: socket.socket | None = None

    def _create_socket(self) -> Any:
        # Called by paho's reconnect() on the loop thread. The socket is connected
        # (and TLS-handshaken) already, so reconnect() never blocks.
        sock, self.next_socket = self.next_socket, None
        if sock is None:
            raise OSError("no connected socket was prepared for paho")
        return sock


def _check_client_id(client_id: str) -> str:
    if not client_id or any(c in client_id for c in "/+#\x00"):
        raise ValueError(f"invalid client id {client_id!r}: no '/', '+', '#' or NUL, not empty")
    return client_id


class MqttConnection:
    """One client connection to a broker.

    ``start()`` returns at once; the connection is made in the background and made
    again after every loss until ``stop()`` (or until the broker refuses the login).
    Every method runs on the event loop's thread; none blocks it.
    """

    def __init__(
        self,
        config: MqttConnectionConfig,
        *,
        client_id: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``client_id``: overrides ``config.client_id``; one of them must be given.

        The login name is ``config.username``, or the client id when that is None.
        """
        chosen = client_id or config.client_id
        if chosen is None:
            raise ValueError("an MQTT connection needs a client id (config.client_id or given)")
        self.config = config
        self.client_id = _check_client_id(chosen)
        self.stats = LinkStats()
        self.last_error: str | None = None
        self.negotiated_protocol: str | None = None
        self._rng = rng or random.Random()
        self._state = LinkState.STOPPED
        self._connected = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._subs: list[Subscription] = []
        self._pending_pubs: dict[int, tuple[asyncio.Future[None], asyncio.TimerHandle]] = {}
        self._pending_subs: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._protocol: MQTTProtocolVersion = (
            MQTTProtocolVersion.MQTTv5 if config.protocol == "5" else MQTTProtocolVersion.MQTTv311
        )
        self._client: _Client | None = None
        self._attempt: _Attempt | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._misc_timer: asyncio.TimerHandle | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._password: str | None = None

    # ------------------------------------------------------- hooks for subclasses

    def last_will(self) -> OutgoingMessage | None:
        """The Last Will the broker publishes when the connection is lost without a
        DISCONNECT. Asked for each new paho client (loop thread). None: no Will."""
        return None

    def birth_message(self) -> OutgoingMessage | None:
        """Published after every CONNACK, before the subscriptions are re-made (loop
        thread, inside paho's callback). None: nothing."""
        return None

    def farewell_message(self) -> OutgoingMessage | None:
        """Published by a clean ``stop()`` while connected, since a clean DISCONNECT
        suppresses the Will. None: nothing."""
        return None

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def connected(self) -> bool:
        """Connected and (re)subscribed: publishes go out now."""
        return self._connected.is_set()

    @property
    def protocol_version(self) -> str:
        """The MQTT version the current (or next) attempt speaks: ``"5"`` or ``"3.1.1"``."""
        return "5" if self._protocol == mqtt.MQTTv5 else "3.1.1"

    async def wait_connected(self) -> None:
        """Wait until connected and subscribed; raises LinkRefused or LinkClosed.

        Bound it with ``asyncio.timeout``; the connection keeps trying meanwhile.
        """
        while not self._connected.is_set():
            if self._state is LinkState.REFUSED:
                raise LinkRefused(self.last_error or "login refused")
            if self._state is LinkState.STOPPED:
                raise LinkClosed("link is stopped")
            self._state_changed.clear()
            await self._state_changed.wait()

    async def wait_state(self, state: LinkState) -> None:
        while self._state is not state:
            self._state_changed.clear()
            await self._state_changed.wait()

    async def wait_disconnected(self) -> None:
        while self._connected.is_set():
            self._state_changed.clear()
            await self._state_changed.wait()

    async def start(self) -> None:
        if self._supervisor is not None:
            raise RuntimeError("link already started")
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self.last_error = None
        # Read once, off the loop (a file): every client made later logs in with it.
        self._password = await asyncio.to_thread(self.config.secret)
        self._client = self._make_client(self._protocol)
        for sub in self._subs:
            self._start_worker(sub)
        self._set_state(LinkState.CONNECTING)
        self._supervisor = asyncio.create_task(self._run(), name=f"mqtt-link-{self.client_id}")

    async def stop(self, grace_s: float = 3.0) -> None:
        """Send the farewell (if any), disconnect cleanly, end every task it started."""
        if self._supervisor is None:
            return
        self._stopping = True
        client, attempt = self._client, self._attempt
        farewell = self.farewell_message()
        if client is not None and self._connected.is_set() and farewell is not None:
            with contextlib.suppress(LinkError, TimeoutError):
                await self._queue_publish(
                    farewell.topic, farewell.payload, farewell.qos, farewell.retain, grace_s / 2
                )
        if client is not None and attempt is not None and client.socket() is not None:
            client.disconnect()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                async with asyncio.timeout(grace_s / 2):
                    await asyncio.shield(attempt.closed)
            self._abort_socket()
        self._supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._supervisor
        self._supervisor = None
        self._abort_socket()
        self._cancel_misc_timer()
        workers = [s.worker for s in self._subs if s.worker is not None]
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for s in self._subs:
            s.worker = None
        self._fail_pending(LinkClosed("link stopped"))
        self._set_connected(False)
        self._set_state(LinkState.STOPPED)

    def publish_nowait(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        puback_timeout_s: float | None = None,
    ) -> asyncio.Future[None]:
        """Queue a message now; the future resolves on the broker's PUBACK (QoS 1).

        While disconnected paho keeps QoS 1 messages and sends them after the next
        CONNACK, so the future may still resolve after a reconnect. A PUBACK only
        means the *broker* has the message (see docs/mqtt.md: it is not proof of
        delivery to the fleet).
        """
        if self._stopping:
            raise LinkClosed("link is stopping")
        return self._queue_publish(topic, payload, qos, retain, puback_timeout_s)

    def _queue_publish(
        self, topic: str, payload: bytes | str, qos: int, retain: bool, timeout: float | None
    ) -> asyncio.Future[None]:
        if self._client is None or self._loop is None or self._supervisor is None:
            raise LinkClosed("link is not running")
        fut: asyncio.Future[None] = self._loop.create_future()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            fut.set_exception(LinkError(f"publish refused by paho: {mqtt.error_string(info.rc)}"))
            return fut
        self.stats.published += 1
        if qos == 0:
            fut.set_result(None)
            return fut
        mid = info.mid
        wait = self.config.publish_timeout_s if timeout is None else timeout
        timer = self._loop.call_later(wait, self._publish_timed_out, mid, wait)
        self._pending_pubs[mid] = (fut, timer)
        return fut

    async def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        puback_timeout_s: float | None = None,
    ) -> None:
        """Publish and wait for the PUBACK (QoS 1); raises PublishTimeout or LinkClosed."""
        await self.publish_nowait(topic, payload, qos, retain, puback_timeout_s)

    async def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, queue_size: int = 1000
    ) -> Subscription:
        """Deliver messages matching ``topic_filter`` to ``handler`` (one at a time, in order).

        The subscription is re-made on every reconnect. When connected this waits for
        the SUBACK; otherwise it returns at once and the next connect subscribes.
        A handler that raises or is slow harms only its own subscription; past
        ``queue_size`` waiting messages, new ones are dropped (and counted).
        """
        check_filter(topic_filter)
        sub = Subscription(topic_filter, handler, qos, asyncio.Queue(queue_size))
        self._subs.append(sub)
        if self._supervisor is not None:
            self._start_worker(sub)
        # After CONNACK (even before the resubscription's SUBACK, which this filter is
        # not part of) subscribe now; before CONNACK, on_connect will include it.
        if self._client is not None and self._state is LinkState.CONNECTED:
            rc, mid = self._client.subscribe(topic_filter, qos)
            if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None and self._loop is not None:
                fut = self._loop.create_future()
                self._pending_subs[mid] = fut
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.publish_timeout_s):
                        codes = await fut
                        self._check_suback([sub], codes)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        if sub.worker is not None:
            sub.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sub.worker
            sub.worker = None
        still_used = any(s.topic_filter == sub.topic_filter for s in self._subs)
        if self._client is not None and self._connected.is_set() and not still_used:
            self._client.unsubscribe(sub.topic_filter)

    # ------------------------------------------------------------- the supervisor

    async def _run(self) -> None:
        """Connect, stay connected, reconnect with jittered backoff (a task on the loop)."""
        failures = 0
        while not self._stopping:
            self._set_state(LinkState.CONNECTING)
            try:
                stayed_up = await self._connect_once()
            except LinkRefused as exc:
                self.last_error = exc.reason
                log.error("MQTT: %s; not retrying (fix the credentials and restart)", exc.reason)
                self._set_state(LinkState.REFUSED)
                return
            if self._stopping:
                return
            # A connection that held for a while resets the backoff; one that the broker
            # drops right after CONNACK (e.g. a session take-over loop) keeps growing it.
            failures = 0 if stayed_up >= max(5.0, self.config.keepalive_s) else failures + 1
            delay = self._backoff(failures)
            log.info("MQTT: next attempt in %.2f s (%s)", delay, self.last_error)
            self._set_state(LinkState.WAITING)
            await asyncio.sleep(delay)

    def _backoff(self, failures: int) -> float:
        """Exponential, capped, with "equal jitter": thousands of stores that lost the
        same broker at once must not come back in lockstep."""
        if failures == 0:
            cap = self.config.reconnect_min_s
        else:
            cap = min(self.config.reconnect_max_s, self.config.reconnect_min_s * 2**failures)
        return self._rng.uniform(cap / 2, cap)

    async def _connect_once(self) -> float:
        """One attempt; returns how long the connection stayed up (0 if it never came up)."""
        cfg = self.config
        host, port = cfg.host, cfg.effective_port
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                sock = await self._open_socket(host, port)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            what = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            self.last_error = f"cannot reach broker {host}:{port}: {what}"
            return 0.0
        assert self._loop is not None and self._client is not None
        client = self._client
        attempt = _Attempt(self._loop.create_future(), self._loop.create_future())
        self._attempt = attempt
        client.next_socket = sock
        props = None
        clean_start: Any = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self._protocol == mqtt.MQTTv5:
            # v5 persistent session: clean_start False plus a session expiry interval.
            clean_start = False
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = cfg.session_expiry_s
        try:
            client.connect_async(
                host, port, cfg.keepalive_s, clean_start=clean_start, properties=props
            )
            client.reconnect()  # non-blocking: the socket is ready; CONNECT is queued
        except (OSError, ValueError) as exc:
            sock.close()
            self.last_error = f"connect to {host}:{port} failed: {exc}"
            return 0.0
        self._schedule_misc()
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                first: list[asyncio.Future[Any]] = [attempt.connack, attempt.closed]
                await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            self.last_error = f"no CONNACK from {host}:{port} within {cfg.connect_timeout_s} s"
            self._abort_socket()
        if not attempt.connack.done():
            await self._closed(attempt)
            if self._protocol == mqtt.MQTTv5 and not self._stopping:
                # amqtt and other 3.1.1-only brokers drop a v5 CONNECT without a word.
                self._fall_back_to_311("the broker closed the connection before CONNACK")
            return 0.0
        rc = attempt.connack.result()
        if rc.is_failure:
            await self._closed(attempt)
            if rc.value == _UNSUPPORTED_PROTOCOL and self._protocol == mqtt.MQTTv5:
                self._fall_back_to_311("the broker does not support MQTT 5")
                return 0.0
            reason = _REFUSED_FOR_GOOD.get(rc.value)
            if reason is not None:
                raise LinkRefused(f"broker {host}:{port} refused the login: {reason} ({rc})")
            self.last_error = f"broker {host}:{port} refused the connection: {rc}"
            return 0.0
        up_since = time.monotonic()
        # Connected means subscribed too; a broker that never SUBACKs gets dropped.
        subscribed = asyncio.ensure_future(self._connected.wait())
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                either: list[asyncio.Future[Any]] = [attempt.closed, subscribed]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            log.error("MQTT: no SUBACK within %s s; reconnecting", cfg.connect_timeout_s)
            self._abort_socket()
        finally:
            subscribed.cancel()
        await self._closed(attempt)
        return time.monotonic() - up_since

    async def _closed(self, attempt: _Attempt) -> None:
        try:
            self.last_error = await attempt.closed
        finally:
            self._attempt = None
            self._cancel_misc_timer()

    def _fall_back_to_311(self, why: str) -> None:
        log.warning("MQTT: %s; falling back to MQTT 3.1.1", why)
        self.last_error = f"{why}; using MQTT 3.1.1"
        self._protocol = MQTTProtocolVersion.MQTTv311
        self._client = self._make_client(self._protocol)

    async def _open_socket(self, host: str, port: int) -> socket.socket:
        """TCP connect (and TLS handshake) without blocking the loop."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        last: OSError = OSError(f"no address for {host}")
        for family, type_, proto, _, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, addr)
            except BaseException as exc:
                sock.close()
                if not isinstance(exc, OSError):
                    raise
                last = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.tls is None:
                return sock
            try:
                return await self._tls_handshake(sock, host)
            except BaseException:
                sock.close()
                raise
        raise last

    async def _tls_handshake(self, sock: socket.socket, host: str) -> socket.socket:
        tls = self.config.tls
        assert tls is not None and self._loop is not None
        ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.cert_file is not None:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        if not tls.verify_hostname:
            ctx.check_hostname = False
        ssock = ctx.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        while True:
            try:
                ssock.do_handshake()
                return ssock
            except ssl.SSLWantReadError:
                await self._fd_ready(ssock, write=False)
            except ssl.SSLWantWriteError:
                await self._fd_ready(ssock, write=True)

    async def _fd_ready(self, sock: socket.socket, write: bool) -> None:
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if write:
            self._loop.add_writer(sock.fileno(), ready)
        else:
            self._loop.add_reader(sock.fileno(), ready)
        try:
            await fut
        finally:
            if write:
                self._loop.remove_writer(sock.fileno())
            else:
                self._loop.remove_reader(sock.fileno())

    # ------------------------------------------------------------ paho plumbing

    def _make_client(self, protocol: MQTTProtocolVersion) -> _Client:
        cfg = self.config
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            # Persistent session: the broker keeps our subscriptions and queues QoS 1
            # messages (desired states, acks) while the store is offline.
            clean_session=False if protocol != mqtt.MQTTv5 else None,
            protocol=protocol,
            reconnect_on_failure=False,  # we reconnect, with our own backoff
        )
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        # A bug in one of our callbacks must not unwind paho's packet handling.
        client.suppress_exceptions = True
        username = cfg.username or self.client_id
        client.username_pw_set(username, self._password)
        will = self.last_will()
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    # Socket callbacks: run on the loop thread, inside paho calls we make on it
    # (reconnect, loop_read, loop_write, loop_misc, publish, disconnect).

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._fd = None

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.add_writer(self._fd, self._writable)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None and self._fd is not None:
            self._loop.remove_writer(self._fd)

    # Loop callbacks (loop thread): hand readiness to paho.

    def _readable(self) -> None:
        client = self._client
        if client is None:
            return
        client.loop_read()
        # paho issue 131: TLS decrypts whole records, and a record may hold several MQTT
        # packets (a TLS-terminating proxy or a broker that batches its writes packs
        # them so). loop_read handles one packet; the rest then sits decrypted inside
        # the SSL object, not in the kernel's buffer, so the loop would not call us
        # again until the next bytes arrive: read on while TLS has bytes pending (as
        # aiomqtt does). Each round consumes at least one byte, so this ends.
        sock = client.socket()
        while isinstance(sock, ssl.SSLSocket) and sock.pending() > 0:
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS or client.socket() is not sock:
                return

    def _writable(self) -> None:
        if self._client is not None:
            self._client.loop_write()

    def _schedule_misc(self) -> None:
        assert self._loop is not None
        self._cancel_misc_timer()
        interval = min(1.0, self.config.keepalive_s / 2)
        self._misc_timer = self._loop.call_later(interval, self._misc)

    def _misc(self) -> None:
        # Loop thread (a timer): keepalive pings, and dropping a connection whose
        # PINGRESP did not come within keepalive (a dead NAT, a pulled cable).
        self._misc_timer = None
        if self._client is not None and self._client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            self._schedule_misc()

    def _cancel_misc_timer(self) -> None:
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None

    def _abort_socket(self) -> None:
        """Drop the connection now, without DISCONNECT (so the Will fires if it was up)."""
        client = self._client
        sock = client.socket() if client is not None else None
        if client is None or sock is None:
            return
        if isinstance(sock, socket.socket):  # an SSLSocket is one too
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        # paho reads EOF, closes the socket (on_socket_close) and calls on_disconnect;
        # bytes still buffered are read first, hence the loop.
        for _ in range(1000):
            if client.socket() is None:
                return
            client.loop_read()

    # MQTT callbacks: run on the loop thread, from inside loop_read/loop_write/loop_misc.

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        attempt = self._attempt
        if attempt is None or attempt.connack.done():
            return
        attempt.connack.set_result(reason)
        if reason.is_failure:
            return
        self.stats.connects += 1
        self.negotiated_protocol = self.protocol_version
        log.info(
            "MQTT: connected to %s as %s (MQTT %s, session present: %s)",
            self.config.host,
            self.client_id,
            self.negotiated_protocol,
            flags.session_present,
        )
        self.last_error = None
        self._set_state(LinkState.CONNECTED)
        # Birth message, then the subscriptions: always re-made, session present or not,
        # because a broker restarted without persistence has forgotten them.
        birth = self.birth_message()
        if birth is not None:
            client.publish(birth.topic, birth.payload, qos=birth.qos, retain=birth.retain)
        filters = self._unique_filters()
        if not filters:
            self._set_connected(True)
            return
        rc, mid = client.subscribe(filters)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            log.error("MQTT: could not queue SUBSCRIBE: %s", mqtt.error_string(rc))
            self._set_connected(True)
            return
        attempt.suback_mid = mid

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._set_connected(False)
        if was_connected:
            self.stats.disconnects += 1
        why = "disconnected" if self._stopping else f"connection lost: {reason}"
        if was_connected and not self._stopping:
            log.warning("MQTT: %s", why)
        attempt = self._attempt
        if attempt is not None and not attempt.closed.done():
            attempt.closed.set_result(why)
        for fut in self._pending_subs.values():
            if not fut.done():
                fut.set_exception(LinkError("connection lost before SUBACK"))
        self._pending_subs.clear()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        entry = self._pending_pubs.pop(mid, None)
        if entry is None:
            return  # birth message, or a publish whose caller already timed out
        fut, timer = entry
        timer.cancel()
        if fut.done():
            return
        if reason.is_failure:
            fut.set_exception(PublishRefused(f"broker refused the message: {reason}"))
        else:
            fut.set_result(None)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        attempt = self._attempt
        if attempt is not None and attempt.suback_mid == mid:
            attempt.suback_mid = None
            filters = [f for f, _ in self._unique_filters()]
            for topic_filter, rc in zip(filters, reasons, strict=False):
                if rc.is_failure:
                    self.last_error = f"subscription to {topic_filter} refused: {rc}"
                    log.error("MQTT: %s", self.last_error)
            self._set_connected(True)
            return
        fut = self._pending_subs.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reasons)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Loop thread. Never await or run a handler here: hand the message to the
        # subscriptions' queues and return, so paho can PUBACK and read on.
        self.stats.messages_in += 1
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self.stats.messages_dropped += 1
            log.warning("MQTT: dropped a message whose topic is not UTF-8")
            return
        if len(msg.payload) > self.config.max_payload_bytes:
            self.stats.messages_dropped += 1
            log.warning(
                "MQTT: dropped %d-byte message on %s (limit %d)",
                len(msg.payload),
                topic,
                self.config.max_payload_bytes,
            )
            return
        message = Message(topic, bytes(msg.payload), msg.qos, bool(msg.retain))
        for sub in self._subs:
            if not mqtt.topic_matches_sub(sub.match_filter, topic):
                continue
            try:
                sub.queue.put_nowait(message)
            except asyncio.QueueFull:
                sub.dropped += 1
                self.stats.messages_dropped += 1
                if sub.dropped in (1, 10, 100) or sub.dropped % 1000 == 0:
                    log.warning(
                        "MQTT: handler for %s is behind; dropped %d messages",
                        sub.topic_filter,
                        sub.dropped,
                    )

    # ------------------------------------------------------------------ helpers

    def _start_worker(self, sub: Subscription) -> None:
        if sub.worker is None or sub.worker.done():
            name = f"mqtt-sub {sub.topic_filter}"
            sub.worker = asyncio.create_task(self._deliver(sub), name=name)

    async def _deliver(self, sub: Subscription) -> None:
        """One task per subscription: a slow handler delays only its own topic."""
        while True:
            message = await sub.queue.get()
            try:
                await sub.handler(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                sub.errors += 1
                self.stats.handler_errors += 1
                log.exception(
                    "MQTT: handler for %s failed on a message on %s",
                    sub.topic_filter,
                    message.topic,
                )

    def _unique_filters(self) -> list[tuple[str, int]]:
        best: dict[str, int] = {}
        for s in self._subs:
            best[s.topic_filter] = max(best.get(s.topic_filter, 0), s.qos)
        return list(best.items())

    def _check_suback(self, subs: list[Subscription], codes: list[ReasonCode]) -> None:
        for sub, rc in zip(subs, codes, strict=False):
            if rc.is_failure:
                self.last_error = f"subscription to {sub.topic_filter} refused: {rc}"
                log.error("MQTT: %s", self.last_error)

    def _publish_timed_out(self, mid: int, wait: float) -> None:
        entry = self._pending_pubs.pop(mid, None)
        if entry is None:
            return
        self.stats.publish_timeouts += 1
        fut, _ = entry
        if not fut.done():
            fut.set_exception(PublishTimeout(f"no PUBACK within {wait} s (message id {mid})"))

    def _fail_pending(self, exc: LinkError) -> None:
        for fut, timer in self._pending_pubs.values():
            timer.cancel()
            if not fut.done():
                fut.set_exception(exc)
        self._pending_pubs.clear()
        for sfut in self._pending_subs.values():
            if not sfut.done():
                sfut.set_exception(exc)
        self._pending_subs.clear()

    def _set_connected(self, up: bool) -> None:
        if up:
            self._connected.set()
        else:
            self._connected.clear()
        self._state_changed.set()

    def _set_state(self, state: LinkState) -> None:
        self._state = state
        self._state_changed.set()

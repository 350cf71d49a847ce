"""``edge-fleet serve``: config → database → broker → MQTT side → HTTP API, and back.

Start order is dependency order; stop is the reverse, each step run even when an
earlier one failed, so a stopped service leaves no task, thread or socket behind:

1. the fleet database (``fleet.sqlite`` in ``data_dir``; migrations run here);
2. the embedded amqtt broker, only when no external ``broker`` is configured;
3. the MQTT side (``fleet.bus.FleetBus``: ingest, desired states, rollouts);
4. the HTTP API. Its socket is bound *first* (a busy port fails the start before
   anything else runs, and with port 0 the bundle URLs the MQTT side publishes
   already carry the real port) but it accepts connections only at the end.

Without a config file (``edge-fleet serve --data-dir DIR``) everything has a
working default: a data directory in the current one, HTTP on 127.0.0.1:8480, the
embedded broker on 127.0.0.1:1883 and an admin token written to
``<data_dir>/admin.token`` (mode 0600) at first start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import ssl
from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web
from cryptography import x509

from edgefleet.core.bundle.signing import TrustStore
from edgefleet.core.errors import ConfigError
from edgefleet.core.mqtt.config import MqttConnectionConfig
from edgefleet.fleet.api import Authenticator, FleetApi, create_app
from edgefleet.fleet.audit import Audit
from edgefleet.fleet.broker_accounts import BrokerAccounts, DynsecAccounts, NoBrokerAccounts
from edgefleet.fleet.bundle_registry import Registry
from edgefleet.fleet.config import FleetServiceConfig
from edgefleet.fleet.console.sessions import Sessions
from edgefleet.fleet.db import FleetDB
from edgefleet.fleet.devices import Devices, EnrolmentInfo
from edgefleet.fleet.hard_examples import HardExamples
from edgefleet.fleet.metrics import metrics_for

log = logging.getLogger("edgefleet.fleet")

FLEET_MQTT_USER = "fleet"  # the fleet's username on the broker (deploy/mosquitto/acl)
_LOOPBACK = ("127.", "localhost", "::1")


def resolve_token(cfg: FleetServiceConfig) -> str:
    """The admin token: inline, from ``auth.token_file``, or made at first start.

    An explicitly configured file must exist (a typo must not silently create a new
    token); the default ``<data_dir>/admin.token`` is created when missing.
    """
    if cfg.auth.token is not None:
        return cfg.auth.token
    path = cfg.token_file
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        if cfg.auth.token_file is not None:
            raise ConfigError(f"auth.token_file {path} does not exist") from None
        # Prefixed like enrolment tokens: never a leading "-", recognisable when leaked.
        token = "efa_" + secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        # 0600 from the start: a chmod afterwards would leave a window.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log.warning("created the admin token in %s (give it to edge-fleet with --token-file)", path)
        return token
    except OSError as exc:
        raise ConfigError(f"cannot read the admin token file {path}: {exc.strerror}") from exc
    if len(token) < 16:
        raise ConfigError(f"the admin token in {path} is shorter than 16 characters")
    return token


def resolve_role_tokens(cfg: FleetServiceConfig) -> list[tuple[str, str, str]]:
    """``(name, role, token)`` for every ``auth.tokens`` entry; files must exist."""
    out: list[tuple[str, str, str]] = []
    for entry in cfg.auth.tokens:
        token = entry.token
        if entry.token_file is not None:
            try:
                token = entry.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"auth.tokens {entry.name}: cannot read {entry.token_file}: {exc.strerror}"
                ) from exc
        if token is None or len(token) < 16:
            raise ConfigError(f"auth.tokens {entry.name}: the token is shorter than 16 characters")
        out.append((entry.name, entry.role, token))
    return out


def _read_ca_cert(cfg: FleetServiceConfig) -> str | None:
    """The broker CA (PEM) enrolling devices get, checked to be a certificate."""
    path = cfg.enrolment.ca_file
    if path is None:
        return None
    try:
        pem = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"enrolment.ca_file {path}: cannot read: {exc}") from exc
    try:
        x509.load_pem_x509_certificates(pem.encode("ascii"))
    except ValueError as exc:
        raise ConfigError(f"enrolment.ca_file {path}: not a PEM certificate: {exc}") from exc
    return pem


def _ssl_context(cfg: FleetServiceConfig) -> ssl.SSLContext | None:
    if cfg.http.tls_cert_file is None or cfg.http.tls_key_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.http.tls_cert_file, cfg.http.tls_key_file)
    return ctx


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"cannot bind the fleet API to {host}:{port}: {exc.strerror}"
        ) from exc
    sock.setblocking(False)
    return sock


class FleetService:
    """The whole fleet service in this event loop: ``await start()``, ``await stop()``."""

    def __init__(self, cfg: FleetServiceConfig) -> None:
        self.cfg = cfg
        self.db: FleetDB | None = None
        self.broker: Any = None  # fleet.embedded_broker.EmbeddedBroker
        self.bus: Any = None  # fleet.bus.FleetBus
        self.runner: web.AppRunner | None = None
        self.registry: Registry | None = None
        self.devices: Devices | None = None
        self.accounts: BrokerAccounts | None = None
        self.retention: Any = None  # fleet.rollup.RetentionJob (chart roll-ups)
        self.token = ""
        self.url = ""  # the base URL devices and the CLI use
        self.mqtt_host = ""
        self.mqtt_port = 0
        self._sock: socket.socket | None = None

    def bundle_url(self, name: str, version: str) -> str:
        return f"{self.url}/v1/bundles/{quote(name, safe='')}/{quote(version, safe='')}"

    async def start(self) -> FleetService:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start(self) -> None:
        cfg = self.cfg
        self.token = resolve_token(cfg)
        try:
            auth = Authenticator.with_roles(self.token, resolve_role_tokens(cfg))
        except ValueError as exc:
            raise ConfigError(f"auth.tokens: {exc}") from exc
        ca_cert = _read_ca_cert(cfg)
        _log_trust(cfg)
        try:
            trust = TrustStore.from_files(cfg.trust.public_keys, cfg.trust.allow_unsigned)
            trusted_pems = [p.read_text(encoding="ascii") for p in cfg.trust.public_keys]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"trust.public_keys: {exc}") from exc
        ssl_ctx = _ssl_context(cfg)

        self._sock = _bind(cfg.http.host, cfg.http.port)
        self.url = cfg.http.base_url(self._sock.getsockname()[1])

        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = await FleetDB(cfg.db_path).open()
        self.registry = Registry(
            self.db,
            cfg.bundle_dir,
            trust,
            max_upload_bytes=cfg.http.max_upload_bytes,
            max_member_bytes=cfg.http.max_member_bytes,
        )
        await asyncio.to_thread(self.registry.prepare)

        broker_cfg = await self._start_broker()
        # Made (its password file read) before anything connects; started after the bus.
        self.accounts = self._make_accounts(broker_cfg)

        from edgefleet.fleet.bus import FleetBus  # the MQTT side (paho) only once it is needed

        self.bus = FleetBus(
            self.db,
            broker_cfg,
            client_id=broker_cfg.client_id or FLEET_MQTT_USER,
            bundle_url=self.bundle_url,
            shared_group=cfg.ingest.shared_group,
            device_rate_per_s=cfg.ingest.device_rate_per_s,
            device_burst=cfg.ingest.device_burst,
        )
        from edgefleet.fleet.rollup import RetentionJob

        self.bus.ingest.retention = cfg.telemetry.retention.rollup()  # before any record
        await self.bus.start()
        await self.accounts.start()
        self.retention = RetentionJob(self.db, self.bus.ingest.retention)
        await self.retention.start()

        bus = self.bus

        async def refresh(device_ids: list[str]) -> None:
            await bus.desired.refresh(device_ids)

        self.devices = Devices(
            self.db,
            EnrolmentInfo(
                mqtt_host=self.mqtt_host,
                mqtt_port=self.mqtt_port,
                mqtt_tls=self._mqtt_tls(),
                fleet_url=self.url,
                trusted_keys=trusted_pems,
                ca_cert=ca_cert,
            ),
            default_ttl_s=cfg.enrolment.token_ttl_s,
            max_ttl_s=cfg.enrolment.max_token_ttl_s,
            on_groups_changed=refresh,
            accounts=self.accounts,
        )
        sessions = Sessions(self.db, ttl_s=cfg.console.session_ttl_s)
        gone = await sessions.clear_unknown(auth.principals())
        if gone:
            log.info("console: %d expired or orphaned session(s) ended", gone)
        api = FleetApi(
            self.registry,
            self.devices,
            auth,
            sessions=sessions,
            audit=Audit(self.db),
            live_interval_s=cfg.console.live_interval_s,
            bus=self.bus,
            max_failure_share=cfg.rollouts.max_failure_share,
            hard_examples=HardExamples(
                self.db,
                cfg.hard_examples_dir,
                cfg.hard_examples.max_bytes,
                cfg.hard_examples.max_example_bytes,
            ),
        )
        app = create_app(api)
        metrics_for(app)  # now, not at the first scrape: the ingest lag counts from the start
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
        await self.runner.setup()
        site = web.SockSite(self.runner, self._sock, ssl_context=ssl_ctx)
        await site.start()
        self._sock = None  # the site owns it now
        if not cfg.http.host.startswith(_LOOPBACK) and ssl_ctx is None:
            log.warning(
                "fleet API on %s without TLS: bearer tokens and device secrets travel in"
                " clear (set http.tls_cert_file/tls_key_file or put a TLS proxy in front)",
                cfg.http.host,
            )
        log.info(
            "edgefleet fleet ready: API %s, MQTT %s:%d%s, data in %s",
            self.url,
            self.mqtt_host,
            self.mqtt_port,
            " (embedded broker)" if self.broker is not None else "",
            cfg.data_dir,
        )

    async def _start_broker(self) -> MqttConnectionConfig:
        """Start the embedded broker when none is configured; the fleet's connection."""
        cfg = self.cfg
        enrol = cfg.enrolment
        if cfg.broker is not None:
            external = cfg.broker
            if external.username is None:
                external = external.model_copy(update={"username": FLEET_MQTT_USER})
            self.mqtt_host = enrol.mqtt_host or external.host
            self.mqtt_port = enrol.mqtt_port or external.effective_port
            return external
        from edgefleet.fleet.devices import check_device_secret
        from edgefleet.fleet.embedded_broker import EmbeddedBroker

        eb = cfg.embedded_broker
        if not eb.host.startswith(_LOOPBACK):
            log.warning(
                "the embedded broker on %s has no TLS: device secrets travel in clear."
                " Use Mosquitto (deploy/mosquitto) with TLS on untrusted networks.",
                eb.host,
            )
        db = self.db
        assert db is not None  # opened before the broker starts

        async def check(device_id: str, secret: str) -> bool:
            return await check_device_secret(db, device_id, secret)

        # Devices log in with their enrolment secret, the fleet with a password made
        # now; each device may touch only its own topics (fleet/embedded_broker.py).
        self.broker = EmbeddedBroker(
            eb.host, eb.port, authenticate=check, fleet_user=FLEET_MQTT_USER
        )
        await self.broker.start()
        connect_host = "127.0.0.1" if eb.host in ("0.0.0.0", "") else eb.host
        connect_host = "::1" if eb.host == "::" else connect_host
        self.mqtt_host = enrol.mqtt_host or (
            urlsplit(self.url).hostname or connect_host
            if eb.host in ("0.0.0.0", "::", "")
            else eb.host
        )
        self.mqtt_port = enrol.mqtt_port or self.broker.port
        return MqttConnectionConfig(
            host=connect_host,
            port=self.broker.port,
            username=FLEET_MQTT_USER,
            password=self.broker.fleet_password,
            client_id=FLEET_MQTT_USER,
        )

    def _make_accounts(self, broker_cfg: MqttConnectionConfig) -> BrokerAccounts:
        """Device broker logins: made by this fleet (dynsec) or by nobody here (none)."""
        settings = self.cfg.broker_accounts
        # Never a device id: the fleet's own broker accounts (see Devices).
        reserved = frozenset({broker_cfg.username or FLEET_MQTT_USER, settings.username})
        if settings.mode == "none":
            return NoBrokerAccounts(reserved)
        password = settings.password
        if settings.password_file is not None:
            try:
                lines = settings.password_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ConfigError(
                    f"broker_accounts.password_file {settings.password_file}: {exc.strerror}"
                ) from exc
            password = lines[0].strip() if lines else ""
        if not password:
            raise ConfigError("broker_accounts: the admin password is empty")
        return DynsecAccounts(
            broker_cfg,
            username=settings.username,
            password=password,
            client_id=settings.client_id or f"{broker_cfg.client_id or FLEET_MQTT_USER}-accounts",
            timeout_s=settings.timeout_s,
            reserved_usernames=reserved,
        )

    def _mqtt_tls(self) -> bool:
        if self.cfg.enrolment.mqtt_tls is not None:
            return self.cfg.enrolment.mqtt_tls
        if self.cfg.enrolment.ca_file is not None:
            return True  # a CA for the devices only makes sense with TLS
        return self.cfg.broker is not None and self.cfg.broker.tls is not None

    async def stop(self) -> None:
        """Reverse order; every step runs even if one before it failed. Idempotent."""
        steps: list[tuple[str, Any]] = []
        if self.runner is not None:
            steps.append(("HTTP API", self.runner.cleanup))
        if self.accounts is not None:
            steps.append(("broker accounts link", self.accounts.stop))
        if self.bus is not None:
            steps.append(("MQTT side", self.bus.stop))
        if self.broker is not None:
            steps.append(("embedded broker", self.broker.stop))
        if self.retention is not None:
            steps.append(("telemetry retention", self.retention.stop))
        if self.db is not None:
            steps.append(("database", self.db.close))
        self.runner = self.bus = self.broker = self.db = self.retention = None
        self.accounts = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for what, step in steps:
            try:
                await step()
            except Exception:
                log.exception("stopping the %s failed", what)


def _log_trust(cfg: FleetServiceConfig) -> None:
    if cfg.trust.allow_unsigned:
        log.warning(
            "!!! trust.allow_unsigned is on: UNSIGNED BUNDLES WILL BE ACCEPTED FOR UPLOAD"
            " and sent to devices. Development only."
        )
    elif not cfg.trust.public_keys:
        log.warning("no trust.public_keys configured: every bundle upload will be refused")


async def serve(cfg: FleetServiceConfig) -> int:
    """Run until SIGTERM or SIGINT, then stop everything; the process's exit code."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows
            loop.add_signal_handler(sig, stopping.set)
            handled.append(sig)
    service = FleetService(cfg)
    try:
        await service.start()
        await stopping.wait()
        log.info("stopping")
    finally:
        await service.stop()
        for sig in handled:
            loop.remove_signal_handler(sig)
    return 0

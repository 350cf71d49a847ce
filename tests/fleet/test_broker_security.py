"""The shipped broker config, for real: Mosquitto 2.0 with deploy/mosquitto/production.conf
(TLS listener, dynamic-security plugin, no anonymous clients), device accounts made by
a real fleet enrolment (FleetService with ``broker_accounts: dynsec``), and the agent's
own MQTT link over TLS.

Only ports and file paths of the shipped config are changed (``ShippedMosquitto``);
every other directive runs as shipped. Certificates come from ``cryptography``: a CA,
the broker's certificate for ``localhost``, and a rogue CA with a certificate for the
same name.

Mosquitto 2.0.11 with the plugin, measured here: a 3.1.1 SUBSCRIBE outside the ACL gets
a failure SUBACK (0x80); a PUBLISH outside it is acknowledged and dropped (the client
stays connected). So these tests check *delivery*: a forged message is followed by an
allowed marker on the same connection, and once the marker has arrived, the forged one
(sent before it, handled in order) provably never will.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.mqtt_link import MqttLink
from edgefleet.core.mqtt import topics
from edgefleet.core.mqtt.connection import LinkState
from edgefleet.core.mqtt.errors import LinkRefused
from edgefleet.core.mqtt.messages import Message
from edgefleet.fleet.broker_accounts import main as broker_accounts_main
from edgefleet.fleet.config import FleetServiceConfig, load_fleet_config
from edgefleet.fleet.service import FleetService
from tests.support.brokers import DEPLOY, Mosquitto, Peer, eventually, free_port, link_config
from tests.support.tls import Ca, make_ca, make_tls

ADMIN_TOKEN = "broker-security-admin-token-0123"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PRODUCTION_CONF = DEPLOY / "production.conf"
DOCKER_CONF = DEPLOY / "docker.conf"

# ------------------------------------------------------------------ certificates


def write_server_tls(d: Path, ca: Ca, host: str = "localhost") -> tuple[Path, Path, Path]:
    """``ca.pem``, ``server.pem`` (for ``host``, signed by ``ca``) and ``server.key``."""
    f = make_tls(d, names=(host,), ca=ca)
    return f.ca, f.cert, f.key


# ------------------------------------------------------------------ the shipped config


def directives(conf: Path) -> list[tuple[str, str]]:
    """``(name, value)`` of every directive, in order (comments and blanks skipped)."""
    out = []
    for line in conf.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            out.append((name, value.strip()))
    return out


class ShippedMosquitto(Mosquitto):
    """Mosquitto running deploy/mosquitto/production.conf with only its ports (to free
    loopback ones) and file paths (into ``workdir``) changed. ``port`` is the TLS
    listener, ``plain_port`` the loopback plain one; both survive a restart."""

    def __init__(self, workdir: Path, tls_dir: Path, dynsec_file: Path) -> None:
        super().__init__(workdir)
        self.plain_port = free_port()
        self.tls_dir = tls_dir
        self.dynsec_file = dynsec_file

    def _write_conf(self) -> None:
        conf_d = self.workdir / "conf.d"
        conf_d.mkdir(exist_ok=True)
        shutil.copy(DEPLOY / "edgefleet.conf", conf_d / "edgefleet.conf")
        swaps = {
            ("listener", "8883"): f"{self.port} 127.0.0.1",
            ("listener", "1883 127.0.0.1"): f"{self.plain_port} 127.0.0.1",
            ("certfile", None): str(self.tls_dir / "server.pem"),
            ("keyfile", None): str(self.tls_dir / "server.key"),
            ("plugin_opt_config_file", None): str(self.dynsec_file),
            ("persistence_location", None): f"{self.workdir}/",
            ("include_dir", None): str(conf_d),
        }
        used = set()
        lines = []
        for name, value in directives(PRODUCTION_CONF):
            for (swap_name, swap_value), new in swaps.items():
                if name == swap_name and swap_value in (None, value):
                    used.add((swap_name, swap_value))
                    value = new
                    break
            if name == "plugin":
                # The Debian path as shipped; only its presence is checked here.
                assert Path(value).exists(), f"the shipped plugin path {value} is missing"
            lines.append(f"{name} {value}")
        assert used == set(swaps), f"production.conf lacks {set(swaps) - used}"
        # As root Mosquitto switches to the 'mosquitto' user, who cannot write here.
        lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        self.conf.write_text("\n".join(lines) + "\n")


def test_shipped_configs_lock_the_broker_down() -> None:
    prod = directives(PRODUCTION_CONF)
    assert ("allow_anonymous", "false") in prod
    assert ("per_listener_settings", "false") in prod
    listeners = [v for n, v in prod if n == "listener"]
    # TLS for the network; plain MQTT only on loopback.
    assert listeners == ["8883", "1883 127.0.0.1"]
    assert ("tls_version", "tlsv1.2") in prod
    assert any(n == "plugin" and v.endswith("mosquitto_dynamic_security.so") for n, v in prod)
    # The container variant says the same with the image's paths.
    docker = directives(DOCKER_CONF)
    path_like = re.compile(r"^/")

    def shape(ds: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(n, "<path>" if path_like.match(v) else v) for n, v in ds]

    assert shape(docker) == shape(prod)
    # The shared settings FIELD-NOTES.md explains stay in the included edgefleet.conf.
    shared = dict(directives(DEPLOY / "edgefleet.conf"))
    assert shared["max_queued_messages"] == "0" and shared["persistence"] == "true"


def test_init_dynsec_never_overwrites_the_live_account_file(tmp_path: Path) -> None:
    for name in ("a", "f"):
        (tmp_path / name).write_text(secrets.token_urlsafe(20))
    out = tmp_path / "dynsec.json"
    args = [
        "init-dynsec",
        f"--out={out}",
        f"--admin-password-file={tmp_path / 'a'}",
        f"--fleet-password-file={tmp_path / 'f'}",
    ]
    assert broker_accounts_main(args) == 0
    first = out.read_bytes()
    assert broker_accounts_main(args) == 1  # exists: refused
    assert broker_accounts_main([*args, "--if-missing"]) == 0  # exists: fine, untouched
    assert out.read_bytes() == first
    doc = json.loads(first)
    assert doc["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }
    (tmp_path / "short").write_text("too-short")
    with pytest.raises(SystemExit, match="at least 16"):
        broker_accounts_main(
            [
                "init-dynsec",
                f"--out={tmp_path / 'x.json'}",
                f"--admin-password-file={tmp_path / 'short'}",
                f"--fleet-password-file={tmp_path / 'f'}",
            ]
        )


def test_shipped_fleet_deployment_files_are_consistent() -> None:
    root = DEPLOY.parent
    cfg = load_fleet_config(root / "fleet" / "fleet.yaml")
    assert cfg.broker_accounts.mode == "dynsec" and cfg.broker is not None
    assert cfg.broker.tls is not None and cfg.enrolment.ca_file is not None
    assert {t.role for t in cfg.auth.tokens} == {"read", "operator"}
    compose = yaml.safe_load((root / "compose.yaml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not source.startswith(("./secrets", "./keys")):
                assert (root / source).exists(), f"compose mounts missing {source}"
    dockerfile = compose["services"]["fleet"]["build"]["dockerfile"]
    assert (root.parent / dockerfile).exists()
    if shutil.which("docker-compose"):  # the Debian package; not in CI
        subprocess.run(
            ["docker-compose", "-f", str(root / "compose.yaml"), "config", "-q"], check=True
        )


def test_fleet_systemd_unit_verifies() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = DEPLOY.parent / "fleet" / "edgefleet-fleet.service"
    text = unit.read_text()
    for hardening in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/edgefleet/fleet",
        "MemoryMax=",
    ):
        assert hardening in text
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    # The one complaint allowed: the venv is not installed on this machine.
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "/opt/edgefleet/venv/bin/python" not in line
    ]
    assert not problems, problems


# ------------------------------------------------------------------ fixtures


@dataclass
class Secure:
    broker: ShippedMosquitto
    fleet: FleetService
    session: aiohttp.ClientSession
    ca_file: Path
    fleet_password: str
    admin_password: str
    make_link: Callable[..., Awaitable[MqttLink]]

    async def call(
        self, method: str, path: str, *, auth: dict[str, str] | None = AUTH, **kw: Any
    ) -> tuple[int, Any]:
        async with self.session.request(
            method, self.fleet.url + path, headers=auth or {}, **kw
        ) as resp:
            return resp.status, await resp.json(content_type=None)

    async def token(self, device_id: str) -> str:
        status, doc = await self.call("POST", "/v1/enrolment-tokens", json={"device_id": device_id})
        assert status == 201, doc
        return str(doc["token"])

    async def enrol(self, device_id: str) -> dict[str, Any]:
        status, doc = await self.call(
            "POST", "/v1/enrol", auth=None, json={"token": await self.token(device_id)}
        )
        assert status == 200, doc
        return dict(doc)

    def link_config(self, creds: dict[str, Any], ca_file: Path | None = None, **kw: Any) -> Any:
        mqtt_doc = creds["mqtt"]
        return link_config(
            mqtt_doc["port"],
            host=mqtt_doc["host"],
            tls={"ca_file": str(ca_file or self.ca_file)},
            username=mqtt_doc["username"],
            password=mqtt_doc["password"],
            **kw,
        )

    def observer(self, client_id: str = "observer") -> Peer:
        """A plain paho client with the fleet's account on the loopback listener."""
        return Peer(
            self.broker.plain_port, client_id, username="fleet", password=self.fleet_password
        )


def fleet_service_config(
    tmp: Path, keys: tuple[Path, Path], broker: ShippedMosquitto, ca_file: Path
) -> FleetServiceConfig:
    return FleetServiceConfig.model_validate(
        {
            "data_dir": str(tmp / "fleet"),
            "http": {"host": "127.0.0.1", "port": 0},
            "auth": {"token": ADMIN_TOKEN},
            "trust": {"public_keys": [str(keys[1])]},
            # The fleet on the TLS listener too, under the name the certificate carries.
            "broker": {
                "host": "localhost",
                "port": broker.port,
                "tls": {"ca_file": str(ca_file)},
                "username": "fleet",
                "password_file": str(tmp / "fleet.password"),
                "client_id": "fleet-test",
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.4,
                "connect_timeout_s": 3,
            },
            "broker_accounts": {
                "mode": "dynsec",
                "password_file": str(tmp / "admin.password"),
                "timeout_s": 3,
            },
            "enrolment": {"mqtt_host": "localhost", "ca_file": str(ca_file)},
        }
    )


@pytest.fixture
async def secure(tmp_path: Path, keys: tuple[Path, Path]) -> AsyncIterator[Secure]:
    ca = make_ca("edgefleet test broker CA")
    ca_file, _, _ = write_server_tls(tmp_path / "tls", ca)
    admin_pw, fleet_pw = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    (tmp_path / "admin.password").write_text(admin_pw + "\n")
    (tmp_path / "fleet.password").write_text(fleet_pw + "\n")
    dynsec_file = tmp_path / "mosquitto" / "dynamic-security.json"
    # The shipped tool, as an operator runs it before the broker's first start.
    init = [
        "init-dynsec",
        f"--out={dynsec_file}",
        f"--admin-password-file={tmp_path / 'admin.password'}",
        f"--fleet-password-file={tmp_path / 'fleet.password'}",
    ]
    assert broker_accounts_main(init) == 0
    assert oct(dynsec_file.stat().st_mode & 0o777) == "0o600"
    broker = ShippedMosquitto(tmp_path / "mosquitto", tmp_path / "tls", dynsec_file).start()
    fleet = FleetService(fleet_service_config(tmp_path, keys, broker, ca_file))
    links: list[MqttLink] = []

    async def make_link(config: Any, device_id: str, start: bool = True) -> MqttLink:
        link = MqttLink(config, device_id, agent_version="test")
        links.append(link)
        if start:
            await link.start()
        return link

    try:
        await fleet.start()
        async with asyncio.timeout(10):
            await fleet.bus.wait_connected()
        async with aiohttp.ClientSession() as session:
            yield Secure(broker, fleet, session, ca_file, fleet_pw, admin_pw, make_link)
    finally:
        for link in links:
            await link.stop()
        await fleet.stop()
        broker.stop()


class Inbox:
    def __init__(self) -> None:
        self.got: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.got.append(message)

    def topics(self) -> list[str]:
        return [m.topic for m in self.got]


def connack(
    port: int,
    username: str | None,
    password: str | None,
    *,
    ca_file: Path | None = None,
    client_id: str | None = None,
) -> str:
    """Connect once with plain paho (its own thread) and return the CONNACK reason."""
    done = threading.Event()
    result: list[str] = []
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or username or f"probe-{secrets.token_hex(3)}",
    )
    if username is not None:
        client.username_pw_set(username, password)
    if ca_file is not None:
        client.tls_set(ca_certs=str(ca_file))

    def on_connect(c: object, u: object, flags: object, rc: Any, props: object) -> None:
        result.append(str(rc))
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *a: done.set()
    client.connect("localhost" if ca_file else "127.0.0.1", port, keepalive=5)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
        return result[0] if result else "disconnected before CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()


def publish_once(
    port: int,
    username: str,
    password: str,
    topic: str,
    payload: bytes,
    *,
    retain: bool = False,
    ca_file: Path,
) -> str:
    """Log in (client id = username), publish one QoS 1 message, and return
    ``acked`` or ``disconnected``, whichever the broker did first. Either way the
    broker had handled the message: a later message is handled after it."""
    connected, finished = threading.Event(), threading.Event()
    outcome: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username)
    client.username_pw_set(username, password)
    client.tls_set(ca_certs=str(ca_file))

    def on_connect(c: object, u: object, flags: object, rc: Any, props: object) -> None:
        if rc.is_failure:
            outcome.append(f"refused: {rc}")
            finished.set()
        connected.set()

    def on_publish(c: object, u: object, mid: int, rc: object, props: object) -> None:
        outcome.append("acked")
        finished.set()

    def on_disconnect(c: object, u: object, flags: object, rc: object, props: object) -> None:
        outcome.append("disconnected")
        finished.set()
        connected.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_disconnect = on_disconnect
    client.reconnect_delay_set(60, 60)  # one attempt: no automatic reconnect here
    client.connect("localhost", port, keepalive=5)
    client.loop_start()
    try:
        assert connected.wait(10), "no CONNACK"
        if not outcome:
            client.publish(topic, payload, qos=1, retain=retain)
        assert finished.wait(10), "neither PUBACK nor disconnect"
        return outcome[0]
    finally:
        client.disconnect()
        client.loop_stop()


# ------------------------------------------------------------------ the tests


async def test_enrolment_hands_out_a_tls_login_with_the_broker_ca(secure: Secure) -> None:
    creds = await secure.enrol("store-a")
    m = creds["mqtt"]
    assert m["username"] == "store-a" and m["tls"] is True
    assert m["host"] == "localhost" and m["port"] == secure.broker.port
    assert m["ca_cert"] == secure.ca_file.read_text()
    link = await secure.make_link(secure.link_config(creds), "store-a")
    async with asyncio.timeout(10):
        await link.wait_connected()
    # The broker's own record: one role for this device, its own subtree only.
    role = json.loads(secure.broker.dynsec_file.read_text())
    (acl_role,) = [r for r in role["roles"] if r["rolename"] == "edgefleet-device-store-a"]
    assert {a["topic"] for a in acl_role["acls"]} == {
        topics.device_topic("store-a", leaf)  # type: ignore[arg-type]
        for leaf in ("status", "reported", "telemetry", "events", "desired", "commands", "acks")
    }


async def test_a_device_reaches_only_its_own_subtree(secure: Secure) -> None:
    a_creds, b_creds = await secure.enrol("store-a"), await secure.enrol("store-b")
    observer = secure.observer()
    try:
        observer.subscribe("edgefleet/v1/devices/+/+")
        a_in, b_in = Inbox(), Inbox()
        a = await secure.make_link(secure.link_config(a_creds), "store-a", start=False)
        b = await secure.make_link(secure.link_config(b_creds), "store-b", start=False)
        await a.subscribe(topics.device_topic("store-a", "desired"), a_in)
        await a.subscribe(topics.device_topic("store-a", "commands"), a_in)
        await a.subscribe(topics.device_topic("store-b", "desired"), a_in)  # not its own
        await a.subscribe(topics.device_topic("store-b", "commands"), a_in)  # not its own
        await b.subscribe(topics.device_topic("store-b", "desired"), b_in)
        await b.subscribe(topics.device_topic("store-b", "commands"), b_in)
        await a.start()
        await b.start()
        async with asyncio.timeout(10):
            await a.wait_connected()
            await b.wait_connected()
        # The broker said no to A's subscriptions of B's topics (failure SUBACK).
        assert a.last_error is not None and "store-b" in a.last_error
        assert "refused" in a.last_error

        # The fleet account reaches every device: the real fleet service's commands
        # arrive at both, and its ingest saw both come online.
        for device in ("store-b", "store-a"):
            status, doc = await secure.call(
                "POST", f"/v1/devices/{device}/commands", json={"command": "resync"}
            )
            assert status == 202, doc
        await eventually(lambda: len(b_in.got) == 1 and len(a_in.got) == 1)

        async def both_online() -> bool:
            _, doc = await secure.call("GET", "/v1/devices")
            return all(d["online"] for d in doc["devices"]) and len(doc["devices"]) == 2

        async with asyncio.timeout(10):
            while True:
                if await both_online():
                    break
                await asyncio.sleep(0.02)

        # B's own desired (from the fleet account) reaches B and not A, even though A
        # asked for it.
        observer.publish(topics.device_topic("store-b", "desired"), b'{"for":"b"}', retain=True)
        observer.publish(topics.device_topic("store-a", "desired"), b'{"for":"a"}')
        await eventually(lambda: len(a_in.got) == 2 and len(b_in.got) == 2)
        assert a_in.topics() == [
            topics.device_topic("store-a", "commands"),
            topics.device_topic("store-a", "desired"),
        ]
        assert b_in.topics()[-1] == topics.device_topic("store-b", "desired")

        # With A's credentials (a leaked device secret, any MQTT client), forge B's data
        # and B's state, write into B's (and A's own) fleet→device topics. A stops first:
        # this is an attacker's client, not the agent (same client id, as the account
        # requires). Then an allowed marker.
        await a.stop()
        forged = b'{"schema":1,"forged":true}'
        a_secret = a_creds["mqtt"]["password"]
        for leaf, retain in (
            ("telemetry", False),
            ("reported", True),
            ("status", True),
            ("events", False),
            ("desired", True),
            ("commands", False),
            ("acks", False),
        ):
            outcome = await asyncio.to_thread(
                publish_once,
                secure.broker.port,
                "store-a",
                a_secret,
                topics.device_topic("store-b", leaf),  # type: ignore[arg-type]
                forged,
                retain=retain,
                ca_file=secure.ca_file,
            )
            assert outcome in ("acked", "disconnected")  # dropped either way (below)
        # Its own desired is fleet → device only: a device cannot rewrite it.
        await asyncio.to_thread(
            publish_once,
            secure.broker.port,
            "store-a",
            a_secret,
            topics.device_topic("store-a", "desired"),
            forged,
            retain=True,
            ca_file=secure.ca_file,
        )
        marker = topics.device_topic("store-a", "telemetry")
        assert (
            await asyncio.to_thread(
                publish_once,
                secure.broker.port,
                "store-a",
                a_secret,
                marker,
                b'{"schema":1,"marker":true}',
                ca_file=secure.ca_file,
            )
            == "acked"
        )
        await observer.wait_for(lambda: bool(observer.received(marker)))
        assert not [m for m in observer.received() if m[1] == forged]
        assert not [m for m in a_in.got + b_in.got if m.payload == forged]
        # Nothing forged was retained either: a newcomer sees B's real state only.
        late = secure.observer("late-observer")
        try:
            late.subscribe("edgefleet/v1/devices/store-b/+")
            await late.wait_for(
                lambda: (
                    bool(late.received(topics.device_topic("store-b", "status")))
                    and bool(late.received(topics.device_topic("store-b", "desired")))
                )
            )
            assert all(m[1] != forged for m in late.received())
            (desired_msg,) = late.received(topics.device_topic("store-b", "desired"))
            assert desired_msg[1] == b'{"for":"b"}'
            (status_msg,) = late.received(topics.device_topic("store-b", "status"))
            assert json.loads(status_msg[1])["state"] == "online"
        finally:
            late.close()
    finally:
        observer.close()


async def test_logins_without_valid_credentials_are_refused(secure: Secure) -> None:
    a_creds, b_creds = await secure.enrol("store-a"), await secure.enrol("store-b")
    plain, tls = secure.broker.plain_port, secure.broker.port
    ca = secure.ca_file
    a_secret, b_secret = a_creds["mqtt"]["password"], b_creds["mqtt"]["password"]
    refusals = await asyncio.gather(
        asyncio.to_thread(connack, plain, None, None),  # anonymous
        asyncio.to_thread(connack, tls, None, None, ca_file=ca),
        asyncio.to_thread(connack, tls, "store-a", "wrong-secret", ca_file=ca),
        asyncio.to_thread(connack, tls, "store-a", b_secret, ca_file=ca),  # B's secret
        asyncio.to_thread(connack, tls, "store-zz", a_secret, ca_file=ca),  # unknown user
        asyncio.to_thread(connack, plain, "fleet", "not-the-fleet-password"),
        # A device's account is bound to its client id: a copy of the secret cannot
        # log in beside the device under another id, unnoticed.
        asyncio.to_thread(connack, tls, "store-a", a_secret, ca_file=ca, client_id="x-store-a"),
    )
    assert all(r in ("Not authorized", "Bad user name or password") for r in refusals), refusals
    assert await asyncio.to_thread(connack, tls, "store-a", a_secret, ca_file=ca) == "Success"
    # The agent's link: a refused login is final (no retry storm), and says why.
    bad = await secure.make_link(
        secure.link_config({"mqtt": {**a_creds["mqtt"], "password": b_secret}}), "store-a"
    )
    with pytest.raises(LinkRefused, match="refused the login"):
        async with asyncio.timeout(10):
            await bad.wait_connected()
    # The fleet's account-admin login can administer accounts but not read device data.
    admin = Peer(plain, "admin-probe", username="edgefleet-admin", password=secure.admin_password)
    try:
        got: list[list[str]] = []
        admin.client.on_subscribe = lambda c, u, mid, rcs, p: got.append([str(r) for r in rcs])
        admin.client.subscribe("edgefleet/v1/#", 1)
        await eventually(lambda: bool(got))
        assert got[0][0] in ("Unspecified error", "Not authorized")
    finally:
        admin.close()


async def test_a_revoked_device_is_cut_off_and_cannot_come_back(secure: Secure) -> None:
    creds = await secure.enrol("store-a")
    secret = creds["mqtt"]["password"]
    link = await secure.make_link(secure.link_config(creds), "store-a")
    async with asyncio.timeout(10):
        await link.wait_connected()
    basic = {"Authorization": aiohttp.encode_basic_auth("store-a", secret)}
    status, _ = await secure.call("GET", "/v1/bundles/none/1", auth=basic)
    assert status == 404  # authenticated; there is just no such bundle

    # Only an admin may revoke.
    status, doc = await secure.call("POST", "/v1/devices/store-a/revoke")
    assert status == 200, doc
    assert doc["broker_account"] == "removed" and doc["revoked_at"] > 0
    # Mosquitto disconnects the deleted account; the link's next login is refused for good.
    async with asyncio.timeout(10):
        await link.wait_state(LinkState.REFUSED)
    assert link.last_error is not None and "refused the login" in link.last_error
    tls = secure.broker.port
    assert await asyncio.to_thread(connack, tls, "store-a", secret, ca_file=secure.ca_file) in (
        "Not authorized",
        "Bad user name or password",
    )
    # Its HTTP download credentials are gone too.
    status, doc = await secure.call("GET", "/v1/bundles/none/1", auth=basic)
    assert status == 401 and doc["error"] == "wrong device id or secret"
    _, device = await secure.call("GET", "/v1/devices/store-a")
    assert isinstance(device["revoked_at"], float)

    # Enrolling the id again (a replaced store PC) makes a new login; the old one stays dead.
    again = await secure.enrol("store-a")
    assert again["mqtt"]["password"] != secret
    fresh = await secure.make_link(secure.link_config(again), "store-a")
    async with asyncio.timeout(10):
        await fresh.wait_connected()
    assert await asyncio.to_thread(connack, tls, "store-a", secret, ca_file=secure.ca_file) in (
        "Not authorized",
        "Bad user name or password",
    )
    _, device = await secure.call("GET", "/v1/devices/store-a")
    assert device["revoked_at"] is None


async def test_revocation_cancels_unused_tokens_for_the_device(secure: Secure) -> None:
    await secure.enrol("store-a")
    spare = await secure.token("store-a")
    status, doc = await secure.call("POST", "/v1/devices/store-a/revoke")
    assert status == 200 and doc["tokens_cancelled"] == 1
    status, doc = await secure.call("POST", "/v1/enrol", auth=None, json={"token": spare})
    assert status == 401 and doc["error"] == "enrolment token expired"


async def test_fleet_account_names_cannot_be_device_ids(secure: Secure) -> None:
    for reserved in ("fleet", "edgefleet-admin"):
        status, doc = await secure.call(
            "POST", "/v1/enrolment-tokens", json={"device_id": reserved}
        )
        assert status == 400 and "reserved" in doc["error"]


async def test_enrolment_without_the_broker_fails_cleanly_and_can_be_retried(
    secure: Secure,
) -> None:
    token = await secure.token("store-a")
    secure.broker.stop()
    status, doc = await secure.call("POST", "/v1/enrol", auth=None, json={"token": token})
    assert status == 503 and "broker" in doc["error"]
    _, listing = await secure.call("GET", "/v1/devices")
    assert listing["devices"] == []  # nothing half-made
    secure.broker.start()
    status, creds = await secure.call("POST", "/v1/enrol", auth=None, json={"token": token})
    assert status == 200, creds  # the token was given back
    link = await secure.make_link(secure.link_config(creds), "store-a")
    async with asyncio.timeout(10):
        await link.wait_connected()


async def test_the_agent_refuses_a_broker_certificate_from_another_ca(
    secure: Secure, tmp_path: Path
) -> None:
    """Same shipped config, same accounts, but the broker's certificate was signed by a
    CA the device was not given: the device must not log in (its secret would go to
    whoever runs that broker)."""
    creds = await secure.enrol("store-a")
    rogue_tls = tmp_path / "rogue-tls"
    write_server_tls(rogue_tls, make_ca("rogue CA"))  # a certificate for "localhost" too
    rogue_dynsec = tmp_path / "rogue" / "dynamic-security.json"
    rogue_dynsec.parent.mkdir()
    shutil.copy(secure.broker.dynsec_file, rogue_dynsec)
    rogue = ShippedMosquitto(tmp_path / "rogue", rogue_tls, rogue_dynsec).start()
    try:
        mqtt_doc = {**creds["mqtt"], "port": rogue.port}
        link = await secure.make_link(secure.link_config({"mqtt": mqtt_doc}), "store-a")
        await eventually(lambda: link.last_error is not None, within=10)
        assert "certificate verify failed" in str(link.last_error)
        assert link.stats.connects == 0 and not link.connected
        assert link.state is not LinkState.REFUSED  # a network problem: it keeps trying
        # The rogue broker's own CA would be accepted: the CA file is what decides.
        trusting = await secure.make_link(
            secure.link_config({"mqtt": mqtt_doc}, ca_file=rogue_tls / "ca.pem"), "store-a"
        )
        async with asyncio.timeout(10):
            await trusting.wait_connected()
        assert link.stats.connects == 0
    finally:
        rogue.stop()

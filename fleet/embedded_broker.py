"""An in-process MQTT broker (amqtt 0.12) for the one-command demo and small sites.

Production runs Mosquitto (deploy/mosquitto/). This one needs no system package:
``edge-fleet serve`` can start it when no broker is configured. What it cannot do
(FIELD-NOTES.md, checked again in tests/test_mqtt_link.py):

- no MQTT 5: it drops a v5 CONNECT, so clients must speak 3.1.1 (the agent's link
  falls back by itself);
- persistent sessions only with ``allow_anonymous: false`` and clients that send a
  username, so this broker always requires a username.

Who may log in, three ways:

- ``authenticate`` (what ``edge-fleet serve`` uses): the fleet's own account
  (``fleet_user``/``fleet_password``, a random password made at each start) and every
  enrolled device with its device secret, checked by the callback against the
  fleet's database (``Devices.check_secret``); a device must use its id as client id.
  Topics are then checked as Mosquitto's per-device roles do (fleet/broker_accounts.py):
  a device publishes only its own status/reported/telemetry/events and subscribes to
  only its own desired/commands/acks; the fleet account has all of ``edgefleet/v1/``.
  So a client without a device's secret can neither connect nor publish a retained
  ``desired``, and one device cannot touch another's topics.
- ``users``: a fixed username → password table, no topic checks (tests).
- neither: **any username without a password**, no topic checks. Tests only; it
  logs a warning at start.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from edgefleet.core.mqtt import topics
from edgefleet.fleet.broker_accounts import DEVICE_PUBLISHES, DEVICE_RECEIVES

log = logging.getLogger(__name__)

# (username, password) → whether it is an enrolled device's secret. Runs on the
# broker's event loop (the fleet's own), for every CONNECT.
CheckDevice = Callable[[str, str], Awaitable[bool]]
FLEET_TREE = "edgefleet/v1/"


@dataclass(frozen=True)
class _Accounts:
    """The login and topic rules of one running broker (see the module doc)."""

    fleet_user: str
    fleet_password: str = field(repr=False)
    check_device: CheckDevice

    async def login(self, session: Session) -> bool:
        user, password = session.username, session.password or ""
        if not user:
            return False
        if user == self.fleet_user:
            return hmac.compare_digest(password.encode(), self.fleet_password.encode())
        try:
            topics.check_device_id(user)
        except ValueError:
            return False
        # Bound to its client id, as Mosquitto's accounts are (broker_accounts.py).
        if session.client_id != user:
            log.warning("device %s refused: client id %r is not its id", user, session.client_id)
            return False
        return await self.check_device(user, password)

    def allows(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        user = session.username if session is not None else None
        if not user or not topic:
            return False
        if user == self.fleet_user:
            return topic.startswith(FLEET_TREE)
        leaves: tuple[str, ...]
        if action == Action.PUBLISH:
            leaves = DEVICE_PUBLISHES
        elif action in (Action.SUBSCRIBE, Action.RECEIVE):
            leaves = DEVICE_RECEIVES
        else:
            return False
        try:
            return topic in {topics.device_topic(user, leaf) for leaf in leaves}  # type: ignore[arg-type]
        except ValueError:
            return False


# Running brokers' rules by key: amqtt builds its plugins itself, from a config dict,
# so the plugin finds its broker's rules through a key in that dict.
_ACCOUNTS: dict[str, _Accounts] = {}


class FleetAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped (Any)
    """amqtt authentication: the fleet account and enrolled devices (``_Accounts``)."""

    @dataclass
    class Config:
        accounts: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._key = str(self._get_config_option("accounts", ""))

    async def authenticate(self, *, session: Session) -> bool | None:
        accounts = _ACCOUNTS.get(self._key)
        return accounts is not None and await accounts.login(session)


class FleetTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt is untyped (Any)
    """amqtt topic checks: each device its own subtree, the fleet all of it."""

    @dataclass
    class Config:
        accounts: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._key = str(self._get_config_option("accounts", ""))

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool | None:
        accounts = _ACCOUNTS.get(self._key)
        return accounts is not None and accounts.allows(session, topic, action)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """``await EmbeddedBroker().start()`` serves MQTT 3.1.1 on ``host:port`` in this loop."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        users: dict[str, str] | None = None,
        authenticate: CheckDevice | None = None,
        fleet_user: str = "fleet",
        session_expiry_s: int | None = 14 * 24 * 3600,
    ) -> None:
        if users is not None and authenticate is not None:
            raise ValueError("give users or authenticate, not both")
        self.host = host
        self.port = port
        self.users = users
        self.session_expiry_s = session_expiry_s
        self.fleet_user = fleet_user
        # With ``authenticate``: the fleet account's password, new at every start.
        self.fleet_password: str | None = None
        self._accounts: _Accounts | None = None
        self._key = secrets.token_hex(8)
        if authenticate is not None:
            self.fleet_password = secrets.token_urlsafe(32)
            self._accounts = _Accounts(fleet_user, self.fleet_password, authenticate)
        self._broker: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self, port: int) -> dict[str, Any]:
        plugins: dict[str, Any]
        if self._accounts is not None:
            plugins = {
                f"{__name__}.FleetAuthPlugin": {"accounts": self._key},
                f"{__name__}.FleetTopicPlugin": {"accounts": self._key},
            }
        elif self.users is not None:
            plugins = {
                "amqtt.plugins.authentication.FileAuthPlugin": {
                    "password_file": str(self._password_file(self.users))
                }
            }
        else:
            # Requiring a username (any) is what makes amqtt keep persistent sessions.
            anonymous = "amqtt.plugins.authentication.AnonymousAuthPlugin"
            plugins = {anonymous: {"allow_anonymous": False}}
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{port}"}},
            # Only authentication: amqtt's packet/event loggers and $SYS publisher cost
            # throughput and say nothing the demo needs.
            "plugins": plugins,
            "session_expiry_interval": self.session_expiry_s,
        }

    def _password_file(self, users: dict[str, str]) -> Path:
        from pwdlib import PasswordHash  # an amqtt dependency
        from pwdlib.hashers.argon2 import Argon2Hasher

        self._tmp = tempfile.TemporaryDirectory(prefix="edgefleet-broker-")
        hasher = PasswordHash((Argon2Hasher(),))
        path = Path(self._tmp.name) / "passwd"
        path.write_text("".join(f"{u}:{hasher.hash(p)}\n" for u, p in users.items()))
        return path

    async def start(self) -> None:
        if self.users is None and self._accounts is None:
            log.warning(
                "embedded MQTT broker accepts ANY username without a password and checks"
                " no topics: for tests only"
            )
        if self._accounts is not None:
            _ACCOUNTS[self._key] = self._accounts
        try:
            await self._start()
        except BaseException:
            _ACCOUNTS.pop(self._key, None)
            raise

    async def _start(self) -> None:
        from amqtt.broker import Broker  # optional dependency: the `fleet` extra
        from amqtt.errors import BrokerError

        tries = 5 if self.port == 0 else 1
        for attempt in range(tries):
            port = self.port or _free_port(self.host)
            broker = Broker(self._config(port))
            try:
                await broker.start()
            except BrokerError:
                # Another process took the free port between our probe and the bind.
                if attempt == tries - 1:
                    raise
                continue
            self._broker, self.port = broker, port
            log.info("embedded MQTT broker (amqtt, MQTT 3.1.1) on %s", self.url)
            return

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
            # amqtt's shutdown leaves its connection handlers finishing; let them.
            await asyncio.sleep(0)
        _ACCOUNTS.pop(self._key, None)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

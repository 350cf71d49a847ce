"""An in-process MQTT broker (amqtt 0.12) for the one-command demo and small sites.

Production runs Mosquitto (deploy/mosquitto/). This one needs no system package:
``edge-fleet serve`` can start it when no broker is configured. What it cannot do
(FIELD-NOTES.md, checked again in tests/test_mqtt_link.py):

- no MQTT 5: it drops a v5 CONNECT, so clients must speak 3.1.1 (the agent's link
  falls back by itself);
- persistent sessions only with ``allow_anonymous: false`` and clients that send a
  username, so this broker always requires a username (``users`` also checks
  passwords; without it any username is accepted — a loopback demo only).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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
        session_expiry_s: int | None = 14 * 24 * 3600,
    ) -> None:
        self.host = host
        self.port = port
        self.users = users
        self.session_expiry_s = session_expiry_s
        self._broker: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self, port: int) -> dict[str, Any]:
        plugins: dict[str, Any]
        if self.users is not None:
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
        from amqtt.broker import Broker  # optional dependency: the `fleet` extra
        from amqtt.errors import BrokerError

        if self.users is None:
            log.warning("embedded MQTT broker accepts any username without a password")
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
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

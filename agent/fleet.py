"""The agent's connection to the fleet: MQTT link + telemetry outbox + sender.

Created only when the config has a ``fleet`` section; started in the aiohttp app's
cleanup_ctx after the models are loaded and stopped before they unload. Starting
never waits for the broker (offline first): the link connects in the background,
and the agent serves local apps the same with or without it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from agent import __version__
from agent.config import AgentConfig
from agent.mqtt_link import MqttLink
from agent.outbox import Outbox
from agent.telemetry_sender import TelemetrySender

log = logging.getLogger(__name__)


class FleetConnection:
    def __init__(self, config: AgentConfig) -> None:
        if config.fleet is None or config.device_id is None:
            raise ValueError("a fleet connection needs the fleet section and a device_id")
        fleet = config.fleet
        self.outbox = Outbox(fleet.outbox.path, fleet.outbox.max_bytes)
        self.link = MqttLink(fleet, config.device_id, agent_version=__version__)
        self.sender = TelemetrySender(self.outbox, self.link, fleet.telemetry)

    async def start(self) -> None:
        await self.outbox.open()
        await self.sender.start()  # subscribes to acks before the first connect
        await self.link.start()

    async def stop(self) -> None:
        """Idempotent, and safe after a start that failed half-way."""
        await self.sender.stop()
        await self.link.stop()
        await self.outbox.close()

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        try:
            await self.start()
        except Exception:
            # Serving local apps matters more than reporting: a broken outbox file or
            # password file must not keep the store's models from answering.
            log.exception("fleet connection could not start; the agent runs standalone")
            await self.stop()
        yield
        await self.stop()


FLEET = web.AppKey("fleet", FleetConnection)

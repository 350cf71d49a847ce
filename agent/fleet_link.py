"""The agent's connection to the fleet: MQTT link + telemetry outbox + sender.

Created only when the config has a ``fleet`` section; started in the aiohttp app's
cleanup_ctx after the models are loaded and stopped before they unload. Starting
never waits for the broker (offline first): the link connects in the background,
and the agent serves local apps the same with or without it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import web

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.mqtt_link import MqttLink
from edgefleet.agent.outbox import Outbox
from edgefleet.agent.telemetry_sender import TelemetrySender
from edgefleet.agent.telemetry_stats import InferenceStats
from edgefleet.core import __version__

if TYPE_CHECKING:
    from edgefleet.agent.serving_registry import ModelRegistry
    from edgefleet.agent.sync import DesiredStateSync

log = logging.getLogger(__name__)


class FleetConnection:
    def __init__(self, config: AgentConfig, registry: ModelRegistry | None = None) -> None:
        if config.fleet is None or config.device_id is None:
            raise ValueError("a fleet connection needs the fleet section and a device_id")
        fleet = config.fleet
        self.outbox = Outbox(fleet.outbox.path, fleet.outbox.max_bytes)
        self.link = MqttLink(fleet, config.device_id, agent_version=__version__)
        self.sender = TelemetrySender(self.outbox, self.link, fleet.telemetry)
        # The desired-state sync (agent/sync.py) needs the registry it installs into;
        # the edge profile only (the cloud profile has no fleet section anyway).
        self.sync: DesiredStateSync | None = None
        if registry is not None and config.profile == "edge":
            from edgefleet.agent.sync import DesiredStateSync

            self.sync = DesiredStateSync(
                config, self.link, self.outbox, registry, agent_version=__version__
            )
        # Per-model inference aggregates; the HTTP handlers feed it (agent/server/app.py).
        self.stats = InferenceStats(self.outbox.add, fleet.telemetry.stats_interval_s)

    async def start(self) -> None:
        await self.outbox.open()
        self.stats.start()
        await self.sender.start()  # subscribes to acks before the first connect
        if self.sync is not None:
            await self.sync.start()  # subscribes to desired/commands, likewise
        await self.link.start()
        if self.sync is not None:
            self.sync.link_started()  # publishes reported on every (re)connect

    async def stop(self) -> None:
        """Idempotent, and safe after a start that failed half-way."""
        # First, while the outbox is open: the last partial window is written to it.
        await self.stats.stop()
        if self.sync is not None:
            await self.sync.stop()  # a download in progress stops; its .part stays
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

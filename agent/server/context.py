"""What the request handlers share, kept on the aiohttp application."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.dataplane import DataPlane
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.serving_registry import ModelRegistry


@dataclass
class Services:
    config: AgentConfig
    registry: ModelRegistry
    metrics: Metrics
    inference_executor: ThreadPoolExecutor
    io_executor: ThreadPoolExecutor
    started_at: float = field(default_factory=time.monotonic)


SERVICES = web.AppKey("services", Services)
# Every inference API's way to the model (agent/dataplane.py).
DATA_PLANE = web.AppKey("data_plane", DataPlane)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def data_plane(request: web.Request) -> DataPlane:
    return request.app[DATA_PLANE]

"""Incoming messages and the subscriptions that hand them to handlers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from edgefleet.core.mqtt.filters import match_filter


@dataclass(frozen=True, slots=True)
class Message:
    """One incoming message, as handed to a handler."""

    topic: str
    payload: bytes
    qos: int
    retain: bool

    def json(self) -> Any:
        """The payload as JSON; raises ``orjson.JSONDecodeError`` (a ValueError) on garbage."""
        return orjson.loads(self.payload)


Handler = Callable[[Message], Awaitable[None]]


@dataclass(eq=False)
class Subscription:
    """A topic filter and the coroutine that gets its messages, one at a time.

    Made by ``MqttConnection.subscribe``; its worker task runs on the event loop and
    awaits the handler for each queued message in order.
    """

    topic_filter: str
    handler: Handler
    qos: int = 1
    # Bounded: a flood on one topic must not eat the store PC's memory.
    queue: asyncio.Queue[Message] = field(default_factory=lambda: asyncio.Queue(1000))
    worker: asyncio.Task[None] | None = None
    dropped: int = 0
    errors: int = 0
    # What incoming topics are matched against (see filters.match_filter).
    match_filter: str = field(init=False)

    def __post_init__(self) -> None:
        self.match_filter = match_filter(self.topic_filter)

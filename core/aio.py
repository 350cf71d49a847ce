"""Event loop choice shared by the agent's and the fleet's command lines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from edgefleet.core.errors import ConfigError


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop a service runs on: uvloop when asked or, with ``auto``, installed."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ConfigError(
                    "server.event_loop is uvloop but uvloop is not installed"
                ) from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop

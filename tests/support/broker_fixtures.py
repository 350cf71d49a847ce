"""Broker fixtures (a pytest plugin, loaded by tests/conftest.py's ``pytest_plugins``).

Kept apart from tests/support/brokers.py so that test modules can import the helpers there
without pytest complaining that a plugin module was imported before registration.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.fleet.embedded_broker import EmbeddedBroker
from tests.support.brokers import Mosquitto, Peer


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh Mosquitto with edgefleet's config, anonymous clients allowed."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Make brokers with other settings (users, ACL); all stopped at the end."""
    made: list[Mosquitto] = []

    def make(name: str = "mosquitto", start: bool = True, **kwargs: object) -> Mosquitto:
        broker = Mosquitto(tmp_path / name, **kwargs)  # type: ignore[arg-type]
        made.append(broker)
        return broker.start() if start else broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
async def amqtt_broker() -> AsyncIterator[EmbeddedBroker]:
    """amqtt in this test's event loop on a free port (any username, no password)."""
    broker = EmbeddedBroker()
    await broker.start()
    yield broker
    await broker.stop()


@pytest.fixture
def peers() -> Any:
    made: list[Peer] = []

    def make(port: int, **kwargs: Any) -> Peer:
        peer = Peer(port, **kwargs)
        made.append(peer)
        return peer

    yield make
    for p in made:
        p.close()

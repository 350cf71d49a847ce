"""Errors of an MQTT connection (``edgefleet.core.mqtt.connection``)."""

from __future__ import annotations

from edgefleet.core.errors import EdgefleetError


class LinkError(EdgefleetError):
    """Base of the connection's errors."""


class LinkClosed(LinkError):
    """The connection was stopped (or never started) while the caller waited."""


class LinkRefused(LinkError):
    """The broker refused the login; the connection stopped retrying. ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PublishTimeout(LinkError, TimeoutError):
    """No PUBACK in time. paho keeps the message and may still deliver it later."""


class PublishRefused(LinkError):
    """The broker answered the PUBLISH with a failure reason (MQTT 5 only)."""

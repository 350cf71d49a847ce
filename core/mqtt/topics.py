"""MQTT topic names of the agent ⇄ fleet contract (see docs/mqtt.md).

Every device owns the subtree ``edgefleet/v1/devices/{device_id}/``; the broker's
ACL lets a device touch nothing else. The helpers here are the only place that
spells the layout, so a rename is one edit.
"""

from __future__ import annotations

from typing import Final, Literal

from edgefleet.core import names

PREFIX: Final = "edgefleet/v1/devices"

# Device → fleet: desired state the device applied, liveness, data, happenings.
REPORTED: Final = "reported"
STATUS: Final = "status"
TELEMETRY: Final = "telemetry"
EVENTS: Final = "events"
# Fleet → device: what it should run, ad-hoc requests, end-to-end telemetry acks.
DESIRED: Final = "desired"
COMMANDS: Final = "commands"
ACKS: Final = "acks"

Leaf = Literal["desired", "reported", "status", "telemetry", "events", "commands", "acks"]
LEAVES: Final[frozenset[str]] = frozenset(
    {DESIRED, REPORTED, STATUS, TELEMETRY, EVENTS, COMMANDS, ACKS}
)


def check_device_id(device_id: str) -> str:
    """A device id is one topic level: the shared name rule (core/names.py, a ValueError)."""
    return names.check_device_id(device_id)


def device_topic(device_id: str, leaf: Leaf) -> str:
    """``edgefleet/v1/devices/{device_id}/{leaf}``."""
    if leaf not in LEAVES:
        raise ValueError(f"unknown topic leaf {leaf!r}")
    return f"{PREFIX}/{check_device_id(device_id)}/{leaf}"


def all_devices(leaf: Leaf) -> str:
    """The fleet's subscription filter for one leaf of every device (``.../+/{leaf}``)."""
    if leaf not in LEAVES:
        raise ValueError(f"unknown topic leaf {leaf!r}")
    return f"{PREFIX}/+/{leaf}"


def shared(group: str, topic_filter: str) -> str:
    """A shared subscription (``$share/{group}/...``) so several fleet workers split the load."""
    return f"$share/{group}/{topic_filter}"


def parse_device_topic(topic: str) -> tuple[str, str] | None:
    """``(device_id, leaf)`` of a device topic, or None when the topic is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != PREFIX or parts[4] not in LEAVES:
        return None
    if not parts[3]:
        return None
    return parts[3], parts[4]

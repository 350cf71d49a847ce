"""MQTT topic filters: validation, and the part of a shared subscription that matches."""

from __future__ import annotations

SHARE_PREFIX = "$share/"


def check_filter(topic_filter: str) -> str:
    """Raise ValueError unless ``topic_filter`` is a valid MQTT subscription filter."""
    levels = topic_filter.split("/")
    if not topic_filter or "\x00" in topic_filter:
        raise ValueError(f"invalid topic filter {topic_filter!r}")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or (
            "+" in level and level != "+"
        ):
            raise ValueError(f"invalid topic filter {topic_filter!r}")
    if topic_filter.startswith(SHARE_PREFIX):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or parts[1] in ("+", "#") or not parts[2]:
            raise ValueError(f"invalid shared subscription {topic_filter!r}")
    return topic_filter


def match_filter(topic_filter: str) -> str:
    """What incoming topics are matched against: the filter without a shared
    subscription's ``$share/{group}/`` prefix (the broker delivers the plain topic)."""
    if topic_filter.startswith(SHARE_PREFIX):
        return topic_filter.split("/", 2)[2]
    return topic_filter

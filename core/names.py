"""The one rule for names that end up in paths, URLs, MQTT topics and HTTP Basic auth.

Model names, versions, labels, device ids and group names all use the same boring
alphabet: a letter or digit, then up to 63 letters, digits, ``.``, ``_`` or ``-``.
So a name is always one path component (never ``.``, ``..`` or a dot-file such as
the model store's ``.state.json``), one topic level (no ``/``, ``+``, ``#``), a
Basic-auth user (no ``:``) and a log field (no control character, no newline).

Every check is a full match: ``re.match`` with ``$`` lets a trailing newline through
(``$`` also matches before a final ``\\n``), which is how ``"2\\n"`` once passed as a
version. Pure functions, any thread.
"""

from __future__ import annotations

import re
from typing import Final

from edgefleet.core.errors import BadRequest

NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
# Labels on the fleet's registry start with a letter, so that one never reads as a
# version number; the agent accepts any name as a label (NAME_PATTERN).
REGISTRY_LABEL_PATTERN: Final = r"[A-Za-z][A-Za-z0-9._-]{0,63}"

_NAME = re.compile(NAME_PATTERN)
_REGISTRY_LABEL = re.compile(REGISTRY_LABEL_PATTERN)


class InvalidName(BadRequest, ValueError):
    """A name breaks the rule: a 400 at an HTTP boundary, a ValueError everywhere else
    (pydantic validators turn it into a validation error with this message)."""


def is_name(value: object) -> bool:
    """True when ``value`` is a string that fully matches ``NAME_PATTERN``."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_name(value: object, what: str) -> str:
    """``value`` when it is a valid name, else ``InvalidName`` naming ``what``."""
    if not is_name(value):
        raise InvalidName(f"{what} {value!r} must match {NAME_PATTERN}")
    assert isinstance(value, str)
    return value


def check_model_name(value: object) -> str:
    return check_name(value, "model name")


def check_version(value: object) -> str:
    return check_name(value, "version")


def check_label(value: object) -> str:
    """A label on the agent (a model's ``labels``, the local label API, ``desired``)."""
    return check_name(value, "label")


def check_registry_label(value: object) -> str:
    """A label in the fleet's registry: a name that starts with a letter."""
    if not isinstance(value, str) or _REGISTRY_LABEL.fullmatch(value) is None:
        raise InvalidName(f"label {value!r} must match {REGISTRY_LABEL_PATTERN}")
    return value


def check_device_id(value: object) -> str:
    """A device id: the fleet's key, one MQTT topic level, the Basic-auth user."""
    return check_name(value, "device id")


def check_group(value: object) -> str:
    return check_name(value, "group name")

"""Config primitives shared by the agent's and the fleet's YAML configs.

Every section forbids unknown keys (a typo is an error, not a silent default), and
errors name the key path and the YAML line it came from. Duplicate keys in a mapping
are refused (YAML would keep the last one silently).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class TrustConfig(Section):
    public_keys: list[Path] = Field(
        default_factory=list, description="PEM files of the Ed25519 keys bundles may be signed by"
    )
    allow_unsigned: bool = Field(False, description="development only; logged loudly at start")


PathKey = tuple[str | int, ...]
Lines = dict[PathKey, int]


def _node_lines(node: yaml.Node, path: PathKey, out: Lines) -> None:
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            out[(*path, k)] = key.start_mark.line + 1
            _node_lines(value, (*path, k), out)
            out[(*path, k)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, (*path, i), out)


def parse_yaml_model(
    model: type[M],
    text: str,
    source: str = "<config>",
    prepare: Callable[[dict[str, Any]], None] | None = None,
) -> M:
    """Validate YAML ``text`` as ``model``; errors name each key path and its line.

    Shared by the agent's and the fleet's configs: ``prepare`` may rewrite the raw
    mapping first (relative paths made absolute).
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: YAML syntax error at {where}: {problem}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    lines: Lines = {}
    if node is not None:
        _node_lines(node, (), lines)
    if prepare is not None:
        prepare(raw)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            # The deepest located ancestor: a missing key has no line of its own.
            line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
            key = ".".join(str(p) for p in loc) or "(root)"
            at = f" (line {line})" if line is not None else ""
            problems.append(f"{key}{at}: {err['msg']}")
        raise ConfigError(f"{source}: invalid configuration\n  " + "\n  ".join(problems)) from exc

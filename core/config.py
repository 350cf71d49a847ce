"""Config primitives shared by the agent's and the fleet's YAML configs.

- :class:`Section`: every section forbids unknown keys (a typo is an error, not a
  silent default).
- :func:`parse_yaml_model`: errors name the key path and the YAML line it came from;
  a key given twice in one mapping is refused with both lines (plain YAML would keep
  the last one silently).
- :data:`ConfigPath`: a path field that is made absolute against the config file's
  directory while it is validated (``model_validate(raw, context={"base": dir})``),
  so a relative path means the same thing whatever the working directory, without a
  hand-kept list of which keys are paths. :data:`LibraryPath` is the same for a
  shared library, except that a bare name (no ``/``) is left for the dynamic loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo
from yaml.constructor import ConstructorError

from edgefleet.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

BASE_CONTEXT_KEY = "base"


def _base_dir(info: ValidationInfo) -> Path | None:
    context = info.context
    if isinstance(context, dict):
        base = context.get(BASE_CONTEXT_KEY)
        if isinstance(base, Path | str):
            return Path(base)
    return None


def rebase_path(value: Path, info: ValidationInfo) -> Path:
    """A relative ``value`` joined to the validation context's ``base`` (if any).

    Without a base (a config given as text, or a model built in code) the path is
    kept as it is: relative to the working directory, as a command-line path would be.
    """
    base = _base_dir(info)
    if base is not None and not value.is_absolute():
        return base / value
    return value


def rebase_library(value: Path, info: ValidationInfo) -> Path:
    """As :func:`rebase_path`, but a bare name (``libedgetpu.so.1``: no ``/``) is for the
    dynamic loader to find on its search path, so it is kept as it is."""
    if "/" not in str(value):
        return value
    return rebase_path(value, info)


# Every path field of a config file uses one of these two (tests/core/test_config.py
# walks the agent's and the fleet's models and fails on a plain ``Path`` field).
ConfigPath = Annotated[Path, AfterValidator(rebase_path)]
LibraryPath = Annotated[Path, AfterValidator(rebase_library)]


class Section(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class TrustConfig(Section):
    public_keys: list[ConfigPath] = Field(
        default_factory=list, description="PEM files of the Ed25519 keys bundles may be signed by"
    )
    allow_unsigned: bool = Field(False, description="development only; logged loudly at start")


# ----------------------------------------------------------------------- YAML


class DuplicateKeyError(ConstructorError):
    """A mapping gives the same key twice; ``problem_mark`` is the second one."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    Keys brought in by a merge (``<<: *anchor``) may be overridden, as YAML intends;
    only keys written out in the same mapping clash.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if first is not None:
                    raise DuplicateKeyError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key!r} (first given at line {first.start_mark.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """The document in ``text`` and its node tree (for line numbers), duplicate keys
    refused. Raises ``yaml.YAMLError`` (``DuplicateKeyError`` among them)."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, node


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
    model: type[M], text: str, source: str = "<config>", base: Path | None = None
) -> M:
    """Validate YAML ``text`` as ``model``; errors name each key path and its line.

    Shared by the agent's and the fleet's configs. ``base``: the directory relative
    :data:`ConfigPath` values are resolved against (the config file's); None keeps
    them as written.
    """
    try:
        raw, node = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, DuplicateKeyError) and mark is not None:
            raise ConfigError(f"{source}: line {mark.line + 1}: {problem}") from exc
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown line"
        raise ConfigError(f"{source}: YAML syntax error at {where}: {problem}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    lines: Lines = {}
    if node is not None:
        _node_lines(node, (), lines)
    context = {BASE_CONTEXT_KEY: base} if base is not None else None
    try:
        return model.model_validate(raw, context=context)
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

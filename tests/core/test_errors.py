"""One exception tree: every error edgefleet defines derives from ``EdgefleetError``.

The tree is drawn in ``core/errors.py``'s docstring. This test imports every module of
the installed package and fails on an exception class outside the tree, so a new
``class FooError(Exception)`` cannot slip in unnoticed.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import edgefleet.agent
import edgefleet.converters
import edgefleet.core
import edgefleet.fleet
from edgefleet.core.errors import EdgeError, EdgefleetError

# Internal control flow or library-protocol classes, never raised to a caller.
OUTSIDE_THE_TREE = {
    # a yaml ConstructorError: PyYAML's loader machinery expects its own type; the
    # config loader turns it into a ConfigError with the line.
    "edgefleet.core.config.DuplicateKeyError",
    # edge-convert's exit path: carries an exit code from a subcommand to main().
    "edgefleet.converters.cli._Fail",
}


def _modules() -> list[str]:
    names = []
    for pkg in (edgefleet.core, edgefleet.agent, edgefleet.fleet, edgefleet.converters):
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            names.append(info.name)
    return sorted(n for n in names if not n.endswith("__main__"))


def _exceptions() -> list[type[BaseException]]:
    found = []
    for name in _modules():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == name:
                found.append(obj)
    return found


def test_every_error_is_in_the_tree() -> None:
    errors = _exceptions()
    assert len(errors) > 20  # the scan found the package's errors at all
    outside = sorted(
        f"{e.__module__}.{e.__qualname__}"
        for e in errors
        if not issubclass(e, EdgefleetError)
        and f"{e.__module__}.{e.__qualname__}" not in OUTSIDE_THE_TREE
    )
    assert not outside, f"exceptions outside EdgefleetError's tree: {outside}"


@pytest.mark.parametrize(
    ("name", "status"),
    [("BadRequest", 400), ("NotFound", 404), ("PayloadTooLarge", 413), ("Unavailable", 503)],
)
def test_http_facing_errors_carry_their_status(name: str, status: int) -> None:
    cls = getattr(importlib.import_module("edgefleet.core.errors"), name)
    assert issubclass(cls, EdgeError) and cls.status == status


def test_the_allowlist_names_real_classes() -> None:
    names = {f"{e.__module__}.{e.__qualname__}" for e in _exceptions()}
    assert names >= OUTSIDE_THE_TREE

"""Session fixtures for the converter and digits-recipe tests: one real digits build.

A pytest plugin loaded by tests/conftest.py's ``pytest_plugins``; the build runs once
per session, and only when a test asks for it. Tests that alter a bundle copy it
first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from models.demo import write_demo_images
from models.digits import DigitsBuild, build_digits
from models.recipe import BuildContext, write_agent_configs, write_stamp


@dataclass(frozen=True)
class DigitsFixture:
    ctx: BuildContext
    build: DigitsBuild

    @property
    def build_dir(self) -> Path:
        return self.ctx.build_dir


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsFixture:
    root = tmp_path_factory.mktemp("digits")
    ctx = BuildContext.create(root / "build", cache_dir=root / "cache")
    build = build_digits(ctx)
    # What `python -m models --only digits` leaves behind, so --if-missing can be tested.
    write_agent_configs(ctx, build.bundles)
    write_demo_images(ctx, {"digits-edge"})
    write_stamp(ctx, {"digits": build.bundles})
    return DigitsFixture(ctx, build)

"""``python -m models``: build every sample bundle and a ready agent config.

Recipes are modules ``models.<name>`` with ``build(ctx) -> list[Path]``; an error
inside a recipe fails the build and says which recipe.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from edgefleet.converters.bundletools import read_manifest_unverified
from edgefleet.converters.cli import cli_logging
from edgefleet.converters.gate import QualityGateError
from models.demo import DEMO_DIR, write_demo_images
from models.recipe import (
    AGENT_CONFIG,
    CLOUD_CONFIG,
    CLOUD_TOKEN,
    DEFAULT_VERSION,
    BuildContext,
    RecipeError,
    read_stamp,
    write_agent_configs,
    write_stamp,
)

log = logging.getLogger("models")

RECIPES = ("digits", "digits_litert", "face_detect", "fleet_update", "digits_bad")


def load_recipes(names: Sequence[str] = RECIPES) -> dict[str, ModuleType]:
    return {name: importlib.import_module(f"models.{name}") for name in names}


def up_to_date(ctx: BuildContext, recipes: Sequence[str]) -> bool:
    """agent.yaml exists and every recipe's bundles were built with this version and key."""
    stamp = read_stamp(ctx.build_dir)
    built = stamp.get("recipes", {})
    if not (ctx.build_dir / AGENT_CONFIG).exists() or not (ctx.build_dir / DEMO_DIR).is_dir():
        return False
    if stamp.get("version") != ctx.version or stamp.get("key_id") != ctx.key_id:
        return False
    if any(name not in built for name in recipes):
        return False
    # A build from before the cloud fallback: its agent.yaml has no fallback section.
    token = ctx.build_dir / "keys" / CLOUD_TOKEN
    if (ctx.build_dir / CLOUD_CONFIG).exists() and not token.exists():
        return False
    return all((ctx.build_dir / b).exists() for name in recipes for b in built[name])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="build directory (default: models/build)",
    )
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when agent.yaml and every bundle already exist",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=RECIPES,
        metavar="RECIPE",
        help=f"build only this recipe (repeatable; one of {', '.join(RECIPES)})",
    )
    parser.add_argument("--version", default=DEFAULT_VERSION, help="bundle version to write")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    with cli_logging(args.quiet):
        return build_all(args.out, args.version, args.only or RECIPES, args.if_missing)


def build_all(out: Path | None, version: str, only: Sequence[str], if_missing: bool = False) -> int:
    """Build the recipes ``only`` into ``out``; keep other recipes' earlier bundles."""
    start = time.monotonic()
    ctx = BuildContext.create(out, version=version)
    recipes = load_recipes(only)
    if if_missing and up_to_date(ctx, list(recipes)):
        log.info("models up to date in %s (agent.yaml and all bundles exist)", ctx.build_dir)
        return 0
    stamp = read_stamp(ctx.build_dir)
    built: dict[str, list[Path]] = {}
    if stamp.get("version") == ctx.version and stamp.get("key_id") == ctx.key_id:
        # Keep what other recipes built earlier (e.g. with --only), if still on disk.
        for name, files in stamp.get("recipes", {}).items():
            paths = [ctx.build_dir / f for f in files]
            if name not in recipes and all(p.exists() for p in paths):
                built[name] = paths
    for name, module in recipes.items():
        t0 = time.monotonic()
        log.info("building %s", name)
        try:
            built[name] = [Path(p) for p in module.build(ctx)]
        except (RecipeError, QualityGateError) as exc:
            # A model that fails its own checks is a result, not a crash: say which.
            log.error("recipe %s failed: %s", name, exc)
            return 1
        log.info(
            "built %s in %.1fs: %s",
            name,
            time.monotonic() - t0,
            ", ".join(p.name for p in built[name]),
        )
    bundles = [p for paths in built.values() for p in paths]
    # Only top-level bundles are the agent's bootstrap models (fleet/ holds updates).
    write_agent_configs(ctx, [b for b in bundles if b.parent == ctx.build_dir])
    write_demo_images(ctx, {read_manifest_unverified(b)[0].name for b in bundles})
    write_stamp(ctx, built)
    log.info("done in %.1fs: %s", time.monotonic() - start, ctx.build_dir / AGENT_CONFIG)
    return 0


if __name__ == "__main__":
    sys.exit(main())

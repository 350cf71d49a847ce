"""Recipe ``fleet_update``: a newer ``digits-edge`` for the fleet demo and benchmark.

``<build>/fleet/digits-edge-2.bundle``: the digits MLP retrained wider (see
``models.digits.build_edge_update``), signed with the same key as version 1, so a
fleet can push it to agents that run version 1. It lives in its own folder because
it is not one of the agent's bootstrap models: ``agent.yaml`` does not list it.
"""

from __future__ import annotations

from pathlib import Path

from models.digits import EDGE_NAME, build_edge_update
from models.recipe import BuildContext

UPDATE_DIR = "fleet"
UPDATE_VERSION = "2"


def update_bundle(build_dir: Path) -> Path:
    return build_dir / UPDATE_DIR / f"{EDGE_NAME}-{UPDATE_VERSION}.bundle"


def build(ctx: BuildContext) -> list[Path]:
    return [build_edge_update(ctx, ctx.build_dir / UPDATE_DIR, UPDATE_VERSION)]

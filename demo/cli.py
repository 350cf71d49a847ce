"""``edge-demo``: the fleet story of ``fleet_story`` (``make demo``'s first step)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgefleet.demo.fleet_story import main as run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edge-demo",
        description="a fleet stops a bad model version by its gates and promotes a good one"
        " across four store agents (all in this process, on loopback)",
    )
    parser.add_argument("--build", default="models/build", help="`python -m models` output")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="after the story, keep the fleet and the stores running (look around the console)",
    )
    args = parser.parse_args(argv)
    return run(Path(args.build), keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())

"""``edge-fleet``: the fleet service's command line (arrives with the fleet issue)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "edge-fleet: the fleet service is not built yet (see the fleet/MQTT sync issue);"
        " the agent runs standalone meanwhile.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())

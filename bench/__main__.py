"""``python -m bench NAME [options]``: run one benchmark (see ``python -m bench --help``)."""

from __future__ import annotations

import importlib
import sys

# Benchmark name -> module with ``main(argv) -> int``; imported only when run, so one
# benchmark's heavy dependencies never slow down (or break) another.
BENCHMARKS: dict[str, str] = {
    "overhead": "bench.overhead",
    "serving": "bench.serving",
    "joint": "bench.joint",
    "fleet": "bench.fleet",
    "mqtt": "bench.mqtt",
    "rollout_guard": "bench.rollout_guard",
    "shadow": "bench.shadow",
    "console": "bench.console",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        names = ", ".join(sorted(BENCHMARKS))
        print(
            f"usage: python -m bench NAME [options]   (NAME: {names};"
            " `python -m bench NAME --help` for its options)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHMARKS[argv[0]])
    return int(module.main(argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

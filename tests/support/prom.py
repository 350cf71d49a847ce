"""Prometheus text checks shared by the agent's and the fleet's metrics tests.

``promtool_check`` runs the real ``promtool check metrics`` (Debian's ``prometheus``
package, installed by deploy/ensure-test-tools.sh); a missing promtool fails the
test rather than skipping it. ``sample`` reads one sample with
``prometheus_client``'s own parser.
"""

from __future__ import annotations

import shutil
import subprocess

from prometheus_client.parser import text_string_to_metric_families


def promtool_check(text: str) -> None:
    """``promtool check metrics`` on ``text``: fails with promtool's complaints."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool missing: run deploy/ensure-test-tools.sh"
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``text``: (name, labels) → value."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample ``name{labels}`` (0.0 when absent: a counter not
    bumped yet)."""
    return samples(text).get((name, frozenset(labels.items())), 0.0)

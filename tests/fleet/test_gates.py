"""The gates' expressions, plans and statistics (fleet/gates.py): pure parts.

The statistics are checked the way a rollout uses them: the evidence grows look after
look (every ``tick`` re-decides on everything gathered so far), and a decision is final.
Seeded, so a failure is reproducible; sized for CI (a few thousand cheap decisions).
"""

from __future__ import annotations

import random

import pytest

from edgefleet.core.errors import BadRequest
from edgefleet.fleet.gates import (
    Counts,
    GateSyntaxError,
    decide_p95,
    decide_rate,
    parse_gate,
    parse_plan,
    wilson,
)


@pytest.mark.parametrize(
    ("text", "signal", "op", "a", "b"),
    [
        ("shadow_agreement >= 0.97", "shadow_agreement", ">=", 0.0, 0.97),
        ("fallback_rate <= baseline + 0.05", "fallback_rate", "<=", 1.0, 0.05),
        ("p95_ms <= 1.5 * baseline", "p95_ms", "<=", 1.5, 0.0),
        ("cloud_agreement >= baseline - 0.02", "cloud_agreement", ">=", 1.0, -0.02),
        ("error_rate<=baseline+0.01", "error_rate", "<=", 1.0, 0.01),
        ("drift_psi <= 0.2", "drift_psi", "<=", 0.0, 0.2),
        ("p95_ms <= baseline * 2", "p95_ms", "<=", 2.0, 0.0),
        ("error_rate <= baseline", "error_rate", "<=", 1.0, 0.0),
    ],
)
def test_gate_expressions(text: str, signal: str, op: str, a: float, b: float) -> None:
    g = parse_gate(text)
    assert (g.signal, g.op, g.a, g.b) == (signal, op, a, b)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("accuracy >= 0.9", "unknown signal 'accuracy'"),
        ("error_rate <=", "does not parse"),
        ("error_rate == 0.1", "unexpected '== 0.1'"),
        ("error_rate <= __import__('os')", "unexpected"),
        ("error_rate <= 1 +", "does not parse"),
        ("error_rate <= baseline + baseline", "does not parse"),
        ("error_rate <= other + 0.1", "only 'baseline'"),
        ("shadow_agreement >= baseline - 0.01", "no baseline"),
        ("0.1 >= error_rate", "does not parse"),
        ("", "a gate is a string"),
    ],
)
def test_bad_gate_expressions_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(GateSyntaxError) as err:
        parse_gate(text)
    assert fragment in str(err.value)
    assert isinstance(err.value, BadRequest)  # an HTTP 400


def test_plans_are_strict() -> None:
    plan = parse_plan(
        {
            "waves": [1, "50%", "100%"],
            "shadow": {"devices": "10%", "min_items": 300, "gates": ["shadow_agreement >= 0.97"]},
            "gates": ["error_rate <= baseline + 0.01", "p95_ms <= 1.5 * baseline"],
            "on_fail": "stop",
        }
    )
    assert plan.shadow is not None and plan.shadow.min_items == 300
    assert plan.promote == "stable" and plan.on_fail == "stop"
    bad = [
        ({"waves": [1], "gate": ["error_rate <= 0.1"]}, "gate: Extra inputs"),
        ({"waves": [1], "gates": ["latency <= 3"]}, "unknown signal"),
        ({"waves": [1], "gates": ["shadow_agreement >= 0.9"]}, "shadow stage only"),
        ({"waves": [1], "shadow": {"gates": ["error_rate <= 0.1"]}}, "shadow_agreement only"),
        ({"waves": [1], "shadow": {"sample_rate": 0}}, "shadow.sample_rate"),
        ({"waves": [1], "shadow": {"min_items": 0}}, "shadow.min_items"),
        ({"waves": [0]}, "waves"),
        ({"waves": [1], "on_fail": "explode"}, "on_fail"),
        ({"waves": [1], "min_requests": "10"}, "min_requests"),
        ({"waves": [1], "promote": "not a label"}, "promote"),
        ({"gates": []}, "waves"),
        ([1, 2], "a plan is an object"),
    ]
    for doc, fragment in bad:
        with pytest.raises(BadRequest) as err:
            parse_plan(doc)
        assert fragment in str(err.value), (doc, err.value)


def test_wilson_interval() -> None:
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(0, 200)
    assert lo == 0.0 and 0.0 < hi < 0.02


def _looks(
    rng: random.Random,
    gate: str,
    p_canary: float,
    p_base: float,
    step: int = 100,
    looks: int = 40,
) -> tuple[str, int]:
    """Evidence grows by ``step`` items per cohort and look; the first final decision."""
    g = parse_gate(gate)
    k1 = n1 = k0 = n0 = 0
    for look in range(1, looks + 1):
        k1 += sum(rng.random() < p_canary for _ in range(step))
        k0 += sum(rng.random() < p_base for _ in range(step))
        n1 += step
        n0 += step
        ev = decide_rate(g, Counts(k1, n1), Counts(k0, n0), 200, 200)
        if ev.outcome != "wait":
            return ev.outcome, look * step
    return "wait", looks * step


def test_noise_does_not_stop_a_good_version() -> None:
    """A canary exactly as good as the baseline, 150 seeded rollouts per gate: never
    failed, and nearly always passed within 4,000 items."""
    rng = random.Random(11)
    for gate, p in [
        ("error_rate <= baseline + 0.02", 0.05),
        ("fallback_rate <= baseline + 0.05", 0.20),
        ("cloud_agreement >= baseline - 0.05", 0.90),
    ]:
        outcomes = [_looks(rng, gate, p, p)[0] for _ in range(150)]
        assert outcomes.count("fail") == 0, gate
        assert outcomes.count("pass") >= 145, (gate, outcomes.count("wait"))


def test_a_version_20_points_worse_is_stopped_quickly() -> None:
    rng = random.Random(12)
    for _ in range(100):
        outcome, items = _looks(rng, "cloud_agreement >= baseline - 0.02", 0.70, 0.90, step=50)
        assert outcome == "fail" and items <= 300  # the minimum sample, then a look or two
    for _ in range(100):
        outcome, items = _looks(rng, "error_rate <= 0.05", 0.25, 0.0, step=50)
        assert outcome == "fail" and items <= 200


def test_below_the_minimum_sample_nothing_is_decided() -> None:
    g = parse_gate("error_rate <= baseline + 0.01")
    ev = decide_rate(g, Counts(199, 199), Counts(0, 1000), 200, 200)
    assert ev.outcome == "wait" and "199 of the 200" in ev.why
    ev = decide_rate(g, Counts(0, 1000), Counts(0, 150), 200, 200)
    assert ev.outcome == "wait" and "baseline" in ev.why


def test_p95_on_histogram_counts() -> None:
    g = parse_gate("p95_ms <= 1.5 * baseline")
    # Buckets: ..., 10, 20, 50, 100, ...: the baseline's p95 is 20 ms (threshold 30).
    base = [0, 0, 0, 0, 100, 880, 20, 0, 0, 0, 0, 0]
    same = decide_p95(g, base, base, 200, 200)
    assert same.outcome == "pass" and same.threshold == 30.0
    slower = [0, 0, 0, 0, 0, 0, 50, 900, 50, 0, 0, 0]  # p95 in (50, 100]
    ev = decide_p95(g, slower, base, 200, 200)
    assert ev.outcome == "fail" and ev.canary["low"] == 50.0
    ev = decide_p95(g, [*slower[:7], 100, 0, 0, 0, 0], base, 200, 200)
    assert ev.outcome == "wait"  # 150 requests: under the minimum
    absolute = parse_gate("p95_ms <= 200")
    assert decide_p95(absolute, slower, None, 200, 200).outcome == "pass"

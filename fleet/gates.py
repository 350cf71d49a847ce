"""Rollout gates: the plan format, the gate expressions, and the statistics that decide.

A rollout plan (``Plan``, docs/fleet.md "Rollout plans and gates") has an optional
**shadow** stage (the candidate runs beside the active version on a few devices and
answers nothing; its gates may only use ``shadow_agreement``) and **serving waves**
(today's cumulative waves), each gated by the plan's ``gates``.

**Expressions** (``parse_gate``; no ``eval``: a tokenizer and a three-form grammar)::

    SIGNAL OP NUMBER                 error_rate <= 0.01
    SIGNAL OP baseline [+|- NUMBER]  fallback_rate <= baseline + 0.05
    SIGNAL OP NUMBER * baseline      p95_ms <= 1.5 * baseline   (also baseline * NUMBER)

with ``OP`` one of ``<=``, ``>=``. A gate is held as ``SIGNAL OP a * baseline + b``
(``a = 0`` for an absolute threshold).

**Decisions** (``decide``): each gate answers ``pass``, ``fail`` or ``wait``. Below the
plan's minimum sample (canary requests, compared shadow items, baseline requests for a
relative gate) it waits. Above it:

- *Rates* (``error_rate``, ``fallback_rate``, ``cloud_agreement``,
  ``shadow_agreement``): ``t = p_canary - a * p_baseline - b`` with a 95 % interval
  from the Wilson score intervals of both proportions (Newcombe's method:
  ``t ± sqrt(d_canary² + a² d_baseline²)``). For ``<=`` the gate fails when the low
  end of the 99 % interval is above 0 (the canary is worse than allowed with 99.5 %
  one-sided confidence: see ``Z_FAIL`` for why not 95 %) and passes when the high end
  of the 95 % interval is at most 0; otherwise it waits.
  ``>=`` mirrors it. A good version is thus not stopped by noise, and one 20 points
  worse is stopped as soon as a few dozen items make that clear.
- *p95 latency* (``p95_ms``): the threshold ``T = a * baseline_p95 + b`` with the
  baseline's p95 read from its merged histogram (the bucket's upper bound). For the
  canary, the ranks ``0.95 n ± 1.96 sqrt(0.0475 n)`` of its merged histogram give a
  95 % interval of its p95 at bucket resolution (order-statistic bound, no
  bootstrap): ``<=`` fails when even the low end's bucket lies wholly above ``T`` and
  passes when the high end's bucket lies wholly at or below ``T``.
- *Drift* (``drift_psi``): the mean of the cohort devices' latest ``psi_max`` (the
  largest PSI over the input features of a window, as the device computed it against
  the bundle's reference profile) against ``T``; no interval (each figure is already
  an aggregate over a window). Devices without a figure (an old bundle without a
  profile, too few items) give none; with no figure at all (or before the fleet
  stores drift: no ``drift_stats`` table) the gate waits with "no evidence".

Pure functions and immutable models: any thread. The queries that gather the figures
run in the rollouts' write jobs (``fleet/rollouts.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.core import protocol
from edgefleet.core.errors import BadRequest
from edgefleet.core.names import check_registry_label

Op = Literal["<=", ">="]
Outcome = Literal["pass", "fail", "wait"]

RATE_SIGNALS = ("error_rate", "fallback_rate", "cloud_agreement", "shadow_agreement")
SIGNALS = (*RATE_SIGNALS, "p95_ms", "drift_psi")
SHADOW_SIGNALS = ("shadow_agreement",)
Z = 1.96  # the 95 % two-sided normal quantile: the interval a gate passes on
# A gate fails on a wider interval (99 % two-sided, 99.5 % one-sided): the rollout looks
# again at every tick as evidence grows, and each look is a chance for noise to cross
# the line; seeded repetitions (tests/fleet/test_gates.py) stopped a good version
# about once in 150 rollouts at 95 %, never at 99 %. A 20-points-worse version is
# still stopped at the minimum sample.
Z_FAIL = 2.576
_PCT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_TOKEN = re.compile(r"\s*(?:(<=|>=)|([A-Za-z_][A-Za-z0-9_]*)|(\d+(?:\.\d*)?|\.\d+)|([*+-]))")


class GateSyntaxError(BadRequest):
    """A gate expression that does not parse, or names an unknown signal (HTTP 400)."""


@dataclass(frozen=True, slots=True)
class Gate:
    """``signal op a * baseline + b``; ``text`` as the operator wrote it."""

    text: str
    signal: str
    op: Op
    a: float  # coefficient of the baseline figure (0: an absolute threshold)
    b: float

    @property
    def relative(self) -> bool:
        return self.a != 0.0


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise GateSyntaxError(f"gate {text!r}: unexpected {text[pos:].strip()[:20]!r}")
        kind = ("op", "name", "num", "sym")[m.lastindex - 1 if m.lastindex else 0]
        out.append((kind, m.group(m.lastindex or 0)))
        pos = m.end()
    return out


def parse_gate(text: str) -> Gate:
    """A gate expression → ``Gate``; ``GateSyntaxError`` (400) saying what is wrong."""
    if not isinstance(text, str) or not text.strip() or len(text) > 200:
        raise GateSyntaxError("a gate is a string such as 'error_rate <= baseline + 0.01'")
    toks = _tokens(text)
    form = "SIGNAL OP NUMBER, SIGNAL OP baseline [+|- NUMBER] or SIGNAL OP NUMBER * baseline"
    if len(toks) < 3 or toks[0][0] != "name" or toks[1][0] != "op":
        raise GateSyntaxError(f"gate {text!r} does not parse: use {form}")
    signal = toks[0][1]
    if signal not in SIGNALS:
        raise GateSyntaxError(
            f"gate {text!r}: unknown signal {signal!r}; known: {', '.join(SIGNALS)}"
        )
    op: Op = "<=" if toks[1][1] == "<=" else ">="
    rest = [(k, v) for k, v in toks[2:]]
    shape = " ".join(v if k in ("sym",) or v == "baseline" else k for k, v in rest)
    nums = [float(v) for k, v in rest if k == "num"]
    names = [v for k, v in rest if k == "name"]
    if any(n != "baseline" for n in names):
        raise GateSyntaxError(f"gate {text!r}: only 'baseline' may appear on the right")
    a, b = {
        "num": lambda: (0.0, nums[0]),
        "baseline": lambda: (1.0, 0.0),
        "baseline + num": lambda: (1.0, nums[0]),
        "baseline - num": lambda: (1.0, -nums[0]),
        "num * baseline": lambda: (nums[0], 0.0),
        "baseline * num": lambda: (nums[0], 0.0),
    }.get(shape, lambda: (math.nan, math.nan))()
    if math.isnan(a) or not all(math.isfinite(x) for x in (a, b)):
        raise GateSyntaxError(f"gate {text!r} does not parse: use {form}")
    if a != 0.0 and signal in SHADOW_SIGNALS:
        raise GateSyntaxError(
            f"gate {text!r}: shadow_agreement has no baseline (it compares with the"
            " active version already): use an absolute threshold"
        )
    if a < 0:
        raise GateSyntaxError(f"gate {text!r}: the baseline factor must be positive")
    return Gate(text.strip(), signal, op, a, b)


# --------------------------------------------------------------------------- plans


def _check_wave(w: int | str) -> int | str:
    if isinstance(w, bool):
        raise ValueError(f"bad wave {w!r}")
    if isinstance(w, int):
        if w < 1:
            raise ValueError(f"a wave of {w} devices: must be at least 1")
        return w
    m = _PCT.match(w)
    if m is None or not 0 < float(m.group(1)) <= 100:
        raise ValueError(f"bad wave {w!r}: an integer device count or a share like '10%'")
    return w


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class ShadowStage(_Strict):
    """The shadow stage: ``devices`` (a count or a share of the targeted devices that run
    a version of the model) run the candidate in shadow on ``sample_rate`` of their
    requests; it ends when its gates pass after ``min_duration_s`` and ``min_items``
    compared items."""

    devices: int | str = 1
    sample_rate: float = Field(1.0, gt=0.0, le=1.0)
    min_duration_s: float = Field(0.0, ge=0.0, le=30 * 24 * 3600.0)
    min_items: int = Field(200, ge=1, le=10**9)
    gates: list[str] = Field(default_factory=lambda: ["shadow_agreement >= 0.95"], min_length=1)

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: int | str) -> int | str:
        return _check_wave(v)

    @field_validator("gates")
    @classmethod
    def _gates(cls, v: list[str]) -> list[str]:
        for g in v:
            gate = parse_gate(g)
            if gate.signal not in SHADOW_SIGNALS:
                raise ValueError(f"gate {g!r}: the shadow stage gates on shadow_agreement only")
        return v


class Plan(_Strict):
    """A rollout plan (``--plan plan.yaml``, or the body of ``POST /v1/assignments``)."""

    waves: list[int | str] = Field(min_length=1, max_length=100)
    shadow: ShadowStage | None = None
    gates: list[str] = Field(default_factory=list, max_length=20)
    min_requests: int = Field(200, ge=1, le=10**9)  # canary requests per wave
    min_baseline_requests: int = Field(200, ge=1, le=10**9)  # for relative gates
    min_audited: int = Field(50, ge=1, le=10**9)  # cloud-checked items, cloud_agreement
    on_fail: Literal["stop", "rollback"] = "rollback"
    promote: str | None = Field("stable", min_length=1, max_length=64)
    max_failure_share: float = Field(0.2, ge=0.0, le=1.0)
    wave_timeout_s: float | None = Field(None, gt=0.0)

    @field_validator("waves")
    @classmethod
    def _waves(cls, v: list[int | str]) -> list[int | str]:
        return [_check_wave(w) for w in v]

    @field_validator("promote")
    @classmethod
    def _promote(cls, v: str | None) -> str | None:
        return None if v is None else check_registry_label(v)

    @field_validator("gates")
    @classmethod
    def _gates(cls, v: list[str]) -> list[str]:
        for g in v:
            if parse_gate(g).signal in SHADOW_SIGNALS:
                raise ValueError(f"gate {g!r}: shadow_agreement gates the shadow stage only")
        return v

    @property
    def gated(self) -> list[Gate]:
        return [parse_gate(g) for g in self.gates]


def parse_plan(doc: Any) -> Plan:
    """A JSON/YAML value → ``Plan``; ``BadRequest`` (400) with the first problem."""
    if not isinstance(doc, dict):
        raise BadRequest("a plan is an object with waves (and shadow, gates, on_fail, ...)")
    try:
        return Plan.model_validate(doc)
    except GateSyntaxError:
        raise
    except ValidationError as exc:
        raise BadRequest(f"plan: {protocol.one_line(exc)}") from None


# ---------------------------------------------------------------------- statistics


def wilson(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n`` (``(0, 1)`` for ``n = 0``)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class Counts:
    """A rate's evidence: ``k`` of ``n`` (errors of requests, agreeing of compared...)."""

    k: int
    n: int

    @property
    def rate(self) -> float | None:
        return self.k / self.n if self.n else None


@dataclass(slots=True)
class Evidence:
    """What a gate was decided on (stored with the decision, shown by ``rollout status``)."""

    gate: str
    signal: str
    outcome: Outcome
    why: str
    canary: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "signal": self.signal,
            "outcome": self.outcome,
            "why": self.why,
            "canary": self.canary,
            "baseline": self.baseline,
            "threshold": self.threshold,
        }


def decide_rate(
    gate: Gate, canary: Counts, baseline: Counts | None, min_n: int, min_baseline: int
) -> Evidence:
    """A rate gate (module doc): ``t = p1 - a p0 - b`` and its Newcombe interval."""
    ev = Evidence(gate.text, gate.signal, "wait", "")
    lo1, hi1 = wilson(canary.k, canary.n)
    ev.canary = {"k": canary.k, "n": canary.n, "value": canary.rate, "low": lo1, "high": hi1}
    if canary.n < min_n:
        ev.why = f"{canary.n} of the {min_n} canary items needed before deciding"
        return ev
    p1 = canary.k / canary.n
    # Squared margins of the canary's interval: [0] for passing (Z), [1] for failing.
    flo1, fhi1 = wilson(canary.k, canary.n, Z_FAIL)
    lower_m2 = [(p1 - lo1) ** 2, (p1 - flo1) ** 2]
    upper_m2 = [(hi1 - p1) ** 2, (fhi1 - p1) ** 2]
    p0 = 0.0
    if gate.relative:
        if baseline is None or baseline.n < min_baseline:
            have = 0 if baseline is None else baseline.n
            ev.why = f"{have} of the {min_baseline} baseline items needed before deciding"
            if baseline is not None:
                ev.baseline = {"k": baseline.k, "n": baseline.n, "value": baseline.rate}
            return ev
        p0 = baseline.k / baseline.n
        lo0, hi0 = wilson(baseline.k, baseline.n)
        ev.baseline = {"k": baseline.k, "n": baseline.n, "value": p0, "low": lo0, "high": hi0}
        flo0, fhi0 = wilson(baseline.k, baseline.n, Z_FAIL)
        lower_m2 = [
            lower_m2[0] + gate.a**2 * (hi0 - p0) ** 2,
            lower_m2[1] + gate.a**2 * (fhi0 - p0) ** 2,
        ]
        upper_m2 = [
            upper_m2[0] + gate.a**2 * (p0 - lo0) ** 2,
            upper_m2[1] + gate.a**2 * (p0 - flo0) ** 2,
        ]
    threshold = gate.a * p0 + gate.b
    ev.threshold = threshold
    t = p1 - threshold
    t_lo, t_hi = t - math.sqrt(lower_m2[0]), t + math.sqrt(upper_m2[0])
    f_lo, f_hi = t - math.sqrt(lower_m2[1]), t + math.sqrt(upper_m2[1])
    ev.canary["diff_low"], ev.canary["diff_high"] = t_lo, t_hi
    ev.canary["diff_low_99"], ev.canary["diff_high_99"] = f_lo, f_hi
    worse, within = (f_lo > 0, t_hi <= 0) if gate.op == "<=" else (f_hi < 0, t_lo >= 0)
    figure = (
        f"{p1:.4f} (margin to the threshold {t:+.4f}; 95% interval {t_lo:+.4f}..{t_hi:+.4f},"
        f" 99% {f_lo:+.4f}..{f_hi:+.4f})"
    )
    if worse:
        ev.outcome, ev.why = "fail", f"{gate.signal} {figure} is beyond {threshold:.4f}"
    elif within:
        ev.outcome, ev.why = "pass", f"{gate.signal} {figure} is within {threshold:.4f}"
    else:
        ev.why = f"{gate.signal} {figure}: not decided yet at {threshold:.4f}"
    return ev


def _rank_bucket(counts: Sequence[int], rank: float) -> int:
    """Index of the bucket holding the ``rank``-th smallest item (1-based, clamped)."""
    total = sum(counts)
    r = min(max(rank, 1.0), float(total))
    cumulative = 0
    for i, c in enumerate(counts):
        cumulative += c
        if cumulative >= r:
            return i
    return len(counts) - 1


def _edges(bounds: Sequence[float], i: int) -> tuple[float, float]:
    lower = 0.0 if i == 0 else float(bounds[i - 1])
    upper = float(bounds[i]) if i < len(bounds) else math.inf
    return lower, upper


def decide_p95(
    gate: Gate,
    canary: Sequence[int],
    baseline: Sequence[int] | None,
    min_n: int,
    min_baseline: int,
    bounds: Sequence[float] = protocol.LATENCY_BOUNDS_MS,
) -> Evidence:
    """The p95 latency gate on histogram counts (module doc)."""
    ev = Evidence(gate.text, gate.signal, "wait", "")
    n = sum(canary)
    point = _edges(bounds, _rank_bucket(canary, 0.95 * n))[1] if n else None
    ev.canary = {"n": n, "value": point}
    if n < min_n:
        ev.why = f"{n} of the {min_n} canary requests needed before deciding"
        return ev
    base = 0.0
    if gate.relative:
        n0 = sum(baseline) if baseline is not None else 0
        if baseline is None or n0 < min_baseline:
            ev.why = f"{n0} of the {min_baseline} baseline requests needed before deciding"
            return ev
        base = _edges(bounds, _rank_bucket(baseline, 0.95 * n0))[1]
        ev.baseline = {"n": n0, "value": base}
        if not math.isfinite(base):
            ev.why = f"the baseline's p95 is above {bounds[-1]} ms: no threshold to compare with"
            return ev
    threshold = gate.a * base + gate.b
    ev.threshold = threshold
    spread = Z * math.sqrt(n * 0.95 * 0.05)
    low_edge = _edges(bounds, _rank_bucket(canary, 0.95 * n - spread))[0]
    high_edge = _edges(bounds, _rank_bucket(canary, 0.95 * n + spread))[1]
    ev.canary.update(low=low_edge, high=high_edge)
    figure = f"p95 {point} ms (95% interval {low_edge}..{high_edge} ms)"
    if gate.op == "<=":
        worse, within = low_edge >= threshold, high_edge <= threshold
    else:
        worse, within = high_edge <= threshold, low_edge >= threshold
    if worse:
        ev.outcome, ev.why = "fail", f"{figure} is beyond {threshold:g} ms"
    elif within:
        ev.outcome, ev.why = "pass", f"{figure} is within {threshold:g} ms"
    else:
        ev.why = f"{figure}: not decided yet at {threshold:g} ms (bucket resolution)"
    return ev


def decide_mean(
    gate: Gate, canary: Sequence[float], baseline: Sequence[float] | None, min_n: int
) -> Evidence:
    """A gate on a score that is already an aggregate (drift): the canary devices' mean."""
    ev = Evidence(gate.text, gate.signal, "wait", "")
    if not canary:
        ev.why = "no evidence: no drift score for the canary yet"
        return ev
    mean = sum(canary) / len(canary)
    ev.canary = {"n": len(canary), "value": mean}
    if len(canary) < min_n:
        ev.why = f"{len(canary)} of the {min_n} canary drift scores needed before deciding"
        return ev
    base = 0.0
    if gate.relative:
        if not baseline:
            ev.why = "no evidence: no drift score for the baseline"
            return ev
        base = sum(baseline) / len(baseline)
        ev.baseline = {"n": len(baseline), "value": base}
    threshold = gate.a * base + gate.b
    ev.threshold = threshold
    ok = mean <= threshold if gate.op == "<=" else mean >= threshold
    ev.outcome = "pass" if ok else "fail"
    ev.why = f"{gate.signal} {mean:.4f} {'within' if ok else 'beyond'} {threshold:.4f}"
    return ev

"""The drift math (core/drift.py) against figures computed independently: scipy's
relative entropy and Jensen–Shannon distance, and the normal distribution's CDF."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import norm

from edgefleet.core import drift
from edgefleet.core.protocol import CONFIDENCE_BOUNDS


def independent_psi(e: np.ndarray, a: np.ndarray) -> float:
    # PSI is the symmetric KL divergence: KL(a||e) + KL(e||a).
    return float(rel_entr(a, e).sum() + rel_entr(e, a).sum())


def test_psi_and_js_of_known_distributions() -> None:
    e = np.array([0.1, 0.2, 0.3, 0.4])
    a = np.array([0.25, 0.25, 0.25, 0.25])
    assert drift.psi(e, a) == pytest.approx(independent_psi(e, a), rel=1e-12)
    assert drift.js_divergence(e, a) == pytest.approx(jensenshannon(e, a, base=2) ** 2, rel=1e-9)
    # Counts are normalised: the same distribution scaled is no drift.
    assert drift.psi(e, e * 1000) == pytest.approx(0.0, abs=1e-12)
    assert drift.js_divergence(e, e * 7) == pytest.approx(0.0, abs=1e-12)
    # Disjoint distributions: JS is 1 bit, PSI finite thanks to the epsilon.
    assert drift.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    eps = drift.EPSILON
    assert drift.psi([1, 0], [0, 1]) == pytest.approx(2 * (1 - eps) * np.log(1 / eps))


def test_identical_samples_score_about_zero() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(20_000, 3))
    profile = drift.build_profile({"x": ref}, bins=10)
    counts = drift.DriftCounts(profile)
    counts.add({"x": rng.normal(size=(20_000, 3))})
    score = counts.score()
    assert score.samples == 20_000 and score.reason is None
    assert score.psi_max is not None and score.psi_max < 0.005
    assert score.psi_mean is not None and score.psi_mean <= score.psi_max


def test_shifted_normal_matches_the_analytic_psi() -> None:
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(200_000, 1))
    profile = drift.build_profile({"x": ref}, bins=10)
    edges = np.array(profile.inputs[0].features[0].edges)
    # What the reference bins hold of N(0.5, 1), from the CDF (no sampling).
    cdf = np.concatenate([[0.0], norm.cdf(edges, loc=0.5), [1.0]])
    expected_live = np.diff(cdf)
    expected = independent_psi(np.full(10, 0.1), expected_live)
    counts = drift.DriftCounts(profile)
    counts.add({"x": rng.normal(loc=0.5, size=(200_000, 1))})
    score = counts.score()
    assert expected == pytest.approx(0.25, abs=0.03)  # the textbook "real shift"
    assert score.psi_max == pytest.approx(expected, abs=0.01)


def test_discrete_and_constant_features_and_image_stats() -> None:
    ref = np.zeros((100, 4))
    ref[:, 1] = np.arange(100) % 3  # three values
    profile = drift.build_profile({"x": ref}, bins=10)
    f0, f1 = profile.inputs[0].features[:2]
    assert f0.edges == [0.0] and f0.shares == [1.0, 0.0]  # constant: above it is drift
    assert len(f1.edges) <= 3
    counts = drift.DriftCounts(profile)
    counts.add({"x": np.ones((200, 4))})  # every constant-0 feature now 1
    score = counts.score()
    assert score.psi_max is not None and score.psi_max > 5
    wide = drift.build_profile({"img": np.random.default_rng(3).random((50, 32, 32, 3))}, bins=5)
    assert wide.inputs[0].kind == "image_stats"
    assert [f.name for f in wide.inputs[0].features] == ["brightness", "contrast"]


def test_outputs_and_too_few_samples() -> None:
    rng = np.random.default_rng(4)
    top = rng.integers(0, 10, size=1000)
    conf = rng.random(1000)
    profile = drift.build_profile(
        {"x": rng.random((1000, 2))}, top_class=top, n_classes=10, confidence=conf
    )
    assert profile.confidence is not None and profile.confidence.le == list(CONFIDENCE_BOUNDS)
    c = drift.DriftCounts(profile)
    c.add({"x": rng.random((10, 2))}, top_class=np.zeros(10, dtype=np.int64), confidence=conf[:10])
    assert c.score().psi_max is None and "too few samples" in (c.score().reason or "")
    c.add({"x": rng.random((500, 2))}, top_class=np.zeros(500, dtype=np.int64), confidence=conf)
    s = c.score()
    # Every answer is class 0 where the reference spread over ten: a large output PSI.
    assert s.psi_output is not None and s.psi_output > 1.0
    assert s.psi_max is not None and s.psi_max < 0.1


def test_a_bad_profile_is_refused() -> None:
    with pytest.raises(ValidationError, match="add up to 1"):
        drift.FeatureProfile(name="a", edges=[1.0], shares=[0.5, 0.6])
    with pytest.raises(ValidationError, match="ascending"):
        drift.FeatureProfile(name="a", edges=[2.0, 1.0], shares=[0.5, 0.25, 0.25])
    with pytest.raises(ValidationError, match="one more entry"):
        drift.FeatureProfile(name="a", edges=[1.0], shares=[1.0])

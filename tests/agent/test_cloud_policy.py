"""The fallback's parts on their own: breaker, budget, policy, confidence rules, and
the OIP client's wire decoding and answer checks."""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest

from edgefleet.agent.cloud.breaker import CircuitBreaker, State
from edgefleet.agent.cloud.budget import CallBudget
from edgefleet.agent.cloud.config import FallbackConfig
from edgefleet.agent.cloud.fallback import check_answer, expectation
from edgefleet.agent.cloud.policy import Route, resolve_policy, route_items
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.errors import ConfigError
from edgefleet.core.oip_client import (
    CloudAnswer,
    CloudProtocolError,
    decode_response,
    encode_request,
)
from edgefleet.core.processing.scoring import Scored, score
from tests.support.tiny import TINY_MANIFEST, agent_config


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- breaker -----------------------------------------------------------------------------


def test_breaker_opens_after_k_failures_probes_once_and_closes():
    clock = Clock()
    changes: list[State] = []
    b = CircuitBreaker(3, backoff_s=1.0, max_backoff_s=8.0, clock=clock, on_change=changes.append)
    for _ in range(2):
        b.acquire().failure("boom")
    assert b.state is State.CLOSED
    p = b.acquire()
    b.acquire().success()  # a success in between resets the count
    p.failure()
    assert b.state is State.CLOSED and b.consecutive_failures == 1
    for _ in range(2):
        b.acquire().failure("boom")
    assert b.state is State.OPEN and b.acquire() is None
    clock.now += 0.99
    assert b.acquire() is None
    clock.now += 0.02
    probe = b.acquire()
    assert probe is not None and probe.probe and b.state is State.HALF_OPEN
    assert b.acquire() is None  # one probe at a time
    probe.failure()
    assert b.state is State.OPEN and b.seconds_until_probe() == pytest.approx(2.0)  # doubled
    clock.now += 2.0
    b.acquire().success()
    assert b.state is State.CLOSED and b.opens == 0
    assert changes == [State.OPEN, State.HALF_OPEN, State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_breaker_backoff_is_capped_and_jittered():
    clock = Clock()
    b = CircuitBreaker(
        1, backoff_s=1.0, max_backoff_s=4.0, jitter=0.2, clock=clock, rng=random.Random(1)
    )
    delays = []
    for _ in range(6):
        permit = b.acquire()
        assert permit is not None
        permit.failure()
        delays.append(b.seconds_until_probe())
        clock.now += delays[-1]
    assert all(0.8 <= d <= 4.8 for d in delays)
    assert delays[-1] >= 3.2  # stuck at the cap (4 s +- 20 %)


def test_breaker_trip_abandon_and_stale_permits():
    clock = Clock()
    b = CircuitBreaker(5, backoff_s=1.0, max_backoff_s=1.0, clock=clock)
    old = b.acquire()
    b.acquire().failure("refused", trip=True)  # unreachable: open at once
    assert b.state is State.OPEN and b.last_error == "refused"
    clock.now += 1.0
    probe = b.acquire()
    old.success()  # started before the trouble: proves nothing
    assert b.state is State.HALF_OPEN
    probe.abandon()  # cancelled: the next call may probe at once
    assert b.state is State.OPEN and b.acquire() is not None


# ---- budget ------------------------------------------------------------------------------


def test_budget_per_minute_and_in_flight():
    clock = Clock()
    budget = CallBudget(per_minute=60, max_in_flight=2, clock=clock)
    a, b = budget.acquire(), budget.acquire()
    assert a and b and budget.acquire() is None  # two in flight
    a.release()
    a.release()  # idempotent
    assert budget.in_flight == 1
    b.release()
    for _ in range(58):
        lease = budget.acquire()
        assert lease is not None
        lease.release()
    assert budget.acquire() is None  # 60 spent
    clock.now += 1.0  # one per second comes back
    assert budget.acquire() is not None
    assert budget.acquire() is None
    clock.now += 3600  # a quiet hour still allows only one minute's worth
    assert budget.snapshot()["tokens"] == 60


def test_budget_reserve_leaves_room_for_live_traffic():
    budget = CallBudget(per_minute=10, max_in_flight=100, clock=Clock())
    taken = 0
    while budget.acquire(reserve=0.5) is not None:
        taken += 1
    assert taken == 5  # retries stop at half the bucket
    assert budget.acquire() is not None


# ---- policy ------------------------------------------------------------------------------


def manifest(**fields) -> Manifest:
    doc = {
        **TINY_MANIFEST,
        "version": "1",
        "model_file": "m.onnx",
        "files": {"m.onnx": {"sha256": "0" * 64, "size": 1}},
        **fields,
    }
    return Manifest.model_validate(doc)


def fallback_config(**doc) -> FallbackConfig:
    return FallbackConfig.model_validate(doc)


def test_policy_precedence_bundle_then_defaults_then_model():
    m = manifest(
        fallback={
            "mode": "cloud_when_unsure",
            "threshold": 0.7,
            "cloud_model": "big",
            "class_thresholds": {"a": 0.6},
            "audit_rate": 0.01,
        },
        confidence={"rule": "margin"},
    )
    p = resolve_policy(m, fallback_config(), cloud_configured=True)
    assert (p.mode, p.rule, p.threshold, p.cloud_model, p.audit_rate) == (
        "cloud_when_unsure",
        "margin",
        0.7,
        "big",
        0.01,
    )
    assert p.class_thresholds == {0: 0.6} and p.active
    cfg = fallback_config(
        cloud={"timeout_ms": 800},
        defaults={"threshold": 0.8, "max_in_flight": 9},
        models={
            "tiny": {
                "threshold": 0.9,
                "confidence_rule": "entropy",
                "class_thresholds": {"c": 0.95},
                "cloud_version": "stable",
            }
        },
    )
    p = resolve_policy(m, cfg, cloud_configured=True)
    assert (p.threshold, p.rule, p.max_in_flight, p.timeout_ms, p.cloud_version) == (
        0.9,
        "entropy",
        9,
        800,
        "stable",
    )
    assert p.class_thresholds == {2: 0.95}
    assert p.threshold_for(2) == 0.95 and p.threshold_for(0) == 0.9


@pytest.mark.parametrize(
    ("fields", "configured", "why"),
    [
        ({"fallback": {"cloud_model": "big"}}, False, "no cloud endpoint"),
        ({}, True, "no cloud model"),
        (
            {"fallback": {"cloud_model": "big"}, "confidence": {"rule": "mean_box"}},
            True,
            "does not apply to a classifier",
        ),
        (
            {"fallback": {"cloud_model": "big"}, "postprocessing": {"type": "raw"}},
            True,
            "raw outputs",
        ),
    ],
)
def test_policy_says_why_it_stays_local(fields, configured, why):
    p = resolve_policy(manifest(**fields), fallback_config(), cloud_configured=configured)
    assert not p.active and why in p.inactive
    assert p.describe([])["mode"] == "edge_only"


def test_confidence_rules_and_routes():
    m = manifest()
    probs = np.array([[0.5, 0.3, 0.2], [0.98, 0.01, 0.01], [1 / 3, 1 / 3, 1 / 3]], np.float32)
    top1 = score(m, {"probs": probs}, "top1")
    np.testing.assert_allclose(top1.confidence, [0.5, 0.98, 1 / 3], rtol=1e-6)
    assert top1.top_class.tolist() == [0, 0, 0]
    margin = score(m, {"probs": probs}, "margin")
    np.testing.assert_allclose(margin.confidence, [0.2, 0.97, 0.0], atol=1e-6)
    entropy = score(m, {"probs": probs}, "entropy")
    assert entropy.confidence[2] == pytest.approx(0.0, abs=1e-6)  # uniform: no idea
    assert entropy.confidence[1] > 0.8 > entropy.confidence[0]
    cfg = fallback_config(
        models={"tiny": {"threshold": 0.6, "class_thresholds": {"b": 0.99}, "cloud_model": "big"}}
    )
    policy = resolve_policy(m, cfg, cloud_configured=True)
    scores = Scored("top1", np.array([0.5, 0.9, 0.9]), np.array([0, 0, 1]))
    assert route_items(policy, scores, random.Random(0)) == [
        Route.UNSURE,
        Route.CONFIDENT,
        Route.UNSURE,
    ]  # class b needs 0.99
    audited = resolve_policy(
        m,
        fallback_config(
            models={"tiny": {"threshold": 0.6, "audit_rate": 1.0, "cloud_model": "big"}}
        ),
        cloud_configured=True,
    )
    assert route_items(audited, scores, random.Random(0)) == [
        Route.UNSURE,
        Route.AUDIT,
        Route.AUDIT,
    ]


# ---- config --------------------------------------------------------------------------------


def test_fallback_config_is_strict(tmp_path):
    with pytest.raises(ConfigError, match="fallback.cloud.url"):
        agent_config(tmp_path, ("k", "p"), [], fallback={"cloud": {"url": "ftp://x"}})
    with pytest.raises(ConfigError, match="fallback.models.tiny.thresold"):
        agent_config(tmp_path, ("k", "p"), [], fallback={"models": {"tiny": {"thresold": 1}}})
    with pytest.raises(ConfigError, match="threshold for 'a'"):
        agent_config(
            tmp_path, ("k", "p"), [], fallback={"models": {"tiny": {"class_thresholds": {"a": 2}}}}
        )


# ---- wire format ---------------------------------------------------------------------------


def test_encode_and_decode_both_ways():
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    body, headers = encode_request({"x": x}, ["probs"], True, "id1")
    n = int(headers["Inference-Header-Content-Length"])
    head = orjson.loads(body[:n])
    assert head["inputs"][0]["parameters"]["binary_data_size"] == 32
    assert head["outputs"] == [{"name": "probs", "parameters": {"binary_data": True}}]
    assert np.frombuffer(body[n:], np.float32).tolist() == x.ravel().tolist()
    body, headers = encode_request({"x": x}, ["probs"], False, "id1")
    assert "Inference-Header-Content-Length" not in headers
    assert orjson.loads(body)["inputs"][0]["data"] == x.ravel().tolist()
    # Answers: binary and JSON.
    y = np.array([[0.25, 0.75]], np.float32)
    header = orjson.dumps(
        {
            "model_name": "m",
            "outputs": [
                {
                    "name": "p",
                    "datatype": "FP32",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": 8},
                }
            ],
        }
    )
    _, out = decode_response(header + y.tobytes(), str(len(header)))
    np.testing.assert_array_equal(out["p"], y)
    _, out = decode_response(
        orjson.dumps(
            {"outputs": [{"name": "p", "datatype": "INT64", "shape": [2], "data": [3, 4]}]}
        ),
        None,
    )
    assert out["p"].dtype == np.int64 and out["p"].tolist() == [3, 4]


@pytest.mark.parametrize(
    ("raw", "header", "match"),
    [
        (b'{"outputs": [', None, "malformed JSON"),
        (b'{"nothing": 1}', None, "no 'outputs'"),
        (
            b'{"outputs": [{"name": "p", "datatype": "FP32", "shape": [2], "data": [1]}]}',
            None,
            "1 values for shape",
        ),
        (
            b'{"outputs": [{"name": "p", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
            None,
            "unsupported datatype",
        ),
        (
            b'{"outputs": [{"name": "p", "datatype": "FP32", "shape": [-1], "data": []}]}',
            None,
            "bad shape",
        ),
        (
            b'{"outputs": [{"name": "p", "datatype": "FP32", "shape": [2],'
            b' "parameters": {"binary_data_size": 8}}]}',
            "999",
            "but the answer has",
        ),
    ],
)
def test_decode_refuses_broken_answers(raw, header, match):
    with pytest.raises(CloudProtocolError, match=match):
        decode_response(raw, header)


def test_answers_must_fit_the_edge_outputs():
    edge = {"probs": np.zeros((4, 3), np.float32), "label": np.zeros(4, np.int64)}
    expect = expectation(edge, 2)
    ok = CloudAnswer(
        "m", "1", {"probs": np.ones((2, 3), np.float64), "label": np.ones(2, np.int32)}, True
    )
    fixed = check_answer(ok, expect)
    assert fixed.outputs["probs"].dtype == np.float32 and fixed.outputs["label"].dtype == np.int64
    for outputs, match in [
        ({"probs": np.ones((2, 4), np.float32), "label": np.ones(2, np.int64)}, "shape"),
        ({"probs": np.ones((2, 3), np.int64), "label": np.ones(2, np.int64)}, "is int64"),
        ({"probs": np.full((2, 3), np.nan, np.float32), "label": np.ones(2, np.int64)}, "NaN"),
    ]:
        with pytest.raises(CloudProtocolError, match=match):
            check_answer(CloudAnswer("m", "1", outputs, True), expect)

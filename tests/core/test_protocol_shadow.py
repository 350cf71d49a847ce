"""The shadow and traffic-split parts of the wire protocol (core/protocol.py, issue 11
parts 1-2): the desired ``shadow``/``split`` of a model, their ``reported`` state and
the ``shadow_stats`` record round-trip; impossible figures are refused with a reason;
a desired without them keeps its old wire form.

What the agent does with them: tests/agent/test_shadow.py, tests/agent/test_split.py.
"""

from __future__ import annotations

import json
import random
from typing import Any

import orjson
import pytest

from edgefleet.core import protocol
from edgefleet.core.protocol import WireError, decode

DEV = "store-0042"
URL = "https://fleet.example:8480/v1/bundles/digits-edge/"


def desired() -> protocol.Desired:
    return protocol.Desired(
        device_id=DEV,
        revision=18,
        models={
            "digits-edge": protocol.DesiredModel(
                version="4",
                url=URL + "4",
                sha256="9f" * 32,
                size=15360,
                shadow=protocol.DesiredShadow(
                    version="5", url=URL + "5", sha256="AB" * 32, size=15400, sample_rate=0.25
                ),
                split=protocol.DesiredSplit(
                    version="3", url=URL + "3", sha256="cd" * 32, size=15000, weight=0.1
                ),
            )
        },
    )


def reported() -> protocol.Reported:
    return protocol.Reported(
        device_id=DEV,
        revision=18,
        models={
            "digits-edge": protocol.ReportedModel(
                active="4",
                desired="4",
                state="active",
                shadow=protocol.ReportedShadow(version="5", state="ready"),
                split=protocol.ReportedSplit(version="3", weight=0.1, source="local"),
            ),
            "other": protocol.ReportedModel(
                active="1",
                state="active",
                shadow=protocol.ReportedShadow(
                    version="2", state="failed", last_error="self-test failed"
                ),
            ),
        },
    )


def shadow_stats() -> dict[str, Any]:
    return {
        "model": "digits-edge",
        "version": "4",
        "candidate": "5",
        "task": "classification",
        "window_start": 1764000000.0,
        "window_s": 60.0,
        "sampled": 110,
        "compared": 100,
        "agreed": 93,
        "errors": 1,
        "dropped_queue": 6,
        "dropped_budget": 3,
        "conf_delta_sum": -2.5,
        "conf_delta_sumsq": 0.75,
        "candidate_latency_ms_sum": 130.0,
        "active_latency_ms_sum": 100.0,
    }


@pytest.mark.parametrize(
    ("leaf", "message"), [("desired", desired()), ("reported", reported())], ids=str
)
def test_shadow_and_split_round_trip(leaf: str, message: protocol.Message) -> None:
    payload = message.to_json()
    again = decode(type(message), payload, max_bytes=protocol.MAX_BYTES[leaf], device_id=DEV)
    assert again == message


def test_the_wire_form_of_shadow_and_split() -> None:
    doc = json.loads(desired().to_json())["models"]["digits-edge"]
    assert doc["shadow"] == {
        "version": "5",
        "url": URL + "5",
        "sha256": "ab" * 32,  # lower-cased, like the active bundle's
        "size": 15400,
        "sample_rate": 0.25,
    }
    assert doc["split"]["weight"] == 0.1 and doc["split"]["version"] == "3"
    rep = json.loads(reported().to_json())["models"]
    assert rep["digits-edge"]["shadow"] == {"version": "5", "state": "ready"}
    assert rep["digits-edge"]["split"] == {
        "version": "3",
        "weight": 0.1,
        "source": "local",
        "state": "serving",
    }
    assert rep["other"]["shadow"]["last_error"] == "self-test failed"
    assert "split" not in rep["other"]
    # A model without them: nothing new on the wire (older agents read it as before).
    plain = protocol.DesiredModel(version="1", url="http://127.0.0.1:1/b", sha256="ab" * 32, size=1)
    assert set(plain.to_wire()) == {"version", "url", "sha256", "size"}


@pytest.mark.parametrize(
    ("where", "patch", "reason"),
    [
        ("shadow", {"sample_rate": 1.5}, "less than or equal to 1"),
        ("shadow", {"sample_rate": -0.1}, "greater than or equal to 0"),
        ("shadow", {"sample_rate": "0.5"}, "valid number"),
        ("shadow", {"version": "4"}, "shadow.version must differ from version"),
        ("shadow", {"sha256": "zz"}, "pattern"),
        ("shadow", {"url": "ftp://x/b"}, "absolute http"),
        ("split", {"weight": 2}, "less than or equal to 1"),
        ("split", {"version": "4"}, "split.version must differ from version"),
        ("split", {"size": 0}, "greater than 0"),
        ("split", {"version": "../x"}, "version"),
    ],
)
def test_bad_shadow_or_split_is_refused_with_a_reason(
    where: str, patch: dict[str, Any], reason: str
) -> None:
    doc = desired().to_wire()
    doc["models"]["digits-edge"][where].update(patch)
    with pytest.raises(WireError) as exc:
        protocol.Desired.from_obj(doc, DEV)
    assert exc.value.reason == "invalid"
    assert reason in exc.value.detail and where in exc.value.detail


def test_bad_reported_shadow_state_is_refused() -> None:
    doc = reported().to_wire()
    doc["models"]["digits-edge"]["shadow"]["state"] = "maybe"
    with pytest.raises(WireError, match="shadow.state"):
        protocol.Reported.from_obj(doc, DEV)
    doc = reported().to_wire()
    doc["models"]["digits-edge"]["split"]["weight"] = -1.0
    with pytest.raises(WireError, match="split.weight"):
        protocol.Reported.from_obj(doc, DEV)


def test_shadow_stats_round_trip() -> None:
    doc = shadow_stats()
    model = protocol.ShadowStats.from_obj(doc)
    assert model.to_wire() == doc
    assert protocol.RECORD_KINDS["shadow_stats"] is protocol.ShadowStats
    # Through JSON, as the outbox stores it and the batch carries it.
    assert protocol.ShadowStats.from_obj(orjson.loads(orjson.dumps(doc))) == model


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"agreed": 101}, "agreed must be at most compared"),
        ({"compared": -1}, "greater than or equal to 0"),
        ({"dropped_queue": -3}, "greater than or equal to 0"),
        ({"errors": 1.0}, "valid integer"),
        ({"conf_delta_sum": 100.5}, "|conf_delta_sum| must be at most compared"),
        ({"conf_delta_sum": -101.0}, "|conf_delta_sum| must be at most compared"),
        ({"conf_delta_sumsq": -0.1}, "greater than or equal to 0"),
        ({"conf_delta_sumsq": 100.5}, "conf_delta_sumsq must be at most compared"),
        ({"candidate_latency_ms_sum": -1.0}, "greater than or equal to 0"),
        ({"task": "regression"}, "task"),
        ({"window_s": -1.0}, "greater than or equal to 0"),
        ({"extra": 1}, "Extra inputs"),
        (
            {"compared": 0, "agreed": 0, "conf_delta_sum": 0.0, "conf_delta_sumsq": 0.0},
            "must be 0 when nothing was compared",
        ),
    ],
)
def test_impossible_shadow_stats_are_refused(patch: dict[str, Any], reason: str) -> None:
    with pytest.raises(WireError) as exc:
        protocol.ShadowStats.from_obj({**shadow_stats(), **patch})
    assert exc.value.reason == "invalid" and reason in exc.value.detail


def test_missing_shadow_stats_fields_are_refused() -> None:
    for key in shadow_stats():
        doc = shadow_stats()
        del doc[key]
        with pytest.raises(WireError, match=key):
            protocol.ShadowStats.from_obj(doc)


def test_mutated_shadow_messages_are_valid_or_refused_never_a_crash() -> None:
    rng = random.Random(11)
    junk: list[Any] = [None, True, -1, 0, 2**60, 1.5, -0.5, "", "x" * 300, [], {}, "5"]
    for base, decode_one in (
        (desired().to_wire()["models"]["digits-edge"], protocol.DesiredModel.from_obj),
        (shadow_stats(), protocol.ShadowStats.from_obj),
    ):
        for _ in range(300):
            doc = json.loads(json.dumps(base))
            target = doc
            if "shadow" in doc and rng.random() < 0.6:
                target = doc[rng.choice(["shadow", "split"])]
            target[rng.choice(list(target))] = rng.choice(junk)
            try:
                decode_one(doc)
            except WireError as exc:
                assert exc.reason == "invalid"

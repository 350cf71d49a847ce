"""The wire protocol (core/protocol.py): every message round-trips through the code
that publishes it and the code that receives it; a newer schema is refused with its
own counted reason; garbage is refused with a reason, never with a crash.

The end-to-end counting (the fleet's ``IngestStats.rejected``, the agent's
``SyncStats.refused``) runs against a real broker in tests/fleet/test_fleet_bus.py and
tests/agent/test_sync.py, ``test_garbage_...``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from edgefleet.agent.mqtt_link import MqttLink
from edgefleet.agent.outbox import NewRecord, Outbox, Priority
from edgefleet.agent.telemetry_sender import encode_batch, parse_ack
from edgefleet.agent.telemetry_stats import InferenceStats as StatsWindows
from edgefleet.core import protocol
from edgefleet.core.protocol import WireError, decode
from edgefleet.fleet.ingest import batch_msg, event_row, reported_msg, status_msg
from edgefleet.fleet.telemetry_math import validate_inference_stats
from tests.support.brokers import link_config

DEV = "store-0042"
HEX = "019a8c5e2f1a7c3b5d9e0f1a2b3c4d5e"


def desired() -> protocol.Desired:
    return protocol.Desired(
        device_id=DEV,
        revision=17,
        issued_at=1764000000.5,
        models={
            "digits-edge": protocol.DesiredModel(
                version="4",
                url="https://fleet.example:8480/v1/bundles/digits-edge/4",
                sha256="9f" * 32,
                size=15360,
                labels={"stable": "4"},
                rollout="r-1",
            ),
            "other": protocol.DesiredModel(
                version="1", url="http://127.0.0.1:1/b", sha256="ab" * 32, size=1
            ),
        },
    )


def reported() -> protocol.Reported:
    return protocol.Reported(
        device_id=DEV,
        revision=17,
        agent_version="0.1.0",
        at=1764000001.5,
        accelerators={"onnx": ["CPUExecutionProvider"], "litert": ["xnnpack"]},
        models={
            "digits-edge": protocol.ReportedModel(
                active="4",
                previous="3",
                desired="4",
                state="active",
                rollout="r-1",
                provider="CPUExecutionProvider",
                labels={"stable": "4"},
            ),
            "boot": protocol.ReportedModel(state="unmanaged", active="1"),
        },
    )


def event() -> protocol.Event:
    return protocol.Event(
        id=HEX,
        device_id=DEV,
        at=1764000001.2,
        kind="activation_failed",
        model="digits-edge",
        version="4",
        previous="3",
        revision=17,
        rollout="r-1",
        reason="self-test failed: output 0 differs by 0.31",
    )


def stats() -> dict[str, Any]:
    return {
        "model": "digits-edge",
        "version": "4",
        "window_start": 1764000000.0,
        "window_s": 60.0,
        "count": 120,
        "errors": 2,
        "latency_ms": {
            "le": list(protocol.LATENCY_BOUNDS_MS),
            "counts": [0, 3, 10, 40, 50, 17, 0, 0, 0, 0, 0, 0],
        },
        "confidence": {
            "le": list(protocol.CONFIDENCE_BOUNDS),
            "counts": [0, 0, 0, 0, 1, 2, 3, 10, 20, 82, 0],
        },
        "sources": {"edge": 108, "cloud": 10},
        "fallback": {"cloud_timeout": 1},
    }


MESSAGES: list[tuple[str, protocol.Message]] = [
    ("desired", desired()),
    ("reported", reported()),
    ("events", event()),
    ("commands", protocol.Command(id="c-1", command="resync", revision=17)),
    ("commands", protocol.Command(id="c-2", command="rollback", model="digits-edge")),
    ("acks", protocol.Ack(batch_id="b" * 32, record_ids=[HEX])),
    ("acks", protocol.Ack(batch_id="b" * 32)),
    (
        "status",
        protocol.Status(
            state="online", device_id=DEV, agent_version="0.1.0", protocol="3.1.1", at=1.5
        ),
    ),
    ("status", protocol.Status(state="offline", device_id=DEV, reason="connection lost")),
]


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize(("leaf", "message"), MESSAGES, ids=[f"{leaf}" for leaf, _ in MESSAGES])
def test_every_message_round_trips(leaf: str, message: protocol.Message) -> None:
    payload = message.to_json()
    assert len(payload) <= protocol.MAX_BYTES[leaf]
    device = getattr(message, "device_id", None)
    again = decode(type(message), payload, max_bytes=protocol.MAX_BYTES[leaf], device_id=device)
    assert again == message
    assert json.loads(payload)["schema"] == protocol.SCHEMA


def test_desired_keeps_its_wire_form() -> None:
    """What fleets have always sent: no empty labels, no null rollout."""
    doc = json.loads(desired().to_json())
    assert doc["models"]["other"] == {
        "version": "1",
        "url": "http://127.0.0.1:1/b",
        "sha256": "ab" * 32,
        "size": 1,
    }
    assert doc["models"]["digits-edge"]["labels"] == {"stable": "4"}
    assert protocol.Desired.from_obj(doc, DEV).models["digits-edge"].sha256 == "9f" * 32


def test_status_from_the_agents_link_is_what_the_fleet_ingests() -> None:
    link = MqttLink(link_config(1883), DEV, agent_version="0.1.0")
    birth, will, bye = link.birth_message(), link.last_will(), link.farewell_message()
    for out in (birth, will, bye):
        assert out.retain and out.topic.endswith("/status")
    online = decode(protocol.Status, birth.payload, max_bytes=4096, device_id=DEV)
    assert (online.state, online.agent_version, online.protocol) == ("online", "0.1.0", "3.1.1")
    assert status_msg(online, retained=False, t=2.0).from_device
    lost = decode(protocol.Status, will.payload, max_bytes=4096, device_id=DEV)
    assert (lost.state, lost.reason, lost.at) == ("offline", "connection lost", None)
    assert not status_msg(lost, retained=False, t=2.0).from_device  # the Will has no time
    assert json.loads(will.payload).keys() == {"schema", "state", "device_id", "reason"}
    gone = decode(protocol.Status, bye.payload, max_bytes=4096, device_id=DEV)
    assert (gone.reason, gone.at is not None) == ("shutdown", True)


async def test_a_batch_from_the_agents_outbox_is_what_the_fleet_ingests(tmp_path: Path) -> None:
    outbox = await Outbox(tmp_path / "outbox.sqlite", 10_000_000).open()
    try:
        await outbox.add(
            [
                NewRecord("inference_stats", stats()),
                NewRecord("event", event().to_wire(), Priority.HIGH),
                NewRecord("sample", {"nested": [1, 2.5, None, "é"]}),
                NewRecord("sample", None),
            ]
        )
        batch = await outbox.next_batch(100, 1_000_000)
        assert batch is not None
        payload = encode_batch(DEV, batch, waiting=3)
    finally:
        await outbox.close()
    got = decode(protocol.TelemetryBatch, payload, max_bytes=1 << 20, device_id=DEV)
    assert got.batch_id == batch.id and got.outbox == protocol.OutboxCounts(waiting=3)
    assert [(r.id, r.seq, r.kind) for r in got.records] == [
        (r.id, r.seq, r.kind) for r in batch.records
    ]
    assert [r.data for r in got.records] == [orjson.loads(r.data) for r in batch.records]
    rows = batch_msg(got, t=5.0)
    assert (rows.bad_stats, rows.bad_events, len(rows.stats), len(rows.events)) == (0, 0, 1, 1)
    assert rows.record_ids == [r.id for r in batch.records]
    # The ack the fleet sends back is what the sender parses.
    ack = protocol.Ack(batch_id=rows.batch_id, record_ids=rows.record_ids)
    assert parse_ack(ack.to_json()) == (batch.id, [r.id for r in batch.records])


def test_inference_stats_from_the_agent_are_what_the_fleet_takes() -> None:
    async def sink(records: Any) -> None:
        return None

    windows = StatsWindows(sink, interval_s=60.0)
    windows.record("m", "1", 0.003, "edge", confidence=0.95)
    windows.record("m", "1", 0.2, "cloud", fallback=None, confidence=0.4)
    windows.record_error("m", "1", 0.001)
    (doc,) = windows.take()
    assert protocol.InferenceStats.from_obj(doc).to_wire() == doc
    assert validate_inference_stats(doc) == doc
    assert doc["latency_ms"]["le"] == list(protocol.LATENCY_BOUNDS_MS)


def test_the_fleets_rows_come_from_the_models() -> None:
    r = reported_msg(reported(), t=3.0)
    assert (r.revision, r.agent_version, r.models["boot"].state) == (17, "0.1.0", "unmanaged")
    assert json.loads(r.text) == json.loads(reported().to_json())
    row = event_row(event(), t=3.0)
    assert row[:5] == (HEX, DEV, 1764000001.2, 3.0, "activation_failed")
    assert json.loads(row[-1]) == event().to_wire()
    empty = protocol.Reported(device_id=DEV, revision=0, agent_version="", models={})
    assert reported_msg(empty, t=1.0).agent_version is None  # "" is no version


def test_fallback_stats_round_trip_and_leave_out_what_did_not_grow() -> None:
    doc = protocol.FallbackStats(
        items=[
            protocol.FallbackItems(model="m", version="1", source="cloud", reason="unsure", n=3)
        ],
        breakers={"m": "open"},
        offline=True,
        hard_examples={"pending": 2},
    ).to_wire()
    assert "calls" not in doc and "agreement" not in doc and doc["schema"] == protocol.SCHEMA
    assert protocol.FallbackStats.from_obj(doc).to_wire() == doc


# --------------------------------------------------------------- schema versions


@pytest.mark.parametrize(("leaf", "message"), MESSAGES, ids=[f"{leaf}" for leaf, _ in MESSAGES])
def test_a_newer_schema_is_refused_with_its_own_reason(
    leaf: str, message: protocol.Message
) -> None:
    doc = {**message.to_wire(), "new_field": {"x": 1}}
    cases = [(2, "newer_schema"), (99, "newer_schema"), (0, "schema"), ("1", "schema")]
    cases += [(True, "schema"), (1.0, "schema"), (None, "schema")]
    for schema, reason in cases:
        payload = orjson.dumps({**doc, "schema": schema})
        with pytest.raises(WireError) as exc:
            decode(type(message), payload, max_bytes=1 << 20)
        assert exc.value.reason == reason, schema
    no_schema = {k: v for k, v in doc.items() if k != "schema"}
    with pytest.raises(WireError, match="schema") as exc:
        decode(type(message), orjson.dumps(no_schema), max_bytes=1 << 20)
    assert exc.value.reason == "schema"
    # Within schema 1 an unknown field is fine: publishers may add optional ones.
    assert decode(type(message), orjson.dumps(doc), max_bytes=1 << 20) == message


# ------------------------------------------------------------------- garbage


GARBAGE: list[tuple[bytes, str]] = [
    (b"", "not_json"),
    (b"\xff\xfe\x00", "not_json"),
    (b"{", "not_json"),
    (b"[" * 100_000, "not_json"),
    (b"NaN", "not_json"),
    (b"null", "schema"),
    (b"[1, 2]", "schema"),
    (b'"a string"', "schema"),
    (b"12", "schema"),
    (b"{}", "schema"),
]


@pytest.mark.parametrize("model", sorted({type(m) for _, m in MESSAGES}, key=lambda t: t.__name__))
def test_garbage_is_refused_with_a_reason(model: type[protocol.Message]) -> None:
    for payload, reason in GARBAGE:
        with pytest.raises(WireError) as exc:
            decode(model, payload, max_bytes=1 << 20)
        assert exc.value.reason == reason, payload[:20]
    with pytest.raises(WireError) as exc:
        decode(model, b"{" + b" " * 5000 + b"}", max_bytes=4096)
    assert exc.value.reason == "oversized"
    with pytest.raises(WireError) as exc:
        payload = b'{"schema": 1, "device_id": "someone-else"}'
        decode(model, payload, max_bytes=4096, device_id=DEV)
    assert exc.value.reason == "device_mismatch"


def _mutations(doc: Any, rng: random.Random) -> Any:
    """``doc`` with one value somewhere replaced by something of another shape."""
    weird: list[Any] = [None, True, -1, 2**64, 1.5, "", "x" * 3000, [], {}, [None]]
    weird += [{"a": 1}, "\n", "1", 0, float("inf")]
    if isinstance(doc, dict) and doc:
        key = rng.choice(sorted(doc))
        if rng.random() < 0.3:
            return {k: v for k, v in doc.items() if k != key}
        return {**doc, key: _mutations(doc[key], rng)}
    if isinstance(doc, list) and doc:
        i = rng.randrange(len(doc))
        return [*doc[:i], _mutations(doc[i], rng), *doc[i + 1 :]]
    return rng.choice(weird)


@pytest.mark.parametrize(("leaf", "message"), MESSAGES, ids=[f"{leaf}" for leaf, _ in MESSAGES])
def test_mutated_messages_are_valid_or_refused_never_a_crash(
    leaf: str, message: protocol.Message
) -> None:
    rng = random.Random(f"{leaf}/{message!r}")
    good = message.to_wire()
    refused = 0
    for _ in range(300):
        mutated = _mutations(good, rng)
        try:
            payload = orjson.dumps(mutated)
        except (TypeError, orjson.JSONEncodeError):
            continue  # inf or 2**64: not JSON at all
        try:
            decode(type(message), payload, max_bytes=1 << 20)
        except WireError as exc:
            refused += 1
            assert exc.reason in ("schema", "invalid", "newer_schema"), exc.reason
    assert refused > 50


def test_record_data_of_each_kind_is_checked_by_its_model() -> None:
    bad_stats = {**stats(), "count": 121}  # latency counts no longer add up
    with pytest.raises(WireError, match="latency_ms.counts must add up"):
        protocol.InferenceStats.from_obj(bad_stats)
    with pytest.raises(WireError):
        protocol.InferenceStats.from_obj({**stats(), "extra": 1})  # a new schema
    with pytest.raises(WireError):
        protocol.Event.from_obj({**event().to_wire(), "kind": "DROP TABLE"})
    with pytest.raises(WireError):
        protocol.FallbackStats.from_obj({"schema": 1, "items": [{"n": -1}]})
    assert {"inference_stats", "fallback_stats", "shadow_stats", "event"} <= set(
        protocol.RECORD_KINDS
    )


def test_revisions_are_bounded() -> None:
    doc = desired().to_wire()
    ok = protocol.Desired.from_obj({**doc, "revision": protocol.MAX_REVISION}, DEV)
    assert ok.revision == 2**53 - 1
    for bad in (protocol.MAX_REVISION + 1, -1, 2**63 - 1):
        with pytest.raises(WireError) as exc:
            protocol.Desired.from_obj({**doc, "revision": bad}, DEV)
        assert exc.value.reason == "invalid"

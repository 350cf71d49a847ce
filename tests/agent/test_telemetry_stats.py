"""Per-model inference aggregates (agent/telemetry_stats.py) and the fleet's math on them
(fleet/telemetry_math.py): buckets, windows, flushes into a real outbox, percentiles,
merging, strict validation, and a real agent whose HTTP traffic must add up exactly in
the ``inference_stats`` records of its outbox file.
"""

from __future__ import annotations

import copy
import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from edgefleet.agent import telemetry_stats
from edgefleet.agent.config import parse_config
from edgefleet.agent.fleet_link import FLEET
from edgefleet.agent.outbox import Outbox, Priority
from edgefleet.agent.telemetry_stats import InferenceStats
from edgefleet.fleet import telemetry_math
from edgefleet.fleet.telemetry_math import (
    histogram_percentile,
    merge_inference_stats,
    validate_inference_stats,
)
from tests.support.brokers import Mosquitto, eventually
from tests.support.brokers import agent_fleet_section as fleet_section
from tests.support.images import BIG, IMAGE_PRE, png
from tests.support.tiny import TEST_X, agent_config

DEV = "store-0042"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "fleet.md"


async def _never(records: Any) -> None:
    raise AssertionError("this test takes the windows itself; nothing may be written")


# ---- the aggregator -------------------------------------------------------------------------


def test_bounds_are_the_contracts_on_both_sides() -> None:
    assert telemetry_stats.LATENCY_BOUNDS_MS == telemetry_math.LATENCY_BOUNDS_MS
    assert telemetry_stats.CONFIDENCE_BOUNDS == telemetry_math.CONFIDENCE_BOUNDS
    doc = _docs_example()
    assert tuple(doc["latency_ms"]["le"]) == telemetry_stats.LATENCY_BOUNDS_MS
    assert tuple(doc["confidence"]["le"]) == telemetry_stats.CONFIDENCE_BOUNDS


def test_buckets_are_inclusive_upper_bounds_with_an_overflow() -> None:
    stats = InferenceStats(_never, 60)
    # latency (seconds in, ms buckets out): exactly on a bound is in that bound's bucket
    for latency_s in (0.0, 0.0005, 0.00051, 0.001, 0.02, 0.0200001, 1.0, 1.5, 30.0):
        stats.record("m", "1", latency_s, "edge")
    # confidence: 0.1 is in the first bucket, 1.0 in the last bound's; beyond is overflow
    for conf in (0.0, 0.1, 0.15, 0.95, 1.0):
        stats.record("m", "2", 0.003, "edge", confidence=conf)
    docs = {d["version"]: d for d in stats.take()}
    lat = docs["1"]["latency_ms"]
    assert lat["le"] == [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    #                       0.5 1  2  5  10 20 50 100 200 500 1000 over
    assert lat["counts"] == [2, 2, 0, 0, 0, 1, 1, 0, 0, 0, 1, 2]
    assert docs["1"]["confidence"]["counts"] == [0] * 11  # none given
    assert docs["2"]["confidence"]["counts"] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0]
    assert docs["2"]["latency_ms"]["counts"][3] == 5  # 3 ms: the 5 ms bucket


def test_a_window_counts_answers_errors_sources_and_fallbacks() -> None:
    stats = InferenceStats(_never, 60)
    stats.record("m", "1", 0.004, "edge", confidence=0.97)
    stats.record("m", "1", 0.3, "cloud", confidence=0.9)
    stats.record("m", "1", 0.25, "edge", "cloud_timeout", confidence=0.3)
    stats.record_error("m", "1", 0.0001)
    stats.record_error("m", "2", 0.0001)
    stats.record("other", "7", 0.001, "mixed")
    docs = {(d["model"], d["version"]): d for d in stats.take()}
    assert set(docs) == {("m", "1"), ("m", "2"), ("other", "7")}
    d = docs[("m", "1")]
    assert (d["count"], d["errors"]) == (4, 1)
    assert d["sources"] == {"edge": 2, "cloud": 1}
    assert d["fallback"] == {"cloud_timeout": 1}
    # 0.97 and 0.9 answered; the fallback's edge answer 0.3
    assert d["confidence"]["counts"] == [0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 0]
    assert sum(d["latency_ms"]["counts"]) == 4
    assert docs[("m", "2")]["sources"] == {} and docs[("m", "2")]["errors"] == 1
    assert docs[("other", "7")]["sources"] == {"mixed": 1}
    for doc in docs.values():
        assert validate_inference_stats(doc) == doc  # what the agent writes, the fleet takes
        assert doc["window_s"] >= 0 and doc["window_start"] > 1.7e9
    assert stats.take() == []  # swapped: the next window starts empty


async def test_flush_writes_one_low_record_per_busy_version_into_the_outbox(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.sqlite", 1 << 20) as outbox:
        stats = InferenceStats(outbox.add, 3600)
        assert await stats.flush() == 0  # a quiet window writes nothing
        for _ in range(3):
            stats.record("m", "1", 0.002, "edge")
        stats.record_error("m", "2", 0.002)
        assert await stats.flush() == 2
        assert await stats.flush() == 0
        batch = await outbox.next_batch(100, 1 << 20)
        assert batch is not None
        assert [(r.kind, r.priority) for r in batch.records] == [
            ("inference_stats", Priority.LOW)
        ] * 2
        counts = sorted(
            (d["version"], d["count"], d["errors"])
            for d in (json.loads(r.data) for r in batch.records)
        )
        assert counts == [("1", 3, 0), ("2", 1, 1)]
        assert stats.counters.records_written == 2


async def test_stop_writes_the_last_partial_window_and_ends_its_task(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.sqlite", 1 << 20) as outbox:
        stats = InferenceStats(outbox.add, 3600)  # no periodic flush during the test
        stats.start()
        for i in range(7):
            stats.record("m", "1", 0.001 * i, "edge")
        await stats.stop()
        await stats.stop()  # idempotent
        assert stats._task is None
        assert (await outbox.stats()).records == 1
        batch = await outbox.next_batch(10, 1 << 20)
        assert batch is not None and json.loads(batch.records[0].data)["count"] == 7


async def test_the_flush_task_writes_every_interval(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "o.sqlite", 1 << 20) as outbox:
        stats = InferenceStats(outbox.add, 0.01)
        stats.start()
        try:
            stats.record("m", "1", 0.001, "edge")
            await eventually(lambda: stats.counters.records_written == 1, within=10)
            stats.record("m", "1", 0.001, "edge")
            await eventually(lambda: stats.counters.records_written == 2, within=10)
            flushes = stats.counters.flushes
            await eventually(lambda: stats.counters.flushes > flushes + 3, within=10)
            assert stats.counters.records_written == 2  # quiet windows wrote nothing
        finally:
            await stats.stop()


async def test_a_refused_write_is_counted_and_the_stop_still_ends(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite", 1 << 20)  # never opened: add() refuses
    stats = InferenceStats(outbox.add, 3600)
    stats.start()
    stats.record("m", "1", 0.001, "edge")
    await stats.stop()
    assert stats.counters.records_lost == 1 and stats.counters.records_written == 0


def test_stats_interval_is_in_the_fleet_telemetry_config() -> None:
    cfg = parse_config("device_id: s1\nfleet:\n  host: b\n")
    assert cfg.fleet is not None and cfg.fleet.telemetry.stats_interval_s == 60.0
    cfg = parse_config("device_id: s1\nfleet:\n  host: b\n  telemetry:\n    stats_interval_s: 5\n")
    assert cfg.fleet is not None and cfg.fleet.telemetry.stats_interval_s == 5.0
    with pytest.raises(Exception, match="stats_interval_s"):
        parse_config("device_id: s1\nfleet:\n  host: b\n  telemetry:\n    stats_interval_s: 0\n")


# ---- fleet math ---------------------------------------------------------------------------------


def _docs_example() -> dict[str, Any]:
    """The inference_stats example in docs/fleet.md, which must itself be valid."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("`inference_stats` — one record") :]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block is not None
    return json.loads(block.group(1))


LE = list(telemetry_math.LATENCY_BOUNDS_MS)


def lat(*counts: int) -> list[int]:
    return [*counts, *([0] * (len(LE) + 1 - len(counts)))]


def test_percentiles_are_bucket_upper_bounds() -> None:
    # the docs example: 120 requests; 60th lands in the 10 ms bucket, 114th in 20 ms
    counts = [0, 3, 10, 40, 50, 17, 0, 0, 0, 0, 0, 0]
    assert histogram_percentile(LE, counts, 50) == (10.0, False)
    assert histogram_percentile(LE, counts, 95) == (20.0, False)
    assert histogram_percentile(LE, counts, 100) == (20.0, False)
    # exactly at the crossing: the 95th of 100 requests is in the first bucket
    assert histogram_percentile(LE, lat(95, 5), 95) == (0.5, False)
    assert histogram_percentile(LE, lat(94, 6), 95) == (1.0, False)
    assert histogram_percentile(LE, lat(1), 50) == (0.5, False)  # one request
    # the overflow bucket: "above 1000 ms", reported as the last bound and a flag
    assert histogram_percentile(LE, lat(*[0] * 11, 4), 50) == (1000.0, True)
    assert histogram_percentile(LE, lat(90, *[0] * 10, 10), 95) == (1000.0, True)
    assert histogram_percentile(LE, lat(), 50) is None  # no requests
    with pytest.raises(ValueError):
        histogram_percentile(LE, [1, 2], 50)
    with pytest.raises(ValueError):
        histogram_percentile(LE, lat(1), 0)


def record(version: str = "4", **changes: Any) -> dict[str, Any]:
    doc = _docs_example()
    doc["version"] = version
    doc.update(changes)
    return doc


def test_the_docs_example_is_valid() -> None:
    doc = _docs_example()
    assert validate_inference_stats(doc) == doc


def test_merge_adds_counts_and_reads_percentiles_from_the_merged_histogram() -> None:
    a = validate_inference_stats(record())  # 120 requests, 2 errors, p95 20 ms
    slow = lat(*[0] * 11, 80)  # 80 requests, all above 1000 ms
    b = validate_inference_stats(
        record(
            window_start=1764000060.0,
            count=80,
            errors=0,
            latency_ms={"le": LE, "counts": slow},
            confidence={"le": list(telemetry_math.CONFIDENCE_BOUNDS), "counts": [0] * 10 + [0]},
            sources={"edge": 70, "mixed": 10},
            fallback={"cloud_timeout": 3, "offline": 2},
        )
    )
    s = merge_inference_stats([a, b])
    assert (s["records"], s["requests"], s["errors"]) == (2, 200, 2)
    assert s["error_rate"] == pytest.approx(0.01)
    assert s["latency_ms"]["counts"] == [0, 3, 10, 40, 50, 17, 0, 0, 0, 0, 0, 80]
    # cumulative 0,3,13,53,103: the 100th request is in the 10 ms bucket
    assert (s["p50_ms"], s["p50_above"]) == (10.0, False)
    assert (s["p95_ms"], s["p95_above"]) == (1000.0, True)
    assert s["confidence"]["counts"] == a["confidence"]["counts"]
    assert s["sources"] == {"edge": 178, "cloud": 10, "mixed": 10}
    assert s["fallback"] == {"cloud_timeout": 4, "offline": 2}
    assert (s["window_start"], s["window_end"]) == (1764000000.0, 1764000120.0)
    # merging is adding: any order, any grouping, the same summary
    assert merge_inference_stats([b, a]) == s
    empty = merge_inference_stats([])
    assert (empty["requests"], empty["error_rate"], empty["p50_ms"], empty["p95_above"]) == (
        0,
        0.0,
        None,
        False,
    )


def _mutations() -> list[tuple[str, Any]]:
    """(what, a function making garbage out of a valid record)."""

    def drop(key: str) -> Any:
        return lambda d: d.pop(key)

    def put(key: str, value: Any) -> Any:
        return lambda d: d.__setitem__(key, value)

    def nested(key: str, sub: str, value: Any) -> Any:
        return lambda d: d[key].__setitem__(sub, value)

    return [
        ("missing model", drop("model")),
        ("missing latency", drop("latency_ms")),
        ("extra field", put("extra", 1)),
        ("model not a string", put("model", 4)),
        ("empty version", put("version", "")),
        ("huge model name", put("model", "m" * 1000)),
        ("count a bool", put("count", True)),
        ("count a float", put("count", 120.0)),
        ("count a string", put("count", "120")),
        ("count negative", put("count", -1)),
        ("count huge", put("count", 2**64)),
        ("errors over count", put("errors", 121)),
        ("window_start NaN", put("window_start", float("nan"))),
        ("window_start a string", put("window_start", "yesterday")),
        ("window_s negative", put("window_s", -1.0)),
        ("window_s infinite", put("window_s", float("inf"))),
        ("latency not an object", put("latency_ms", [1, 2, 3])),
        ("latency other bounds", nested("latency_ms", "le", [1, 2, 3])),
        ("latency bounds bools", nested("latency_ms", "le", [True] * 11)),
        ("latency counts short", nested("latency_ms", "counts", [120])),
        ("latency counts negative", nested("latency_ms", "counts", [-1, 121, *[0] * 10])),
        ("latency counts not summing to count", nested("latency_ms", "counts", [1] * 12)),
        ("latency extra key", nested("latency_ms", "sum", 3.5)),
        ("confidence 10 counts", nested("confidence", "counts", [0] * 10)),
        ("confidence over answered", nested("confidence", "counts", [0] * 10 + [119])),
        ("sources a list", put("sources", ["edge"])),
        ("sources not summing", put("sources", {"edge": 1})),
        ("sources count a float", put("sources", {"edge": 108.0, "cloud": 10})),
        ("sources empty key", put("sources", {"": 108, "cloud": 10})),
        ("fallback over answered", put("fallback", {"cloud_timeout": 119})),
        ("fallback too many keys", put("fallback", {f"r{i}": 0 for i in range(40)})),
        ("fallback value null", put("fallback", {"cloud_timeout": None})),
    ]


@pytest.mark.parametrize(("what", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
def test_validation_rejects_garbage(what: str, mutate: Any) -> None:
    doc = copy.deepcopy(_docs_example())
    validate_inference_stats(copy.deepcopy(doc))
    mutate(doc)
    with pytest.raises(ValueError):
        validate_inference_stats(doc)


@pytest.mark.parametrize("garbage", [None, 1, "x", [], [{}], {}, b"{}"])
def test_validation_rejects_non_records(garbage: Any) -> None:
    with pytest.raises(ValueError):
        validate_inference_stats(garbage)


# ---- a real agent ---------------------------------------------------------------------------------


def _json_infer(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }


BAD_OIP = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0] * 7}]}


async def _traffic(session: aiohttp.ClientSession, base: str, n: int) -> dict[str, int]:
    """Send a mix of requests; how many of each kind were answered as expected."""
    sent = {"oip_ok": 0, "oip_bad": 0, "img_ok": 0, "img_bad": 0}

    async def post(path: str, status: int, kind: str | None, **kw: Any) -> None:
        async with session.post(f"{base}{path}", **kw) as r:
            assert r.status == status, await r.text()
        if kind is not None:
            sent[kind] += 1

    for i in range(n):
        await post("/v2/models/tiny/infer", 200, "oip_ok", json=_json_infer(TEST_X[: 1 + i % 3]))
        if i % 3 == 0:
            await post("/v2/models/tiny/infer", 400, "oip_bad", json=BAD_OIP)
        if i % 2 == 0:
            await post("/v1/predict/tiny", 200, "img_ok", data=png(BIG))
        if i % 4 == 0:
            await post("/v1/predict/tiny", 400, "img_bad", data=b"not an image")
            await post("/v1/predict/tiny?top_k=lots", 400, "img_bad", data=png(BIG))
        if i % 5 == 0:  # unknown model, version: never counted
            await post("/v2/models/nope/infer", 404, None, json=_json_infer(TEST_X[:1]))
            await post("/v2/models/tiny/versions/9/infer", 404, None, json=_json_infer(TEST_X[:1]))
            await post("/v1/predict/nope", 404, None, data=png(BIG))
    return sent


def _outbox_stats(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT priority, data FROM records WHERE kind = 'inference_stats' ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    assert rows, "no inference_stats records in the outbox"
    assert {prio for prio, _ in rows} == {int(Priority.LOW)}
    return [json.loads(data) for _, data in rows]


@pytest.mark.parametrize("interval", [3600.0, 0.02], ids=["flushed-at-stop", "many-windows"])
async def test_agent_traffic_adds_up_exactly_in_the_outbox(
    mosquitto: Mosquitto,
    start_agent: Any,
    make_tiny_bundle: Any,
    keys: Any,
    tmp_path: Path,
    interval: float,
) -> None:
    v1 = make_tiny_bundle("s1", preprocessing=IMAGE_PRE)
    v2 = make_tiny_bundle("s2", weights=np.eye(4, 3, dtype=np.float32), preprocessing=IMAGE_PRE)
    fleet = fleet_section(mosquitto.port, tmp_path)
    fleet["telemetry"]["stats_interval_s"] = interval
    agent = await start_agent(agent_config(tmp_path, keys, [v1], device_id=DEV, fleet=fleet))
    outbox_path = Path(fleet["outbox"]["path"])
    async with aiohttp.ClientSession() as session:
        sent = {"s1": await _traffic(session, agent.base, 12)}
        async with session.post(f"{agent.base}/v1/bundles?activate=1", data=v2.read_bytes()) as r:
            assert r.status == 201, await r.text()
        sent["s2"] = await _traffic(session, agent.base, 7)
        if interval < 1:  # let the windows turn a few times, with traffic in between
            stats = agent.app[FLEET].stats
            await eventually(lambda: stats.counters.records_written >= 2, within=10)
            more = await _traffic(session, agent.base, 3)
            sent["s2"] = {k: v + more[k] for k, v in sent["s2"].items()}
    await agent.runner.cleanup()  # a clean stop: the last partial window is written
    records = [validate_inference_stats(d) for d in _outbox_stats(outbox_path)]
    assert {r["model"] for r in records} == {"tiny"}
    if interval > 1:
        assert sorted(r["version"] for r in records) == ["s1", "s2"]  # one window each
    for version, s in sent.items():
        mine = [r for r in records if r["version"] == version]
        summary = merge_inference_stats(mine)
        answered = s["oip_ok"] + s["img_ok"]
        errors = s["oip_bad"] + s["img_bad"]
        assert (summary["requests"], summary["errors"]) == (answered + errors, errors), version
        assert sum(summary["latency_ms"]["counts"]) == answered + errors
        assert summary["sources"] == {"edge": answered}
        assert summary["fallback"] == {}
        # no cloud configured: every answer of a classifier carries its confidence, on
        # both endpoints (the data plane scores it, whichever protocol brought it)
        assert sum(summary["confidence"]["counts"]) == answered
        assert summary["p95_ms"] is not None
        assert all(r["count"] > 0 for r in mine)  # quiet windows wrote nothing
    # the task is gone with the agent; the fixture also fails on lingering tasks
    assert agent.app[FLEET].stats._task is None

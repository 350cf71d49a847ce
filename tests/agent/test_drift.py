"""Input drift on the device (agent/telemetry_stats.py ``DriftMonitor``, fed by the data
plane): a real agent with a real digits bundle whose reference profile was made on the
training split, real HTTP, a real outbox. Held-out digits score about no drift,
inverted and noise images a large one, and a bundle without a profile keeps serving and
says "no reference profile" — all read from the ``drift_stats`` records in the outbox.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from edgefleet.agent.fleet_link import FLEET
from edgefleet.agent.telemetry_stats import DRIFT_KIND, DriftMonitor
from edgefleet.core import protocol
from edgefleet.core.drift import NO_PROFILE
from models.digits import INPUT, load_split
from tests.support.brokers import Mosquitto, eventually
from tests.support.brokers import agent_fleet_section as fleet_section
from tests.support.drift_bundles import digits_bundle, send_digits
from tests.support.tiny import agent_config

DEV = "store-0007"


def outbox_drift(path: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT data FROM records WHERE kind = ? ORDER BY seq", (DRIFT_KIND,)
        ).fetchall()
    finally:
        conn.close()
    return [json.loads(d) for (d,) in rows]


async def activate(session: aiohttp.ClientSession, base: str, bundle: Path) -> None:
    async with session.post(f"{base}/v1/bundles?activate=1", data=bundle.read_bytes()) as r:
        assert r.status == 201, await r.text()


async def test_drift_is_low_for_held_out_digits_and_high_for_shifted_ones(
    mosquitto: Mosquitto, start_agent: Any, digits: Any, keys: Any, tmp_path: Path
) -> None:
    same = digits_bundle(digits, keys, tmp_path, "d1", profile=True)
    inverted = digits_bundle(digits, keys, tmp_path, "d2", profile=True)
    noise = digits_bundle(digits, keys, tmp_path, "d3", profile=True)
    old = digits_bundle(digits, keys, tmp_path, "d0", profile=False)
    fleet = fleet_section(mosquitto.port, tmp_path)
    fleet["telemetry"]["stats_interval_s"] = 3600  # one window each, written at the stop
    agent = await start_agent(agent_config(tmp_path, keys, [same], device_id=DEV, fleet=fleet))
    x = load_split().x_test  # 450 held-out digits, pixels 0..16
    rng = np.random.default_rng(0)
    async with aiohttp.ClientSession() as session:
        await send_digits(session, agent.base, x)
        await activate(session, agent.base, inverted)
        await send_digits(session, agent.base, 16.0 - x)  # white ink on black: a real shift
        await activate(session, agent.base, noise)
        await send_digits(session, agent.base, rng.uniform(0, 16, size=(300, 64)))
        await activate(session, agent.base, old)
        await send_digits(session, agent.base, x[:50])  # an old bundle keeps answering
    await agent.runner.cleanup()  # the clean stop writes the last window
    records = {
        d["version"]: protocol.DriftStats.from_obj(d)
        for d in outbox_drift(Path(fleet["outbox"]["path"]))
    }
    assert set(records) == {"d0", "d1", "d2", "d3"}

    d1 = records["d1"]
    # Every item binned, or counted as dropped (a busy box); no drops expected here.
    assert d1.samples + d1.dropped == len(x) and d1.samples >= 300
    assert d1.features == 64 and d1.drift_reason is None
    assert d1.psi_max is not None and d1.psi_mean is not None and d1.psi_output is not None
    # Same distribution: PSI is sampling noise, far under the 0.2 of a real shift.
    assert d1.psi_mean < 0.05 and d1.psi_max < 0.25 and d1.psi_output < 0.1
    assert d1.js_output is not None and d1.js_output < 0.02

    for version in ("d2", "d3"):
        r = records[version]
        assert r.samples >= 200 and r.psi_mean is not None and r.psi_max is not None
        assert r.psi_mean > 1.0 and r.psi_max > 5.0, r  # constant-0 corner pixels lit up
        assert r.worst_feature is not None and r.worst_feature.startswith(f"{INPUT}[")

    d0 = records["d0"]
    assert d0.samples == 50 and d0.psi_max is None and d0.psi_output is None
    assert d0.drift_reason == NO_PROFILE


async def test_too_few_items_carry_over_and_a_busy_box_drops_not_blocks(
    digits: Any, keys: Any, tmp_path: Path
) -> None:
    from edgefleet.core.bundle.archive import read_bundle
    from edgefleet.core.bundle.signing import TrustStore
    from edgefleet.core.processing.scoring import score

    bundle = digits_bundle(digits, keys, tmp_path, "d5", profile=True)
    contents = read_bundle(bundle, tmp_path / "x", TrustStore.from_files([keys[1]]))
    m = contents.manifest
    mon = DriftMonitor(min_samples=100)
    x = load_split().x_test.astype(np.float32)
    probs = np.full((1, 10), 0.1, dtype=np.float32)
    scored = score(m, {"probabilities": probs})
    for row in x[:40]:
        mon.observe(m, contents.directory, {INPUT: row[None]}, scored)
    (first,) = await mon.take()
    assert first["samples"] == 40 and first["psi_max"] is None
    assert first["drift_reason"] == "too few samples (40 < 100)"
    for row in x[40:120]:
        mon.observe(m, contents.directory, {INPUT: row[None]}, scored)
    (second,) = await mon.take()
    # The 40 of the first window count in the second: 120 items, figures.
    assert second["samples"] == 120 and second["psi_max"] is not None
    assert second["window_start"] == first["window_start"]
    assert mon.current[("digits-edge", "d5")] == second
    assert await mon.take() == []  # a quiet window: nothing, and the version is forgotten
    await mon.close()


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda d: d | {"psi_max": -0.1}, "greater than or equal to 0"),
        (lambda d: d | {"psi_mean": 9.0}, "psi_mean must be at most psi_max"),
        (lambda d: d | {"samples": -1}, "greater than or equal to 0"),
        (lambda d: d | {"js_output": 1.5}, "less than or equal to 1"),
        (lambda d: d | {"drift_reason": "x"}, "drift_reason must be null"),
        (
            lambda d: (
                {k: v for k, v in d.items() if k != "drift_reason"}
                | {"psi_max": None, "psi_mean": None, "psi_output": None}
            ),
            "drift_reason is required",
        ),
        (lambda d: d | {"psi_max": float("nan")}, "finite"),
        (lambda d: d | {"extra": 1}, "Extra inputs"),
    ],
)
def test_impossible_drift_figures_are_refused(mutate: Any, reason: str) -> None:
    good = {
        "model": "m",
        "version": "1",
        "window_start": 1.0,
        "window_s": 60.0,
        "samples": 200,
        "features": 64,
        "psi_max": 0.3,
        "psi_mean": 0.1,
        "psi_output": 0.05,
        "js_max": 0.1,
        "js_output": 0.01,
        "worst_feature": "x[3]",
        "drift_reason": None,
    }
    protocol.DriftStats.from_obj(good)
    with pytest.raises(protocol.WireError, match=reason):
        protocol.DriftStats.from_obj(mutate(dict(good)))


async def test_current_drift_in_model_metadata_and_metrics(
    mosquitto: Mosquitto, start_agent: Any, digits: Any, keys: Any, tmp_path: Path
) -> None:
    old = digits_bundle(digits, keys, tmp_path, "e0", profile=False)
    new = digits_bundle(digits, keys, tmp_path, "e1", profile=True)
    fleet = fleet_section(mosquitto.port, tmp_path)
    fleet["telemetry"]["stats_interval_s"] = 0.2
    agent = await start_agent(agent_config(tmp_path, keys, [old], device_id=DEV, fleet=fleet))
    meta_url = f"{agent.base}/v2/models/digits-edge"
    async with aiohttp.ClientSession() as session:
        async with session.get(meta_url) as r:
            drift = (await r.json())["parameters"]["drift"]
        assert drift["psi_max"] is None and drift["drift_reason"] == NO_PROFILE
        await activate(session, agent.base, new)
        await send_digits(session, agent.base, 16.0 - load_split().x_test[:150])
        monitor = agent.app[FLEET].stats.drift
        key = ("digits-edge", "e1")
        await eventually(lambda: monitor.current.get(key, {}).get("psi_max"), within=10)
        async with session.get(meta_url) as r:
            drift = (await r.json())["parameters"]["drift"]
        # The windows turn while the requests come: the first with 100 items has figures.
        assert 100 <= drift["samples"] <= 150 and drift["drift_reason"] is None
        assert drift["psi_max"] > 5 and drift["psi_mean"] > 1 and drift["psi_output"] > 0.5
        async with session.get(f"{agent.base}/metrics") as r:
            text = await r.text()
        for feature in ("max", "mean", "output"):
            line = next(
                ln
                for ln in text.splitlines()
                if ln.startswith(
                    f'edgefleet_drift_psi{{model="digits-edge",version="e1",feature="{feature}"}}'
                )
            )
            assert float(line.split()[-1]) == pytest.approx(drift[f"psi_{feature}"], rel=1e-4)
        assert 'version="e0"' not in "".join(
            ln for ln in text.splitlines() if ln.startswith("edgefleet_drift_psi")
        )


def test_answers_are_judged_by_the_profile_confidence_rule(
    digits: Any, keys: Any, tmp_path: Path
) -> None:
    """A version calibrated to another rule (edge-convert calibrate keeps the profile):
    its answers' confidences are counted by the profile's rule, the buckets it was made
    with, not by the version's own."""
    from edgefleet.agent.telemetry_stats import _DriftVersion
    from edgefleet.core.bundle.archive import read_bundle
    from edgefleet.core.bundle.signing import TrustStore
    from edgefleet.core.processing.scoring import score

    bundle = digits_bundle(digits, keys, tmp_path, "d6", profile=True)
    contents = read_bundle(bundle, tmp_path / "x", TrustStore.from_files([keys[1]]))
    m = contents.manifest
    v = _DriftVersion(contents.directory, None)
    probs = np.array([[0.75, 0.25] + [0.0] * 8], dtype=np.float32)
    margin = score(m, {"probabilities": probs}, rule="margin")  # 0.5, where top1 says 0.75
    assert DriftMonitor._bin(v, [({INPUT: load_split().x_test[:1]}, margin)]) is None
    assert v.counts is not None and v.counts.profile.confidence is not None
    assert v.counts.profile.confidence.rule == m.confidence.rule == "top1"
    assert v.counts.confidence is not None
    assert v.counts.confidence.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]  # 0.75: le 0.8

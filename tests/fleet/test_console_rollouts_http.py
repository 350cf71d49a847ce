"""The console's model and rollout pages over plain HTTP (fleet/console/models.py,
fleet/console/rollouts.py): a real fleet service on a real Mosquitto, devices on the
agent's real MQTT link (tests/support/fleet_sim.py), a real aiohttp client holding the
console's session cookie. What a browser is not needed for: each rollout state renders
with the buttons it allows, the gate series JSON and its history (migration 8), 404s
and 400s, a read user's pages without buttons and its refused actions, the upload body
console.js sends, the manifest's figures, labels, placement, unassign and the 409 of
deleting a version in use.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from edgefleet.fleet.console.rollouts import MAX_POINTS
from edgefleet.fleet.service import FleetService
from tests.support.brokers import Mosquitto
from tests.support.fleet_sim import SimDevice, batch, stats_data, until
from tests.support.quality_fleet import TOKEN, fleet_config
from tests.support.tiny import W2

READ_TOKEN = "console-read-token-" + "0" * 16
FIGURES = {
    "accuracy_fp32": 0.9822,
    "accuracy_int8": 0.9711,
    "accuracy_drop_points": 1.11,
    "size_bytes_fp32": 39506,
    "size_bytes_int8": 14808,
    "latency_ms_fp32": 0.0099,
    "latency_ms_int8": 0.0113,
    "quant_format": "qdq",
}


class Console:
    """One signed-in console user: a cookie jar and the session's CSRF token."""

    def __init__(self, base: str) -> None:
        self.base = base
        # The default jar drops cookies for an IP address host (127.0.0.1).
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def sign_in(self, token: str) -> Console:
        async with self.session.post(
            self.base + "/ui/login", data={"token": token, "next": "/ui/"}, allow_redirects=False
        ) as r:
            assert r.status == 303, await r.text()
        html = await self.page("/ui/")
        m = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
        assert m is not None, html[:500]
        self.csrf = m.group(1)
        return self

    async def get(self, path: str, **kw: Any) -> tuple[int, str]:
        async with self.session.get(self.base + path, allow_redirects=False, **kw) as r:
            return r.status, await r.text()

    async def page(self, path: str, **kw: Any) -> str:
        status, text = await self.get(path, **kw)
        assert status == 200, (path, status, text[:500])
        return text

    async def json(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.base + path) as r:
            return r.status, await r.json(content_type=None)

    async def api(
        self, method: str, path: str, body: Any = None, *, csrf: bool = True, **kw: Any
    ) -> tuple[int, Any]:
        """A call as console.js makes it: the session cookie and the CSRF header."""
        headers = {"X-CSRF-Token": self.csrf} if csrf else {}
        headers.update(kw.pop("headers", {}))
        if body is not None:
            kw["json"] = body
        async with self.session.request(method, self.base + path, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def close(self) -> None:
        await self.session.close()


class Setup:
    def __init__(self, svc: FleetService, admin: Console, client: aiohttp.ClientSession) -> None:
        self.svc, self.admin, self.client = svc, admin, client
        self.sims: list[SimDevice] = []

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.client.request(method, self.svc.url + path, headers=headers, **kw) as r:
            doc = await r.json(content_type=None)
            assert r.status < 300, (method, path, r.status, doc)
            return doc

    async def device(self, port: int, device_id: str, groups: list[str]) -> SimDevice:
        tok = await self.call(
            "POST", "/v1/enrolment-tokens", json={"device_id": device_id, "groups": groups}
        )
        async with self.client.post(self.svc.url + "/v1/enrol", json={"token": tok["token"]}) as r:
            assert r.status == 200, await r.text()
        sim = SimDevice(port, device_id)
        self.sims.append(sim)
        await sim.start()
        await sim.connected()
        return sim


@pytest.fixture
async def fleet(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto, make_tiny_bundle: Any
) -> AsyncIterator[Setup]:
    auth = {"token": TOKEN, "tokens": [{"name": "dashboard", "role": "read", "token": READ_TOKEN}]}
    svc = await FleetService(fleet_config(tmp_path, keys, mosquitto.port, auth=auth)).start()
    async with asyncio.timeout(10):
        await svc.bus.wait_connected()
    client = aiohttp.ClientSession()
    admin = Console(svc.url)
    setup = Setup(svc, admin, client)
    try:
        await admin.sign_in(TOKEN)
        for b in (make_tiny_bundle("1", metrics=FIGURES), make_tiny_bundle("2", W2)):
            await setup.call("POST", "/v1/models", data=b.read_bytes())
        yield setup
    finally:
        for sim in setup.sims:
            await sim.stop()
        await admin.close()
        await client.close()
        await svc.stop()


async def fleet_stored_active(fleet: Setup, sims: list[SimDevice], version: str) -> None:
    """Until the fleet has stored every sim's report of tiny ``version`` active: a sim
    knows first, and a plan assigned before the fleet does finds no baseline."""

    async def stored() -> bool:
        for sim in sims:
            doc = await fleet.call("GET", f"/v1/devices/{sim.device_id}")
            if (doc["models"].get("tiny") or {}).get("active") != version:
                return False
        return True

    await until(stored)


def buttons(html: str) -> set[str]:
    """The ids of the operator buttons on a rollout page."""
    return set(re.findall(r'id="btn-(\w+)"', html))


async def rollout_state(setup: Setup, rid: str, state: str) -> Any:
    r = await setup.call("GET", f"/v1/rollouts/{rid}")
    return r if r["state"] == state else None


async def test_rollout_pages_render_every_state_with_its_buttons_and_the_gate_history(
    fleet: Setup, mosquitto: Mosquitto
) -> None:
    admin = fleet.admin
    sims = [await fleet.device(mosquitto.port, f"store-{i}", ["north"]) for i in range(2)]
    await fleet.call(
        "POST", "/v1/assignments", json={"model": "tiny", "version": "1", "target": {"all": True}}
    )
    await until(lambda: all(s.active.get("tiny") == "1" for s in sims))
    await fleet_stored_active(fleet, sims, "1")
    fleet.svc.bus.rollouts.series_interval_s = 0.0  # every evaluation on the chart
    plan = {"waves": ["100%"], "gates": ["error_rate <= 0.05"], "min_requests": 50}
    started = await fleet.call(
        "POST",
        "/v1/assignments",
        json={"model": "tiny", "version": "2", "target": {"group": "north"},
              "plan": {**plan, "on_fail": "stop"}},
    )  # fmt: skip
    rid = started["id"]

    # running: pause, advance, roll back; the gate is listed, not decided.
    html = await admin.page(f"/ui/rollouts/{rid}")
    assert 'id="rollout-state">running<' in html
    assert buttons(html) == {"pause", "advance", "rollback"}
    assert "error_rate &lt;= 0.05" in html  # the gate, escaped as text
    assert 'class="chart gate-chart" data-stage="wave" data-gate="error_rate &lt;= 0.05"' in html
    status, series = await admin.json(f"/v1/rollouts/{rid}/gates/series")
    assert status == 200
    assert [(g["stage"], g["gate"], g["signal"], g["op"]) for g in series["gates"]] == [
        ("wave", "error_rate <= 0.05", "error_rate", "<=")
    ]

    # paused: resume instead of pause.
    assert (await admin.api("POST", f"/v1/rollouts/{rid}/pause"))[0] == 200
    html = await admin.page(f"/ui/rollouts/{rid}")
    assert 'id="rollout-state">paused<' in html
    assert buttons(html) == {"resume", "advance", "rollback"}
    assert (await admin.api("POST", f"/v1/rollouts/{rid}/resume"))[0] == 200

    # The canary sends 40 % errors: the gate fails and, on_fail stop, the rollout stops.
    canary = sims[0]
    await until(lambda: canary.active.get("tiny") == "2")
    bad = stats_data("tiny", "2", [100] + [0] * 11)
    bad.update(errors=40, sources={"edge": 60})
    bad["confidence"]["counts"] = [0] * 9 + [60, 0]
    await canary.link.publish(
        canary.topic("telemetry"), orjson.dumps(batch(canary.device_id, [("inference_stats", bad)]))
    )
    await until(lambda: rollout_state(fleet, rid, "stopped"))
    html = await admin.page(f"/ui/rollouts/{rid}")
    assert 'id="rollout-state">stopped<' in html
    assert buttons(html) == {"resume", "rollback"}
    assert 'id="evidence"' in html and "Why it stopped" in html
    assert "40.00 %" in html and "40 of 100" in html  # the canary's figure and sample
    assert "5.00 %" in html  # the threshold
    status, series = await admin.json(f"/v1/rollouts/{rid}/gates/series")
    gate = series["gates"][0]
    n = len(gate["t"])
    assert n >= 2, gate
    for column in ("wave", "outcome", "canary", "canary_low", "canary_high", "canary_n",
                   "baseline", "baseline_n", "threshold"):  # fmt: skip
        assert len(gate[column]) == n, column
    assert gate["t"] == sorted(gate["t"])
    assert gate["outcome"][-1] == "fail" and gate["canary"][-1] == 0.4
    assert gate["canary_n"][-1] == 100 and gate["threshold"][-1] == 0.05
    assert gate["canary_low"][-1] > 0.05  # the evidence: its interval is above the line
    assert gate["outcome"][0] == "wait" and gate["canary_n"][0] == 0
    # Before any canary item: no interval drawn, the absolute threshold drawn already.
    assert gate["canary_low"][0] is None and gate["canary_high"][0] is None
    assert gate["threshold"][0] == 0.05
    assert [(d["stage"], d["wave"], d["outcome"]) for d in series["decisions"]] == [
        ("wave", 1, "fail")
    ]
    # from= keeps the later points only.
    status, later = await admin.json(f"/v1/rollouts/{rid}/gates/series?from={gate['t'][-1]}")
    assert status == 200 and later["gates"][0]["t"] == [gate["t"][-1]]

    # rolled back: no button left.
    assert (await admin.api("POST", f"/v1/rollouts/{rid}/rollback"))[0] == 200
    html = await admin.page(f"/ui/rollouts/{rid}")
    assert 'id="rollout-state">rolled_back<' in html and "data-action" not in html

    # completed: a plain waves rollout.
    plain = await fleet.call(
        "POST",
        "/v1/assignments",
        json={"model": "tiny", "version": "2", "target": {"group": "north"}, "waves": [1, "100%"]},
    )
    html = await admin.page(f"/ui/rollouts/{plain['id']}")
    assert 'id="no-gates"' in html and 'data-wave="1"' in html and 'data-wave="2"' in html
    # The first wave's device reports version 2 and the second wave follows by itself;
    # the operator pushes it on meanwhile if it has not (a 409 once it completed).
    status, _ = await admin.api("POST", f"/v1/rollouts/{plain['id']}/advance")
    assert status in (200, 409)
    await until(lambda: rollout_state(fleet, plain["id"], "completed"))
    html = await admin.page(f"/ui/rollouts/{plain['id']}")
    assert 'id="rollout-state">completed<' in html and buttons(html) == {"rollback"}
    status, series = await admin.json(f"/v1/rollouts/{plain['id']}/gates/series")
    assert status == 200 and series["gates"] == [] and series["decisions"] == []

    # The list: both, newest first, with their states; a filter; the live fragment.
    html = await admin.page("/ui/rollouts")
    rows = re.findall(r'data-rollout="([^"]+)" data-state="(\w+)"', html)
    assert rows == [(plain["id"], "completed"), (rid, "rolled_back")]
    html = await admin.page("/ui/rollouts?state=rolled_back")
    assert re.findall(r'data-rollout="([^"]+)"', html) == [rid]
    fragment = await admin.page("/ui/rollouts", headers={"HX-Request": "true"})
    assert "<html" not in fragment and 'id="rollouts-table"' in fragment
    fragment = await admin.page(f"/ui/rollouts/{rid}", headers={"HX-Request": "true"})
    assert "<html" not in fragment and 'id="rollout-state"' in fragment

    # Unknown and bad requests.
    assert (await admin.get("/ui/rollouts/r-nope"))[0] == 404
    assert (await admin.json("/v1/rollouts/r-nope/gates/series")) == (
        404,
        {"error": "unknown rollout 'r-nope'"},
    )
    status, doc = await admin.json(f"/v1/rollouts/{rid}/gates/series?from=yesterday")
    assert status == 400 and "from must be unix seconds" in doc["error"]
    status, doc = await admin.json(f"/v1/rollouts/{rid}/gates/series?gate=x")
    assert status == 400 and "'gate'" in doc["error"]
    assert (await admin.get("/ui/rollouts?state=bogus"))[0] == 400


async def test_a_read_user_sees_no_buttons_and_its_actions_are_refused(
    fleet: Setup, mosquitto: Mosquitto
) -> None:
    await fleet.device(mosquitto.port, "store-0", ["north"])
    started = await fleet.call(
        "POST",
        "/v1/assignments",
        json={"model": "tiny", "version": "2", "target": {"group": "north"},
              "plan": {"waves": ["100%"], "gates": ["error_rate <= 0.05"]}},
    )  # fmt: skip
    rid = started["id"]
    reader = await Console(fleet.svc.url).sign_in(READ_TOKEN)
    try:
        html = await reader.page(f"/ui/rollouts/{rid}")
        assert 'id="rollout-state">running<' in html
        assert "data-action" not in html and buttons(html) == set()
        assert 'id="gate-charts"' in html  # reading is allowed: the charts are there
        models = await reader.page("/ui/models")
        assert "data-upload" not in models and 'href="/ui/models/tiny"' in models
        model = await reader.page("/ui/models/tiny")
        assert "assign-form" not in model and "data-action" not in model
        assert "data-api" not in model and 'id="versions"' in model
        # The server refuses anyway: the session with its CSRF token, and the bearer token.
        for action in ("pause", "rollback", "advance"):
            status, doc = await reader.api("POST", f"/v1/rollouts/{rid}/{action}")
            assert status == 403 and doc == {"error": "dashboard (read) may not write"}
        async with fleet.client.post(
            f"{fleet.svc.url}/v1/rollouts/{rid}/pause",
            headers={"Authorization": f"Bearer {READ_TOKEN}"},
        ) as r:
            assert r.status == 403
        status, doc = await reader.api(
            "POST", "/v1/assignments", {"model": "tiny", "version": "1", "target": {"all": True}}
        )
        assert status == 403
        # An operator's session without the CSRF header is refused too.
        status, doc = await fleet.admin.api("POST", f"/v1/rollouts/{rid}/pause", csrf=False)
        assert status == 403 and "CSRF" in doc["error"]
        assert (await fleet.call("GET", f"/v1/rollouts/{rid}"))["state"] == "running"
    finally:
        await reader.close()


async def test_model_pages_figures_placement_labels_upload_and_removal(
    fleet: Setup, mosquitto: Mosquitto, make_tiny_bundle: Any
) -> None:
    admin = fleet.admin
    sims = [await fleet.device(mosquitto.port, f"store-{i}", ["north"]) for i in range(2)]
    # The upload as console.js sends it: the raw file, the session, the CSRF header.
    body = make_tiny_bundle("3").read_bytes()
    status, doc = await admin.api(
        "POST", "/v1/models", data=body, headers={"Content-Type": "application/octet-stream"}
    )
    assert status == 201 and doc["version"] == "3", doc
    status, doc = await admin.api("POST", "/v1/models", csrf=False, data=body)
    assert status == 403

    await fleet.call(
        "POST", "/v1/assignments", json={"model": "tiny", "version": "1", "target": {"all": True}}
    )
    await until(lambda: all(s.active.get("tiny") == "1" for s in sims))
    await fleet_stored_active(fleet, sims, "1")
    await until(lambda: fleet.call("GET", "/v1/devices/store-1"))
    html = await admin.page("/ui/models")
    assert re.findall(r'data-version="(\d)"', html) == ["3", "2", "1"]
    assert 'data-upload="/v1/models"' in html
    assert "1 · 2" in html  # version 1 on two devices (the stacked bar)

    status, doc = await admin.api("PUT", "/v1/models/tiny/labels/staging", {"version": "2"})
    assert status == 200
    html = await admin.page("/ui/models/tiny")
    version1 = html[html.index('<tr data-version="1">') :]
    version1 = version1[: version1.index("</tr>")]
    # The converter's figures from the signed manifest.
    for text in ("98.22 %", "97.11 %", "−1.11 pts", "38.6 KiB", "14.5 KiB", "0.010 ms",
                 "0.011 ms", "qdq"):  # fmt: skip
        assert text in version1, (text, version1)
    assert re.search(r'class="num active-n">2 <span class="muted small">\(2 online\)', version1)
    assert "<dt>accuracy_drop_points</dt><dd>1.11</dd>" in html  # all figures
    assert '<span class="badge">staging</span>' in html
    assert '<option value="staging">label: staging</option>' in html  # assign by label
    assert 'data-model="tiny"' in html and 'id="assign-form"' in html
    assert "<dt>staging</dt><dd>2 <button" in html
    # The label's remove button, as the page sends it.
    assert 'data-action="/v1/models/tiny/labels/staging" data-method="DELETE"' in html
    status, doc = await admin.api("DELETE", "/v1/models/tiny/labels/staging")
    assert status == 200, doc
    assert "<dt>staging</dt>" not in await admin.page("/ui/models/tiny")
    status, doc = await admin.api("PUT", "/v1/models/tiny/labels/staging", {"version": "2"})
    assert status == 200

    # A version in use cannot go: the 409 the console shows names what uses it.
    status, doc = await admin.api("DELETE", "/v1/models/tiny/versions/1")
    assert status == 409 and "1" in doc["error"], doc
    status, doc = await admin.api("DELETE", "/v1/models/tiny/versions/3")
    assert status == 200
    html = await admin.page("/ui/models/tiny")
    assert '<tr data-version="3">' not in html
    # Unassign as the page's button does it (query form).
    assert 'data-action="/v1/assignments?model=tiny&amp;all=true"' in html
    status, doc = await admin.api("DELETE", "/v1/assignments?model=tiny&all=true")
    assert status == 200, doc
    html = await admin.page("/ui/models/tiny")
    assert "Not assigned anywhere." in html
    assert (await admin.get("/ui/models/nope"))[0] == 404


def shadow_stats(candidate: str, compared: int, agreed: int) -> dict[str, Any]:
    """A ``shadow_stats`` record's data as agent/shadow.py sends it (core/protocol.py)."""
    return {
        "model": "tiny",
        "version": "1",
        "candidate": candidate,
        "task": "classification",
        "window_start": time.time() - 60,
        "window_s": 60.0,
        "sampled": compared,
        "compared": compared,
        "agreed": agreed,
        "errors": 0,
        "dropped_queue": 0,
        "dropped_budget": 0,
        "conf_delta_sum": 0.0,
        "conf_delta_sumsq": 0.0,
        "candidate_latency_ms_sum": 1.0 * compared,
        "active_latency_ms_sum": 1.0 * compared,
    }


async def test_a_shadow_stage_shows_its_stores_its_gate_chart_and_its_end(
    fleet: Setup, mosquitto: Mosquitto
) -> None:
    admin = fleet.admin
    sims = [await fleet.device(mosquitto.port, f"store-{i}", ["north"]) for i in range(2)]
    await fleet.call(
        "POST", "/v1/assignments", json={"model": "tiny", "version": "1", "target": {"all": True}}
    )
    await until(lambda: all(s.active.get("tiny") == "1" for s in sims))
    await fleet_stored_active(fleet, sims, "1")
    plan = {
        "waves": ["100%"],
        "shadow": {"devices": 1, "min_items": 100, "gates": ["shadow_agreement >= 0.9"]},
    }
    started = await fleet.call(
        "POST",
        "/v1/assignments",
        json={"model": "tiny", "version": "2", "target": {"group": "north"}, "plan": plan},
    )
    rid, shadow_id = started["id"], started["shadow_devices"][0]
    html = await admin.page(f"/ui/rollouts/{rid}")
    assert 'id="rollout-stage">shadow stage<' in html
    assert 'id="stage-shadow" data-state="running"' in html
    assert f'href="/ui/devices/{shadow_id}"' in html
    assert 'data-stage="shadow" data-gate="shadow_agreement &gt;= 0.9"' in html
    # The shadow store compares 120 items and agrees on all: the stage ends, waves follow.
    sim = next(s for s in sims if s.device_id == shadow_id)
    records = [("shadow_stats", shadow_stats("2", 120, 120))]
    await sim.link.publish(sim.topic("telemetry"), orjson.dumps(batch(shadow_id, records)))
    done = await until(lambda: rollout_state(fleet, rid, "completed"))
    assert [(d["stage"], d["outcome"]) for d in done["decisions"]] == [("shadow", "pass")]
    html = await admin.page(f"/ui/rollouts/{rid}")
    assert 'id="stage-shadow" data-state="done"' in html and "Shadow stage: gates passed" in html
    assert "100.00 %" in html and "120 of 120" in html  # the agreement and its sample
    status, series = await admin.json(f"/v1/rollouts/{rid}/gates/series")
    assert status == 200
    (gate,) = series["gates"]
    assert gate["stage"] == "shadow" and gate["outcome"][-1] == "pass"
    assert gate["canary"][-1] == 1.0 and gate["canary_n"][-1] == 120
    assert gate["threshold"][-1] == 0.9 and set(gate["wave"]) == {0}


async def test_the_gate_history_is_thinned_for_a_long_wave_and_keeps_its_decisions(
    fleet: Setup, mosquitto: Mosquitto
) -> None:
    """A wave that waited a week: far more evaluations than a chart draws. The route
    answers at most about MAX_POINTS per gate, evenly spread, with every evaluation
    that decided something and the last one."""
    await fleet.device(mosquitto.port, "store-0", ["north"])
    started = await fleet.call(
        "POST",
        "/v1/assignments",
        json={"model": "tiny", "version": "2", "target": {"group": "north"},
              "plan": {"waves": ["100%"], "gates": ["error_rate <= 0.05"]}},
    )  # fmt: skip
    rid = started["id"]
    await fleet.call("POST", f"/v1/rollouts/{rid}/pause")  # no new evaluation meanwhile
    t0 = time.time() - 7 * 86400
    n = 3 * MAX_POINTS + 7

    def job(conn: Any) -> None:
        conn.execute("DELETE FROM rollout_gate_evals WHERE rollout_id = ?", (rid,))
        conn.executemany(
            "INSERT INTO rollout_gate_evals (rollout_id, at, stage, wave, gate, signal, outcome,"
            " canary, canary_low, canary_high, canary_n, baseline, baseline_n, threshold)"
            " VALUES (?, ?, 'wave', 1, 'error_rate <= 0.05', 'error_rate', ?, 0.01, 0.0, 0.03,"
            " ?, NULL, NULL, 0.05)",
            [(rid, t0 + 10.0 * i, "pass" if i == 1234 else "wait", 100 + i) for i in range(n)],
        )

    await fleet.svc.bus.db.write(job)
    status, series = await fleet.admin.json(f"/v1/rollouts/{rid}/gates/series")
    assert status == 200 and series["stride"] == 4
    (gate,) = series["gates"]
    assert MAX_POINTS // 2 < len(gate["t"]) <= MAX_POINTS + 2
    assert gate["t"] == sorted(gate["t"]) and gate["t"][-1] == t0 + 10.0 * (n - 1)
    assert gate["canary_n"][gate["outcome"].index("pass")] == 100 + 1234
    html = await fleet.admin.page(f"/ui/rollouts/{rid}")
    assert f'data-points="{len(gate["t"])}"' in html

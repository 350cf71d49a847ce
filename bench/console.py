"""``python -m bench console``: the fleet console on a fleet of 2,000 devices with a week
of per-minute telemetry (issue 12).

How the fleet is made (all real: ``edge-fleet serve`` as its own process, Mosquitto,
SQLite, Debian's headless Chromium):

1. the fleet starts once on an empty data dir and stops, so its migrations make the
   database;
2. ``bench/console_seed.py`` writes the devices (4 groups, models and versions in
   ``device_models``) and the chart roll-ups by SQL; :func:`seed_more` here makes the
   fleet look lived-in (offline devices, agent versions, events);
3. the fleet starts again: the real bundles are uploaded and rollouts made through the
   API (one left running, one paused, one rolled back, one that will have stopped),
   and one device is enrolled for the live measurement; the fleet stops;
4. :func:`seed_history` adds what those rollouts would have stored over two days (gate
   evaluations every minute, decisions with evidence), hard examples and an audit
   log, again by SQL;
5. the fleet starts for the measurements.

Measured:

- **server time** per console page and per chart query: a signed-in HTTP client
  (session cookie) fetches each URL of :func:`targets` ``--repeat`` times after a
  warm-up, one request at a time on a keep-alive connection over loopback; p50/p95 of
  the client's round trip (request sent → whole body read), an upper bound of the
  server's time. Chart URLs a page names in its HTML (``data-chart``,
  ``data-series``) are added to the list.
- **first render** of the overview and of a rollout page in Chromium: Navigation
  Timing's first contentful paint (and ``domContentLoadedEventEnd``, ``loadEventEnd``,
  and when the page's charts finished drawing: ``dataset.loadedAt`` set by
  console.js/rollouts.js), median of ``--loads`` loads after one cold load.
- **live delay**: a device page open in Chromium; the bench publishes one real
  ``inference_stats`` telemetry record as that (enrolled) device over MQTT and measures
  from the publish to the page's chart having redrawn with the record's request count
  in its data (the fleet stores and rolls it up, the change feed notices, the page's
  SSE fires, the chart re-fetches its series and redraws). When the device page has no
  such chart yet, a probe on the page does what the chart does (on the same SSE notice,
  the same series query) and the result says so. Twice ``--live-reps`` records: on a
  quiet fleet, then while another enrolled device publishes every 0.5 s (a busy fleet,
  where the page's charts redraw at their own throttled pace); the headline
  ``live_delay_s`` is the busy median.

Writes ``bench/results/console.json`` (``devices``, ``page_p95_ms``: the slowest page's
p95, ``first_render_ms``: the slower of the two pages' median first contentful paint,
``live_delay_s``, and every figure behind them) and the "Console" section of
docs/benchmarks.md. ``--quick`` (200 devices, 1 day) checks the harness and only prints.
Exits 1 when a page or chart answers an error other than 404 (404: listed as missing,
a page not built yet), when sign-in, the browser or the live measurement fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import html
import json
import random
import re
import secrets
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench import console_seed
from bench.common import (
    MODELS_BUILD,
    CpuMeter,
    add_run_options,
    free_port,
    machine_info,
    machine_markdown,
    rss_mb,
    wait_until_quiet,
    warn_if_busy,
    write_doc_section,
    write_result,
)
from bench.fleet import api, fleet_process, mosquitto, version_two
from bench.mqtt_sim import SimClient, reported_payload, status_payload, topic

MODEL = console_seed.MODEL
LIVE_DEVICE = "bench-live"  # its page is watched
NOISE_DEVICE = "bench-noise"  # other telemetry arriving meanwhile (a busy fleet)
GOALS = {"page_p95_ms": 200.0, "first_render_ms": 1000.0, "live_delay_s": 2.0}
PLAN_GATES = ["error_rate <= baseline + 0.01", "p95_ms <= 1.5 * baseline"]
OTHER_MODELS = ("digits-edge-litert", "face-detect")  # bundles in models/build
# (state it ends in, model (bundle name), version, group), made in this order.
ROLLOUTS = (
    ("rolled_back", MODEL, "2", "east"),
    ("completed", MODEL, "2", "west"),
    ("paused", "digits-edge-litert", "1", "south"),
    ("stopped", "face-detect", "1", "west"),
    ("running", MODEL, "2", "north"),
)


# ---- what is measured (one place) -----------------------------------------------------


@dataclass
class Ctx:
    """The ids the URLs need, known once the fleet is made."""

    device: str  # a seeded device on two versions (the candidate share)
    group: str
    rollout: str  # the running rollout (gate charts with two days of points)


def targets(c: Ctx) -> list[tuple[str, str, str]]:
    """(kind, name, URL) of every console page and chart query measured. ``page``s are
    HTML pages (their chart URLs are discovered and added); ``chart``s are the JSON the
    pages' charts load."""
    return [
        ("page", "overview", "/ui/"),
        ("page", "devices", "/ui/devices"),
        (
            "page",
            "devices filtered",
            f"/ui/devices?group={c.group}&online=1&model={MODEL}&version=2",
        ),
        ("page", "device", f"/ui/devices/{c.device}"),
        ("page", "models", "/ui/models"),
        ("page", "model", f"/ui/models/{MODEL}"),
        ("page", "rollouts", "/ui/rollouts"),
        ("page", "rollout", f"/ui/rollouts/{c.rollout}"),
        ("page", "hard examples", "/ui/hard-examples"),
        ("page", "audit", "/ui/audit"),
        ("chart", "model 7d auto", f"/v1/series/models/{MODEL}?from=-7d&step=auto"),
        ("chart", "model v2 7d auto", f"/v1/series/models/{MODEL}?version=2&from=-7d&step=auto"),
        ("chart", "model 24h auto", f"/v1/series/models/{MODEL}?from=-24h"),
        ("chart", "device 7d auto", f"/v1/series/devices/{c.device}?from=-7d&step=auto"),
        ("chart", "device 24h auto", f"/v1/series/devices/{c.device}?from=-24h"),
        ("chart", "rollout gate series", f"/v1/rollouts/{c.rollout}/gates/series"),
    ]


# ---- seeding beyond console_seed ---------------------------------------------------------


AGENT_VERSIONS = ("0.12.0", "0.11.3", "0.12.1")
EVENT_KINDS = ("activated", "activated", "activated", "rolled_back", "download_failed",
               "command_done")  # fmt: skip


def _hex(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def seed_more(
    db_path: Path, devices: int, days: float, t: float, rng_seed: int = 12
) -> dict[str, int]:
    """Offline devices, agent versions and events (fleet stopped; SQL). The seeded
    ``model_versions`` rows are removed: the real signed bundles are uploaded next."""
    rng = random.Random(rng_seed)
    ids = [console_seed.device_id(i) for i in range(devices)]
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM model_versions WHERE name = ?", (MODEL,))
        offline = [d for d in ids if rng.random() < 0.08]
        conn.executemany(
            "UPDATE devices SET online = 0, status_at = ?, last_seen = ?,"
            " offline_reason = 'connection lost' WHERE id = ?",
            [(t - s, t - s, d) for d, s in ((d, rng.uniform(60, 3 * 86400)) for d in offline)],
        )
        conn.executemany(
            "UPDATE devices SET agent_version = ?, accelerators = ? WHERE id = ?",
            [
                (AGENT_VERSIONS[i % 3], '{"onnx": ["CPUExecutionProvider"]}', d)
                for i, d in enumerate(ids)
            ],
        )
        events = []
        span = days * 86400
        for d in ids:
            for _ in range(10):
                at = t - rng.uniform(0, span)
                kind = rng.choice(EVENT_KINDS)
                doc = {"kind": kind, "model": MODEL, "version": "1", "at": at}
                events.append(
                    (_hex(rng, 32), d, at, at + 0.2, kind, MODEL, "1", 1, None,
                     "bench" if kind != "activated" else None, json.dumps(doc))
                )  # fmt: skip
        conn.executemany(
            "INSERT OR REPLACE INTO events (id, device_id, at, received_at, kind, model,"
            " version, revision, rollout, reason, data) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            events,
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return {"offline_devices": len(offline), "events": len(events)}


def _evidence(gate: str, outcome: str, rng: random.Random) -> dict[str, Any]:
    if gate.startswith("error_rate"):
        n, k = rng.randint(3000, 9000), rng.randint(5, 40)
        return {
            "gate": gate, "signal": "error_rate", "outcome": outcome,
            "why": f"canary {k}/{n}", "threshold": 0.01,
            "canary": {"k": k, "n": n, "value": k / n, "low": k / n * 0.8, "high": k / n * 1.2},
            "baseline": {"k": k, "n": n * 10, "value": k / n / 1.5, "low": 0.0, "high": 0.01},
        }  # fmt: skip
    return {
        "gate": gate, "signal": "p95_ms", "outcome": outcome, "why": "p95 against 1.5 x baseline",
        "threshold": 15.0, "canary": {"n": rng.randint(3000, 9000), "value": 10.0},
        "baseline": {"n": 50_000, "value": 10.0},
    }  # fmt: skip


def _hard_example(
    rng: random.Random, device: str, t: float, i: int
) -> tuple[tuple[Any, ...], bytes]:
    """One hard example as a device uploads it (core.hard_example_wire's container, a
    28x28 digit-sized input and both answers) and its ``hard_examples`` row."""
    import numpy as np

    from edgefleet.core.hard_example_wire import encode_upload, pack

    nrng = np.random.default_rng(i)
    x = nrng.random((1, 1, 28, 28), dtype=np.float32)
    edge = nrng.dirichlet(np.ones(10)).astype(np.float32)[None, :]
    cloud = nrng.dirichlet(np.ones(10)).astype(np.float32)[None, :]
    e, c = int(edge.argmax()), int(cloud.argmax())
    at = t - rng.uniform(0, 2 * 86400)
    reason = rng.choice(("unsure", "escalated", "audit"))
    header = {
        "device_id": device, "model": MODEL, "version": "1", "kind": reason,
        "status": "answered", "created_at": at, "cloud_model": "digits-cloud",
        "cloud_version": "1", "edge_class": e, "edge_confidence": float(edge.max()),
        "cloud_class": c, "cloud_confidence": float(cloud.max()), "agree": e == c,
        "image_type": None,
    }  # fmt: skip
    hid, body = encode_upload(
        header,
        {"inputs": pack({"x": x}), "edge_outputs": pack({"probs": edge}),
         "cloud_outputs": pack({"probs": cloud}), "image": b""},
    )  # fmt: skip
    labelled = rng.random() < 0.3
    row = (
        hid, device, MODEL, "1", reason, "answered", at, at + 1, len(body), 0, e,
        float(edge.max()), "digits-cloud", "1", c, float(cloud.max()), int(e == c),
        str(c) if labelled else None, c if labelled else None,
        "admin" if labelled else None, at + 60 if labelled else None,
        json.dumps({k: v for k, v in header.items() if v is not None}),
    )  # fmt: skip
    return row, body


def seed_history(
    db_path: Path, rollouts: dict[str, str], devices: int, t: float, rng_seed: int = 13
) -> dict[str, int]:
    """What two days of the rollouts, a labelling queue and the audit log leave in the
    database (fleet stopped; SQL). ``rollouts``: state → rollout id (made by the API)."""
    rng = random.Random(rng_seed)
    start = t - 2 * 86400
    conn = sqlite3.connect(db_path, isolation_level=None)
    written = {"rollout_gate_evals": 0, "rollout_decisions": 0, "hard_examples": 0, "audit_log": 0}
    try:
        conn.execute("BEGIN IMMEDIATE")
        for state, rid in rollouts.items():
            end = t if state in ("running", "paused") else t - 3600
            conn.execute(
                "UPDATE rollouts SET created_at = ?, stage_started_at = ?, serving_started_at = ?"
                " WHERE id = ?",
                (start, start, start, rid),
            )
            if state == "completed":
                conn.execute(
                    "UPDATE rollouts SET state = 'completed', current_wave = 2, reason = NULL,"
                    " updated_at = ? WHERE id = ?",
                    (end, rid),
                )
                conn.execute(
                    "UPDATE rollout_devices SET state = 'succeeded' WHERE rollout_id = ?", (rid,)
                )
            if state == "stopped":
                ev = [_evidence(PLAN_GATES[0], "fail", rng)]
                conn.execute(
                    "UPDATE rollouts SET state = 'stopped', reason = ?, evidence = ?,"
                    " updated_at = ? WHERE id = ?",
                    ("gate failed: error_rate", json.dumps(ev), end, rid),
                )
            rows = []
            for i, at in enumerate(range(int(start), int(end), 60)):
                wave = min(2, i * 3 // max(1, int(end - start) // 60))
                for gate in PLAN_GATES:
                    rate = gate.startswith("error")
                    canary = rng.gauss(0.004, 0.001) if rate else rng.gauss(11.0, 1.0)
                    base = 0.003 if rate else 9.0
                    rows.append(
                        (rid, float(at), "wave", wave, gate, "error_rate" if rate else "p95_ms",
                         "wait", canary, canary * 0.8, canary * 1.2, 100 * (i + 1), base,
                         50_000, base + 0.01 if rate else base * 1.5)
                    )  # fmt: skip
            conn.executemany(
                "INSERT INTO rollout_gate_evals (rollout_id, at, stage, wave, gate, signal,"
                " outcome, canary, canary_low, canary_high, canary_n, baseline, baseline_n,"
                " threshold) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            written["rollout_gate_evals"] += len(rows)
            for wave in range(2):
                ev = [_evidence(g, "pass", rng) for g in PLAN_GATES]
                conn.execute(
                    "INSERT INTO rollout_decisions (rollout_id, stage, wave, outcome, evidence, at)"
                    " VALUES (?, 'wave', ?, 'pass', ?, ?)",
                    (rid, wave, json.dumps(ev), start + (wave + 1) * 12 * 3600),
                )
                written["rollout_decisions"] += 1
        hard = []
        root = db_path.parent / "hard-examples"  # FleetConfig.hard_examples_dir's default
        for i in range(max(200, devices)):
            row, body = _hard_example(rng, console_seed.device_id(i % devices), t, i)
            path = root / row[0][:2] / f"{row[0]}.efh"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            hard.append(row)
        conn.executemany(
            "INSERT OR REPLACE INTO hard_examples (id, device_id, model, version, reason, status,"
            " created_at, received_at, bytes, has_image, edge_class, edge_confidence,"
            " cloud_model, cloud_version, cloud_class, cloud_confidence, agree, label, label_id,"
            " labelled_by, labelled_at, meta) VALUES"
            " (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            hard,
        )
        written["hard_examples"] = len(hard)
        audit = [
            (t - rng.uniform(0, 7 * 86400), rng.choice(("admin", "ops", "dashboard")), "operator",
             rng.choice(("api", "console")), rng.choice(("assign", "pause", "resync", "label")),
             console_seed.device_id(rng.randrange(devices)), 200, "127.0.0.1", "")
            for _ in range(5000)
        ]  # fmt: skip
        conn.executemany(
            "INSERT INTO audit_log (at, actor, role, via, action, target, status, remote, detail)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            sorted(audit),
        )
        written["audit_log"] = len(audit)
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    finally:
        conn.close()
    return written


# ---- the fleet -----------------------------------------------------------------------


@contextlib.contextmanager
def running_fleet(workdir: Path, mqtt_port: int, token: str) -> Iterator[tuple[str, int]]:
    """``edge-fleet serve`` (bench/fleet.py's process) until it answers healthy."""
    port = free_port()
    with fleet_process(workdir, mqtt_port, port, token) as pid:
        base = f"http://127.0.0.1:{port}"
        import urllib.request

        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/v1/health", timeout=2) as r:
                    if json.load(r).get("mqtt") == "connected":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log = (workdir / "fleet.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the fleet did not become healthy in 60 s: {log}")
            time.sleep(0.1)
        yield base, pid


async def make_rollouts(base: str, token: str) -> tuple[dict[str, str], dict[str, str]]:
    """Upload the bundles, make the rollouts (state → id) and enrol the live device and
    the background one (device id → MQTT password)."""
    bundles = [MODELS_BUILD / f"{MODEL}-1.bundle", version_two()]
    bundles += [MODELS_BUILD / f"{b}-1.bundle" for b in OTHER_MODELS]
    rollouts: dict[str, str] = {}
    async with aiohttp.ClientSession() as s:
        names = {}
        for bundle in bundles:
            doc = await api(s, "POST", f"{base}/v1/models", token, data=bundle.read_bytes())
            names[bundle.name] = doc["name"]
        # The fleet allows one unfinished rollout per model: the running one and the
        # finished ones are of the seeded model, the paused and the stopped one of others.
        for state, model, version, grp in ROLLOUTS:
            model = names.get(f"{model}-1.bundle", model)
            r = await api(
                s,
                "POST",
                f"{base}/v1/assignments",
                token,
                json={
                    "model": model,
                    "version": version,
                    "target": {"group": grp},
                    "plan": {"waves": [5, "50%", "100%"], "gates": PLAN_GATES},
                },
            )
            rid = r["id"]
            rollouts[state] = rid
            if state in ("rolled_back", "completed"):  # completed: recorded so by SQL
                await api(s, "POST", f"{base}/v1/rollouts/{rid}/rollback", token)
            elif state == "paused":
                await api(s, "POST", f"{base}/v1/rollouts/{rid}/pause", token)
        secrets_: dict[str, str] = {}
        for dev in (LIVE_DEVICE, NOISE_DEVICE):
            tok = await api(
                s,
                "POST",
                f"{base}/v1/enrolment-tokens",
                token,
                json={"device_id": dev, "groups": ["north"]},
            )
            async with s.post(f"{base}/v1/enrol", json={"token": tok["token"]}) as resp:
                doc = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"enrol {dev}: HTTP {resp.status} {doc}")
            secrets_[dev] = str(doc["mqtt"]["password"])
    return rollouts, secrets_


# ---- server time ---------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def sign_in(base: str, token: str) -> aiohttp.ClientSession:
    """A client holding a console session cookie (the default jar drops 127.0.0.1's)."""
    s = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with s.post(
        f"{base}/ui/login", data={"token": token, "next": "/ui/"}, allow_redirects=False
    ) as r:
        await r.read()
        if r.status != 303 or not any(c.key for c in s.cookie_jar):
            await s.close()
            raise RuntimeError(f"console sign-in: HTTP {r.status}, no session cookie")
    return s


_CHART_TAG = re.compile(r'<[^>]*\bdata-(?:chart|series)="([^"]+)"[^>]*>')
_FROM_ATTR = re.compile(r'\bdata-from="([^"]+)"')


def chart_urls(page: str) -> list[str]:
    """The JSON URLs a page's charts load (``data-chart``, or ``data-series`` with the
    range in ``data-from`` as devices.js asks it)."""
    out = []
    for m in _CHART_TAG.finditer(page):
        url = html.unescape(m.group(1))
        since = _FROM_ATTR.search(m.group(0))
        if since and "from=" not in url:
            url += ("&" if "?" in url else "?") + "from=" + html.unescape(since.group(1))
        out.append(url)
    return out


async def time_urls(
    s: aiohttp.ClientSession, base: str, ctx: Ctx, repeat: int, warmup: int
) -> dict[str, Any]:
    """Every target, ``warmup`` then ``repeat`` sequential GETs: round trip p50/p95."""
    todo = targets(ctx)
    out: dict[str, Any] = {}
    seen = {u for _, _, u in todo}
    i = 0
    while i < len(todo):
        kind, name, url = todo[i]
        i += 1
        async with s.get(base + url, allow_redirects=False) as r:
            body = await r.read()
            status = r.status
        entry: dict[str, Any] = {"kind": kind, "url": url, "status": status, "bytes": len(body)}
        out[name] = entry
        if status != 200:
            entry["error"] = body[:300].decode(errors="replace")
            continue
        if kind == "page":
            for u in chart_urls(body.decode(errors="replace")):
                if u.startswith("/") and u not in seen:
                    seen.add(u)
                    todo.append(("chart", f"{name} chart {u}", u))
        for _ in range(warmup):
            async with s.get(base + url) as r:
                await r.read()
        ms = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            async with s.get(base + url, allow_redirects=False) as r:
                await r.read()
                if r.status != 200:
                    entry["status"] = r.status
            ms.append((time.perf_counter() - t0) * 1000)
        entry |= {
            "n": repeat,
            "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(pct(ms, 0.95), 1),
            "max_ms": round(max(ms), 1),
        }
        print(f"  {name:28s} p50 {entry['p50_ms']:7.1f} ms  p95 {entry['p95_ms']:7.1f} ms",
              file=sys.stderr)  # fmt: skip
    return out


# ---- browser -------------------------------------------------------------------------


_CHARTS_DONE = """
    const els = document.querySelectorAll("[data-chart], [data-series]");
    if (!els.length) return {charts: 0, done: true, at: null};
    let last = 0, done = true;
    els.forEach(function (el) {
      if (!el.dataset.loadedAt) done = false;
      else last = Math.max(last, Number(el.dataset.loadedAt));
    });
    return {charts: els.length, done: done, at: done ? last - performance.timeOrigin : null};
"""


def first_render(driver: Any, base: str, pages: dict[str, str], loads: int) -> dict[str, Any]:
    """Blocking (selenium): per page a cold load then ``loads`` loads; medians."""
    from tests.support.browser import navigation_timing

    out: dict[str, Any] = {}
    for name, url in pages.items():
        runs = []
        for i in range(loads + 1):
            driver.get(base + url)
            nt = navigation_timing(driver, timeout=10)
            charts: dict[str, Any] = {"done": False}
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                charts = driver.execute_script(_CHARTS_DONE)
                if charts["done"]:
                    break
                time.sleep(0.02)
            run = {
                "fcp_ms": nt.first_contentful_paint_ms,
                "dom_content_loaded_ms": nt.dom_content_loaded_ms,
                "load_ms": nt.load_ms,
                "response_start_ms": nt.response_start_ms,
                "charts": charts.get("charts"),
                "charts_drawn_ms": charts.get("at"),
            }
            if i == 0:
                out[name] = {"url": url, "cold": run}
            else:
                runs.append(run)

        def med(key: str, rs: list[dict[str, Any]] = runs) -> float | None:
            vals = [r[key] for r in rs if r[key] is not None]
            return round(statistics.median(vals), 1) if len(vals) == len(rs) else None

        out[name] |= {
            "loads": loads,
            "fcp_ms": med("fcp_ms"),
            "dom_content_loaded_ms": med("dom_content_loaded_ms"),
            "load_ms": med("load_ms"),
            "response_start_ms": med("response_start_ms"),
            "charts": runs[-1]["charts"],
            "charts_drawn_ms": med("charts_drawn_ms"),
        }
    return out


# The live measurement's view of the page: per drawn chart, when it last loaded and the
# sum of every number it plots; the probe (no suitable chart on the page) keeps the same
# figures for the series query a device chart makes.
_PLOTS = """
    const out = [];
    document.querySelectorAll("[data-chart], [data-series], [data-metric]").forEach(function (el) {
      if (!el._plot) return;
      const box = el.dataset.loadedAt ? el : el.closest("[data-loaded-at]");
      let sum = 0;
      el._plot.data.slice(1).forEach(function (col) {
        (col || []).forEach(function (v) { if (typeof v === "number") sum += v; });
      });
      out.push({url: el.id || el.dataset.chart || el.dataset.series,
                at: Number(box ? box.dataset.loadedAt : 0), sum: sum});
    });
    const p = window.__benchProbe;
    if (p) out.push({url: "probe", at: p.at, sum: p.sum});
    return out;
"""

_PROBE = """
    const url = arguments[0];
    const p = window.__benchProbe = {at: 0, sum: 0};
    function load() {
      return fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}})
        .then(function (r) { return r.json(); })
        .then(function (d) {
          let sum = 0;
          (d.requests || []).forEach(function (line) {
            (line || []).forEach(function (v) { if (typeof v === "number") sum += v; });
          });
          p.sum = sum; p.at = Date.now();
        });
    }
    document.body.addEventListener("ef:telemetry", load);
    load();
"""


def stats_batch(device_id: str, seq: int, count: int) -> bytes:
    """One batch with one ``inference_stats`` record of ``count`` requests (the agent's
    record, docs/fleet.md)."""
    now = time.time()
    lat = [0] * 12
    lat[3] = count  # 2..5 ms
    data = {
        "model": MODEL,
        "version": "1",
        "window_start": now - 60,
        "window_s": 60.0,
        "count": count,
        "errors": 0,
        "latency_ms": {"le": [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], "counts": lat},
        "confidence": {
            "le": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
            "counts": [0] * 9 + [count, 0],
        },
        "sources": {"edge": count},
        "fallback": {},
    }
    return orjson.dumps(
        {
            "schema": 1,
            "device_id": device_id,
            "batch_id": secrets.token_hex(16),
            "sent_at": now,
            "outbox": {"dropped_low": 0, "dropped_high": 0, "waiting": 0},
            "records": [
                {"id": secrets.token_hex(16), "seq": seq, "kind": "inference_stats",
                 "priority": 0, "ts": now, "data": data}
            ],
        }
    )  # fmt: skip


async def _device(mqtt_port: int, device_id: str, password: str) -> SimClient:
    """An enrolled device's MQTT session, online and reporting the seeded model."""
    dev = SimClient(
        "127.0.0.1",
        mqtt_port,
        device_id,
        username=device_id,
        password=password,
        will=(topic(device_id, "status"), status_payload(device_id, "offline")),
    )
    await dev.connect()
    await dev.publish(topic(device_id, "status"), status_payload(device_id, "online"), retain=True)
    models: dict[str, dict[str, object]] = {
        MODEL: {"active": "1", "desired": "1", "state": "active"}
    }
    await dev.publish(
        topic(device_id, "reported"), reported_payload(device_id, 0, models), retain=True
    )
    return dev


async def _watch_once(
    driver: Any, dev: SimClient, seq: int, count: int, plots: list[dict[str, Any]]
) -> tuple[float | None, list[dict[str, Any]]]:
    """Publish one record of ``count`` requests; seconds until a chart on the page has
    reloaded with exactly ``count`` more requests in its data (None: not in 15 s)."""
    before = {p["url"]: p for p in plots}
    t_pub = time.time()
    await dev.publish(topic(LIVE_DEVICE, "telemetry"), stats_batch(LIVE_DEVICE, seq, count))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        plots = await asyncio.to_thread(driver.execute_script, _PLOTS)
        for p in plots:
            b = before.get(p["url"])
            if b is not None and p["at"] > b["at"] and abs(p["sum"] - b["sum"] - count) < 0.5:
                return p["at"] / 1000 - t_pub, plots
    return None, plots


async def live_delay(
    driver: Any, base: str, mqtt_port: int, passwords: dict[str, str], reps: int
) -> dict[str, Any]:
    """Publish → the chart redrawn with the record (see the module doc), ``reps`` times
    on a quiet fleet, then ``reps`` times while another device sends telemetry every
    0.5 s (a busy fleet: the page's charts then redraw at their own throttled pace)."""
    dev = await _device(mqtt_port, LIVE_DEVICE, passwords[LIVE_DEVICE])
    noise = await _device(mqtt_port, NOISE_DEVICE, passwords[NOISE_DEVICE])
    noise_task: asyncio.Task[None] | None = None
    try:
        seq = 1
        await dev.publish(topic(LIVE_DEVICE, "telemetry"), stats_batch(LIVE_DEVICE, seq, 100))
        await asyncio.sleep(2.0)  # stored and rolled up before the page opens

        await asyncio.to_thread(driver.get, f"{base}/ui/devices/{LIVE_DEVICE}")
        status = await asyncio.to_thread(
            driver.execute_script,
            "return performance.getEntriesByType('navigation')[0].responseStatus || 0",
        )
        plots: list[dict[str, Any]] = []
        for _ in range(100):  # the page's charts drawn once
            plots = await asyncio.to_thread(driver.execute_script, _PLOTS)
            if plots and all(p["at"] for p in plots):
                break
            await asyncio.sleep(0.05)
        watched = "the device page's charts"
        if not plots:
            # No drawn chart on the device page (not built yet, or an error): the probe.
            watched = "a probe on the device page (it drew no chart)"
            if status != 200 or not await asyncio.to_thread(
                driver.execute_script, "return !!(window.EF && window.EventSource)"
            ):
                await asyncio.to_thread(driver.get, base + "/ui/")
                watched = "a probe on the overview (device page unavailable)"
            await asyncio.to_thread(
                driver.execute_script,
                _PROBE,
                f"/v1/series/devices/{LIVE_DEVICE}?from=-1h&step=minute",
            )
            for _ in range(100):
                plots = await asyncio.to_thread(driver.execute_script, _PLOTS)
                if plots and plots[-1]["at"]:
                    break
                await asyncio.sleep(0.05)

        async def background() -> None:
            n = 0
            while True:
                n += 1
                await noise.publish(
                    topic(NOISE_DEVICE, "telemetry"), stats_batch(NOISE_DEVICE, n, 10)
                )
                await asyncio.sleep(0.5)

        out: dict[str, Any] = {"watched": watched, "device_page_status": status, "reps": reps}
        for phase in ("quiet", "busy"):
            if phase == "busy":
                noise_task = asyncio.create_task(background(), name="bench-noise")
                await asyncio.sleep(3.0)
            delays: list[float] = []
            misses = 0
            for i in range(reps):
                # Quiet: past the page's own redraw throttle (devices.js: 3 s), at any
                # phase of the change feed's 0.5 s poll. Busy: spread over 2-5 s, so the
                # records land at any phase of the page's redraw pace too.
                await asyncio.sleep(
                    3.2 + random.random() if phase == "quiet" else 2.0 + 3.0 * random.random()
                )
                seq += 1
                delay, plots = await _watch_once(driver, dev, seq, 1000 + 37 * i, plots)
                if delay is None:
                    misses += 1
                else:
                    delays.append(delay)
            out[phase] = {
                "missed": misses,
                "delays_s": [round(d, 3) for d in delays],
                "median_s": round(statistics.median(delays), 3) if delays else None,
                "max_s": round(max(delays), 3) if delays else None,
            }
        return out
    finally:
        if noise_task is not None:
            noise_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await noise_task
        await dev.close()
        await noise.close()


# ---- the run -------------------------------------------------------------------------


async def measure(
    args: argparse.Namespace,
    base: str,
    token: str,
    ctx: Ctx,
    mqtt_port: int,
    passwords: dict[str, str],
) -> dict[str, Any]:
    from tests.support.browser import login, start_chromium

    res: dict[str, Any] = {}
    print("server time per page and chart …", file=sys.stderr)
    s = await sign_in(base, token)
    try:
        res["urls"] = await time_urls(s, base, ctx, args.repeat, args.warmup)
    finally:
        await s.close()
    print("Chromium: first render, live delay …", file=sys.stderr)
    browser = await asyncio.to_thread(start_chromium)
    try:
        driver = browser.driver
        res["chromium"] = driver.capabilities.get("browserVersion")
        await asyncio.to_thread(login, driver, base, token)
        pages = {"overview": "/ui/", "rollout": f"/ui/rollouts/{ctx.rollout}"}
        res["browser"] = await asyncio.to_thread(first_render, driver, base, pages, args.loads)
        res["live"] = await live_delay(driver, base, mqtt_port, passwords, args.live_reps)
        await asyncio.to_thread(driver.get, "about:blank")
    finally:
        await asyncio.to_thread(browser.quit)
    return res


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    token = secrets.token_urlsafe(24)
    db_path = workdir / "fleet" / "fleet.sqlite"
    res: dict[str, Any] = {"devices": args.devices, "days": args.days, "loads": args.loads}
    res |= {"repeat": args.repeat, "warmup": args.warmup}
    with mosquitto(workdir) as broker:
        print("fleet: first start (migrations) …", file=sys.stderr)
        with running_fleet(workdir, broker.port, token):
            pass
        t = time.time()
        print(f"seeding {args.devices} devices x {args.days} days …", file=sys.stderr)
        t0 = time.perf_counter()
        info = console_seed.seed(db_path, args.devices, args.days, now=t)
        more = seed_more(db_path, args.devices, args.days, t)
        with running_fleet(workdir, broker.port, token) as (base, _):
            rollouts, passwords = await make_rollouts(base, token)
        history = seed_history(db_path, rollouts, args.devices, t)
        res["seed"] = {
            "rows": {**info["rows"], **more, **history},
            "rollouts": sorted(rollouts),
            "seconds": round(time.perf_counter() - t0, 1),
            "db_mb": round(
                sum(p.stat().st_size for p in db_path.parent.glob("fleet.sqlite*")) / 1e6
            ),
        }
        ctx = Ctx(device=console_seed.device_id(0), group="north", rollout=rollouts["running"])
        print("fleet: start for the measurements …", file=sys.stderr)
        with running_fleet(workdir, broker.port, token) as (base, pid):
            await asyncio.sleep(1.0)  # past the start's own work
            res |= await measure(args, base, token, ctx, broker.port, passwords)
            res["fleet_memory_mb"] = rss_mb(pid)
    return res


def summarise(res: dict[str, Any]) -> list[str]:
    """Fill the headline figures; return the failures (empty: success)."""
    urls = res.get("urls", {})
    failures = [
        f"{n}: HTTP {u['status']}" for n, u in urls.items() if u["status"] not in (200, 404)
    ]
    res["missing"] = [f"{n} ({u['url']})" for n, u in urls.items() if u["status"] == 404]
    pages = {n: u for n, u in urls.items() if u["kind"] == "page" and "p95_ms" in u}
    charts = {n: u for n, u in urls.items() if u["kind"] == "chart" and "p95_ms" in u}
    if pages:
        slowest = max(pages, key=lambda n: pages[n]["p95_ms"])
        res["page_p95_ms"], res["slowest_page"] = pages[slowest]["p95_ms"], slowest
    else:
        res["page_p95_ms"] = None
        failures.append("no page answered 200")
    if charts:
        slowest = max(charts, key=lambda n: charts[n]["p95_ms"])
        res["chart_p95_ms"], res["slowest_chart"] = charts[slowest]["p95_ms"], slowest
    br = res.get("browser", {})
    fcps = [p["fcp_ms"] for p in br.values()]
    res["first_render_ms"] = max(fcps) if fcps and None not in fcps else None
    if res["first_render_ms"] is None:
        failures.append("no first contentful paint measured")
    drawn = [p["charts_drawn_ms"] for p in br.values() if p.get("charts")]
    res["charts_drawn_ms"] = max(drawn) if drawn and None not in drawn else None
    live = res.get("live", {})
    busy, quiet = live.get("busy", {}), live.get("quiet", {})
    # The headline is the busy fleet's: telemetry arrives all the time on 2,000 devices.
    res["live_delay_s"] = busy.get("median_s")
    res["live_delay_max_s"] = busy.get("max_s")
    res["live_delay_quiet_s"] = quiet.get("median_s")
    for name, phase in (("quiet", quiet), ("busy", busy)):
        if phase.get("missed") or phase.get("median_s") is None:
            failures.append(
                f"live delay ({name}): {phase.get('missed')} of {live.get('reps')}"
                " records not seen on the chart within 15 s"
            )
    res["goals"] = GOALS
    res["failures"] = failures
    return failures


def _ok(value: float | None, goal: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value <= goal else "**missed**"


def render(res: dict[str, Any]) -> str:
    urls = res.get("urls", {})
    br = res.get("browser", {})
    live = res.get("live", {})
    quiet, busy = live.get("quiet", {}), live.get("busy", {})
    seed = res.get("seed", {})
    rows = seed.get("rows", {})
    lines = [
        "## Console (`python -m bench console`)",
        "",
        machine_markdown(res["machine"]),
        f"One `edge-fleet serve` process (SQLite), Mosquitto, the benchmark's client and"
        f" Debian's headless Chromium {res.get('chromium') or ''} share the cores."
        f" The database: {res['devices']:,}"
        f" devices in 4 groups, {res['days']} days of per-minute telemetry roll-ups"
        f" ({rows.get('ts_version_minute', 0):,} version-minute,"
        f" {rows.get('ts_device_hour', 0):,} device-hour and"
        f" {rows.get('ts_device_minute', 0):,} device-minute rows), 5 rollouts (running,"
        f" paused, stopped, completed, rolled back) with {rows.get('rollout_gate_evals', 0):,} gate"
        f" evaluations, {rows.get('events', 0):,} events, {rows.get('hard_examples', 0):,}"
        f" hard examples, {rows.get('audit_log', 0):,} audit entries; {seed.get('db_mb')} MB"
        " (bench/console_seed.py and bench/console.py).",
        "",
        "| figure | goal | measured | |",
        "|---|---|---|---|",
        f"| slowest page's p95 server time ({res.get('slowest_page')}) | ≤ 200 ms |"
        f" {res.get('page_p95_ms')} ms | {_ok(res.get('page_p95_ms'), 200)} |",
        f"| slowest chart query's p95 ({res.get('slowest_chart')}) | ≤ 200 ms |"
        f" {res.get('chart_p95_ms')} ms | {_ok(res.get('chart_p95_ms'), 200)} |",
        f"| first render, slowest of overview and rollout page (first contentful paint) |"
        f" ≤ 1 s | {res.get('first_render_ms')} ms | {_ok(res.get('first_render_ms'), 1000)} |",
        f"| live delay, telemetry record published over MQTT → chart redrawn with it, while"
        f" other telemetry keeps arriving (median of {live.get('reps')}; max"
        f" {res.get('live_delay_max_s')} s) | ≤ 2 s | {res.get('live_delay_s')} s"
        f" | {_ok(res.get('live_delay_s'), 2)} |",
        f"| the same on a quiet fleet (median; max {quiet.get('max_s')} s) | ≤ 2 s |"
        f" {quiet.get('median_s')} s | {_ok(quiet.get('median_s'), 2)} |",
        "",
        "Server time is the client's round trip on loopback (request sent → body read,"
        f" signed in with a session cookie, one request at a time, {res.get('repeat')} per"
        f" URL after {res.get('warmup')} warm-up requests), an upper bound of the server's"
        " own time:",
        "",
        "| page or chart query | URL | p50 ms | p95 ms | bytes |",
        "|---|---|---|---|---|",
    ]
    for name, u in urls.items():
        if "p95_ms" in u:
            lines.append(
                f"| {name} | `{u['url']}` | {u['p50_ms']} | {u['p95_ms']} | {u['bytes']:,} |"
            )
        else:
            lines.append(f"| {name} | `{u['url']}` | HTTP {u['status']} | | |")
    lines += [
        "",
        "Chromium (headless, Navigation Timing; median of"
        f" {res.get('loads')} loads after a cold one, static files"
        " cached as a browser keeps them):",
        "",
        "| page | first contentful paint | DOMContentLoaded end | load end | charts drawn |"
        " cold load: FCP |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in br.items():
        drawn = f"{p['charts_drawn_ms']} ms" if p.get("charts") else "no chart"
        lines.append(
            f"| {name} | {p['fcp_ms']} ms | {p['dom_content_loaded_ms']} ms | {p['load_ms']} ms"
            f" | {drawn} | {p['cold']['fcp_ms']} ms |"
        )
    lines += [
        "",
        f"Live delay, watched on {live.get('watched')}: one `inference_stats` record"
        " published by an enrolled device; the fleet stores the batch and its roll-up, the"
        " console's change feed (polled every 0.5 s) notices, the page's server-sent event"
        " fires, the chart re-fetches its series and redraws; the clock stops when a chart's"
        " data holds the record's request count. Quiet fleet (nothing else arriving):"
        f" {quiet.get('delays_s')} s. Busy (another device publishing every 0.5 s, so the"
        f" telemetry notice fires all the time and the page redraws at its own pace;"
        " static/devices.js redraws a device's charts at most once a second):"
        f" {busy.get('delays_s')} s.",
    ]
    others = res.get("box_load", {}).get("others_share_of_box", 0.0)
    if others > 0.1:
        lines += [
            "",
            f"**Other work used {others:.0%} of the box's CPU during this run: the figures"
            " are pessimistic.**",
        ]
    if res.get("missing"):
        lines += [
            "",
            "Not measured (HTTP 404, not built when this ran): " + ", ".join(res["missing"]) + ".",
        ]
    if res.get("failures"):
        lines += ["", "Failures: " + "; ".join(res["failures"]) + "."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench console", description=__doc__)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--days", type=float, default=7.0)
    parser.add_argument("--repeat", type=int, default=30, help="timed requests per URL")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loads", type=int, default=5, help="browser loads per page")
    parser.add_argument("--live-reps", type=int, default=10, help="records per live phase")
    parser.add_argument(
        "--quick", action="store_true", help="200 devices, 1 day: a fast check of the harness"
    )
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.days = 200, 1.0
    busy_before = wait_until_quiet(args.wait_quiet)
    meter = CpuMeter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-console-"))
    try:
        res = asyncio.run(run(args, workdir))
    except Exception as exc:
        print(
            f"bench console: FAILED: {exc!r} (fleet log: {workdir / 'fleet.log'})", file=sys.stderr
        )
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    load = meter.stop()
    res["box_load"] = {"busy_share_before": round(busy_before, 3), **load}
    warn_if_busy(load["others_share_of_box"])
    res["machine"] = machine_info()
    failures = summarise(res)
    res["quick"] = args.quick
    if not args.quick:  # a quick check's figures are not the fleet's: printed only
        write_result("console", res)
        if not args.no_doc:
            write_doc_section("console", render(res))
    print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())
    for f in failures:
        print(f"bench console: FAILED: {f}", file=sys.stderr)
    if res.get("missing"):
        print(f"bench console: missing pages (404): {', '.join(res['missing'])}", file=sys.stderr)
    return 1 if failures else 0

"""``python -m bench rollout_guard``: does a gated rollout stop a bad model version, and
never a good one? (issue 11)

One Mosquitto (bench/mosquitto.py), one ``edge-fleet serve`` process (the rollout
gates of fleet/gates.py decide in it, from the telemetry it ingests) and ``--devices``
simulated stores (bench/mqtt_sim.py: real MQTT sessions, enrolled over the fleet API,
downloading the real bundles with their own credentials), plus ``--agents`` real agents
(default 2: the agent's aiohttp app in this process, on the same Mosquitto, with a
real cloud endpoint and a local app each sending held-out digit images; more do not
fit beside 200 stores on a two-core box).

What makes the simulated stores' telemetry real: every store answers a stream of
**real held-out digits** (models/build/digits-test.npz, sampled with the store's own
seeded RNG) with the **real model** it runs: ONNX Runtime sessions of the bundles the
fleet sent, verified and opened as the agent does (one session per version, shared by
the stores, since an ONNX model's answer does not depend on which store asks). Each
store's answers go through the agent's own telemetry code (``InferenceStats`` of
agent/telemetry_stats.py: windows → ``inference_stats`` records); unsure answers (top-1
below the bundle's fallback threshold) are escalated to the real ``digits-cloud``
model, which answers them (``sources.cloud``) and gives the cloud agreement
(``fallback_stats`` records, ``core/protocol.FallbackStats``); a store told to run a
shadow candidate runs it on ``sample_rate`` of its requests and compares the top-1
classes (``shadow_stats`` records, ``core/protocol.ShadowStats``). Records are
published in telemetry batches every ``--window`` seconds, as the agent's sender does.

Each **repetition** (seeded: the stores' digit streams; the rollout id, hence the wave
order, is the fleet's) starts with every store on version 1 (a plain assignment), then
starts a rollout with a plan (``PLAN``: a shadow stage on 5 % of the stores, then
serving waves 4 %, 25 %, 100 % gated on error rate, fallback rate and cloud agreement
against the baseline cohort) and watches it to its end (completed, or
rolled back), or to ``--timeout``:

* the good version (digits-edge 2) ``--good`` times: ``good_version_false_stops``;
* the ~20-points-worse version (models/digits_bad.py) with the plan (does the shadow
  stage alone catch it: ``shadow_caught_before_serving``) and with the same plan
  without its shadow stage (the serving gates alone: ``bad_version_max_share_served``,
  ``bad_version_detect_s``, ``bad_version_detect_requests``);
* the 10, 5 and 2-points-worse versions: the detection curve (stop rate).

``shadow_p99_overhead`` is read from bench/results/shadow.json when ``python -m bench
shadow`` wrote it (measured once, there, against a real agent), else null.

Writes ``bench/results/rollout_guard.json`` and its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from bench.common import (
    MODELS_BUILD,
    ROOT,
    CpuMeter,
    add_run_options,
    free_port,
    machine_info,
    machine_markdown,
    wait_until_quiet,
    warn_if_busy,
    write_doc_section,
    write_result,
)
from bench.fleet import Usage, api, fleet_process, mosquitto
from bench.mqtt_sim import SimClient, status_payload, topic
from edgefleet.agent.shadow import compare
from edgefleet.agent.telemetry_stats import InferenceStats
from edgefleet.core import protocol
from edgefleet.core.bundle.manifest import Manifest

MODEL = "digits-edge"
CLOUD = "digits-cloud"
GOOD = "2"
INPUT, SCORES = "pixels", "probabilities"

# The plan every repetition uses (``serving_only`` drops the shadow stage).
SHADOW_STAGE: dict[str, Any] = {
    "devices": "5%",
    "sample_rate": 1.0,
    "min_items": 300,
    "gates": ["shadow_agreement >= 0.98"],
}
# No p95 gate: a cohort's p95 here says which kind of store it holds, not which version
# (a real agent's answer, HTTP and image decoding included, takes ~5 ms; a simulated
# store's, the model alone, ~0.05 ms), so a canary wave holding a real agent would be
# stopped against a baseline of simulated stores: measured, a false stop in 2 runs.
PLAN: dict[str, Any] = {
    "waves": ["4%", "25%", "100%"],
    "gates": [
        "error_rate <= 0.01",
        "fallback_rate <= baseline + 0.05",
        "cloud_agreement >= baseline - 0.1",
    ],
    "min_requests": 200,
    "min_baseline_requests": 200,
    "on_fail": "rollback",
    "promote": "stable",
}


# The fleet's database, copied for a look when a rollout stays undecided (set by run()).
KEEP_DB: Path | None = None


def plan(shadow: bool) -> dict[str, Any]:
    return {**PLAN, "shadow": SHADOW_STAGE} if shadow else dict(PLAN)


# ---- the real models ------------------------------------------------------------------


class Models:
    """ONNX Runtime sessions of verified bundles, one per (model, version); shared."""

    def __init__(self, workdir: Path) -> None:
        from edgefleet.core.bundle.signing import TrustStore

        self.workdir = workdir
        self.trust = TrustStore.from_files(sorted((MODELS_BUILD / "keys").glob("*.pub")))
        self.backends: dict[tuple[str, str], Any] = {}
        self.thresholds: dict[tuple[str, str], float] = {}
        self.by_sha: dict[str, tuple[str, str]] = {}
        self.manifests: dict[tuple[str, str], Manifest] = {}
        self.stack = contextlib.ExitStack()
        self.lock = threading.Lock()

    def load(self, data: bytes) -> tuple[str, str]:
        """Verify and open a bundle's bytes (as the agent would); its (name, version).
        Any thread; one bundle at a time (stores fetch the same bundle at once)."""
        with self.lock:
            return self._load(data)

    def _load(self, data: bytes) -> tuple[str, str]:
        from edgefleet.converters.evaluate import open_model
        from edgefleet.core.bundle.archive import read_bundle

        sha = hashlib.sha256(data).hexdigest()
        if sha in self.by_sha:
            return self.by_sha[sha]
        path = self.workdir / f"{sha}.bundle"
        path.write_bytes(data)
        contents = read_bundle(path, self.workdir / sha, self.trust, 1 << 30)
        m = contents.manifest
        fields = m.model_dump(exclude={"files", "self_test", "metrics", "reference_profile"})
        backend = self.stack.enter_context(open_model(contents.directory / m.model_file, fields))
        key = (m.name, m.version)
        self.backends[key] = backend
        self.manifests[key] = m
        self.thresholds[key] = float(m.fallback.threshold) if m.fallback is not None else 0.0
        self.by_sha[sha] = key
        return key

    def infer(
        self, key: tuple[str, str], x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float, dict[str, np.ndarray]]:
        """(top-1 class, top-1 confidence, seconds, outputs) for the rows of ``x``."""
        t0 = time.perf_counter()
        outputs = self.backends[key].infer({INPUT: x})
        dt = time.perf_counter() - t0
        scores = outputs[SCORES]
        return scores.argmax(axis=1), scores.max(axis=1), dt, outputs

    def close(self) -> None:
        self.stack.close()


# ---- simulated stores -----------------------------------------------------------------


@dataclass
class ShadowWindow:
    """One window of shadow comparisons (the ``shadow_stats`` record's figures)."""

    sampled: int = 0
    compared: int = 0
    agreed: int = 0
    conf_delta_sum: float = 0.0
    conf_delta_sumsq: float = 0.0
    candidate_ms: float = 0.0
    active_ms: float = 0.0


@dataclass
class Store:
    device_id: str
    secret: str
    rng: np.random.Generator
    client: SimClient | None = None
    active: str = "1"
    desired: str = "1"
    state: str = "active"
    rollout: str | None = None
    revision: int = 0
    shadow: tuple[str, float] | None = None  # (candidate version, sample rate)
    stats: InferenceStats | None = None
    shadow_window: ShadowWindow = field(default_factory=ShadowWindow)
    agreement: dict[tuple[str, bool], int] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)
    seq: int = 0
    errors: list[str] = field(default_factory=list)


async def _discard(records: object) -> None:  # InferenceStats' sink: we take() ourselves
    return None


class Fleet:
    """The simulated stores, their request streams and their telemetry."""

    def __init__(
        self,
        mqtt_port: int,
        session: aiohttp.ClientSession,
        models: Models,
        x: np.ndarray,
        rate: float,
    ) -> None:
        self.mqtt_port, self.session, self.models = mqtt_port, session, models
        self.x, self.rate = x, rate
        self.stores: list[Store] = []
        self.agents: list[RealAgent] = []
        self.work: set[asyncio.Task[None]] = set()
        self.download_sem = asyncio.Semaphore(16)
        self.cloud: tuple[str, str] | None = None
        self.requests = 0
        self.window_start = time.time()

    # MQTT side

    async def connect(self, s: Store) -> None:
        client = SimClient(
            "127.0.0.1",
            self.mqtt_port,
            s.device_id,
            username=s.device_id,
            password=s.secret,
            will=(topic(s.device_id, "status"), status_payload(s.device_id, "offline")),
            on_message=lambda t, p: self.on_message(s, t, p),
        )
        s.client = client
        s.stats = InferenceStats(_discard, 1.0)
        await client.connect()
        await client.subscribe([topic(s.device_id, "desired")])
        await client.publish(
            topic(s.device_id, "status"), status_payload(s.device_id, "online"), retain=True
        )
        await self.report(s)

    async def report(self, s: Store) -> None:
        assert s.client is not None
        model: dict[str, Any] = {"active": s.active, "desired": s.desired, "state": s.state}
        if s.rollout:
            model["rollout"] = s.rollout
        if s.shadow is not None:
            model["shadow"] = {"version": s.shadow[0], "state": "ready"}
        doc = protocol.Reported(
            device_id=s.device_id,
            revision=s.revision,
            agent_version="bench-sim",
            at=time.time(),
            models={MODEL: protocol.ReportedModel.model_validate(model)},
        )
        await s.client.publish(topic(s.device_id, "reported"), doc.to_json(), retain=True)

    def on_message(self, s: Store, t: str, payload: bytes) -> None:
        if t.rsplit("/", 1)[1] == "desired":
            task = asyncio.create_task(self.apply(s, payload))
            self.work.add(task)
            task.add_done_callback(self.work.discard)

    async def fetch(self, s: Store, url: str, size: int, sha256: str) -> tuple[str, str]:
        """Download a bundle with the store's credentials, check it, open it."""
        auth = base64.b64encode(f"{s.device_id}:{s.secret}".encode()).decode()
        async with (
            self.download_sem,
            self.session.get(url, headers={"Authorization": f"Basic {auth}"}) as resp,
        ):
            body = await resp.read()
        if resp.status != 200 or len(body) != size or hashlib.sha256(body).hexdigest() != sha256:
            raise RuntimeError(f"download {url}: HTTP {resp.status}, {len(body)} bytes")
        return await asyncio.to_thread(self.models.load, body)

    async def apply(self, s: Store, payload: bytes) -> None:
        try:
            desired = protocol.Desired.from_obj(orjson.loads(payload), s.device_id)
        except Exception as exc:
            s.errors.append(f"desired refused: {exc}")
            return
        if desired.revision <= s.revision:
            return
        want = desired.models.get(MODEL)
        try:
            if want is not None:
                if want.version != s.active:
                    await self.fetch(s, want.url, want.size, want.sha256)
                    s.active = want.version
                s.desired, s.rollout, s.state = want.version, want.rollout, "active"
                if want.shadow is not None:
                    sh = want.shadow
                    await self.fetch(s, sh.url, sh.size, sh.sha256)
                    if s.shadow is None or s.shadow[0] != sh.version:
                        s.shadow_window = ShadowWindow()
                    s.shadow = (sh.version, sh.sample_rate)
                else:
                    s.shadow = None
            s.revision = desired.revision
            await self.report(s)
        except Exception as exc:  # recorded and reported in the results
            s.errors.append(str(exc))

    # request streams

    def serve_tick(self, dt: float) -> None:
        """Each store answers its requests of the last ``dt`` seconds with its model."""
        assert self.cloud is not None
        escalated: list[tuple[Store, str, np.ndarray, np.ndarray]] = []
        for s in self.stores:
            n = int(s.rng.poisson(self.rate * dt))
            if n == 0 or s.stats is None:
                continue
            idx = s.rng.integers(0, len(self.x), n)
            rows = self.x[idx]
            key = (MODEL, s.active)
            labels, conf, secs, outputs = self.models.infer(key, rows)
            self.requests += n
            s.served[s.active] = s.served.get(s.active, 0) + n
            per = secs / n
            unsure = conf < self.models.thresholds[key]
            for i in range(n):
                if not unsure[i]:
                    s.stats.record(MODEL, s.active, per, "edge", None, float(conf[i]))
            if unsure.any():
                escalated.append((s, s.active, rows[unsure], labels[unsure]))
            if s.shadow is not None:
                cand, sample_rate = s.shadow
                pick = s.rng.random(n) < sample_rate
                if pick.any():
                    ckey = (MODEL, cand)
                    _, _, c_secs, c_out = self.models.infer(ckey, rows[pick])
                    # The agent's own comparison (agent/shadow.py): top-1 agreement
                    # and confidences by the model's confidence rule.
                    comp = compare(
                        self.models.manifests[key],
                        {k: v[pick] for k, v in outputs.items()},
                        self.models.manifests[ckey],
                        c_out,
                    )
                    w = s.shadow_window
                    k = int(pick.sum())
                    w.sampled += k
                    w.compared += k
                    w.agreed += sum(comp.agree)
                    delta = np.asarray(comp.candidate_conf) - np.asarray(comp.active_conf)
                    w.conf_delta_sum += float(delta.sum())
                    w.conf_delta_sumsq += float((delta * delta).sum())
                    w.candidate_ms += c_secs * 1000.0
                    w.active_ms += per * k * 1000.0
        if not escalated:
            return
        # The cloud answers every store's unsure items (one batch: it is one service).
        rows = np.concatenate([e[2] for e in escalated])
        c_labels, c_conf, c_secs, _ = self.models.infer(self.cloud, rows)
        pos = 0
        for s, version, r, edge_labels in escalated:
            k = len(r)
            cl, cc = c_labels[pos : pos + k], c_conf[pos : pos + k]
            pos += k
            assert s.stats is not None
            for i in range(k):
                s.stats.record(MODEL, version, c_secs / len(rows), "cloud", None, float(cc[i]))
            agree = int((cl == edge_labels).sum())
            for flag, m in ((True, agree), (False, k - agree)):
                if m:
                    s.agreement[(version, flag)] = s.agreement.get((version, flag), 0) + m

    def _record(self, s: Store, kind: str, data: bytes) -> tuple[str, int, str, int, float, bytes]:
        s.seq += 1
        return (secrets.token_hex(16), s.seq, kind, 0, time.time(), data)

    async def send_telemetry(self) -> None:
        """One window: every store's records, as the agent's sender would send them."""
        start, now = self.window_start, time.time()
        self.window_start = now
        pubs = []
        for s in self.stores:
            if s.client is None or s.stats is None:
                continue
            records = [self._record(s, "inference_stats", orjson.dumps(d)) for d in s.stats.take()]
            w, s.shadow_window = s.shadow_window, ShadowWindow()
            if s.shadow is not None and w.sampled:
                doc = protocol.ShadowStats(
                    model=MODEL,
                    version=s.active,
                    candidate=s.shadow[0],
                    task="classification",
                    window_start=round(start, 3),
                    window_s=round(now - start, 3),
                    sampled=w.sampled,
                    compared=w.compared,
                    agreed=w.agreed,
                    errors=0,
                    dropped_queue=0,
                    dropped_budget=0,
                    conf_delta_sum=w.conf_delta_sum,
                    conf_delta_sumsq=min(w.conf_delta_sumsq, float(w.compared)),
                    candidate_latency_ms_sum=w.candidate_ms,
                    active_latency_ms_sum=w.active_ms,
                )
                records.append(self._record(s, "shadow_stats", doc.to_json()))
            if s.agreement:
                agreement = [
                    protocol.FallbackAgreement(
                        model=MODEL,
                        version=v,
                        kind="escalated",
                        agree="true" if flag else "false",
                        n=n,
                    )
                    for (v, flag), n in s.agreement.items()
                ]
                s.agreement = {}
                fb = protocol.FallbackStats(agreement=agreement)
                records.append(self._record(s, "fallback_stats", fb.to_json()))
            if not records:
                continue
            payload = protocol.encode_telemetry(
                s.device_id, secrets.token_hex(16), now, protocol.OutboxCounts(), records
            )
            pubs.append(s.client.publish(topic(s.device_id, "telemetry"), payload))
        # QoS 1: wait for the broker's PUBACKs (bounded), not the fleet's acks.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*pubs, return_exceptions=True), 10)

    async def run_traffic(self, stop: asyncio.Event, tick_s: float, window_s: float) -> None:
        last, next_send = time.monotonic(), time.monotonic() + window_s
        while not stop.is_set():
            await asyncio.sleep(tick_s)
            t = time.monotonic()
            self.serve_tick(t - last)
            last = t
            if t >= next_send:
                next_send = t + window_s
                await self.send_telemetry()

    async def close(self) -> None:
        for t in list(self.work):
            t.cancel()
        await asyncio.gather(*self.work, return_exceptions=True)
        await asyncio.gather(
            *(s.client.close() for s in self.stores if s.client is not None),
            return_exceptions=True,
        )


# ---- real agents ---------------------------------------------------------------------


@dataclass
class RealAgent:
    """A real agent (agent/server/app.py, in this process) enrolled like a store, with a
    local app sending it held-out digit images; ``seen``: who answered, this repetition."""

    device_id: str
    base: str = ""
    seen: dict[str, int] = field(default_factory=dict)
    failed: int = 0


async def start_agent(cfg: Any, runners: list[Any]) -> str:
    from aiohttp import web

    from edgefleet.agent.server.app import create_app

    runner = web.AppRunner(create_app(cfg), access_log=None)
    await runner.setup()
    runners.append(runner)
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


async def start_real_agents(
    n: int,
    session: aiohttp.ClientSession,
    base: str,
    token: str,
    mqtt_port: int,
    workdir: Path,
    runners: list[Any],
) -> list[RealAgent]:
    """A cloud endpoint (digits-cloud) and ``n`` enrolled store agents on Mosquitto."""
    from edgefleet.agent.config import AgentConfig

    if n <= 0:
        return []
    trust = {"public_keys": [str(k) for k in sorted((MODELS_BUILD / "keys").glob("*.pub"))]}
    token_file = MODELS_BUILD / "keys" / "cloud.token"
    cloud_base = await start_agent(
        AgentConfig.model_validate(
            {
                "profile": "cloud",
                "server": {"host": "127.0.0.1", "port": 0, "auth_token_file": str(token_file)},
                "store": {"path": str(workdir / "cloud" / "store")},
                "trust": trust,
                "models": [{"bundle": str(MODELS_BUILD / f"{CLOUD}-1.bundle")}],
            }
        ),
        runners,
    )
    agents = []
    for i in range(n):
        tok = await api(
            session,
            "POST",
            f"{base}/v1/enrolment-tokens",
            token,
            json={"device_id": f"agent-{i:02d}", "groups": ["bench"]},
        )
        async with session.post(f"{base}/v1/enrol", json={"token": tok["token"]}) as r:
            d = await r.json()
        home = workdir / d["device_id"]
        cfg = AgentConfig.model_validate(
            {
                "device_id": d["device_id"],
                "server": {"host": "127.0.0.1"},
                "store": {"path": str(home / "store")},
                "trust": trust,
                "models": [{"bundle": str(MODELS_BUILD / f"{MODEL}-1.bundle")}],
                "fallback": {
                    "cloud": {"url": cloud_base, "token_file": str(token_file)},
                    "telemetry_interval_s": 1,
                    "hard_examples": {"path": str(home / "hard.sqlite")},
                },
                "fleet": {
                    "host": "127.0.0.1",
                    "port": mqtt_port,
                    "username": d["mqtt"]["username"],
                    "password": d["mqtt"]["password"],
                    "reconnect_min_s": 0.2,
                    "reconnect_max_s": 2,
                    "outbox": {"path": str(home / "outbox.sqlite")},
                    "telemetry": {"flush_interval_s": 0.5, "stats_interval_s": 1},
                    "sync": {"fleet_url": d["fleet_url"]},
                },
            }
        )
        agents.append(RealAgent(d["device_id"], await start_agent(cfg, runners)))
    return agents


async def agent_app(
    session: aiohttp.ClientSession,
    agent: RealAgent,
    images: list[bytes],
    seed: int,
    rate: float,
    stop: asyncio.Event,
) -> None:
    """The agent's local app: held-out digit PNGs at about ``rate`` requests/s."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        body = images[int(rng.integers(len(images)))]
        try:
            async with session.post(
                f"{agent.base}/v1/predict/{MODEL}",
                data=body,
                headers={"Content-Type": "image/png"},
            ) as resp:
                doc = await resp.json(content_type=None)
                if resp.status == 200:
                    v = str(doc["version"])
                    agent.seen[v] = agent.seen.get(v, 0) + 1
                else:
                    agent.failed += 1
        except aiohttp.ClientError:
            agent.failed += 1
        await asyncio.sleep(1.0 / rate)


# ---- one repetition --------------------------------------------------------------------


@dataclass
class Outcome:
    version: str
    shadow_stage: bool
    seed: int
    state: str  # completed, rolled_back, stopped, or "timeout (<state>)"
    stopped: bool
    stage_at_stop: str | None
    served_share: float
    serving_requests: int
    detect_s: float | None
    shadow_detect_s: float | None
    compared_items: int | None
    reason: str | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


async def reset_to_v1(fleet: Fleet, base: str, token: str, within_s: float = 60.0) -> None:
    await api(
        fleet.session,
        "POST",
        f"{base}/v1/assignments",
        token,
        json={"model": MODEL, "version": "1", "target": {"all": True}},
    )
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(s.active == "1" and s.shadow is None for s in fleet.stores):
            on_v1 = 0
            for a in fleet.agents:
                d = await api(fleet.session, "GET", f"{base}/v1/devices/{a.device_id}", token)
                m = (d.get("models") or {}).get(MODEL) or {}
                on_v1 += m.get("active") == "1" and m.get("desired") == "1"
            if on_v1 == len(fleet.agents):
                return
        await asyncio.sleep(0.2)
    raise RuntimeError("the stores did not all return to version 1")


async def repetition(
    fleet: Fleet, base: str, token: str, version: str, shadow: bool, seed: int, timeout_s: float
) -> Outcome:
    """Every store on version 1, then roll ``version`` out with the plan; watch it."""
    await reset_to_v1(fleet, base, token)
    for i, s in enumerate(fleet.stores):
        s.rng = np.random.default_rng([seed, i])
        s.served = {}
    for a in fleet.agents:
        a.seen = {}
    t0 = time.monotonic()
    doc = await api(
        fleet.session,
        "POST",
        f"{base}/v1/assignments",
        token,
        json={"model": MODEL, "version": version, "target": {"all": True}, "plan": plan(shadow)},
    )
    rid = doc["id"]
    first_serving: float | None = None
    ever: set[str] = set()
    state = doc.get("state", "running")
    while time.monotonic() - t0 < timeout_s:
        now = time.monotonic()
        serving = {s.device_id for s in fleet.stores if s.active == version}
        if serving and first_serving is None:
            first_serving = now
        ever |= {s.device_id for s in fleet.stores if s.served.get(version)}
        ever |= {a.device_id for a in fleet.agents if a.seen.get(version)}
        doc = await api(fleet.session, "GET", f"{base}/v1/rollouts/{rid}", token)
        state = doc["state"]
        if state in ("completed", "rolled_back", "stopped"):
            break
        await asyncio.sleep(0.25)
    ended = time.monotonic()
    if state not in ("completed", "rolled_back", "stopped"):
        print(
            f"  undecided: stage {doc.get('stage')}, wave {doc.get('current_wave')},"
            f" counts {doc.get('counts')}, evidence {doc.get('evidence')}",
            file=sys.stderr,
        )
        if KEEP_DB is not None:
            kept = Path(tempfile.gettempdir()) / f"rollout_guard-undecided-{rid}.sqlite"
            shutil.copyfile(KEEP_DB, kept)
            print(f"  the fleet's database kept in {kept}", file=sys.stderr)
        # Undecided within the time limit: end it, so the next repetition can start.
        await api(fleet.session, "POST", f"{base}/v1/rollouts/{rid}/rollback", token)
    ever |= {s.device_id for s in fleet.stores if s.served.get(version)}
    ever |= {a.device_id for a in fleet.agents if a.seen.get(version)}
    stopped = state in ("rolled_back", "stopped")
    decisions = doc.get("decisions") or []
    fail = next((d for d in decisions if d.get("outcome") == "fail"), None)
    compared = None
    for d in decisions:
        if d.get("stage") == "shadow":
            for g in d.get("gates") or []:
                n = (g.get("canary") or {}).get("n") if isinstance(g, Mapping) else None
                if isinstance(n, int):
                    compared = n
    shadow_detect = None
    if stopped and fail is not None and fail.get("stage") == "shadow":
        created = doc.get("created_at")
        if isinstance(created, int | float) and isinstance(fail.get("at"), int | float):
            shadow_detect = round(fail["at"] - created, 2)
    detect = None
    if stopped and first_serving is not None:
        detect = round(ended - first_serving, 2)
    return Outcome(
        version=version,
        shadow_stage=shadow,
        seed=seed,
        state=state if state in ("completed", "rolled_back", "stopped") else f"timeout ({state})",
        stopped=stopped,
        stage_at_stop=None if fail is None else str(fail.get("stage")),
        served_share=round(len(ever) / (len(fleet.stores) + len(fleet.agents)), 4),
        serving_requests=sum(s.served.get(version, 0) for s in fleet.stores)
        + sum(a.seen.get(version, 0) for a in fleet.agents),
        detect_s=detect,
        shadow_detect_s=shadow_detect,
        compared_items=compared,
        reason=doc.get("reason"),
        seconds=round(ended - t0, 1),
    )


# ---- the run ---------------------------------------------------------------------------


def bundles(points: list[int]) -> dict[str, Path]:
    """version -> bundle path: 1, 2 and the worse ones (built now when missing)."""
    from models.digits_bad import ensure_worse, worse_version
    from models.recipe import BuildContext

    v1 = MODELS_BUILD / f"{MODEL}-1.bundle"
    v2 = MODELS_BUILD / "fleet" / f"{MODEL}-{GOOD}.bundle"
    cloud = MODELS_BUILD / f"{CLOUD}-1.bundle"
    if not (v1.exists() and v2.exists() and cloud.exists()):
        raise SystemExit("models/build lacks the digits bundles: run `python -m models` first")
    ctx = BuildContext.create(MODELS_BUILD)
    out = {"1": v1, GOOD: v2, "cloud": cloud}
    for p in points:
        out[worse_version(p)] = ensure_worse(ctx, p)
    return out


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from models.digits_bad import WORSE, worse_version

    points = sorted(WORSE, reverse=True)
    paths = await asyncio.to_thread(bundles, points)
    with np.load(MODELS_BUILD / "digits-test.npz", allow_pickle=False) as data:
        x = np.asarray(data["x"], dtype=np.float32)
    global KEEP_DB
    KEEP_DB = workdir / "fleet" / "fleet.sqlite"
    token = secrets.token_urlsafe(24)
    models = Models(workdir / "models")
    models.workdir.mkdir(parents=True)
    res: dict[str, Any] = {
        "devices": args.devices + args.agents,
        "simulated_devices": args.devices,
        "real_agents": args.agents,
        "requests_per_device_s": args.rate,
        "plan": plan(True),
    }
    with mosquitto(workdir) as broker:
        http_port = free_port()
        with fleet_process(workdir, broker.port, http_port, token) as pid:
            base = f"http://127.0.0.1:{http_port}"
            conn = aiohttp.TCPConnector(limit=64)
            async with aiohttp.ClientSession(connector=conn) as session:
                for _ in range(300):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{base}/v1/health") as r:
                            if r.status == 200:
                                break
                    await asyncio.sleep(0.1)
                for p in paths.values():
                    await api(session, "POST", f"{base}/v1/models", token, data=p.read_bytes())
                fleet = Fleet(broker.port, session, models, x, args.rate)
                fleet.cloud = models.load(paths["cloud"].read_bytes())
                # What every store runs before the bench (its bootstrap bundle).
                models.load(paths["1"].read_bytes())
                await reset_assign(session, base, token)
                print(f"enrolling {args.devices} simulated stores …", file=sys.stderr)
                sem = asyncio.Semaphore(16)

                async def enrol(i: int) -> Store:
                    async with sem:
                        tok = await api(
                            session,
                            "POST",
                            f"{base}/v1/enrolment-tokens",
                            token,
                            json={"device_id": f"store-{i:04d}", "groups": ["bench"]},
                        )
                        async with session.post(
                            f"{base}/v1/enrol", json={"token": tok["token"]}
                        ) as r:
                            d = await r.json()
                    return Store(d["device_id"], d["mqtt"]["password"], np.random.default_rng(i))

                fleet.stores = list(await asyncio.gather(*(enrol(i) for i in range(args.devices))))
                csem = asyncio.Semaphore(50)

                async def connect(s: Store) -> None:
                    async with csem:
                        await fleet.connect(s)

                await asyncio.gather(*(connect(s) for s in fleet.stores))
                stop = asyncio.Event()
                runners: list[Any] = []
                fleet.agents = await start_real_agents(
                    args.agents, session, base, token, broker.port, workdir, runners
                )
                from edgefleet.demo.fleet_story import render_digits

                images = await asyncio.to_thread(render_digits, MODELS_BUILD / "digits-test.npz")
                apps = [
                    asyncio.create_task(agent_app(session, a, images, 500 + i, args.rate, stop))
                    for i, a in enumerate(fleet.agents)
                ]
                traffic = asyncio.create_task(fleet.run_traffic(stop, args.tick, args.window))
                usage = Usage(pid)
                usage.start()
                sim_cpu0, sim_t0 = time.process_time(), time.monotonic()
                outcomes: list[Outcome] = []
                try:
                    await reset_to_v1(fleet, base, token)
                    schedule: list[tuple[str, bool]] = [(GOOD, True)] * args.good
                    schedule += [(worse_version(20), True)] * args.bad
                    schedule += [(worse_version(20), False)] * args.bad
                    for p in points:
                        if p != 20:
                            schedule += [(worse_version(p), True)] * args.curve
                    for i, (version, shadow) in enumerate(schedule):
                        o = await repetition(
                            fleet, base, token, version, shadow, args.seed + i, args.timeout
                        )
                        outcomes.append(o)
                        errors = [e for st in fleet.stores for e in st.errors]
                        if errors:
                            print(f"  store errors so far: {len(errors)}, e.g. {errors[-1]}")
                        print(
                            f"[{i + 1}/{len(schedule)}] {version}"
                            f" ({'shadow + waves' if shadow else 'waves only'}): {o.state}"
                            f" after {o.seconds} s, served by {o.served_share:.1%} of the"
                            f" stores ({o.serving_requests} requests)"
                            + (f"; {o.reason}" if o.reason else ""),
                            file=sys.stderr,
                        )
                finally:
                    stop.set()
                    await traffic
                    await asyncio.gather(*apps, return_exceptions=True)
                    res["real_agent_failed_requests"] = sum(a.failed for a in fleet.agents)
                    for runner in reversed(runners):
                        await runner.cleanup()
                    res["fleet_process"] = usage.stop()
                    res["simulator_cores"] = round(
                        (time.process_time() - sim_cpu0) / (time.monotonic() - sim_t0), 2
                    )
                    res["requests_answered"] = fleet.requests
                    res["store_errors"] = sum(len(s.errors) for s in fleet.stores)
                    await fleet.close()
    models.close()
    res |= summarize(outcomes, points)
    res["repetitions"] = [o.to_json() for o in outcomes]
    return res


async def reset_assign(session: aiohttp.ClientSession, base: str, token: str) -> None:
    """Version 1 for every store, before any enrols (their first desired document)."""
    await api(
        session,
        "POST",
        f"{base}/v1/assignments",
        token,
        json={"model": MODEL, "version": "1", "target": {"all": True}},
    )


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def summarize(outcomes: list[Outcome], points: list[int]) -> dict[str, Any]:
    from models.digits_bad import worse_version

    good = [o for o in outcomes if o.version == GOOD]
    bad = worse_version(20)
    bad_shadow = [o for o in outcomes if o.version == bad and o.shadow_stage]
    bad_waves = [o for o in outcomes if o.version == bad and not o.shadow_stage]
    curve: dict[str, Any] = {}
    for p in points:
        runs = [o for o in outcomes if o.version == worse_version(p) and o.shadow_stage]
        curve[str(p)] = {
            "runs": len(runs),
            "stop_rate": round(sum(o.stopped for o in runs) / len(runs), 3) if runs else None,
            "stopped_in_shadow": sum(o.stage_at_stop == "shadow" for o in runs),
            "median_shadow_detect_s": _median(
                [o.shadow_detect_s for o in runs if o.shadow_detect_s is not None]
            ),
            "median_compared_items": _median(
                [float(o.compared_items) for o in runs if o.compared_items is not None]
            ),
        }
    served = [o.served_share for o in bad_shadow + bad_waves]
    return {
        "good_version_repetitions": len(good),
        "good_version_false_stops": sum(o.stopped for o in good),
        "good_version_completed": sum(o.state == "completed" for o in good),
        "good_version_median_s": _median([o.seconds for o in good if o.state == "completed"]),
        "bad_version_repetitions": len(bad_shadow) + len(bad_waves),
        "bad_version_max_share_served": max(served) if served else None,
        "shadow_caught_before_serving": bool(bad_shadow)
        and all(o.stage_at_stop == "shadow" and o.served_share == 0 for o in bad_shadow),
        "bad_version_shadow_detect_s": _median(
            [o.shadow_detect_s for o in bad_shadow if o.shadow_detect_s is not None]
        ),
        "bad_version_max_share_served_with_shadow": (
            max(o.served_share for o in bad_shadow) if bad_shadow else None
        ),
        "bad_version_max_share_served_without_shadow": (
            max(o.served_share for o in bad_waves) if bad_waves else None
        ),
        "bad_version_detect_s": _median([o.detect_s for o in bad_waves if o.detect_s is not None]),
        "bad_version_detect_requests": _median(
            [float(o.serving_requests) for o in bad_waves if o.stopped]
        ),
        "bad_version_stopped_without_shadow": sum(o.stopped for o in bad_waves),
        "detection_curve": curve,
        **shadow_figures(),
        **accuracies(),
    }


def accuracies() -> dict[str, Any]:
    """Held-out accuracy (int8) of each version, from its bundle's manifest."""
    from edgefleet.converters.bundletools import read_manifest_unverified
    from models.digits_bad import WORSE, worse_bundle, worse_version

    paths = {"1": MODELS_BUILD / f"{MODEL}-1.bundle"}
    paths[GOOD] = MODELS_BUILD / "fleet" / f"{MODEL}-{GOOD}.bundle"
    paths |= {worse_version(p): worse_bundle(MODELS_BUILD, p) for p in WORSE}
    out: dict[str, Any] = {}
    for v, path in paths.items():
        if path.exists():
            out[v] = read_manifest_unverified(path)[0].metrics.get("accuracy_int8")
    return {"held_out_accuracy": out}


def shadow_figures() -> dict[str, Any]:
    """The shadow's cost on the active answers, as ``python -m bench shadow`` measured it
    (bench/results/shadow.json, a real agent at steady load); nulls when not run."""
    path = ROOT / "bench" / "results" / "shadow.json"
    doc = orjson.loads(path.read_bytes()) if path.exists() else {}
    return {
        "shadow_p99_overhead": doc.get("shadow_p99_overhead"),
        "shadow_extra_cpu_ms_per_compared_item": doc.get("extra_cpu_ms_per_compared_item"),
    }


def render(res: dict[str, Any]) -> str:
    curve = res["detection_curve"]
    acc = res.get("held_out_accuracy") or {}
    rows = [
        f"| {p} points worse (`worse-{p}`, {acc.get(f'worse-{p}')}) | {c['stop_rate']}"
        f" ({c['runs']} runs, {c['stopped_in_shadow']} in shadow) |"
        f" {c['median_shadow_detect_s']} s | {c['median_compared_items']} |"
        for p, c in curve.items()
    ]
    lines = [
        "## Rollout guard (`python -m bench rollout_guard`)",
        "",
        machine_markdown(res["machine"]),
        f"{res['simulated_devices']} simulated stores (bench/mqtt_sim.py sessions on one"
        f" Mosquitto, {res['requests_per_device_s']} requests/s each: real held-out digits"
        " answered by ONNX Runtime sessions of the real bundles, counted by the agent's"
        " InferenceStats, shadow comparisons and cloud escalations to the real digits-cloud)"
        f" and {res['real_agents']} real agents (the agent's app in the bench process, on the"
        " same broker, with a real cloud endpoint and a local app sending held-out digit"
        " images); one `edge-fleet serve` process decides."
        " Plan: shadow on 5 % of the stores (`shadow_agreement >= 0.98`, 300 items), then"
        " waves 4 %, 25 %, 100 % gated on `error_rate <= 0.01`, `fallback_rate <= baseline"
        " + 0.05`, `cloud_agreement >= baseline - 0.1`, 200 requests and 50 cloud-checked"
        " items per wave; on fail: rollback. No `p95_ms` gate: with real agents (~5 ms an"
        " answer, HTTP and image decoding included) among simulated stores (~0.05 ms, the"
        " model alone) a cohort's p95 says which kind of store it holds, not which version;"
        " a quick run with `p95_ms <= 2 * baseline` stopped the good version once in two"
        " (a canary wave holding a real agent). A fleet of mixed hardware has the same"
        " problem: a latency gate should compare each canary store with itself before.",
        "",
        "| figure | measured | goal |",
        "|---|---|---|",
        f"| good version (digits-edge 2) false stops | {res['good_version_false_stops']} of"
        f" {res['good_version_repetitions']} seeded repetitions ({res['good_version_completed']}"
        f" completed and promoted, median {res['good_version_median_s']} s) | 0 |",
        f"| bad version (~20 points worse): largest share of stores that served it |"
        f" {res['bad_version_max_share_served']} (with the shadow stage:"
        f" {res['bad_version_max_share_served_with_shadow']}; serving gates alone:"
        f" {res['bad_version_max_share_served_without_shadow']}) | ≤ 0.05 |",
        f"| shadow stage alone stopped it (0 stores served it) |"
        f" {res['shadow_caught_before_serving']} (median {res['bad_version_shadow_detect_s']} s"
        " from the assignment) | yes |",
        f"| without the shadow stage: first serving → rollback | {res['bad_version_detect_s']} s,"
        f" {res['bad_version_detect_requests']} requests answered by it |  |",
        f"| shadow p99 overhead (active answer, shadow on/off) | {res['shadow_p99_overhead']}"
        f" ({res.get('shadow_extra_cpu_ms_per_compared_item')} ms extra CPU per compared item;"
        " from `python -m bench shadow`) | ≤ 1.10 |",
        "",
        "Detection curve (the plan above, shadow stage included; held-out accuracy in"
        f" brackets, version 1: {acc.get('1')}, version 2: {acc.get(GOOD)}):",
        "",
        "| version | stop rate | median time to stop | median compared items |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Fleet process: {res['fleet_process'].get('cpu_cores')} cores; simulator"
        f" {res['simulator_cores']} cores; {res['requests_answered']:,} requests answered;"
        f" store errors: {res['store_errors']}; failed requests of the real agents' apps:"
        f" {res.get('real_agent_failed_requests')}. The fleet re-decides a rollout on every"
        " `reported`, on telemetry batches (at most once a second per rollout) and on its"
        " 5 s tick. Times to stop are from the assignment (shadow) or from the first store"
        " serving the version (waves only) to the bench seeing the rollout rolled back.",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench rollout_guard", description=__doc__)
    parser.add_argument("--devices", type=int, default=200, help="simulated stores")
    parser.add_argument("--agents", type=int, default=2, help="real agents beside them")
    parser.add_argument("--good", type=int, default=20, help="repetitions of the good version")
    parser.add_argument("--bad", type=int, default=3, help="repetitions of the bad one, per plan")
    parser.add_argument("--curve", type=int, default=3, help="repetitions per curve point")
    parser.add_argument("--rate", type=float, default=12.0, help="requests/s per store")
    parser.add_argument("--tick", type=float, default=0.25, help="traffic tick (s)")
    parser.add_argument("--window", type=float, default=1.0, help="telemetry window (s)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per repetition (s)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="60 stores at 20 requests/s, 2 good, 1 bad per plan, 1 per curve point;"
        " no result files",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite the doc section from bench/results/rollout_guard.json (with the"
        " current bench/results/shadow.json figures); run nothing",
    )
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.render_only:
        path = ROOT / "bench" / "results" / "rollout_guard.json"
        res = orjson.loads(path.read_bytes()) | shadow_figures() | accuracies()
        write_result("rollout_guard", res)
        write_doc_section("rollout_guard", render(res))
        return 0
    if args.quick:
        args.devices, args.good, args.bad, args.curve, args.rate = 60, 2, 1, 1, 20.0
        args.no_doc = True
    busy_before = wait_until_quiet(args.wait_quiet)
    meter = CpuMeter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-rollout-guard-"))
    try:
        res = asyncio.run(run(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    load = meter.stop()
    res["box_load"] = {"busy_share_before": round(busy_before, 3), **load}
    warn_if_busy(load["others_share_of_box"])
    res["machine"] = machine_info()
    if not args.quick:
        write_result("rollout_guard", res)
    if not args.no_doc:
        write_doc_section("rollout_guard", render(res))
    summary = {k: v for k, v in res.items() if k != "repetitions"}
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    return 0

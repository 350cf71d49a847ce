"""``edge-demo``: a bad model version is stopped by the fleet on what it does; a
good one goes through shadow and gated waves and is promoted.

Everything runs in this process on loopback, with nothing installed beyond the
project: the fleet service with its embedded MQTT broker (amqtt), a cloud endpoint
(a cloud-profile agent serving ``digits-cloud``) and ``STORES`` store agents, each
enrolled with a one-time token, with its own model store and outbox, and serving
``digits-edge`` version 1. Beside each store a local "app" keeps sending it real
held-out digit images (the split models/digits.py saved, rendered as dark ink on
white paper) the whole time; unsure answers go to the cloud, as configured.

1. The fleet manager rolls out ``worse-20`` (models/digits_bad.py: ~20 points less
   accurate, yet signed, self-tested and let through by the converter's gate) with a
   plan of gated waves: one canary store first. Its answers disagree with the
   cloud's far more often than the baseline stores', the gate fails, and the fleet
   **rolls the canary back by itself**, with the evidence.
2. It rolls out version 2 (models/fleet_update.py) with a plan that starts with a
   **shadow** stage: one store runs it beside version 1 on every request, answering
   nothing, and reports how often the two agree; then the same gated waves. Every
   gate passes, every store ends on version 2, and the ``stable`` label moves to it.

The demo prints each step as the fleet sees it and, at the end, how many requests
the apps sent, which version answered them and how many failed (the point: none).
Exit code 0 when the bad version was rolled back, the good one promoted, and no
request failed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.server.app import create_app
from edgefleet.fleet.config import FleetServiceConfig
from edgefleet.fleet.service import FleetService

log = logging.getLogger(__name__)

MODEL = "digits-edge"
CLOUD_MODEL = "digits-cloud"
NEW_VERSION = "2"
BAD_VERSION = "worse-20"
STORES = 4
APP_WORKERS = 3  # concurrent requests of one store's app
APP_PAUSE_S = 0.01  # between one worker's requests
# The serving waves and their gates, shared by both rollouts.
WAVES: list[int | str] = [1, "100%"]
GATES = [
    "error_rate <= 0.01",
    "fallback_rate <= baseline + 0.05",
    "cloud_agreement >= baseline - 0.3",
]
BAD_PLAN: dict[str, Any] = {
    "waves": WAVES,
    "gates": GATES,
    "min_requests": 150,
    "min_baseline_requests": 150,
    "on_fail": "rollback",
}
GOOD_PLAN: dict[str, Any] = {
    **BAD_PLAN,
    "shadow": {
        "devices": 1,
        "sample_rate": 1.0,
        "min_items": 150,
        "gates": ["shadow_agreement >= 0.95"],
    },
    "promote": "stable",
}
ENDED = ("completed", "rolled_back", "stopped")


def version_two(build: Path) -> Path | None:
    """``<build>/fleet/digits-edge-2.bundle``, made by ``python -m models`` (recipe
    models/fleet_update.py); None when that build has not run."""
    path = build / "fleet" / f"{MODEL}-{NEW_VERSION}.bundle"
    return path if path.exists() else None


def bad_version(build: Path) -> Path | None:
    """``<build>/fleet/worse/digits-edge-worse-20.bundle`` (recipe models/digits_bad.py)."""
    path = build / "fleet" / "worse" / f"{MODEL}-{BAD_VERSION}.bundle"
    return path if path.exists() else None


def render_digits(test_set: Path, size: int = 32) -> list[bytes]:
    """The held-out digits (``x``: N x 64, values 0..16) as PNGs of dark ink on white
    paper, upscaled nearest-neighbour (what models/digits.py's render_digit_png does;
    the image preprocessing area-shrinks them back to the dataset's values)."""
    import cv2

    with np.load(test_set, allow_pickle=False) as data:
        x = np.asarray(data["x"], dtype=np.float32)
    out = []
    for row in x:
        ink = np.clip(np.rint(row.reshape(8, 8) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        img = cv2.resize(255 - ink, (size, size), interpolation=cv2.INTER_NEAREST)
        ok, buf = cv2.imencode(".png", img)
        if not ok:
            raise RuntimeError("PNG encoding failed")
        out.append(buf.tobytes())
    return out


class Api:
    """The fleet's HTTP API as a fleet manager's tool uses it."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str) -> None:
        self.session, self.base = session, base
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        async with self.session.request(
            method, self.base + path, headers=self.headers, **kw
        ) as resp:
            doc = await resp.json(content_type=None)
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {doc}")
            return doc


@dataclass
class Store:
    """One enrolled store: its agent, its local app and what the app saw."""

    device_id: str
    base: str = ""
    runner: web.AppRunner | None = None
    seen: Counter[str] = field(default_factory=Counter)


async def _app_load(
    session: aiohttp.ClientSession,
    store: Store,
    images: Sequence[bytes],
    seed: int,
    stop: asyncio.Event,
) -> None:
    """A local app: one request after another, counting who answered (or that none did)."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        body = images[int(rng.integers(len(images)))]
        try:
            async with session.post(
                f"{store.base}/v1/predict/{MODEL}",
                data=body,
                headers={"Content-Type": "image/png"},
            ) as resp:
                doc = await resp.json(content_type=None)
                if resp.status == 200:
                    store.seen[f"version {doc['version']}"] += 1
                else:
                    store.seen[f"failed: HTTP {resp.status}"] += 1
        except aiohttp.ClientError as exc:
            store.seen[f"failed: {type(exc).__name__}"] += 1
        await asyncio.sleep(APP_PAUSE_S)


async def _start_agent(cfg: AgentConfig) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(cfg), access_log=None)
    await runner.setup()
    # Port 0: the OS picks a free one, no race with another process.
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def run_demo(build: Path, workdir: Path, *, keep: bool = False) -> int:
    keys = sorted((build / "keys").glob("*.pub"))
    v1 = build / f"{MODEL}-1.bundle"
    cloud_bundle = build / f"{CLOUD_MODEL}-1.bundle"
    v2, bad = version_two(build), bad_version(build)
    test_set = build / "digits-test.npz"
    token_file = build / "keys" / "cloud.token"
    needed = (v1, cloud_bundle, test_set, token_file)
    if not all(p.exists() for p in needed) or v2 is None or bad is None or not keys:
        print(
            f"{build} lacks the {MODEL} bundles (1, 2, {BAD_VERSION}), {CLOUD_MODEL}, the"
            " held-out digits or the keys: run `python -m models`"
        )
        return 2
    images = await asyncio.to_thread(render_digits, test_set)
    uploads = [(p, await asyncio.to_thread(p.read_bytes)) for p in (v1, v2, bad)]
    trust = {"public_keys": [str(k) for k in keys]}

    token = secrets.token_urlsafe(24)
    fleet_cfg = FleetServiceConfig.model_validate(
        {
            "data_dir": str(workdir / "fleet"),
            "http": {"host": "127.0.0.1", "port": 0},
            "auth": {"token": token},
            "trust": trust,
            "embedded_broker": {"host": "127.0.0.1", "port": 0},
        }
    )
    fleet = await FleetService(fleet_cfg).start()
    runners: list[web.AppRunner] = []
    stores: list[Store] = []
    stop = asyncio.Event()
    loads: list[asyncio.Task[None]] = []
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(session, fleet.url, token)
            print(f"fleet service on {fleet.url}, embedded MQTT broker on port {fleet.mqtt_port}")
            print(f"  watch it in the console: {fleet.url}/ui/ (sign in with the token {token})")
            for bundle, data in uploads:
                doc = await api.call("POST", "/v1/models", data=data)
                print(
                    f"  uploaded {bundle.name}: signature and hashes verified"
                    f" (sha256 {doc['sha256'][:12]}…, {doc['size']:,} bytes)"
                )
            print(
                f"  ({BAD_VERSION} is ~20 points less accurate than version 1 on held-out"
                " digits, built so for this demo: it loads, verifies and self-tests fine)"
            )

            cloud_runner, cloud_base = await _start_agent(
                AgentConfig.model_validate(
                    {
                        "profile": "cloud",
                        "server": {
                            "host": "127.0.0.1",
                            "port": 0,
                            "auth_token_file": str(token_file),
                        },
                        "store": {"path": str(workdir / "cloud" / "store")},
                        "trust": trust,
                        "models": [{"bundle": str(cloud_bundle), "labels": ["stable"]}],
                    }
                )
            )
            runners.append(cloud_runner)
            print(f"cloud endpoint serving {CLOUD_MODEL} on {cloud_base}")

            for i in range(1, STORES + 1):
                store = Store(f"store-{i:04d}")
                tok = await api.call(
                    "POST",
                    "/v1/enrolment-tokens",
                    json={"device_id": store.device_id, "groups": ["demo"]},
                )
                async with session.post(f"{fleet.url}/v1/enrol", json={"token": tok["token"]}) as r:
                    enrolled = await r.json()
                home = workdir / store.device_id
                store.runner, store.base = await _start_agent(
                    AgentConfig.model_validate(
                        {
                            "device_id": enrolled["device_id"],
                            "server": {"host": "127.0.0.1"},
                            "store": {"path": str(home / "store")},
                            "trust": trust,
                            "models": [{"bundle": str(v1), "labels": ["stable"]}],
                            "fallback": {
                                "cloud": {
                                    "url": cloud_base,
                                    "token_file": str(token_file),
                                    "timeout_ms": 1000,
                                },
                                # Cloud agreement reaches the fleet every second.
                                "telemetry_interval_s": 1,
                                "hard_examples": {"path": str(home / "hard.sqlite")},
                            },
                            "fleet": {
                                "host": enrolled["mqtt"]["host"],
                                "port": enrolled["mqtt"]["port"],
                                "username": enrolled["mqtt"]["username"],
                                "password": enrolled["mqtt"]["password"],
                                "reconnect_min_s": 0.2,
                                "reconnect_max_s": 2,
                                "outbox": {"path": str(home / "outbox.sqlite")},
                                "telemetry": {"flush_interval_s": 0.5, "stats_interval_s": 1},
                                # What `edge-agent enroll` records: downloads send the
                                # device credentials to this origin only.
                                "sync": {"fleet_url": enrolled["fleet_url"]},
                            },
                        }
                    )
                )
                runners.append(store.runner)
                stores.append(store)
            print(
                f"enrolled {', '.join(s.device_id for s in stores)}: each serves {MODEL}"
                " version 1, asks the cloud when unsure, and has a local app sending it"
                f" held-out digit images ({len(images)} distinct)"
            )
            for store in stores:
                await _wait_online(api, store.device_id)
            print(f"  the fleet sees {len(stores)} stores online")
            # The fleet manages version 1 from now on: a rollback returns a store to it
            # (without a fleet assignment the stores run their local bundle, which a
            # rollback would not restore).
            await api.call(
                "POST",
                "/v1/assignments",
                json={"model": MODEL, "version": "1", "target": {"group": "demo"}},
            )
            for store in stores:
                await _wait_managed(api, store.device_id, "1")
            print(f"fleet manager: assign {MODEL} version 1 to group 'demo' (the baseline)")
            for i, store in enumerate(stores):
                loads.append(asyncio.create_task(_app_load(session, store, images, 1000 + i, stop)))
            await asyncio.sleep(2.0)  # a baseline: version 1's figures reach the fleet

            print(
                f"\n1) fleet manager: roll out {MODEL} {BAD_VERSION} with gated waves"
                f" {WAVES} (gates: {'; '.join(GATES)}; on a failed gate: roll back)"
            )
            bad_doc = await _rollout(api, stores, BAD_VERSION, BAD_PLAN)
            bad_ok = bad_doc.get("state") == "rolled_back"
            print(
                f"\n2) fleet manager: roll out {MODEL} {NEW_VERSION}: shadow on 1 store"
                f" ({GOOD_PLAN['shadow']['gates'][0]}, {GOOD_PLAN['shadow']['min_items']}"
                " compared items), then the same gated waves, promote to 'stable'"
            )
            good_doc = await _rollout(api, stores, NEW_VERSION, GOOD_PLAN)
            model_doc = await api.call("GET", f"/v1/models/{MODEL}")
            stable = (model_doc.get("labels") or {}).get("stable")
            good_ok = good_doc.get("state") == "completed" and stable == NEW_VERSION
            print(f"  fleet label stable -> {MODEL} {stable}")
            await asyncio.sleep(1.0)  # the apps keep going on the new version
            if keep:
                # The stores and their apps keep running so a person can look around the
                # console (rollouts with their gate evidence, devices, charts).
                print(
                    f"\nthe fleet keeps running: {fleet.url}/ui/ (token {token}); Ctrl-C stops it"
                )
                await asyncio.Event().wait()
            stop.set()
            await asyncio.gather(*loads)
            seen: Counter[str] = Counter()
            for store in stores:
                seen.update(store.seen)
            failed = sum(n for k, n in seen.items() if k.startswith("failed"))
            print(
                f"\nthe local apps sent {sum(seen.values())} requests: "
                + ", ".join(
                    f"{n} answered by {k}" if k.startswith("version") else f"{n} {k}"
                    for k, n in sorted(seen.items())
                )
            )
            print(f"failed requests: {failed}")
            for row in (await api.call("GET", "/v1/telemetry/models"))["models"]:
                if row.get("model") != MODEL:
                    continue
                print(
                    f"fleet telemetry: {row.get('model')} v{row.get('version')}:"
                    f" {row.get('requests')} requests, p50 {row.get('p50_ms')} ms"
                )
            return 0 if bad_ok and good_ok and failed == 0 else 1
    finally:
        stop.set()
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        for runner in reversed(runners):
            await runner.cleanup()
        await fleet.stop()


async def _rollout(
    api: Api, stores: Sequence[Store], version: str, plan: dict[str, Any], within_s: float = 90.0
) -> dict[str, Any]:
    """Start a plan rollout to group 'demo' and print it as the fleet sees it, to its end."""
    t0 = time.monotonic()
    doc: dict[str, Any] = await api.call(
        "POST",
        "/v1/assignments",
        json={"model": MODEL, "version": version, "target": {"group": "demo"}, "plan": plan},
    )
    rid = doc["id"]

    def say(text: str) -> None:
        print(f"  +{time.monotonic() - t0:5.2f} s  {text}")

    say(f"rollout {rid} started")
    last_step: tuple[Any, ...] | None = None
    decisions = 0
    versions: dict[str, tuple[Any, Any]] = {}
    while time.monotonic() - t0 < within_s:
        doc = await api.call("GET", f"/v1/rollouts/{rid}")
        step = (doc.get("state"), doc.get("stage"), doc.get("current_wave"))
        if step != last_step and doc.get("state") not in ENDED:
            if doc.get("stage") == "shadow":
                shadow = ", ".join(doc.get("shadow_devices") or [])
                say(f"shadow stage: {shadow} runs {version} beside version 1, answering nothing")
            elif doc.get("current_wave"):
                say(f"wave {doc['current_wave']} of {doc.get('wave_count')}: pushed")
            last_step = step
        for d in (doc.get("decisions") or [])[decisions:]:
            where = "shadow stage" if d.get("stage") == "shadow" else f"wave {d.get('wave')}"
            for g in d.get("gates") or []:
                say(f"{where}: gate {g.get('outcome')}: {g.get('why')}")
        decisions = len(doc.get("decisions") or [])
        await _print_device_changes(api, stores, versions, say)
        if doc.get("state") in ENDED:
            break
        await asyncio.sleep(0.2)
    else:
        say(f"not decided within {within_s:g} s")
        return doc
    # Let the stores' reports of the outcome arrive, then show them.
    for _ in range(25):
        await _print_device_changes(api, stores, versions, say)
        want = version if doc.get("state") == "completed" else None
        if all(
            (versions.get(s.device_id, (None, None))[0] == want)
            if want
            else versions.get(s.device_id, (None, None))[0] != version
            for s in stores
        ):
            break
        await asyncio.sleep(0.2)
    say(f"rollout {doc.get('state')}" + (f": {doc['reason']}" if doc.get("reason") else ""))
    return doc


async def _print_device_changes(
    api: Api,
    stores: Sequence[Store],
    versions: dict[str, tuple[Any, Any]],
    say: Callable[[str], None],
) -> None:
    for store in stores:
        doc = await api.call("GET", f"/v1/devices/{store.device_id}")
        model = (doc.get("models") or {}).get(MODEL) or {}
        now = (model.get("active"), (model.get("shadow") or {}).get("version"))
        if versions.get(store.device_id) != now:
            if store.device_id in versions:
                shadow = f" (shadow: {now[1]})" if now[1] else ""
                say(f"{store.device_id}: serves {MODEL} {now[0]}{shadow}")
            versions[store.device_id] = now


async def _wait_managed(api: Api, device: str, version: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        doc = await api.call("GET", f"/v1/devices/{device}")
        model = (doc.get("models") or {}).get(MODEL) or {}
        if model.get("desired") == version and model.get("active") == version:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{device} did not report {MODEL} {version} within {within_s} s")


async def _wait_online(api: Api, device: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        doc = await api.call("GET", f"/v1/devices/{device}")
        if doc.get("online"):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{device} did not come online within {within_s} s")


def main(build: Path, *, keep: bool = False) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        try:
            return asyncio.run(run_demo(build, Path(tmp), keep=keep))
        except KeyboardInterrupt:
            return 0

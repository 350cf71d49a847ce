"""``edge-fleet demo``: the fleet pushes a new model version to a running agent.

Everything runs in this process on loopback, with nothing installed beyond the
project: the fleet service with its embedded MQTT broker (amqtt), and one agent
that was enrolled with a one-time token. A local "app" keeps sending the agent
digit images the whole time. The fleet manager uploads ``digits-edge`` version 2
(signed, built by models/digits.py) and assigns it; the agent downloads it,
verifies the hash and the signature, self-tests it, and swaps it in while the
app's requests keep being answered. The demo prints each step as the fleet sees
it and, at the end, how many requests were answered by which version and how
many failed (the point: none).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.server.app import create_app
from edgefleet.fleet.config import FleetServiceConfig
from edgefleet.fleet.service import FleetService

log = logging.getLogger(__name__)

MODEL = "digits-edge"
NEW_VERSION = "2"


def version_two(build: Path) -> Path | None:
    """``<build>/fleet/digits-edge-2.bundle``, made by ``python -m models`` (recipe
    models/fleet_update.py); None when that build has not run."""
    path = build / "fleet" / f"{MODEL}-{NEW_VERSION}.bundle"
    return path if path.exists() else None


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


async def _app_load(
    session: aiohttp.ClientSession, base: str, images: list[bytes], stop: asyncio.Event
) -> Counter[str]:
    """A local app: one request after another, counting who answered (or that none did)."""
    seen: Counter[str] = Counter()
    i = 0
    while not stop.is_set():
        body = images[i % len(images)]
        i += 1
        try:
            async with session.post(
                f"{base}/v1/predict/{MODEL}",
                data=body,
                headers={"Content-Type": "image/png"},
            ) as resp:
                doc = await resp.json(content_type=None)
                if resp.status == 200:
                    seen[f"version {doc['version']}"] += 1
                else:
                    seen[f"failed: HTTP {resp.status}"] += 1
        except aiohttp.ClientError as exc:
            seen[f"failed: {type(exc).__name__}"] += 1
        await asyncio.sleep(0.005)
    return seen


async def run_demo(build: Path, workdir: Path) -> int:
    keys = sorted((build / "keys").glob("*.pub"))
    v1 = build / f"{MODEL}-1.bundle"
    v2 = version_two(build)
    images_dir = build / "demo" / MODEL
    if not v1.exists() or v2 is None or not keys or not images_dir.is_dir():
        print(f"{build} lacks the {MODEL} bundles, keys or demo images: run `python -m models`")
        return 2
    images = await asyncio.to_thread(
        lambda: [p.read_bytes() for p in sorted(images_dir.glob("*.png"))]
    )
    bundles = await asyncio.to_thread(lambda: [b.read_bytes() for b in (v1, v2)])

    token = secrets.token_urlsafe(24)
    fleet_cfg = FleetServiceConfig.model_validate(
        {
            "data_dir": str(workdir / "fleet"),
            "http": {"host": "127.0.0.1", "port": 0},
            "auth": {"token": token},
            "trust": {"public_keys": [str(k) for k in keys]},
            "embedded_broker": {"host": "127.0.0.1", "port": 0},
        }
    )
    fleet = await FleetService(fleet_cfg).start()
    agent_runner: web.AppRunner | None = None
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(session, fleet.url, token)
            print(f"fleet service on {fleet.url}, embedded MQTT broker on port {fleet.mqtt_port}")
            for bundle, data in zip((v1, v2), bundles, strict=True):
                doc = await api.call("POST", "/v1/models", data=data)
                print(
                    f"  uploaded {bundle.name}: signature and hashes verified"
                    f" (sha256 {doc['sha256'][:12]}…, {doc['size']:,} bytes)"
                )

            # Enrol a store PC: a one-time token gives it an id, MQTT credentials, keys.
            tok = await api.call(
                "POST", "/v1/enrolment-tokens", json={"device_id": "store-0001", "groups": ["demo"]}
            )
            async with session.post(f"{fleet.url}/v1/enrol", json={"token": tok["token"]}) as r:
                enrolled = await r.json()
            device = enrolled["device_id"]
            print(f"enrolled {device}: MQTT user {enrolled['mqtt']['username']}")

            agent_cfg = AgentConfig.model_validate(
                {
                    "device_id": device,
                    "server": {"host": "127.0.0.1"},
                    "store": {"path": str(workdir / "agent" / "store")},
                    "trust": {"public_keys": [str(k) for k in keys]},
                    "models": [{"bundle": str(v1), "labels": ["stable"]}],
                    "fleet": {
                        "host": enrolled["mqtt"]["host"],
                        "port": enrolled["mqtt"]["port"],
                        "username": enrolled["mqtt"]["username"],
                        "password": enrolled["mqtt"]["password"],
                        "reconnect_min_s": 0.2,
                        "reconnect_max_s": 2,
                        "outbox": {"path": str(workdir / "agent" / "outbox.sqlite")},
                        "telemetry": {"flush_interval_s": 1, "stats_interval_s": 2},
                        # What `edge-agent enroll` records: downloads send the device
                        # credentials to this origin only.
                        "sync": {"fleet_url": enrolled["fleet_url"]},
                    },
                }
            )
            agent_runner = web.AppRunner(create_app(agent_cfg), access_log=None)
            await agent_runner.setup()
            # Port 0: the OS picks a free one, no race with another process.
            await web.TCPSite(agent_runner, "127.0.0.1", 0).start()
            agent_base = f"http://127.0.0.1:{agent_runner.addresses[0][1]}"
            print(f"agent {device} serving {MODEL} version 1 on {agent_base}")
            await _wait_online(api, device)
            print("  the fleet sees it online")

            stop = asyncio.Event()
            load = asyncio.create_task(_app_load(session, agent_base, images, stop))
            await asyncio.sleep(1.0)
            print(f"fleet manager: assign {MODEL} version {NEW_VERSION} to group 'demo'")
            t0 = time.monotonic()
            await api.call(
                "POST",
                "/v1/assignments",
                json={"model": MODEL, "version": NEW_VERSION, "target": {"group": "demo"}},
            )
            ok = await _watch_switch(api, device, t0)
            await asyncio.sleep(1.0)  # the app keeps going on the new version
            stop.set()
            seen = await load
            failed = sum(n for k, n in seen.items() if k.startswith("failed"))
            print(
                f"the local app sent {sum(seen.values())} requests during the switch: "
                + ", ".join(
                    f"{n} answered by {k}" if k.startswith("version") else f"{n} {k}"
                    for k, n in sorted(seen.items())
                )
            )
            print(f"failed requests: {failed}")
            await asyncio.sleep(2.5)  # one telemetry window reaches the fleet
            for row in (await api.call("GET", "/v1/telemetry/models"))["models"]:
                print(
                    f"fleet telemetry: {row.get('model')} v{row.get('version')}:"
                    f" {row.get('requests')} requests, p50 {row.get('p50_ms')} ms"
                )
            return 0 if ok and failed == 0 else 1
    finally:
        if agent_runner is not None:
            await agent_runner.cleanup()
        await fleet.stop()


async def _wait_online(api: Api, device: str, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        doc = await api.call("GET", f"/v1/devices/{device}")
        if doc.get("online"):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{device} did not come online within {within_s} s")


async def _watch_switch(api: Api, device: str, t0: float, within_s: float = 60.0) -> bool:
    """Print the device's model state as the fleet sees it, until version 2 is active."""
    last = None
    while time.monotonic() - t0 < within_s:
        doc = await api.call("GET", f"/v1/devices/{device}")
        model = (doc.get("models") or {}).get(MODEL) or {}
        state = (model.get("state"), model.get("active"), model.get("last_error"))
        if state != last:
            print(
                f"  +{time.monotonic() - t0:5.2f} s  {device}: {MODEL} state={state[0]}"
                f" active={state[1]}" + (f" error={state[2]}" if state[2] else "")
            )
            last = state
        if state[0] == "active" and state[1] == NEW_VERSION:
            return True
        if state[0] == "failed":
            return False
        await asyncio.sleep(0.05)
    print(f"  version {NEW_VERSION} not active after {within_s} s")
    return False


def main(build: Path) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
        return asyncio.run(run_demo(build, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main(Path("models/build")))

"""The README's demo: start the agent, send it real images, print what it says."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from agent.cli import format_prediction
from agent.config import AgentConfig
from agent.server.app import create_app

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


Sample = tuple[str, str, bytes]  # model, file name, image bytes


def collect_samples(images: Path) -> list[Sample]:
    """Every image under ``images/<model>/``, read before the event loop starts."""
    if not images.is_dir():
        return []
    return [
        (model_dir.name, img.name, img.read_bytes())
        for model_dir in sorted(p for p in images.iterdir() if p.is_dir())
        for img in sorted(p for p in model_dir.iterdir() if p.suffix in IMAGE_SUFFIXES)
    ]


async def _send_images(base: str, samples: list[Sample]) -> int:
    """POST each sample image to ``/v1/predict/<model>`` and print the answer."""
    failures = 0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v1/models") as resp:
            doc = await resp.json()
        for m in doc["models"]:
            active = next((v for v in m["versions"] if v["active"]), None)
            if active:
                print(
                    f"  {m['name']}:{active['version']} on {active['runtime']}"
                    f"/{active['provider']}, self-test {active['self_test']}"
                )
            else:
                print(f"  {m['name']}: NOT READY ({m.get('last_error')})")
        print()
        for model, name, data in samples:
            async with session.post(f"{base}/v1/predict/{model}", data=data) as resp:
                answer = await resp.json()
            if resp.status != 200:
                failures += 1
                print(f"  {name:28} -> HTTP {resp.status}: {answer.get('error')}")
            else:
                print(f"  {name:28} -> {format_prediction(answer)}")
    return failures


async def run_demo(config: AgentConfig, samples: list[Sample], keep_serving: bool) -> int:
    started = time.monotonic()
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://{config.server.host}:{port}"
        print(f"edgefleet agent ready at {base} in {time.monotonic() - started:.2f} s\n")
        failures = await _send_images(base, samples)
        if keep_serving:
            print(f"\nstill serving at {base}; try:\n"
                  f"  curl -s {base}/v2/models/digits-edge\n"
                  f"  curl -s -X POST --data-binary @models/build/demo/face-detect/astronaut.png"
                  f" {base}/v1/predict/face-detect\n"
                  "Ctrl-C stops it.")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        return 1 if failures else 0
    finally:
        await runner.cleanup()

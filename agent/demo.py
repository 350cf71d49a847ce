"""The README's demo: start the agent, send it real images, print what it says.

When a cloud-profile config sits beside the agent's (``models/build/cloud.yaml``,
written by ``python -m models``), the demo also starts that cloud endpoint in this
process and tells the fallback story: a confident digit answered locally, an
ambiguous one answered by the cloud, then the cloud stopped and the same
ambiguous digit answered locally with the reason the cloud could not.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from edgefleet.agent.config import AgentConfig, load_config
from edgefleet.agent.formatting import format_prediction
from edgefleet.agent.server.app import create_app
from edgefleet.agent.server.tls import server_ssl_context
from edgefleet.core.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
CLOUD_CONFIG = "cloud.yaml"
# Images named so are held back for the cloud-fallback part of the demo.
AMBIGUOUS_PREFIX = "ambiguous-"


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


def cloud_setup(
    config_path: Path, cloud_path: str | None, cloud_port: int | None
) -> AgentConfig | None:
    """The cloud-profile config to start beside the agent: ``cloud_path``, else
    ``cloud.yaml`` next to the agent's config; None when there is none."""
    path = Path(cloud_path) if cloud_path else config_path.parent / CLOUD_CONFIG
    if not path.is_file():
        if cloud_path:
            raise ConfigError(f"--cloud-config {cloud_path}: no such file")
        return None
    cloud = load_config(path)
    if cloud.profile != "cloud":
        raise ConfigError(f"{path}: profile is {cloud.profile!r}, the demo wants a cloud profile")
    if cloud_port is not None:
        cloud = cloud.model_copy(
            update={"server": cloud.server.model_copy(update={"port": cloud_port})}
        )
    return cloud


def point_at_cloud(config: AgentConfig, cloud: AgentConfig, base: str) -> AgentConfig:
    """``config`` with its fallback sent to the cloud endpoint at ``base``, with its token."""
    endpoint = config.fallback.cloud.model_copy(
        update={"url": base, "token": cloud.server.auth_token, "token_file": None}
    )
    fallback = config.fallback.model_copy(update={"cloud": endpoint})
    return config.model_copy(update={"fallback": fallback})


async def _post_image(
    session: aiohttp.ClientSession, base: str, model: str, name: str, data: bytes
) -> tuple[str, dict[str, Any] | None]:
    async with session.post(f"{base}/v1/predict/{model}", data=data) as resp:
        answer = await resp.json()
    if resp.status != 200:
        return f"  {name:28} -> HTTP {resp.status}: {answer.get('error')}", None
    return f"  {name:28} -> {format_prediction(answer)}", answer


async def _send_images(session: aiohttp.ClientSession, base: str, samples: list[Sample]) -> int:
    """POST each sample image to ``/v1/predict/<model>`` and print the answer."""
    failures = 0
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
        line, answer = await _post_image(session, base, model, name, data)
        failures += answer is None
        print(line)
    return failures


async def _start_cloud(cloud: AgentConfig) -> tuple[web.AppRunner | None, str, str]:
    """(runner or None, base URL, a line saying what happened)."""
    started = time.monotonic()
    runner = web.AppRunner(create_app(cloud), access_log=None)
    await runner.setup()
    ssl_context = server_ssl_context(cloud)
    try:
        site = web.TCPSite(runner, cloud.server.host, cloud.server.port, ssl_context=ssl_context)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        return None, "", f"cloud endpoint not started ({exc.strerror}): answers stay local"
    scheme = "https" if ssl_context else "http"
    host = cloud.server.host if cloud.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    base = f"{scheme}://{host}:{runner.addresses[0][1]}"
    names = ", ".join(m.bundle.name.removesuffix(".bundle") for m in cloud.models)
    took = time.monotonic() - started
    return runner, base, f"cloud endpoint (profile cloud) ready at {base} in {took:.2f} s: {names}"


async def _cloud_story(
    session: aiohttp.ClientSession,
    base: str,
    samples: list[Sample],
    ambiguous: list[Sample],
    cloud_runner: web.AppRunner | None,
) -> int:
    """Confident digit locally; ambiguous digit by the cloud; cloud stopped; again."""
    failures = 0
    model, name, data = ambiguous[0]
    async with session.get(f"{base}/v2/models/{model}") as resp:
        meta = await resp.json()
    policy = meta.get("parameters", {}).get("fallback_effective", {})
    print(
        f"\nCloud fallback: {model} asks {policy.get('cloud_model')} when its"
        f" {policy.get('confidence_rule')} confidence is below {policy.get('threshold')}"
        f" ({policy.get('mode')}, timeout {policy.get('timeout_ms')} ms)\n"
    )
    confident = next((s for s in samples if s[0] == model), None)
    steps = [s for s in (confident, (model, name, data)) if s is not None]
    for m, n, d in steps:
        line, answer = await _post_image(session, base, m, n, d)
        failures += answer is None
        print(line)
    if cloud_runner is not None:
        await cloud_runner.cleanup()
        print("\n  (cloud endpoint stopped)\n")
        line, answer = await _post_image(session, base, model, name, data)
        failures += answer is None
        print(line)
    return failures


async def run_demo(
    config: AgentConfig,
    samples: list[Sample],
    keep_serving: bool,
    cloud: AgentConfig | None = None,
) -> int:
    started = time.monotonic()
    cloud_runner: web.AppRunner | None = None
    if cloud is not None:
        cloud_runner, cloud_base, line = await _start_cloud(cloud)
        print(line)
        if cloud_runner is not None:
            config = point_at_cloud(config, cloud, cloud_base)
        # The demo prints each fallback reason itself; the log would say it twice.
        if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
            logging.getLogger("edgefleet.agent.cloud").setLevel(logging.ERROR)
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port)
        await site.start()
        port = runner.addresses[0][1]
        base = f"http://{config.server.host}:{port}"
        print(f"edgefleet agent ready at {base} in {time.monotonic() - started:.2f} s\n")
        regular = [s for s in samples if not s[1].startswith(AMBIGUOUS_PREFIX)]
        ambiguous = [s for s in samples if s[1].startswith(AMBIGUOUS_PREFIX)]
        async with aiohttp.ClientSession() as session:
            failures = await _send_images(session, base, regular)
            if ambiguous:
                failures += await _cloud_story(session, base, regular, ambiguous, cloud_runner)
                cloud_runner = None  # stopped by the story
        if keep_serving:
            print(
                f"\nstill serving at {base}; try:\n"
                f"  curl -s {base}/v2/models/digits-edge\n"
                f"  curl -s {base}/v1/fallback\n"
                f"  curl -s -X POST --data-binary @models/build/demo/face-detect/astronaut.png"
                f" {base}/v1/predict/face-detect\n"
                + (
                    "  edge-agent serve --config models/build/cloud.yaml"
                    "   # the cloud again: unsure digits go to it after the back-off\n"
                    if cloud is not None
                    else ""
                )
                + "Ctrl-C stops it."
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        return 1 if failures else 0
    finally:
        await runner.cleanup()
        if cloud_runner is not None:
            await cloud_runner.cleanup()

"""Shared fixtures: real keys, real ONNX models, real agents on loopback ports.

Every test also runs under tests/support/leaks.py's autouse check: it must leave no
asyncio task, timer or thread behind."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from edgefleet.agent.server.app import create_app
from edgefleet.converters.bundler import build_bundle
from edgefleet.core.bundle.signing import generate_keypair, load_private_key
from tests.support.tiny import TEST_X, TINY_MANIFEST, TINY_W, RunningAgent, write_tiny_onnx

pytest_plugins = (
    "pytester",  # tests/test_leak_check.py runs small test files through the leak check
    "tests.support.leaks",  # autouse: no task, timer or thread left behind
    "tests.support.broker_fixtures",  # mosquitto, mosquitto_factory, amqtt_broker, peers
    "tests.support.cloud_fixtures",  # servers, cloud_bundles
    "tests.support.digits_fixtures",  # digits
    "tests.support.browser",  # chromium (session), browser: Debian's headless Chromium
)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("other-keys"), "other")


@pytest.fixture(scope="session")
def make_tiny_bundle(
    tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]
) -> Callable[..., Path]:
    """Build ``tiny-<version>.bundle``; ``weights`` changes the model, ``key`` the signer."""
    out_dir = tmp_path_factory.mktemp("bundles")
    private = load_private_key(keys[0])

    def make(version: str = "1", weights: np.ndarray = TINY_W, **manifest: Any) -> Path:
        work = tmp_path_factory.mktemp(f"tiny-{version}")
        model = write_tiny_onnx(work / "tiny.onnx", weights)
        out = out_dir / f"tiny-{version}.bundle"
        build_bundle(
            out=out,
            model_file=model,
            manifest={**TINY_MANIFEST, "version": version, **manifest},
            test_inputs={"x": TEST_X},
            private_key=private,
            self_test={"atol": 1e-5},
        )
        return out

    return make


@pytest.fixture
async def start_agent() -> AsyncIterator[Callable[..., Any]]:
    """Start real agents on loopback ports in this test's loop; all stopped at the end."""
    runners: list[web.AppRunner] = []

    async def start(config: Any) -> RunningAgent:
        app = create_app(config)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return RunningAgent(runner, f"http://127.0.0.1:{port}", app)

    yield start
    for r in reversed(runners):
        await r.cleanup()
    # Whatever the agents left running fails the test (tests/support/leaks.py).


if os.environ.get("EDGEFLEET_TEST_LOOP") == "uvloop":

    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        """pytest-asyncio hook: every async test runs on uvloop."""
        import uvloop

        return {"uvloop": uvloop.new_event_loop}

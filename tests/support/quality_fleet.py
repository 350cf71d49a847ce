"""A real fleet service (in this test's loop, on a real Mosquitto) and an HTTP client
for it, for the issue 11 policy and hard-example tests (tests/agent/test_policy_push.py,
tests/e2e/test_hard_example_upload.py, tests/fleet/test_hard_examples.py)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp

from edgefleet.fleet.config import FleetServiceConfig
from edgefleet.fleet.service import FleetService

TOKEN = "quality-" + secrets.token_hex(16)


def fleet_config(
    tmp: Path, keys: tuple[Path, Path], mqtt_port: int, http_port: int = 0, **extra: Any
) -> FleetServiceConfig:
    return FleetServiceConfig.model_validate(
        {
            "data_dir": str(tmp / "fleet"),
            "http": {"host": "127.0.0.1", "port": http_port},
            "auth": {"token": TOKEN},
            "trust": {"public_keys": [str(keys[1])]},
            "broker": {
                "host": "127.0.0.1",
                "port": mqtt_port,
                "client_id": "quality-fleet",
                "reconnect_min_s": 0.05,
                "reconnect_max_s": 0.5,
            },
            **extra,
        }
    )


class Fleet:
    """HTTP calls to a running fleet service with the admin token."""

    def __init__(self, service: FleetService, session: aiohttp.ClientSession) -> None:
        self.service, self.session = service, session

    @property
    def base(self) -> str:
        return self.service.url

    async def raw(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {TOKEN}", **kw.pop("headers", {})}
        async with self.session.request(method, self.base + path, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def call(self, method: str, path: str, **kw: Any) -> Any:
        status, doc = await self.raw(method, path, **kw)
        assert status < 300, f"{method} {path}: {status} {doc}"
        return doc

    async def enrol(self, device_id: str, groups: list[str]) -> dict[str, Any]:
        tok = await self.call(
            "POST", "/v1/enrolment-tokens", json={"device_id": device_id, "groups": groups}
        )
        async with self.session.post(self.base + "/v1/enrol", json={"token": tok["token"]}) as r:
            assert r.status == 200, await r.text()
            return dict(await r.json())

    async def device(self, device_id: str) -> dict[str, Any]:
        return dict(await self.call("GET", f"/v1/devices/{device_id}"))


@contextlib.asynccontextmanager
async def running_fleet(cfg: FleetServiceConfig, *, cookies: bool = False) -> AsyncIterator[Fleet]:
    """A fleet service started in this loop, its MQTT side connected, and a client for
    it; stopped on exit. ``cookies``: the client keeps cookies from 127.0.0.1 (aiohttp's
    default jar drops cookies of IP hosts), for console sessions."""
    svc = await FleetService(cfg).start()
    jar = aiohttp.CookieJar(unsafe=True) if cookies else None
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        try:
            async with asyncio.timeout(10):
                await svc.bus.wait_connected()
            yield Fleet(svc, session)
        finally:
            await svc.stop()


async def until(
    fetch: Callable[[], Any], check: Callable[[Any], bool], within: float = 15.0
) -> Any:
    """Fetch (a coroutine function) until ``check`` holds; the last document."""
    doc = None
    try:
        async with asyncio.timeout(within):
            while True:
                doc = await fetch()
                if check(doc):
                    return doc
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not reached within {within} s; last: {doc}") from None


def fleet_section(enrolled: dict[str, Any], tmp: Path, **extra: Any) -> dict[str, Any]:
    """An agent's ``fleet`` section for an enrolment answer."""
    name = enrolled["device_id"]
    return {
        "host": enrolled["mqtt"]["host"],
        "port": enrolled["mqtt"]["port"],
        "username": enrolled["mqtt"]["username"],
        "password": enrolled["mqtt"]["password"],
        "keepalive_s": 5,
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.5,
        "outbox": {"path": str(tmp / name / "outbox.sqlite")},
        "telemetry": {"flush_interval_s": 0.2, "stats_interval_s": 0.3, "ack_timeout_s": 2},
        "sync": {"fleet_url": enrolled["fleet_url"]},
        **extra,
    }

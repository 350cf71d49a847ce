"""Fleet API tokens with roles, for real: ``edge-fleet serve``'s own wiring
(FleetService from a YAML config, the embedded broker, aiohttp with its access log)
and real HTTP calls.

- missing or unknown token: 401 with a JSON error and ``WWW-Authenticate``;
- a known token whose role lacks the route's permission: 403 with a JSON error;
- read (dashboards) < operator (rollouts) < admin (enrolment, revocation);
- no token ever reaches a log line, whatever the outcome of the call.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from edgefleet.core.errors import ConfigError
from edgefleet.fleet.config import load_fleet_config
from edgefleet.fleet.service import FleetService

ADMIN = "roles-admin-token-000000000000"
READ = "roles-read-token-1111111111111"
OPERATOR = "roles-operator-token-22222222222"  # from a token file, relative to the config
SECOND_ADMIN = "roles-second-admin-3333333333333"
ALL_TOKENS = (ADMIN, READ, OPERATOR, SECOND_ADMIN)


def write_config(tmp: Path, keys: tuple[Path, Path], **extra: Any) -> Path:
    (tmp / "operator.token").write_text(OPERATOR + "\n")
    doc: dict[str, Any] = {
        "data_dir": "data",
        "http": {"host": "127.0.0.1", "port": 0},
        "embedded_broker": {"host": "127.0.0.1", "port": 0},
        "auth": {
            "token": ADMIN,
            "tokens": [
                {"name": "dashboard", "role": "read", "token": READ},
                {"name": "ci", "role": "operator", "token_file": "operator.token"},
                {"name": "ops-lead", "role": "admin", "token": SECOND_ADMIN},
            ],
        },
        "trust": {"public_keys": [str(keys[1])]},
        **extra,
    }
    path = tmp / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Api:
    def __init__(self, svc: FleetService, session: aiohttp.ClientSession) -> None:
        self.svc, self.session = svc, session

    async def call(
        self, method: str, path: str, token: str | None, **kw: Any
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.session.request(method, self.svc.url + path, headers=headers, **kw) as resp:
            return resp.status, await resp.json(content_type=None), resp.headers


@pytest.fixture
async def api(tmp_path: Path, keys: tuple[Path, Path]) -> AsyncIterator[Api]:
    svc = await FleetService(load_fleet_config(write_config(tmp_path, keys))).start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(svc, session)
    finally:
        await svc.stop()


# (method, path, body, the least role that may call it, the permission it needs)
ROUTES: list[tuple[str, str, Any, str, str]] = [
    ("GET", "/v1/models", None, "read", "read"),
    ("GET", "/v1/devices", None, "read", "read"),
    ("GET", "/v1/devices/store-1", None, "read", "read"),
    ("GET", "/v1/rollouts", None, "read", "read"),
    ("GET", "/v1/telemetry/models", None, "read", "read"),
    ("GET", "/v1/events", None, "read", "read"),
    ("GET", "/v1/bundles/tiny/1", None, "operator", "download"),
    ("POST", "/v1/models", None, "operator", "write"),
    ("PUT", "/v1/models/tiny/labels/stable", {"version": "1"}, "operator", "write"),
    ("PUT", "/v1/devices/store-1/groups", {"groups": ["north"]}, "operator", "write"),
    ("POST", "/v1/devices/store-1/commands", {"command": "resync"}, "operator", "write"),
    (
        "POST",
        "/v1/assignments",
        {"model": "tiny", "version": "1", "target": {"all": True}},
        "operator",
        "write",
    ),
    ("POST", "/v1/rollouts/r-none/pause", None, "operator", "write"),
    ("POST", "/v1/enrolment-tokens", {"device_id": "store-9"}, "admin", "devices"),
    ("POST", "/v1/devices/store-1/revoke", None, "admin", "devices"),
]
NAMES = {"read": "dashboard", "operator": "ci", "admin": "ops-lead"}
RANK = {"read": 0, "operator": 1, "admin": 2}
TOKENS = {"read": READ, "operator": OPERATOR, "admin": SECOND_ADMIN}


async def test_each_role_gets_exactly_its_routes(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # everything, from every logger, aiohttp's included
    # A device to act on (an admin's enrolment).
    status, tok, _ = await api.call(
        "POST", "/v1/enrolment-tokens", ADMIN, json={"device_id": "store-1"}
    )
    assert status == 201
    status, _, _ = await api.call("POST", "/v1/enrol", None, json={"token": tok["token"]})
    assert status == 200

    for method, path, body, least, permission in ROUTES:
        for role, token in TOKENS.items():
            status, doc, _ = await api.call(method, path, token, json=body)
            where = f"{role} {method} {path}: {status} {doc}"
            if RANK[role] >= RANK[least]:
                # Past the permission check: whatever the route answers (404 for the
                # bundle or rollout that does not exist), it is not a 401/403.
                assert status not in (401, 403), where
            else:
                assert status == 403, where
                assert doc == {"error": f"{NAMES[role]} ({role}) may not {permission}"}, where

    # The revocation above (embedded broker: accounts not the fleet's business) stuck,
    # and doing it again is harmless.
    status, doc, _ = await api.call("POST", "/v1/devices/store-1/revoke", ADMIN)
    assert status == 200 and doc["broker_account"] == "not managed"
    status, doc, _ = await api.call("GET", "/v1/devices/store-1", READ)
    assert status == 200 and doc["revoked_at"] is not None
    # The bootstrap admin token still has every permission.
    status, _, _ = await api.call("POST", "/v1/enrolment-tokens", ADMIN, json={})
    assert status == 201
    _assert_no_token_logged(caplog)


async def test_missing_and_wrong_tokens_get_401_with_a_json_error(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for token, header in (
        (None, None),
        ("not-a-known-token-but-long-enough", None),
        (READ[:-1], None),  # a prefix of a real one
        (READ + "x", None),
        (None, f"Basic {READ}"),  # the right secret under the wrong scheme
        (None, f"Bearer{READ}"),
        (None, "Bearer "),
    ):
        headers = {"Authorization": header} if header is not None else {}
        if token is not None:
            headers = {"Authorization": f"Bearer {token}"}
        for method, path in (
            ("GET", "/v1/devices"),
            ("POST", "/v1/enrolment-tokens"),
            ("GET", "/v1/no-such-route"),
        ):
            async with api.session.request(method, api.svc.url + path, headers=headers) as resp:
                assert resp.status == 401, (token, header, path)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
                assert resp.content_type == "application/json"
                assert (await resp.json())["error"] == "missing or wrong bearer token"
    # Open routes stay open.
    status, doc, _ = await api.call("GET", "/v1/health", None)
    assert status == 200 and doc["status"] == "ok"
    _assert_no_token_logged(caplog)


def _assert_no_token_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert caplog.records, "expected the calls to be logged at all"
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for token in ALL_TOKENS:
        # Any 12-character piece of a token would be a leak too.
        for i in range(0, len(token) - 12):
            assert token[i : i + 12] not in text, f"a piece of a token was logged: {token[:4]}…"


async def test_token_config_errors_are_caught_at_start(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    # Two entries with the same token: which role would win would depend on list order.
    path = write_config(tmp_path, keys)
    doc = yaml.safe_load(path.read_text())
    doc["auth"]["tokens"][0]["token"] = SECOND_ADMIN
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="same as another token"):
        await FleetService(load_fleet_config(path)).start()
    # A token file that is not there.
    doc["auth"]["tokens"][0]["token"] = READ
    doc["auth"]["tokens"][1]["token_file"] = "missing.token"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="ci: cannot read"):
        await FleetService(load_fleet_config(path)).start()
    # Config-level checks: unknown role, both forms, a short inline token, duplicate names.
    for bad, match in (
        ({"name": "x", "role": "root", "token": READ}, "role"),
        ({"name": "x", "role": "read", "token": READ, "token_file": "a"}, "exactly one"),
        ({"name": "x", "role": "read", "token": "short"}, "at least 16"),
        ({"name": "admin", "role": "read", "token": READ}, "unique and not 'admin'"),
    ):
        doc["auth"]["tokens"] = [bad]
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(ConfigError, match=match):
            load_fleet_config(path)

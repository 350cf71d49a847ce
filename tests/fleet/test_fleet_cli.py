"""``edge-fleet`` end to end: the fleet config, ``edge-fleet serve`` as a real process
(with its embedded broker, no config file: the demo path) and every manager command
as a real subprocess against it, tables and ``--json``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.core.errors import ConfigError
from edgefleet.fleet.config import load_fleet_config, parse_fleet_config
from tests.support.brokers import free_port
from tests.support.fleet_server import ServedFleet
from tests.support.tiny import TINY_W

ROOT = Path(__file__).resolve().parents[2]


# -------------------------------------------------------------------------- config


def test_config_defaults() -> None:
    cfg = parse_fleet_config("")
    assert cfg.http.host == "127.0.0.1" and cfg.http.port == 8480
    assert cfg.http.base_url() == "http://127.0.0.1:8480"
    assert cfg.broker is None and cfg.embedded_broker.port == 1883
    assert cfg.token_file == cfg.data_dir / "admin.token"
    assert cfg.rollouts.max_failure_share == 0.2


def test_config_errors_name_key_and_line() -> None:
    text = "data_dir: /tmp/x\nhttp:\n  port: 8480\n  prot: 1\nrollouts:\n  max_failure_share: 3\n"
    with pytest.raises(ConfigError) as exc:
        parse_fleet_config(text, "fleet.yaml")
    msg = str(exc.value)
    assert "http.prot (line 4): Extra inputs are not permitted" in msg
    assert "rollouts.max_failure_share (line 6)" in msg
    with pytest.raises(ConfigError, match="YAML syntax error at line 3"):
        parse_fleet_config("http:\n  port: [1\n")
    with pytest.raises(ConfigError, match="not both"):
        parse_fleet_config("broker: {host: b}\nembedded_broker: {port: 1884}\n")
    with pytest.raises(ConfigError, match="public_url must be an absolute"):
        parse_fleet_config("http: {public_url: fleet.example}\n")
    with pytest.raises(ConfigError, match="at least 16"):
        parse_fleet_config("auth: {token: short}\n")
    with pytest.raises(ConfigError, match="broker.host"):
        parse_fleet_config("broker: {port: 1883}\n")


def test_config_paths_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "fleet.yaml"
    path.parent.mkdir()
    path.write_text(
        "data_dir: data\n"
        "auth: {token_file: admin.token}\n"
        "trust: {public_keys: [keys/a.pub]}\n"
        "broker: {host: mqtt.example, password_file: mqtt.pw, tls: {ca_file: ca.pem}}\n"
        "http: {host: 0.0.0.0, public_url: 'https://fleet.example/'}\n"
        "enrolment: {mqtt_port: 8883}\n"
    )
    cfg = load_fleet_config(path)
    base = path.resolve().parent
    assert cfg.data_dir == base / "data"
    assert cfg.token_file == base / "admin.token"
    assert cfg.trust.public_keys == [base / "keys" / "a.pub"]
    assert cfg.broker is not None and cfg.broker.password_file == base / "mqtt.pw"
    assert cfg.broker.tls is not None and cfg.broker.tls.ca_file == base / "ca.pem"
    assert cfg.http.base_url() == "https://fleet.example"


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet.fleet", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "fleet.yaml"
    good.write_text("data_dir: d\n")
    r = run_cli("check-config", "--config", str(good))
    assert r.returncode == 0 and "OK" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("data_dir: d\nhttp:\n  porrt: 1\n")
    r = run_cli("check-config", "--config", str(bad))
    assert r.returncode == 2 and "http.porrt (line 3)" in r.stderr


# ---------------------------------------------------------------- a served fleet


@pytest.fixture
def served(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[ServedFleet]:
    """``edge-fleet serve`` with no config file: demo defaults, embedded broker."""
    fleet = ServedFleet(
        tmp_path,
        free_port(),
        [
            "--data-dir",
            str(tmp_path / "data"),
            "--mqtt-port",
            "0",
            "--trust-key",
            str(keys[1]),
        ],
    )
    yield fleet
    fleet.stop()


def test_serve_and_every_manager_command(
    served: ServedFleet, tmp_path: Path, make_tiny_bundle: Callable[..., Path]
) -> None:
    token_file = tmp_path / "data" / "admin.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    env = {"EDGEFLEET_URL": served.url, "EDGEFLEET_TOKEN_FILE": str(token_file)}

    def ok(*args: str) -> subprocess.CompletedProcess[str]:
        r = run_cli(*args, env=env)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    def as_json(*args: str) -> Any:
        return json.loads(ok(*args, "--json").stdout)

    # models
    bundle = make_tiny_bundle("1")
    r = ok("models", "push", str(bundle))
    assert "tiny:1 uploaded" in r.stdout
    assert "100%" in r.stderr  # progress on stderr
    r = ok("models", "push", str(bundle))
    assert "already there (same bytes)" in r.stdout
    other = make_tiny_bundle("1", weights=TINY_W * 2)
    r = run_cli("models", "push", str(other), env=env)
    assert r.returncode == 1 and "409" in r.stderr and "other bytes" in r.stderr
    ok("models", "push", str(make_tiny_bundle("2", weights=TINY_W * 3)))
    r = ok("models", "list")
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "VERSION", "LABELS"]
    assert [ln.split()[1] for ln in lines[1:]] == ["1", "2"]
    r = ok("models", "label", "tiny", "stable", "1")
    assert "tiny: stable -> 1" in r.stdout
    doc = as_json("models", "show", "tiny")
    assert doc["labels"] == {"stable": "1"} and len(doc["versions"]) == 2

    # devices and enrolment
    tok = as_json("devices", "enrol-token", "--device-id", "store-1", "--group", "north")
    assert tok["device_id"] == "store-1" and tok["groups"] == ["north"]
    enrolled = enrol(served.url, tok["token"])
    assert enrolled["device_id"] == "store-1" and enrolled["mqtt"]["port"] > 0
    tok2 = as_json("devices", "enrol-token", "--device-id", "store-2", "--group", "north")
    enrol(served.url, tok2["token"])
    r = ok("devices", "enrol-token")
    assert len(r.stdout.strip()) >= 40 and "one-time enrolment token" in r.stderr
    r = ok("devices", "list")
    assert "store-1" in r.stdout and "offline" in r.stdout and "2 device(s)" in r.stdout
    r = ok("devices", "groups", "store-1", "north", "pilot")
    assert "north, pilot" in r.stdout
    r = ok("devices", "show", "store-1")
    assert "device        store-1" in r.stdout and "north, pilot" in r.stdout
    assert as_json("devices", "list", "--group", "pilot")["devices"][0]["id"] == "store-1"

    # assignments and rollouts
    r = ok("assign", "tiny", "1", "--device", "store-1")
    assert "assigned tiny:1 to device store-1" in r.stdout
    r = run_cli("assign", "tiny", "9", "--all", env=env)
    assert r.returncode == 1 and "404" in r.stderr
    r = ok(
        "assign", "tiny", "2", "--group", "north", "--waves", "1,100%", "--max-failure-share", "0.5"
    )
    assert "rollout r-" in r.stdout and "running" in r.stdout
    rid = r.stdout.split()[1].rstrip(":")
    r = ok("rollout", "status")
    assert rid in r.stdout and "group north" in r.stdout
    r = ok("rollout", "pause", rid)
    assert "paused" in r.stdout
    r = ok("rollout", "resume", rid)
    assert "running" in r.stdout
    r = ok("rollout", "rollback", rid)
    assert "rolled_back" in r.stdout
    # Terminal: returns, exit 4 for a rolled-back (or stopped) rollout, for scripts.
    r = run_cli("rollout", "status", rid, "--watch", "--interval", "0.1", env=env)
    assert r.returncode == 4 and "rolled_back" in r.stdout, (r.stdout, r.stderr)
    r = run_cli("rollout", "status", rid, "--json", env=env)
    assert r.returncode == 4 and json.loads(r.stdout)["id"] == rid

    # commands, telemetry, events
    r = ok("devices", "command", "store-1", "resync")
    assert "sent resync to store-1: c-" in r.stdout
    r = ok("telemetry", "models")
    assert "(none)" in r.stdout
    assert as_json("telemetry", "device", "store-1") == {"device_id": "store-1", "models": []}
    assert as_json("events", "--device", "store-1") == {"events": []}
    r = ok("devices", "revoke", "store-2")
    assert "store-2: revoked" in r.stdout and "broker account not managed" in r.stdout
    assert as_json("devices", "show", "store-2").get("revoked_at")

    # refusals: wrong token 1, unreachable 3, usage 2
    r = run_cli("models", "list", "--token", "wrong-token-0123456789", env=env)
    assert r.returncode == 1 and "401" in r.stderr
    r = run_cli("models", "list", "--url", f"http://127.0.0.1:{free_port()}", env=env)
    assert r.returncode == 3 and "cannot reach" in r.stderr
    r = run_cli("assign", "tiny", "2", "--group", "north", "--waves", "x%,y", env=env)
    assert r.returncode == 2

    # SIGTERM: everything stops, exit 0
    assert served.stop() == 0
    log = served.log_path.read_text()
    assert "stopping" in log and "Traceback" not in log


def enrol(url: str, token: str) -> Any:
    req = urllib.request.Request(
        url + "/v1/enrol",
        data=json.dumps({"token": token}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)


def test_oversized_push_reports_413(
    tmp_path: Path, keys: tuple[Path, Path], make_tiny_bundle: Callable[..., Path]
) -> None:
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(
        f"data_dir: data\nhttp: {{max_upload_bytes: 1000}}\nauth: {{token: {'t' * 20}}}\n"
        f"trust: {{public_keys: ['{keys[1]}']}}\nembedded_broker: {{port: 0}}\n"
    )
    fleet = ServedFleet(tmp_path, free_port(), ["--config", str(cfg)])
    try:
        r = run_cli(
            "models", "push", str(make_tiny_bundle("1")), "--url", fleet.url, "--token", "t" * 20
        )
        assert r.returncode == 1 and "413" in r.stderr and "1000 byte limit" in r.stderr
    finally:
        assert fleet.stop() == 0

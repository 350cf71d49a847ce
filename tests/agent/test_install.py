"""The agent installer for real: ``deploy/install-agent.sh`` into a throw-away root from
a wheelhouse built here, its systemd unit checked by ``systemd-analyze``, the
*installed* ``edge-agent enroll`` against a real ``edge-fleet serve``, the installed
agent serving and seen online by the fleet, upgrade, uninstall and purge.

Nothing is mocked: the wheelhouse comes from the machine's package index with the
recipe docs/install.md gives, the venv is a real one, the fleet a real process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefleet.agent.config import load_config
from edgefleet.agent.enroll import (
    EnrolError,
    Enrolment,
    Layout,
    merge_config,
    parse_enrolment,
    replace_top_level,
)
from tests.support.brokers import free_port
from tests.support.fleet_server import ServedFleet
from tests.support.tls import make_tls

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "deploy" / "install-agent.sh"
UNIT = REPO / "deploy" / "systemd" / "edgefleet-agent.service"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def run(cmd: list[str], timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw
    )


def install(
    root: Path,
    wheelhouse: Path,
    *extra: str,
    installer: Path = INSTALLER,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    # The repo venv's interpreter: the installed venv is made from its base Python.
    r = run(
        [installer, "--root", root, "--wheelhouse", wheelhouse, "--python", sys.executable, *extra],
        env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def wheelhouse_recipe(dest: Path) -> list[object]:
    """docs/install.md's offline recipe: the agent's runtime wheels plus the build
    backend (no edgefleet wheel: the installer builds the tree it sits in)."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        dest,
        "-c",
        REPO / "constraints.txt",
        REPO,
        "setuptools>=68",
        "wheel",
    ]


def wheelhouse_key() -> str:
    """What the recipe's result depends on: the pins, the dependency list, the build
    requirements, the interpreter and the platform (not the code: no edgefleet wheel)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    inputs = {
        "constraints": (REPO / "constraints.txt").read_text(),
        "dependencies": pyproject["project"]["dependencies"],
        "build": pyproject["build-system"]["requires"],
        "python": list(sys.version_info[:2]),
        "platform": sysconfig.get_platform(),
        "recipe": [str(a) for a in wheelhouse_recipe(Path("DEST"))[3:]],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """The recipe's wheelhouse, made once per machine and kept between runs.

    Downloading and resolving ~140 MB of wheels is a third of this module's time and
    proves the same thing every run while its inputs stay the same, so the result is
    cached under ``$EDGEFLEET_TEST_CACHE`` (default ``~/.cache/edgefleet-tests``) by
    ``wheelhouse_key()``: a change to constraints.txt or to pyproject's dependencies
    runs the recipe again. Made in a temporary directory and renamed into place when
    complete, so an interrupted run never leaves a half wheelhouse to be trusted;
    wheelhouses of older keys are removed.
    """
    cache = Path(
        os.environ.get("EDGEFLEET_TEST_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgefleet-tests"
    )
    key = wheelhouse_key()
    target = cache / f"wheelhouse-{key}"
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob("wheelhouse-*"):
        shutil.rmtree(old, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f".wheelhouse-{key}-", dir=cache))
    try:
        r = run(wheelhouse_recipe(partial), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        try:
            os.rename(partial, target)
        except OSError:  # another session made it first: theirs is as good
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


@pytest.fixture
def fleet(tmp_path: Path, keys: tuple[Path, Path]) -> Any:
    f = ServedFleet(
        tmp_path,
        free_port(),
        [
            "--data-dir",
            str(tmp_path / "fleet-data"),
            "--mqtt-port",
            "0",
            "--trust-key",
            str(keys[1]),
        ],
    )
    yield f
    f.stop()


def fleet_get(fleet: ServedFleet, path: str) -> Any:
    token = (fleet.workdir / "fleet-data" / "admin.token").read_text().strip()
    req = urllib.request.Request(fleet.url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def enrol_token(fleet: ServedFleet, device_id: str) -> str:
    """A one-time token from the manager CLI, as an operator makes it."""
    r = run(
        [
            sys.executable,
            "-m",
            "edgefleet.fleet",
            "devices",
            "enrol-token",
            "--device-id",
            device_id,
            "--url",
            fleet.url,
            "--token-file",
            fleet.workdir / "fleet-data" / "admin.token",
        ],
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


class Agent:
    """The installed agent as a process."""

    def __init__(self, cmd: list[str], log: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self.log = open(log, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(port)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"agent not ready: {log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------ the whole story


def test_install_enrol_serve_upgrade_uninstall(
    tmp_path: Path, wheelhouse: Path, fleet: ServedFleet, keys: tuple[Path, Path]
) -> None:
    root = tmp_path / "root"
    venv = root / "opt/edgefleet/venv"
    etc = root / "etc/edgefleet"
    data = root / "var/lib/edgefleet"
    config = etc / "agent.yaml"
    unit = root / "etc/systemd/system/edgefleet-agent.service"
    wrapper = root / "usr/local/bin/edge-agent"
    # A release tree, as IT gets it (a copy of the checkout): the installer installs
    # the tree it sits in, so a change here shows up in the venv after an upgrade.
    tree = tmp_path / "release"
    for name in ("pyproject.toml", "README.md", "constraints.txt"):
        tree.mkdir(exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    for name in ("core", "agent", "fleet", "converters", "demo", "deploy"):
        shutil.copytree(
            REPO / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    installer = tree / "deploy" / "install-agent.sh"

    # ---- install
    r = install(root, wheelhouse, installer=installer)
    assert f"installed edgefleet {VERSION}" in r.stdout
    assert "wrote the default config" in r.stdout
    for hint in (
        "systemctl status edgefleet-agent",
        "journalctl -u edgefleet-agent",
        "127.0.0.1:8470/v2/health/ready",
        "edge-agent enroll --fleet",
    ):
        assert hint in r.stdout
    assert mode(etc) == 0o750 and mode(etc / "keys") == 0o750 and mode(data) == 0o750
    assert mode(config) == 0o640
    assert mode(unit) == 0o644 and unit.read_text() == UNIT.read_text()
    assert mode(wrapper) == 0o755
    assert "/opt/edgefleet/venv/bin/python -I -m edgefleet.agent" in wrapper.read_text()
    # The default config loads, points into the data dir, and is not enrolled yet.
    cfg = load_config(config)
    assert cfg.store.path == data / "models" and cfg.fleet is None and cfg.device_id is None
    # Only the agent's runtime: no converters, no torch, no fleet broker.
    r = run([venv / "bin/python", "-m", "pip", "list", "--format", "json"])
    installed = {p["name"].lower() for p in json.loads(r.stdout)}
    assert {"edgefleet", "onnxruntime", "ai-edge-litert", "aiohttp", "paho-mqtt"} <= installed
    assert not installed & {"torch", "onnx", "scikit-learn", "skl2onnx", "amqtt", "pytest"}
    # `python -I -m edgefleet.agent` (the unit's ExecStart, the wrapper) ignores the working
    # directory: run from the repo, it still imports the installed agent.
    r = run(
        [
            venv / "bin/python",
            "-I",
            "-c",
            "import edgefleet.agent; print(edgefleet.agent.__file__)",
        ],
        cwd=REPO,
    )
    assert r.stdout.strip().startswith(str(venv)), r.stdout

    check_unit(unit, root, tmp_path)

    # ---- enrol with the installed command
    token = enrol_token(fleet, "store-0042")
    r = run(
        [
            venv / "bin/edge-agent",
            "enroll",
            "--fleet",
            fleet.url,
            "--token",
            token,
            "--config",
            config,
            "--data-dir",
            data,
            "--owner",
            "",
        ]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "enrolled as store-0042" in r.stdout
    password_file = etc / "mqtt.password"
    secret = password_file.read_text().strip()
    assert len(secret) >= 40
    assert mode(password_file) == 0o600 and mode(config) == 0o640
    assert mode(etc / "keys" / "fleet-1.pub") == 0o644
    assert (etc / "keys" / "fleet-1.pub").read_text().strip() == keys[1].read_text().strip()
    # The secret is in its 0600 file and nowhere else: not in the config, not printed.
    assert secret not in r.stdout + r.stderr
    holders = [
        p
        for p in root.rglob("*")
        if p.is_file() and not p.is_relative_to(venv) and secret.encode() in p.read_bytes()
    ]
    assert holders == [password_file]
    doc = yaml.safe_load(config.read_text())
    assert doc["device_id"] == "store-0042"
    assert doc["fleet"]["password_file"] == str(password_file)
    assert "password" not in doc["fleet"] and doc["fleet"]["username"] == "store-0042"
    assert doc["trust"]["public_keys"] == [str(etc / "keys" / "fleet-1.pub")]
    assert doc["fleet"]["outbox"]["path"] == str(data / "outbox.sqlite")
    assert "# Bundles to install at start" in config.read_text()  # comments kept
    cfg = load_config(config)
    assert cfg.fleet is not None and cfg.fleet.tls is None  # the demo fleet: no TLS

    # ---- the installed agent serves and the fleet sees it online
    agent = Agent(
        [str(venv / "bin/edge-agent"), "serve", "--config", str(config)],
        tmp_path / "agent.log",
        free_port(),
    )
    try:
        wait_for(
            lambda: any(
                d["id"] == "store-0042" and d["online"]
                for d in fleet_get(fleet, "/v1/devices")["devices"]
            ),
            30,
            "the fleet to list store-0042 online",
        )
        assert (data / "outbox.sqlite").exists() and (data / "models").is_dir()
    finally:
        agent.stop()
    assert "Traceback" not in agent.log_path.read_text()

    # ---- re-enrol: the secret rotates, the operator's settings and notes stay
    text = config.read_text()
    text = text.replace(
        "logging:\n  level: INFO\n", "# my note about logging\nlogging:\n  level: DEBUG\n"
    )
    text = text.replace("fleet:\n", "fleet:\n  keepalive_s: 45\n")
    config.write_text(text)
    r = run(
        [
            venv / "bin/edge-agent",
            "enroll",
            "--fleet",
            fleet.url,
            "--token",
            enrol_token(fleet, "store-0042"),
            "--config",
            config,
            "--owner",
            "",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert password_file.read_text().strip() != secret
    text = config.read_text()
    assert "# my note about logging\nlogging:\n  level: DEBUG\n" in text
    doc = yaml.safe_load(text)
    assert doc["fleet"]["keepalive_s"] == 45 and doc["store"]["path"] == str(data / "models")

    # ---- upgrade in place: venv updated, config, models and outbox kept
    (data / "models" / "marker").write_text("a model would be here")
    (tree / "agent" / "_release_note.py").write_text('NOTE = "the next release"\n')
    before = config.read_bytes()
    r = install(root, wheelhouse, installer=installer)
    assert f"upgraded edgefleet {VERSION}" in r.stdout and "kept the config" in r.stdout
    r2 = run(
        [
            venv / "bin/python",
            "-I",
            "-c",
            "import edgefleet.agent._release_note as n; print(n.NOTE)",
        ]
    )
    assert r2.stdout.strip() == "the next release", r2.stderr
    assert "created the venv" not in r.stdout
    assert config.read_bytes() == before and password_file.read_text().strip()
    assert (data / "models" / "marker").exists() and (data / "outbox.sqlite").exists()
    assert run([venv / "bin/edge-agent", "check-config", "--config", config]).returncode == 0

    # ---- the installer enrols too (token from the environment, out of `ps`)
    secret = password_file.read_text().strip()
    r = install(
        root,
        wheelhouse,
        "--fleet",
        fleet.url,
        installer=installer,
        env={"EDGEFLEET_ENROL_TOKEN": enrol_token(fleet, "store-0042")},
    )
    assert "enrolled as store-0042" in r.stdout and "enrolled with" in r.stdout
    assert password_file.read_text().strip() != secret
    assert "# my note about logging" in config.read_text()
    spent = enrol_token(fleet, "store-0042")
    run(
        [
            venv / "bin/edge-agent",
            "enroll",
            "--fleet",
            fleet.url,
            "--token",
            spent,
            "--config",
            config,
            "--owner",
            "",
        ]
    )
    r = run(
        [
            installer,
            "--root",
            root,
            "--wheelhouse",
            wheelhouse,
            "--python",
            sys.executable,
            "--fleet",
            fleet.url,
            "--token",
            spent,
        ]
    )
    assert r.returncode == 1 and "enrolment token already used" in r.stderr
    assert "is installed, but the enrolment failed" in r.stderr

    # ---- uninstall keeps config and data; purge removes them
    r = run([installer, "--root", root, "--uninstall"])
    assert r.returncode == 0, r.stderr
    assert "kept:" in r.stdout
    assert not (root / "opt/edgefleet").exists() and not unit.exists() and not wrapper.exists()
    assert config.exists() and password_file.exists() and (data / "models" / "marker").exists()
    r = run([installer, "--root", root, "--uninstall", "--purge"])
    assert r.returncode == 0, r.stderr
    assert not etc.exists() and not data.exists()


def check_unit(unit: Path, root: Path, tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the installed unit.

    verify checks that ExecStart's binary exists, and the unit names /opt/edgefleet as
    the target system will see it. In a throw-away root that path is under ``root``,
    so a copy with the three paths rewritten into it is verified on this machine
    (``--root=DIR`` would need a whole systemd tree under DIR, and it resolves the
    venv's absolute ``python`` symlink inside DIR too). Warnings (unknown keys, bad
    values) still exit 0, hence the check that it printed nothing.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (apt-get install systemd)")
        pytest.skip("no systemd-analyze on this machine")
    text = unit.read_text()
    for path in ("/opt/edgefleet", "/etc/edgefleet", "/var/lib/edgefleet"):
        text = text.replace(path, f"{root}{path}")
    copy = tmp_path / "verify" / unit.name
    copy.parent.mkdir()
    copy.write_text(text)
    r = run([analyze, "verify", copy])
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    # The hardening, as systemd scores it: "OK" is below 4; this unit scores 1.7.
    r = run([analyze, "security", "--offline=yes", copy])
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout
    for directive in (
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/edgefleet",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "MemoryMax=",
        "User=edgefleet",
    ):
        assert re.search(rf"^{re.escape(directive)}", unit.read_text(), re.M), directive


# -------------------------------------------------------------------- refusals


def enroll_cmd(*args: Any) -> subprocess.CompletedProcess[str]:
    return run(
        [sys.executable, "-m", "edgefleet.agent", "enroll", *args, "--owner", ""],
        cwd=REPO,
        timeout=60,
    )


def test_spent_unknown_token_and_unreachable_fleet(tmp_path: Path, fleet: ServedFleet) -> None:
    config = tmp_path / "etc" / "agent.yaml"
    token = enrol_token(fleet, "store-7")
    r = enroll_cmd(
        "--fleet", fleet.url, "--token", token, "--config", config, "--data-dir", tmp_path / "data"
    )
    assert r.returncode == 0, r.stderr
    before = {p: p.read_bytes() for p in config.parent.rglob("*") if p.is_file()}

    r = enroll_cmd("--fleet", fleet.url, "--token", token, "--config", config)
    assert r.returncode == 1
    assert "the fleet refused the token: enrolment token already used" in r.stderr
    assert "ask the fleet operator for a new one" in r.stderr and "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in config.parent.rglob("*") if p.is_file()} == before

    r = enroll_cmd("--fleet", fleet.url, "--token", "not-a-real-token", "--config", config)
    assert r.returncode == 1 and "unknown enrolment token" in r.stderr

    # The token from the environment (out of the process list), a closed port.
    r = run(
        [
            sys.executable,
            "-m",
            "edgefleet.agent",
            "enroll",
            "--fleet",
            f"http://127.0.0.1:{free_port()}",
            "--config",
            config,
            "--retries",
            "1",
        ],
        cwd=REPO,
        timeout=60,
        env={**os.environ, "EDGEFLEET_ENROL_TOKEN": "t" * 40},
    )
    assert r.returncode == 3 and "cannot reach the fleet" in r.stderr
    assert "retrying in 1 s" in r.stderr

    r = enroll_cmd("--fleet", fleet.url, "--config", config)
    assert r.returncode == 2 and "give the enrolment token" in r.stderr

    # A config that does not parse is refused before the token is spent.
    bad = tmp_path / "bad" / "agent.yaml"
    bad.parent.mkdir()
    bad.write_text("server: [1\n")
    token = enrol_token(fleet, "store-8")
    r = enroll_cmd("--fleet", fleet.url, "--token", token, "--config", bad)
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    bad.write_text("runtime:\n  executor_threds: 2\n")
    r = enroll_cmd(
        "--fleet", fleet.url, "--token", token, "--config", bad, "--data-dir", tmp_path / "data"
    )
    assert r.returncode == 2 and "the token is still good" in r.stderr
    assert "runtime.executor_threds (line 2)" in r.stderr
    bad.write_text("")
    r = enroll_cmd(
        "--fleet", fleet.url, "--token", token, "--config", bad, "--data-dir", tmp_path / "data"
    )
    assert r.returncode == 0, r.stderr  # the token still worked


# --------------------------------------------------------------- https fleet, CA


def make_ca_and_server_cert(d: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for 127.0.0.1 signed by it."""
    f = make_tls(d)
    return f.ca, f.cert, f.key


class HttpsFleet(ServedFleet):
    """``edge-fleet serve`` with HTTPS (its readiness probe trusts ``ca``)."""

    def __init__(self, workdir: Path, port: int, args: list[str], ca: Path) -> None:
        self.ca = ca
        super().__init__(workdir, port, args)

    def _wait_ready(self, timeout: float = 60.0) -> None:
        self.url = self.url.replace("http://", "https://")
        ctx = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fleet exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/health", timeout=1, context=ctx) as r:
                    if json.load(r).get("mqtt") == "connected":
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fleet not ready: {self.log_path.read_text()[-3000:]}")


def test_https_fleet_needs_its_ca_and_the_broker_ca_is_written(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    admin = "a" * 32
    fleet_yaml = tmp_path / "fleet.yaml"
    fleet_yaml.write_text(
        yaml.safe_dump(
            {
                "data_dir": "fleet-data",
                "http": {"tls_cert_file": str(cert), "tls_key_file": str(key)},
                "auth": {"token": admin},
                "trust": {"public_keys": [str(keys[1])]},
                "embedded_broker": {"port": 0},
                # What devices are told: TLS on the broker, with this CA (here the same CA).
                "enrolment": {"mqtt_tls": True, "ca_file": str(ca)},
            }
        )
    )
    fleet = HttpsFleet(tmp_path, free_port(), ["--config", str(fleet_yaml)], ca)
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        req = urllib.request.Request(
            fleet.url + "/v1/enrolment-tokens",
            data=b'{"device_id": "store-tls"}',
            headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=ctx) as resp:
            token = json.load(resp)["token"]
        config = tmp_path / "etc" / "agent.yaml"

        # Without the CA: a clear TLS error, and the token is not spent.
        r = enroll_cmd(
            "--fleet",
            fleet.url,
            "--token",
            token,
            "--config",
            config,
            "--data-dir",
            tmp_path / "data",
        )
        assert r.returncode == 3, r.stderr
        assert "TLS certificate is not trusted" in r.stderr and "--ca-file" in r.stderr

        r = enroll_cmd(
            "--fleet",
            fleet.url,
            "--token",
            token,
            "--config",
            config,
            "--ca-file",
            ca,
            "--data-dir",
            tmp_path / "data",
        )
        assert r.returncode == 0, r.stderr
        written = config.parent / "fleet-ca.pem"
        assert written.read_text().strip() == ca.read_text().strip()
        cfg = load_config(config)
        assert cfg.fleet is not None and cfg.fleet.tls is not None
        assert cfg.fleet.tls.ca_file == written
        # Bundle URLs are on the same https fleet: downloads trust its CA as well.
        http_ca = config.parent / "fleet-http-ca.pem"
        assert cfg.fleet.sync.ca_file == http_ca
        assert http_ca.read_bytes() == ca.read_bytes()
    finally:
        fleet.stop()


# ------------------------------------------------------- config merge, answer checks


ANSWER: dict[str, Any] = {
    "device_id": "store-1",
    "mqtt": {
        "host": "mqtt.example",
        "port": 8883,
        "tls": True,
        "username": "store-1",
        "password": "s3cret-never-shown",
    },
    "trusted_keys": [],
    "fleet_url": "https://fleet.example:8480",
}


def test_merge_keeps_the_operators_config(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "etc" / "agent.yaml", tmp_path / "data")
    own_key = "/etc/keys/release.pub"
    text = (
        "# top note\n"
        "device_id: old-id   # inline\n"
        "runtime:\n  executor_threads: 2   # keep me\n"
        "fleet:\n  host: old\n  password: inline-secret\n  client_id: old-id\n"
        "  tls:\n    ca_file: /etc/ssl/own-ca.pem\n"
        f"trust:\n  public_keys:\n  - {layout.keys_dir}/fleet-3.pub\n  - {own_key}\n"
        "  allow_unsigned: false\n"
        "models:\n- bundle: /srv/a.bundle\n  labels: [stable]\n"
        "store:\n  path: /srv/models\n"
        "server: {port: 9000}\n"
        "# tail note\n"
    )
    key_files = [layout.key_file(1)]
    out = merge_config(
        text,
        parse_enrolment(ANSWER),
        layout,
        key_files=key_files,
        ca_file=None,
        set_data_paths=False,
    )
    doc = yaml.safe_load(out)
    assert doc["device_id"] == "store-1"
    assert doc["runtime"] == {"executor_threads": 2} and "# keep me" in out
    assert "# top note" in out and "# tail note" in out
    assert doc["models"] == [{"bundle": "/srv/a.bundle", "labels": ["stable"]}]
    assert doc["server"] == {"port": 9000}
    assert doc["store"] == {"path": "/srv/models"}  # no --data-dir: kept
    assert doc["trust"]["public_keys"] == [str(layout.key_file(1)), own_key]
    fleet = doc["fleet"]
    assert "password" not in fleet and "client_id" not in fleet
    assert fleet["tls"] == {"ca_file": "/etc/ssl/own-ca.pem"}  # the operator's CA stays
    assert fleet["host"] == "mqtt.example" and fleet["port"] == 8883
    assert "inline-secret" not in out and "s3cret" not in out

    # --data-dir moves the paths; no TLS drops the tls section.
    plain = {**ANSWER, "mqtt": {**ANSWER["mqtt"], "tls": False}}
    out = merge_config(
        text, parse_enrolment(plain), layout, key_files=[], ca_file=None, set_data_paths=True
    )
    doc = yaml.safe_load(out)
    assert doc["store"]["path"] == str(tmp_path / "data" / "models")
    assert "tls" not in doc["fleet"] and doc["trust"]["public_keys"] == [own_key]

    # A flow-style top level is re-dumped whole, values kept.
    out = merge_config(
        "{server: {port: 9000}, models: []}",
        parse_enrolment(ANSWER),
        layout,
        key_files=[],
        ca_file=None,
        set_data_paths=False,
    )
    assert yaml.safe_load(out)["server"] == {"port": 9000}


@pytest.mark.parametrize(
    "text",
    [
        "a:\n  b:\nc: 1  # keep\n",  # an empty value
        "# c\ndevice_id:\n# note\nserver:\n  port: 1\n",
        "x: |\n  literal\n  text\n# after\nfleet:\n  host: h\n",  # a block scalar
        "fleet: {host: h}\ny: [1,\n  2]\n# end",  # flow values, no final newline
        "---\nfleet:\n  host: h\n...\n",  # document markers
        "# only comments\n",
        "",
    ],
)
def test_replace_top_level_keeps_the_rest(text: str) -> None:
    out = replace_top_level(text, {"device_id": "d", "fleet": {"host": "new"}})
    doc = yaml.safe_load(out)
    assert doc["device_id"] == "d" and doc["fleet"] == {"host": "new"}
    before = yaml.safe_load(text) or {}
    assert {k: v for k, v in doc.items() if k not in ("device_id", "fleet")} == {
        k: v for k, v in before.items() if k not in ("device_id", "fleet")
    }
    for comment in re.findall(r"#.*", text):
        assert comment in out


def test_bad_answers_are_refused_without_showing_the_secret() -> None:
    def refused(doc: dict[str, Any], match: str) -> None:
        with pytest.raises(EnrolError, match=match) as exc:
            parse_enrolment(doc)
        assert "s3cret" not in str(exc.value)

    refused({**ANSWER, "device_id": "a/b"}, "device_id")
    refused({**ANSWER, "mqtt": {**ANSWER["mqtt"], "port": "1883"}}, "mqtt.port")
    refused({**ANSWER, "mqtt": {**ANSWER["mqtt"], "password": ""}}, "mqtt.password")
    refused({**ANSWER, "mqtt": {**ANSWER["mqtt"], "ca_cert": "s3cret"}}, "ca_cert")
    refused({**ANSWER, "trusted_keys": ["s3cret"]}, r"trusted_keys\[0\]")
    e = parse_enrolment(ANSWER)
    assert isinstance(e, Enrolment) and "s3cret" not in repr(e)

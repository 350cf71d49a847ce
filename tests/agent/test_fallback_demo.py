"""``edge-agent demo`` tells the cloud-fallback story with the real sample models:
a confident digit answered locally, an ambiguous one by the cloud, then the cloud
stopped and the same digit answered locally with the reason."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.brokers import free_port

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_demo_falls_back_to_the_cloud_and_survives_losing_it(tmp_path):
    build = tmp_path / "build"
    run("-m", "models", "--out", str(build), "--only", "digits", "-q")
    # The recipe wires the edge to the cloud endpoint with a private dev token.
    token = build / "keys" / "cloud.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    edge = yaml.safe_load((build / "agent.yaml").read_text())
    cloud = yaml.safe_load((build / "cloud.yaml").read_text())
    assert edge["fallback"]["cloud"] == {
        "url": "http://127.0.0.1:8490",
        "token_file": "keys/cloud.token",
        "timeout_ms": 300,
    }
    assert cloud["profile"] == "cloud" and cloud["server"]["auth_token_file"] == "keys/cloud.token"
    ambiguous = list((build / "demo" / "digits-edge").glob("ambiguous-*.png"))
    assert len(ambiguous) == 1
    truth = re.match(r"ambiguous-(\d)-test\d+\.png", ambiguous[0].name)[1]

    out = run(
        "-m",
        "agent",
        "demo",
        "--config",
        str(build / "agent.yaml"),
        "--exit",
        "--port",
        str(free_port()),
        "--cloud-port",
        str(free_port()),
        "--images",
        str(build / "demo"),
    )
    assert "cloud endpoint (profile cloud) ready at http://127.0.0.1:" in out
    story = out.split("\nCloud fallback: digits-edge asks digits-cloud")[1]
    before, after = story.split("(cloud endpoint stopped)")
    confident = re.search(
        r"digit-(\d)-test\d+\.png\s+-> digits-edge:1 \(edge, [\d.]+ ms\): "
        r"(\d) ([\d.]+)",
        before,
    )
    assert confident and confident[1] == confident[2] and float(confident[3]) >= 0.9, out
    name = re.escape(ambiguous[0].name)
    by_cloud = re.search(
        name + r"\s+-> digits-edge:1 \(cloud digits-cloud:1, [\d.]+ ms; "
        r"edge said (\d) ([\d.]+)\): (\d) ",
        before,
    )
    assert by_cloud, out
    assert float(by_cloud[2]) < 0.9 and by_cloud[3] == truth  # unsure edge, right cloud
    local = re.search(
        name + r"\s+-> digits-edge:1 \(edge, fallback (offline|circuit_open), "
        r"[\d.]+ ms\): (\d) ([\d.]+)",
        after,
    )
    assert local, out
    assert local[2] == by_cloud[1]  # the edge's own answer, as it said before

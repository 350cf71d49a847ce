"""The README's demo and the edge-agent CLI, end to end: real sample bundles built by
``python -m models``, a real agent process, real images."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.agent_process import AgentProcess
from tests.support.brokers import free_port

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, check=check, timeout=300
    )


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    run("-m", "models", "--out", str(out), "-q")
    return out


def test_build_writes_bundles_config_and_demo_images(build):
    names = sorted(p.name for p in build.glob("*.bundle"))
    assert names == [
        "digits-cloud-1.bundle",
        "digits-edge-1.bundle",
        "digits-edge-litert-1.bundle",
        "face-detect-1.bundle",
    ]
    assert [p.name for p in (build / "fleet").glob("*.bundle")] == ["digits-edge-2.bundle"]
    assert "fleet/" not in (build / "agent.yaml").read_text()  # an update, not a bootstrap
    assert (build / "keys" / "signing.key").stat().st_mode & 0o077 == 0
    assert (build / "demo" / "face-detect" / "astronaut.png").is_file()
    # --if-missing does nothing on an up-to-date build.
    before = (build / "digits-edge-1.bundle").stat().st_mtime_ns
    run("-m", "models", "--out", str(build), "--if-missing", "-q")
    assert (build / "digits-edge-1.bundle").stat().st_mtime_ns == before


def test_fleet_demo_rolls_the_bad_version_back_and_promotes_version_2(build, tmp_path):
    """``make demo``'s first step, as the console script runs it: from another
    directory, so only installed packages can be imported. Four real agents on the
    embedded broker with a real cloud endpoint: the ~20-points-worse version is rolled
    back by a failed gate in its canary wave, version 2 passes its shadow stage and
    gated waves and gets the ``stable`` label, and no app request fails."""
    script = Path(sys.executable).parent / "edge-demo"
    r = subprocess.run(
        [str(script), "--build", str(build)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    bad, good = r.stdout.split("\n1) ", 1)[1].split("\n2) ", 1)
    assert "roll out digits-edge worse-20" in bad
    assert re.search(r"wave 1: gate fail: ", bad), bad
    assert re.search(r"rollout rolled_back: gate '.+' failed in wave 1: .+; rolled back", bad)
    assert "wave 2" not in bad  # stopped at the canary: the other stores never served it
    assert re.search(r"shadow stage: store-\d+ runs 2 beside version 1", good)
    assert re.search(r"shadow stage: gate pass: shadow_agreement", good)
    assert re.search(r"wave 2: gate pass: ", good)
    assert "rollout completed" in good
    assert "fleet label stable -> digits-edge 2" in good
    assert re.search(r"failed requests: 0$", r.stdout, re.M)
    assert re.search(
        r"\d+ answered by version 1, \d+ answered by version 2,"
        r" \d+ answered by version worse-20",
        r.stdout,
    )


def test_demo_answers_every_image_correctly(build):
    proc = run(
        "-m",
        "edgefleet.agent",
        "demo",
        "--config",
        str(build / "agent.yaml"),
        "--exit",
        "--port",
        str(free_port()),
        "--images",
        str(build / "demo"),
    )
    # The sample images; the cloud-fallback story after them has its own test
    # (tests/test_fallback_demo.py).
    out = proc.stdout.split("\nCloud fallback")[0]
    assert "self-test passed" in out
    digits = re.findall(
        r"digit-(\d)-test\d+\.png\s+-> (digits-edge(?:-litert)?):1 \(edge, "
        r"[\d.]+ ms\): (\d) ([\d.]+)",
        out,
    )
    assert len(digits) == 12, out
    for truth, _model, top, _conf in digits:
        assert truth == top, out
    face = re.search(
        r"astronaut\.png\s+-> face-detect:1 \(edge, [\d.]+ ms\): 1 detection\(s\) "
        r"face (0\.\d+) at \[(\d+), (\d+), (\d+), (\d+)\]",
        out,
    )
    assert face, out
    score, x1, y1, x2, y2 = float(face[1]), *map(int, face.groups()[1:])
    assert score > 0.8
    assert 150 < x1 < x2 < 300 and 50 < y1 < y2 < 220


@pytest.fixture(scope="module")
def agent(build, tmp_path_factory):
    work = tmp_path_factory.mktemp("cli-agent")
    # The generated config, with its relative paths made absolute and a fresh store.
    doc = yaml.safe_load((build / "agent.yaml").read_text())
    doc["store"]["path"] = str(work / "store")
    doc["trust"]["public_keys"] = [str(build / k) for k in doc["trust"]["public_keys"]]
    for m in doc["models"]:
        m["bundle"] = str(build / m["bundle"])
    proc = AgentProcess(doc, work, free_port())
    yield proc
    proc.stop()


def test_cli_predict_and_models(agent, build):
    url = ["--url", agent.base]
    out = run(
        "-m",
        "edgefleet.agent",
        "predict",
        str(build / "demo" / "face-detect" / "astronaut.png"),
        "--model",
        "face-detect",
        "--json",
        *url,
    ).stdout
    answer = json.loads(out)
    assert answer["model"] == "face-detect" and answer["source"] == "edge"
    assert len(answer["detections"]) == 1
    assert len(answer["detections"][0]["keypoints"]) == 6

    digit = next((build / "demo" / "digits-edge").glob("digit-3-*.png"))
    out = run(
        "-m",
        "edgefleet.agent",
        "predict",
        str(digit),
        "--model",
        "digits-edge",
        "--version",
        "stable",
        *url,
    ).stdout
    assert re.match(r"digits-edge:1 \(edge, [\d.]+ ms\): 3 ", out), out

    table = run("-m", "edgefleet.agent", "models", *url).stdout
    assert re.search(
        r"digits-edge\s+1\s+active\s+stable\s+onnx\s+CPUExecutionProvider\s+passed", table
    ), table
    assert re.search(r"face-detect\s+1\s+active\s+stable\s+litert\s+XNNPACK", table), table


def test_cli_reports_errors_plainly(agent, build, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    proc = run(
        "-m",
        "edgefleet.agent",
        "predict",
        str(junk),
        "--model",
        "digits-edge",
        "--url",
        agent.base,
        check=False,
    )
    assert proc.returncode != 0
    assert "agent answered 400: body is not a JPEG or PNG image" in proc.stderr
    proc = run(
        "-m", "edgefleet.agent", "models", "--url", f"http://127.0.0.1:{free_port()}", check=False
    )
    assert proc.returncode != 0 and "cannot reach the agent" in proc.stderr

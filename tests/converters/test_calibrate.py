"""``edge-convert calibrate``: the threshold table, the choice, the new signed bundle,
and the agent taking the calibrated threshold from it. Real digits models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgefleet.agent.cloud.config import FallbackConfig
from edgefleet.agent.cloud.policy import resolve_policy
from edgefleet.converters.bundletools import verify_bundle
from edgefleet.converters.calibrate import CalibrationError, Point, choose, curve
from edgefleet.converters.cli import EXIT_ERROR, EXIT_OK, main
from tests.support.agent_process import AgentProcess
from tests.support.brokers import free_port


def test_curve_counts_shares_and_joint_accuracy_exactly():
    conf = np.array([0.9, 0.3, 0.6, 0.6, 0.95])
    y = np.array([0, 1, 2, 3, 4])
    edge = np.array([0, 9, 2, 9, 4])  # wrong on items 1 and 3
    cloud = np.array([0, 1, 9, 3, 9])  # right on 1 and 3, wrong on 2 and 4
    pts = curve(conf, edge, cloud, y)
    # Cuts between distinct confidences (0.3 | 0.6 0.6 | 0.9 | 0.95), then everything.
    assert [round(p.threshold, 4) for p in pts] == [0.0, 0.45, 0.75, 0.925, 0.95]
    assert [p.cloud_items for p in pts] == [0, 1, 3, 4, 5]
    assert [p.joint_accuracy for p in pts] == [0.6, 0.8, 0.8, 0.8, 0.6]
    assert choose(pts, max_share=0.7).threshold == pytest.approx(0.75)  # best, using the budget
    assert choose(pts, max_share=0.1).cloud_items == 0
    assert choose(pts, min_accuracy=0.8).cloud_items == 1  # the cheapest reaching it
    with pytest.raises(CalibrationError, match="the best is 0.8000"):
        choose(pts, min_accuracy=0.9)
    with pytest.raises(CalibrationError, match="exactly one target"):
        choose(pts)
    assert isinstance(pts[0], Point)


def test_calibrate_writes_a_new_signed_bundle_the_agent_follows(digits, tmp_path, capsys):
    ctx, build = digits.ctx, digits.build
    out = tmp_path / "digits-edge-2.bundle"
    rc = main(
        [
            "calibrate",
            str(build.edge.out),
            "--eval",
            str(build.test_set),
            "--cloud-bundle",
            str(build.cloud.out),
            "--target-share",
            "0.15",
            "--key",
            str(ctx.private_key_path),
            "-o",
            str(out),
        ]
    )
    assert rc == EXIT_OK
    table = capsys.readouterr().out
    assert "edge alone 0.9822, cloud alone 0.9933" in table
    assert "<- bundle now" in table and "<- chosen" in table
    chosen = next(line for line in table.splitlines() if "chosen" in line).split()
    threshold, share, accuracy = float(chosen[0]), float(chosen[1].rstrip("%")), float(chosen[2])
    # The goal on the held-out split: within 0.5 points of the cloud, <= 15 % sent.
    assert share <= 15.0 and accuracy >= 0.9933 - 0.005

    result = verify_bundle(out, [ctx.public_key_path], self_test=True)
    m = result.manifest
    assert (m.name, m.version) == ("digits-edge", "2")
    assert m.fallback.threshold == pytest.approx(threshold, abs=1e-4)
    assert m.fallback.cloud_model == "digits-cloud"
    assert m.metrics["calibration_target"] == "cloud_share<=0.15"
    assert m.metrics["calibration_samples"] == 450
    assert m.metrics["calibrated_from_version"] == "1"
    assert m.metrics["accuracy_int8"] == build.edge.metrics["accuracy_int8"]  # kept
    # The agent takes the bundle's calibrated default unless its config overrides it.
    policy = resolve_policy(m, FallbackConfig(), cloud_configured=True)
    assert policy.threshold == m.fallback.threshold and policy.active
    override = FallbackConfig.model_validate({"models": {"digits-edge": {"threshold": 0.5}}})
    assert resolve_policy(m, override, cloud_configured=True).threshold == 0.5


def test_cloud_predictions_from_a_file_or_a_live_endpoint(digits, tmp_path, capsys):
    ctx, build = digits.ctx, digits.build
    data = np.load(build.test_set)
    from edgefleet.converters.evaluate import open_model
    from models.digits import CLOUD_SPEC, INPUT, SCORES

    with open_model(build.cloud_onnx, {**CLOUD_SPEC, "version": "1"}) as backend:
        probs = backend.infer({INPUT: data["x"]})[SCORES]
    preds = tmp_path / "cloud.npz"
    np.savez(preds, y_pred=probs.argmax(axis=1))
    args = [
        "calibrate",
        str(build.edge.out),
        "--eval",
        str(build.test_set),
        "--pubkey",
        str(ctx.public_key_path),
        "--target-accuracy",
        "0.99",
        "--json",
    ]
    assert main([*args, "--cloud-predictions", str(preds)]) == EXIT_OK
    from_file = json.loads(capsys.readouterr().out)
    assert from_file["cloud_accuracy"] == pytest.approx(0.9933, abs=1e-4)
    assert from_file["chosen"]["joint_accuracy"] >= 0.99
    assert len(from_file["curve"]) > 20

    # The same answers from a real cloud-profile agent over OIP.
    token = tmp_path / "cloud.token"
    token.write_text("calibration-token")
    config = {
        "profile": "cloud",
        "server": {"host": "127.0.0.1", "auth_token_file": str(token)},
        "store": {"path": str(tmp_path / "store")},
        "trust": {"public_keys": [str(ctx.public_key_path)]},
        "models": [{"bundle": str(build.cloud.out)}],
    }
    agent = AgentProcess(config, tmp_path, free_port())
    try:
        assert main([*args, "--cloud-url", agent.base, "--cloud-token-file", str(token)]) == 0
    finally:
        agent.stop()
    live = json.loads(capsys.readouterr().out)
    assert live["chosen"] == from_file["chosen"]


def test_calibrate_errors_are_plain(digits, tmp_path, capsys):
    build = digits.build
    base = [
        "calibrate",
        str(build.edge.out),
        "--eval",
        str(build.test_set),
        "--cloud-bundle",
        str(build.cloud.out),
    ]
    assert main([*base, "-o", str(tmp_path / "x.bundle")]) == EXIT_ERROR
    assert "needs --key" in capsys.readouterr().err
    assert main(base) == EXIT_ERROR  # no key to verify with
    assert "--pubkey" in capsys.readouterr().err
    wrong = tmp_path / "short.npz"
    np.savez(wrong, y_pred=np.zeros(3, np.int64))
    assert (
        main(
            [
                "calibrate",
                str(build.edge.out),
                "--eval",
                str(build.test_set),
                "--cloud-predictions",
                str(wrong),
                "--pubkey",
                str(digits.ctx.public_key_path),
            ]
        )
        == EXIT_ERROR
    )
    assert "3 predictions for 450 items" in capsys.readouterr().err

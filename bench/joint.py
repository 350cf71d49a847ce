"""``python -m bench joint``: what the cloud fallback buys, and what it costs when the cloud hangs.

On the digits held-out split (450 images, the split the recipe's gate uses):

1. ``edge-convert calibrate``'s code picks the fallback threshold for a target cloud
   share (15 %) from the edge model's confidences and the cloud model's answers,
   and writes it into a new signed digits-edge bundle version.
2. A real cloud-profile agent (``digits-cloud``, token required) and a real edge
   agent (the calibrated bundle, fallback to that cloud) run as processes. Every
   held-out digit is sent as an OIP JSON request three ways: to the edge with the
   cloud disabled for the request (edge only), straight to the cloud (cloud only),
   and to the edge as a local app would (joint). Accuracy, the share of requests the
   cloud answered, and latency percentiles come from those answers.
3. The same edge agent config is pointed at a cloud that hangs (a socket that
   listens and never answers), with the breaker off so that *every* unsure request
   waits out the timeout: the callers' p99 must stay under the timeout plus 5 ms.
   A second run with the default breaker shows the realistic case.

The threshold is calibrated on the same split it is measured on (as a data
scientist with one validation set would); a 2-fold cross-fit (calibrate on one
half, measure on the other) is reported beside it as the honest generalisation
estimate.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.common import (
    AgentProcess,
    CpuMeter,
    KeepAliveClient,
    Stats,
    add_run_options,
    ensure_models,
    machine_info,
    machine_markdown,
    no_gc,
    wait_until_quiet,
    warn_if_busy,
    write_doc_section,
    write_result,
)
from edgefleet.converters import calibrate as cal
from edgefleet.converters.evaluate import EvalSet
from edgefleet.core.bundle.signing import load_private_key

NAME = "joint"
EDGE, CLOUD = "digits-edge", "digits-cloud"
INPUT, SCORES = "pixels", "probabilities"
TOKEN = "bench-joint-token"
TARGET_SHARE = 0.15
GOAL_POINTS = 0.5  # joint accuracy within this many points of cloud-only
GOAL_HANG_MARGIN_MS = 5.0
# Other work above this share of the box's CPU makes the latencies pessimistic: say so.


# ---- requests ---------------------------------------------------------------------------------


def body_for(x: np.ndarray, *, cloud: bool = True) -> bytes:
    doc: dict[str, Any] = {
        "inputs": [
            {
                "name": INPUT,
                "shape": [1, x.size],
                "datatype": "FP32",
                "data": x.reshape(-1).tolist(),
            }
        ]
    }
    if not cloud:
        doc["parameters"] = {"cloud": False}
    return orjson.dumps(doc)


def run_requests(
    port: int,
    model: str,
    xs: np.ndarray,
    *,
    cloud: bool = True,
    token: str | None = None,
    rounds: int = 1,
    warmup: int = 20,
) -> tuple[list[int], list[dict[str, Any]]]:
    """Send every row of ``xs`` (``rounds`` times) sequentially on one keep-alive
    connection; return every latency in ns and the answers of the last round."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    path = f"/v2/models/{model}/infer"
    with KeepAliveClient("127.0.0.1", port, timeout=60) as client:
        prepared = [client.prepare("POST", path, body_for(x, cloud=cloud), headers) for x in xs]
        for req in prepared[:warmup]:
            client.roundtrip(req)
        latencies: list[int] = []
        answers: list[dict[str, Any]] = []
        clock = time.perf_counter_ns
        with no_gc():
            for r in range(rounds):
                bodies = []
                for req in prepared:
                    t0 = clock()
                    status, _, body = client.roundtrip(req)
                    latencies.append(clock() - t0)
                    if status != 200:
                        raise RuntimeError(f"{model}: HTTP {status}: {body[:300]!r}")
                    if r == rounds - 1:
                        bodies.append(body)
        answers = [orjson.loads(b) for b in bodies]
    return latencies, answers


def predicted(answers: list[dict[str, Any]]) -> np.ndarray:
    out = []
    for doc in answers:
        scores = next(o for o in doc["outputs"] if o["name"] == SCORES)
        out.append(int(np.argmax(scores["data"])))
    return np.asarray(out)


def stats_ms(ns: list[int]) -> dict[str, float] | None:
    if not ns:
        return None
    s = Stats.from_ns(ns)
    p95 = float(np.percentile(np.asarray(ns) / 1e6, 95))
    return {
        "n": s.n,
        "p50_ms": s.p50_ms,
        "p95_ms": round(p95, 3),
        "p99_ms": s.p99_ms,
        "max_ms": s.max_ms,
    }


# ---- agents ------------------------------------------------------------------------------------


def cloud_agent(work: Path, build: Path) -> AgentProcess:
    return AgentProcess(
        {
            "profile": "cloud",
            "server": {"host": "127.0.0.1", "auth_token": TOKEN},
            "store": {"path": str(work / "cloud-store")},
            "trust": {"public_keys": [str(build / "keys" / "signing.pub")]},
            "models": [{"bundle": str(build / f"{CLOUD}-1.bundle")}],
        },
        work,
        "cloud",
    )


def edge_agent(
    work: Path,
    build: Path,
    bundle: Path,
    url: str,
    timeout_ms: int,
    name: str,
    breaker_failures: int = 3,
) -> AgentProcess:
    return AgentProcess(
        {
            "server": {"host": "127.0.0.1"},
            "store": {"path": str(work / f"{name}-store")},
            "trust": {"public_keys": [str(build / "keys" / "signing.pub")]},
            "models": [{"bundle": str(bundle)}],
            "fallback": {
                "cloud": {"url": url, "token": TOKEN, "timeout_ms": timeout_ms},
                "breaker": {"failures": breaker_failures},
                "hard_examples": {"path": str(work / f"{name}-hard.sqlite")},
            },
        },
        work,
        name,
    )


class HangingCloud:
    """A socket that listens and never accepts: the kernel completes the handshake,
    takes the request into its buffers, and no answer ever comes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


# ---- calibration -----------------------------------------------------------------------------


def two_fold(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stratified split in halves (indices)."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        a.extend(idx[::2])
        b.extend(idx[1::2])
    return np.sort(np.asarray(a)), np.sort(np.asarray(b))


def cross_fit(
    conf: np.ndarray, edge: np.ndarray, cloud: np.ndarray, y: np.ndarray
) -> dict[str, Any]:
    """Threshold chosen on one half, measured on the other; both ways, pooled."""
    sent = correct = 0
    thresholds = []
    for fit, test in (two_fold(y), two_fold(y)[::-1]):
        chosen = cal.choose(
            cal.curve(conf[fit], edge[fit], cloud[fit], y[fit]), max_share=TARGET_SHARE
        )
        thresholds.append(round(chosen.threshold, 4))
        to_cloud = conf[test] < chosen.threshold
        sent += int(to_cloud.sum())
        correct += int(np.where(to_cloud, cloud[test] == y[test], edge[test] == y[test]).sum())
    return {
        "thresholds": thresholds,
        "cloud_share": round(sent / len(y), 4),
        "joint_accuracy": round(correct / len(y), 4),
    }


def calibrate_bundle(build: Path, work: Path, data: EvalSet) -> dict[str, Any]:
    key = load_private_key(build / "keys" / "signing.key")
    trust = cal.trust_for([build / "keys" / "signing.pub"], key)
    edge = cal.open_bundle(build / f"{EDGE}-1.bundle", trust, work / "edge-1")
    cloud = cal.open_bundle(build / f"{CLOUD}-1.bundle", trust, work / "cloud-1")
    cloud_pred = cal.class_probabilities(cloud, data).argmax(axis=1)
    result = cal.calibrate(edge, data, cloud_pred)
    chosen = cal.choose(result.curve, max_share=TARGET_SHARE)
    out = work / f"{EDGE}-calibrated.bundle"
    m = cal.write_calibrated(edge, out, result, chosen, f"cloud_share<={TARGET_SHARE}", key)
    probs = cal.class_probabilities(edge, data)
    conf = cal.confidences(probs, result.rule)
    return {
        "bundle": out,
        "version": m.version,
        "calibration": result,
        "chosen": chosen,
        "cross_fit": cross_fit(conf, probs.argmax(axis=1), cloud_pred, data.labels),
    }


# ---- the run ------------------------------------------------------------------------------------


def run(timeout_ms: int, rounds: int) -> dict[str, Any]:
    build = ensure_models([f"{EDGE}-*.bundle", f"{CLOUD}-*.bundle"])
    with np.load(build / "digits-test.npz", allow_pickle=False) as f:
        x, y = f["x"].astype(np.float32), f["y"].astype(np.int64)
    data = EvalSet({INPUT: x}, y)
    meter = CpuMeter()
    with tempfile.TemporaryDirectory(prefix="bench-joint-") as tmp:
        work = Path(tmp)
        calibrated = calibrate_bundle(build, work, data)
        threshold = calibrated["chosen"].threshold
        cloud = cloud_agent(work, build)
        cloud.start()
        try:
            edge = edge_agent(
                work,
                build,
                calibrated["bundle"],
                f"http://127.0.0.1:{cloud.port}",
                timeout_ms,
                "edge",
            )
            edge.start()
            try:
                lat_edge, ans_edge = run_requests(edge.port, EDGE, x, cloud=False, rounds=rounds)
                lat_cloud, ans_cloud = run_requests(
                    cloud.port, CLOUD, x, token=TOKEN, rounds=rounds
                )
                lat_joint, ans_joint = run_requests(edge.port, EDGE, x, rounds=rounds)
            finally:
                edge.stop()
        finally:
            cloud.stop()
        hang = HangingCloud()
        try:
            # Breaker off: every unsure request waits the full timeout (the worst case).
            stuck = edge_agent(
                work,
                build,
                calibrated["bundle"],
                f"http://127.0.0.1:{hang.port}",
                timeout_ms,
                "edge-hang",
                breaker_failures=1_000_000,
            )
            stuck.start()
            try:
                lat_hang, ans_hang = run_requests(stuck.port, EDGE, x, warmup=0)
            finally:
                stuck.stop()
            realistic = edge_agent(
                work,
                build,
                calibrated["bundle"],
                f"http://127.0.0.1:{hang.port}",
                timeout_ms,
                "edge-breaker",
            )
            realistic.start()
            try:
                lat_breaker, ans_breaker = run_requests(realistic.port, EDGE, x, warmup=0)
            finally:
                realistic.stop()
        finally:
            hang.close()
    load = meter.stop()
    n = len(y)
    sources = [a["parameters"]["source"] for a in ans_joint]
    per_round = len(x)
    last = lat_joint[-per_round:]
    by_cloud = [t for t, s in zip(last, sources, strict=True) if s == "cloud"]
    by_edge = [t for t, s in zip(last, sources, strict=True) if s == "edge"]
    hang_reasons: dict[str, int] = {}
    for a in ans_hang:
        reason = a["parameters"].get("fallback", "none")
        hang_reasons[reason] = hang_reasons.get(reason, 0) + 1
    breaker_reasons: dict[str, int] = {}
    for a in ans_breaker:
        reason = a["parameters"].get("fallback", "none")
        breaker_reasons[reason] = breaker_reasons.get(reason, 0) + 1
    waited = [
        t
        for t, a in zip(lat_hang, ans_hang, strict=True)
        if a["parameters"].get("fallback") == "cloud_timeout"
    ]
    edge_acc = float(np.mean(predicted(ans_edge) == y))
    cloud_acc = float(np.mean(predicted(ans_cloud) == y))
    joint_acc = float(np.mean(predicted(ans_joint) == y))
    hang_acc = float(np.mean(predicted(ans_hang) == y))
    p99_hang = Stats.from_ns(lat_hang).p99_ms
    result: Any = calibrated["calibration"]
    chosen: Any = calibrated["chosen"]
    doc: dict[str, Any] = {
        "edge_accuracy": round(edge_acc, 4),
        "cloud_accuracy": round(cloud_acc, 4),
        "joint_accuracy": round(joint_acc, 4),
        "cloud_share": round(sources.count("cloud") / n, 4),
        "threshold": threshold,
        "p99_ms_cloud_hanging": p99_hang,
        "timeout_ms": timeout_ms,
        "goals": {
            "joint_within_points_of_cloud": GOAL_POINTS,
            "max_cloud_share": TARGET_SHARE,
            "p99_ms_cloud_hanging_max": timeout_ms + GOAL_HANG_MARGIN_MS,
        },
        "details": {
            "samples": n,
            "rounds": rounds,
            "calibrated_bundle_version": calibrated["version"],
            "calibration_predicted": {
                "cloud_share": round(chosen.cloud_share, 4),
                "joint_accuracy": round(chosen.joint_accuracy, 4),
            },
            "calibration_table": [
                {
                    "threshold": round(p.threshold, 4),
                    "cloud_share": round(p.cloud_share, 4),
                    "joint_accuracy": round(p.joint_accuracy, 4),
                }
                for p in cal.summary(result, chosen)
            ],
            "cross_fit_2fold": calibrated["cross_fit"],
            "latency": {
                "edge_only": stats_ms(lat_edge),
                "cloud_only": stats_ms(lat_cloud),
                "joint_all": stats_ms(lat_joint),
                "joint_answered_by_edge": stats_ms(by_edge),
                "joint_answered_by_cloud": stats_ms(by_cloud),
                "cloud_hanging_no_breaker": stats_ms(lat_hang),
                "cloud_hanging_waited": stats_ms(waited),
                "cloud_hanging_with_breaker": stats_ms(lat_breaker),
            },
            "cloud_hanging": {
                "accuracy": round(hang_acc, 4),
                "reasons_no_breaker": hang_reasons,
                "reasons_with_breaker": breaker_reasons,
            },
            "machine": machine_info(),
            "box_load": load,
        },
    }
    doc["goals_met"] = {
        "joint_accuracy": (cloud_acc - joint_acc) * 100 <= GOAL_POINTS,
        "cloud_share": doc["cloud_share"] <= TARGET_SHARE,
        "p99_ms_cloud_hanging": p99_hang <= timeout_ms + GOAL_HANG_MARGIN_MS,
    }
    return doc


# ---- reporting ---------------------------------------------------------------------------


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _reasons(counts: dict[str, int]) -> str:
    names = {"none": "no fallback needed"}
    return ", ".join(f"{n} {names.get(k, k)}" for k, n in sorted(counts.items()))


def _lat_row(label: str, s: dict[str, float] | None) -> str:
    if s is None:
        return f"| {label} | 0 | - | - | - |"
    return f"| {label} | {s['n']} | {s['p50_ms']:.3f} | {s['p95_ms']:.3f} | {s['p99_ms']:.3f} |"


def render_markdown(doc: dict[str, Any]) -> str:
    d = doc["details"]
    lat = d["latency"]
    met = doc["goals_met"]
    t = doc["timeout_ms"]
    points = (doc["cloud_accuracy"] - doc["joint_accuracy"]) * 100
    cf = d["cross_fit_2fold"]
    lines = [
        "## Joint inference (`python -m bench joint`)",
        "",
        "What the cloud fallback buys on the digits held-out split (450 images): the",
        "int8 edge MLP alone, the fp32 cloud SVM alone, and the two together with the",
        "threshold `edge-convert calibrate` chose for at most 15 % of requests to the",
        "cloud (written into a new signed bundle, digits-edge"
        f" v{d['calibrated_bundle_version']}). Real agents as processes, OIP JSON",
        "requests one at a time on a keep-alive connection; the cloud is a cloud-profile",
        "agent on loopback, so cloud latency here is the model plus HTTP, without a WAN.",
        "",
        "| figure | measured | goal | met |",
        "|---|---|---|---|",
        f"| joint accuracy vs cloud only | {doc['joint_accuracy']:.4f} vs"
        f" {doc['cloud_accuracy']:.4f} ({points:+.2f} points) | within {GOAL_POINTS} points"
        f" | {_yes(met['joint_accuracy'])} |",
        f"| requests answered by the cloud | {doc['cloud_share']:.1%} | ≤ 15% |"
        f" {_yes(met['cloud_share'])} |",
        f"| p99 latency while the cloud hangs | {doc['p99_ms_cloud_hanging']:.1f} ms |"
        f" ≤ timeout + 5 = {t + GOAL_HANG_MARGIN_MS:.0f} ms | {_yes(met['p99_ms_cloud_hanging'])}"
        " |",
        "",
        "| mode | accuracy | to cloud | p50 ms | p95 ms |",
        "|---|---|---|---|---|",
        f"| edge only | {doc['edge_accuracy']:.4f} | 0 % | {lat['edge_only']['p50_ms']:.3f} |"
        f" {lat['edge_only']['p95_ms']:.3f} |",
        f"| cloud only | {doc['cloud_accuracy']:.4f} | 100 % | {lat['cloud_only']['p50_ms']:.3f}"
        f" | {lat['cloud_only']['p95_ms']:.3f} |",
        f"| joint, threshold {doc['threshold']:.4f} | {doc['joint_accuracy']:.4f} |"
        f" {doc['cloud_share']:.1%} | {lat['joint_all']['p50_ms']:.3f} |"
        f" {lat['joint_all']['p95_ms']:.3f} |",
        f"| joint, cloud hanging (timeout {t} ms) | {d['cloud_hanging']['accuracy']:.4f} |"
        f" 0 % | {lat['cloud_hanging_no_breaker']['p50_ms']:.3f} |"
        f" {lat['cloud_hanging_no_breaker']['p95_ms']:.3f} |",
        "",
        "Latency of every request (client side, ms):",
        "",
        "| requests | n | p50 | p95 | p99 |",
        "|---|---|---|---|---|",
        _lat_row("edge only", lat["edge_only"]),
        _lat_row("cloud only", lat["cloud_only"]),
        _lat_row("joint, all", lat["joint_all"]),
        _lat_row("joint, answered by the edge", lat["joint_answered_by_edge"]),
        _lat_row("joint, answered by the cloud", lat["joint_answered_by_cloud"]),
        _lat_row("cloud hanging, breaker off: all", lat["cloud_hanging_no_breaker"]),
        _lat_row("cloud hanging, breaker off: those that waited", lat["cloud_hanging_waited"]),
        _lat_row("cloud hanging, default breaker (3 failures)", lat["cloud_hanging_with_breaker"]),
        "",
        "Calibration (`edge-convert calibrate --target-share 0.15`), threshold → share sent"
        " → joint accuracy on the same 450 digits:",
        "",
        "| threshold | to cloud | joint accuracy |",
        "|---|---|---|",
        *(
            f"| {r['threshold']:.4f} | {r['cloud_share']:.1%} | {r['joint_accuracy']:.4f} |"
            for r in d["calibration_table"]
        ),
        "",
        f"The threshold is chosen on the split it is measured on. Cross-fitted (chosen on one"
        f" stratified half, measured on the other, both ways): joint accuracy"
        f" {cf['joint_accuracy']:.4f} with {cf['cloud_share']:.1%} sent (thresholds"
        f" {', '.join(str(x) for x in cf['thresholds'])}), the figure to expect on new data;"
        " 450 digits make one error 0.22 points.",
        "",
        "While the cloud hangs, the breaker-off run is the worst case (every unsure request"
        f" waits the full {t} ms: {_reasons(d['cloud_hanging']['reasons_no_breaker'])});"
        " with the default breaker three timeouts open the circuit and the rest are"
        f" answered at once ({_reasons(d['cloud_hanging']['reasons_with_breaker'])})."
        " Either way every request got the edge's answer, with its reason.",
        "",
        "### Machine and method",
        "",
        machine_markdown(d["machine"]),
        f"Other processes used {d['box_load']['others_share_of_box']:.0%} of the box's CPU"
        f" during the run ({d['box_load']['others_cpu_s']} CPU-s of"
        f" {d['box_load']['wall_s']} s wall).",
    ]
    return "\n".join(lines)


def summary(doc: dict[str, Any]) -> str:
    met = doc["goals_met"]
    return "\n".join(
        [
            f"{'ok  ' if met['joint_accuracy'] else 'MISS'} joint accuracy"
            f" {doc['joint_accuracy']:.4f}"
            f" (edge {doc['edge_accuracy']:.4f}, cloud {doc['cloud_accuracy']:.4f})",
            f"{'ok  ' if met['cloud_share'] else 'MISS'} cloud share {doc['cloud_share']:.1%}"
            f" at threshold {doc['threshold']:.4f}",
            f"{'ok  ' if met['p99_ms_cloud_hanging'] else 'MISS'} p99 while the cloud hangs"
            f" {doc['p99_ms_cloud_hanging']:.1f} ms (timeout {doc['timeout_ms']} ms)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench joint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--timeout-ms",
        type=int,
        default=300,
        help="the edge's cloud timeout (models/build/agent.yaml uses 300)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over the 450 digits for the latency figures"
    )
    add_run_options(parser)
    args = parser.parse_args(argv)
    wait_until_quiet(args.wait_quiet)
    doc = run(args.timeout_ms, args.rounds)
    others = doc["details"]["box_load"]["others_share_of_box"]
    warn_if_busy(others)
    path = write_result(NAME, doc)
    print(summary(doc))
    print(f"wrote {path}")
    if not args.no_doc:
        print(f"wrote {write_doc_section(NAME, render_markdown(doc))}")
    return 0 if all(doc["goals_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

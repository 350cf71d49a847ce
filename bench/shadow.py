"""``python -m bench shadow``: what a shadow candidate costs the answers it shadows.

The agent runs as its own process with digits-edge 1 active (the sample bundle) and
digits-edge 2 (``models/build/work/digits/digits-edge-2.int8.onnx``, bundled here and
signed with the sample key) installed. One client sends JSON OIP requests of one
held-out digit each at a steady rate (paced, not as fast as possible: a store's
camera or till does not wait for the previous answer to send the next). Rounds
alternate shadow off and shadow on (``PUT /v1/models/digits-edge/shadow``,
``sample_rate`` 1.0, the default CPU budget), so slow drifts of the box hit both.

Reported:

* ``shadow_p99_overhead``: active-answer p99 with the shadow on / with it off, over
  every request of the rounds (goal <= 1.10);
* ``extra_cpu_ms_per_compared_item``: the agent process's CPU time in the "on" rounds
  minus the "off" rounds, per item the shadow compared; beside it the shadow worker's
  own CPU per item (``edgefleet_shadow_cpu_seconds_total``, its budget's measure);
* how many items the shadow compared and dropped (queue full, over budget).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.common import (
    MODELS_BUILD,
    AgentProcess,
    CpuMeter,
    KeepAliveClient,
    Stats,
    add_run_options,
    ensure_models,
    machine_info,
    machine_markdown,
    process_cpu_s,
    wait_until_quiet,
    warn_if_busy,
    write_doc_section,
    write_result,
)
from edgefleet.converters.bundler import build_bundle
from edgefleet.core.bundle.signing import load_private_key

NAME = "shadow"
MODEL = "digits-edge"
CANDIDATE = "2"
_SERIES = re.compile(r"^(edgefleet_shadow_\w+)\{([^}]*)\} (\S+)$", re.MULTILINE)


def candidate_bundle(work: Path) -> Path:
    """digits-edge 2 (int8), same manifest as version 1 but its model and version."""
    with tarfile.open(MODELS_BUILD / "digits-edge-1.bundle") as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        manifest = json.load(member)
    for key in ("model_file", "files", "self_test", "created_at", "created_by"):
        manifest.pop(key, None)
    manifest["version"] = CANDIDATE
    with np.load(MODELS_BUILD / "digits-test.npz", allow_pickle=False) as data:
        x = data["X_test"][:8].astype(np.float32)
    out = work / f"{MODEL}-{CANDIDATE}.bundle"
    build_bundle(
        out=out,
        model_file=MODELS_BUILD / "work" / "digits" / "digits-edge-2.int8.onnx",
        manifest=manifest,
        test_inputs={"pixels": x},
        private_key=load_private_key(MODELS_BUILD / "keys" / "signing.key"),
        self_test={"atol": 1e-4},
    )
    return out


def shadow_series(client: KeepAliveClient) -> dict[str, float]:
    """The shadow's /metrics series for the model, summed by name and outcome."""
    status, _, body = client.roundtrip(client.prepare("GET", "/metrics"))
    assert status == 200
    out: dict[str, float] = {}
    for name, labels, value in _SERIES.findall(body.decode()):
        if f'model="{MODEL}"' not in labels:
            continue
        m = re.search(r'outcome="(\w+)"', labels)
        key = f"{name}:{m.group(1)}" if m else name
        out[key] = out.get(key, 0.0) + float(value)
    return out


def paced(client: KeepAliveClient, requests: list[bytes], rate: float, n: int) -> list[int]:
    """``n`` requests at ``rate`` per second (one client); each one's latency in ns,
    from the moment it was sent (a late start is not counted as latency)."""
    lat = [0] * n
    gap = 1.0 / rate
    start = time.perf_counter()
    for i in range(n):
        due = start + i * gap
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        t0 = time.perf_counter_ns()
        status, _, body = client.roundtrip(requests[i % len(requests)])
        lat[i] = time.perf_counter_ns() - t0
        if status != 200:
            raise RuntimeError(f"request {i} failed with {status}: {body[:300]!r}")
    return lat


def set_shadow(client: KeepAliveClient, on: bool) -> None:
    path = f"/v1/models/{MODEL}/shadow"
    if on:
        body = orjson.dumps({"version": CANDIDATE, "sample_rate": 1.0})
        req = client.prepare("PUT", path, body, {"Content-Type": "application/json"})
    else:
        req = client.prepare("DELETE", path)
    status, _, answer = client.roundtrip(req)
    if status != 200:
        raise RuntimeError(f"shadow {'on' if on else 'off'}: {status} {answer[:300]!r}")


def run(rate: float, seconds: float, rounds: int) -> dict[str, Any]:
    build = ensure_models([f"{MODEL}-*.bundle", "digits-test.npz"])
    meter = CpuMeter()  # stopped after the agent is (its CPU then counts as ours)
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp:
        work = Path(tmp)
        cand = candidate_bundle(work)
        config = {
            "server": {"host": "127.0.0.1", "port": 0},
            "store": {"path": str(work / "store")},
            "trust": {"public_keys": [str(build / "keys" / "signing.pub")]},
            "models": [{"bundle": str(build / f"{MODEL}-1.bundle")}],
            "logging": {"level": "WARNING"},
        }
        with np.load(build / "digits-test.npz", allow_pickle=False) as data:
            xs = data["X_test"].astype(np.float32)
        with AgentProcess(config, work) as agent:
            agent.start()
            client = agent.client()
            up = client.prepare(
                "POST",
                "/v1/bundles",
                cand.read_bytes(),
                {"Content-Type": "application/octet-stream"},
            )
            status, _, body = client.roundtrip(up)
            if status != 201:
                raise RuntimeError(f"candidate upload failed: {status} {body[:300]!r}")
            requests = [
                client.prepare(
                    "POST",
                    f"/v2/models/{MODEL}/infer",
                    orjson.dumps(
                        {
                            "inputs": [
                                {
                                    "name": "pixels",
                                    "shape": [1, 64],
                                    "datatype": "FP32",
                                    "data": row.tolist(),
                                }
                            ]
                        }
                    ),
                    {"Content-Type": "application/json"},
                )
                for row in xs
            ]
            n = int(rate * seconds)
            paced(client, requests, rate, min(n, 2000))  # warm-up, shadow off
            set_shadow(client, True)
            paced(client, requests, rate, min(n, 500))  # the shadow's own warm-up
            set_shadow(client, False)
            lat: dict[str, list[int]] = {"off": [], "on": []}
            cpu: dict[str, float] = {"off": 0.0, "on": 0.0}
            per_round: list[dict[str, Any]] = []
            before = shadow_series(client)
            for r in range(rounds):
                for mode in ("off", "on"):
                    set_shadow(client, mode == "on")
                    time.sleep(0.2)
                    c0 = process_cpu_s(agent.pid)
                    got = paced(client, requests, rate, n)
                    time.sleep(0.2)  # the shadow's last items settle
                    used = process_cpu_s(agent.pid) - c0
                    cpu[mode] += used
                    lat[mode] += got
                    per_round.append(
                        {
                            "round": r,
                            "shadow": mode,
                            "p99_ms": Stats.from_ns(got).p99_ms,
                            "cpu_s": round(used, 3),
                        }
                    )
            set_shadow(client, False)
            after = shadow_series(client)
            client.close()
    box = meter.stop()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    compared = delta.get("edgefleet_shadow_items_total:agreed", 0.0) + delta.get(
        "edgefleet_shadow_items_total:disagreed", 0.0
    )
    off, on = Stats.from_ns(lat["off"]), Stats.from_ns(lat["on"])
    return {
        "rate_per_s": rate,
        "seconds_per_round": seconds,
        "rounds": rounds,
        "requests_per_mode": len(lat["on"]),
        "off": off.__dict__,
        "on": on.__dict__,
        "shadow_p99_overhead": round(on.p99_ms / off.p99_ms, 3),
        "shadow_p50_overhead": round(on.p50_ms / off.p50_ms, 3),
        "compared": int(compared),
        "agreed": int(delta.get("edgefleet_shadow_items_total:agreed", 0.0)),
        "dropped": int(delta.get("edgefleet_shadow_items_total:dropped", 0.0)),
        "errors": int(delta.get("edgefleet_shadow_items_total:error", 0.0)),
        "extra_cpu_ms_per_compared_item": round((cpu["on"] - cpu["off"]) * 1000 / compared, 4)
        if compared
        else None,
        "shadow_worker_cpu_ms_per_compared_item": round(
            delta.get("edgefleet_shadow_cpu_seconds_total", 0.0) * 1000 / compared, 4
        )
        if compared
        else None,
        "agent_cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "box": box,
        "per_round": per_round,
        "round_p99_ratio_median": round(
            statistics.median(
                per_round[i + 1]["p99_ms"] / per_round[i]["p99_ms"]
                for i in range(0, len(per_round), 2)
            ),
            3,
        ),
    }


def render_markdown(doc: dict[str, Any]) -> str:
    off, on, box = doc["off"], doc["on"], doc["box"]
    pr = doc["per_round"]
    rounds = ", ".join(f"{pr[i + 1]['p99_ms'] / pr[i]['p99_ms']:.2f}" for i in range(0, len(pr), 2))
    return f"""## Shadow candidate overhead (`python -m bench shadow`)

{machine_markdown(doc["machine"])}

digits-edge 1 answers JSON OIP requests (one held-out digit each) from one client at a
steady {doc["rate_per_s"]:g} requests/s; digits-edge 2 (int8) runs in shadow on every
answer (`sample_rate` 1.0, default budget: {doc["cpu_budget"]} of a core over
{doc["budget_window_s"]:g} s, queue {doc["queue_size"]}). {doc["rounds"]} rounds of
{doc["seconds_per_round"]:g} s with the shadow off, then on;
{doc["requests_per_mode"]} requests per mode.

| | p50 ms | p90 ms | p99 ms |
|---|---|---|---|
| shadow off | {off["p50_ms"]:.3f} | {off["p90_ms"]:.3f} | {off["p99_ms"]:.3f} |
| shadow on | {on["p50_ms"]:.3f} | {on["p90_ms"]:.3f} | {on["p99_ms"]:.3f} |

- `shadow_p99_overhead` (p99 on / off over every request of the mode):
  **{doc["shadow_p99_overhead"]}** (goal <= 1.10); p50 ratio {doc["shadow_p50_overhead"]};
  per round (on / off of the same round): {rounds}, median
  {doc["round_p99_ratio_median"]}. Other work took {box["others_share_of_box"]:.0%} of
  the box during the run (its cores are shared): a single round's p99 (the ~20 slowest
  of 2,000 requests) moves by more than the shadow's share, which is why the ratio is
  taken over all rounds pooled, and why the per-round ratios are shown beside it.
- Items compared: {doc["compared"]} ({doc["agreed"]} agreed), dropped {doc["dropped"]},
  errors {doc["errors"]}.
- Extra agent CPU per compared item: {doc["extra_cpu_ms_per_compared_item"]} ms (process
  CPU, on rounds minus off rounds); the shadow worker's own measure:
  {doc["shadow_worker_cpu_ms_per_compared_item"]} ms per item.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench shadow", description=__doc__)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=4)
    add_run_options(parser)
    args = parser.parse_args(argv)
    quiet = wait_until_quiet(args.wait_quiet)
    from edgefleet.agent.config import ShadowConfig

    defaults = ShadowConfig()
    doc: dict[str, Any] = {
        "machine": machine_info(),
        "busy_before": round(quiet, 3),
        "cpu_budget": defaults.cpu_budget,
        "budget_window_s": defaults.budget_window_s,
        "queue_size": defaults.queue_size,
        **run(args.rate, args.seconds, args.rounds),
    }
    warn_if_busy(doc["box"]["others_share_of_box"])
    path = write_result(NAME, doc)
    print(f"bench shadow: {path}")
    print(
        f"p99 off {doc['off']['p99_ms']:.3f} ms, on {doc['on']['p99_ms']:.3f} ms:"
        f" overhead {doc['shadow_p99_overhead']}; compared {doc['compared']},"
        f" dropped {doc['dropped']}; extra CPU/item {doc['extra_cpu_ms_per_compared_item']} ms"
    )
    if not args.no_doc:
        write_doc_section(NAME, render_markdown(doc))
    return 0

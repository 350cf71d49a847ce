"""The agent's Prometheus exposition (agent/metrics.py): exact numbers, process
figures, and ``promtool check metrics`` on the real ``/metrics`` of a serving agent."""

from __future__ import annotations

import aiohttp
import pytest

from edgefleet.agent.cloud.metrics import CloudMetrics
from edgefleet.agent.metrics import Metrics
from tests.support.prom import promtool_check, sample
from tests.support.tiny import TEST_X, agent_config


def test_counters_and_sums_print_every_digit():
    m = Metrics()
    CloudMetrics(m)  # its series are part of the exposition as well
    m.http_requests.inc("/v2/models/{model}/infer", "200", value=1_234_567)
    m.http_requests.inc("/v2/models/{model}/infer", "200")
    m.inference_rows.inc("tiny", "1", value=9_007_199_254_740_000)  # < 2**53: an int
    m.request_duration.observe("tiny", "1", value=0.1)
    m.request_duration.observe("tiny", "1", value=0.2)
    m.queue_depth.set("tiny", "1", value=float("inf"))
    text = m.render()
    # %g printed 1.23457e+06 here: the exact figure is what rate() needs.
    assert (
        'edgefleet_http_requests_total{route="/v2/models/{model}/infer",status="200"} 1234568\n'
        in text
    )
    assert 'edgefleet_inference_rows_total{model="tiny",version="1"} 9007199254740000\n' in text
    # The sum is the float's shortest exact form, not a rounded one.
    assert (
        'edgefleet_request_duration_seconds_sum{model="tiny",version="1"} 0.30000000000000004\n'
        in text
    )
    assert sample(text, "edgefleet_request_duration_seconds_sum", model="tiny", version="1") == (
        0.1 + 0.2
    )
    assert 'edgefleet_queue_depth{model="tiny",version="1"} +Inf\n' in text
    # Bucket bounds keep their short form (le="0.00025", le="1").
    assert 'le="0.00025"' in text and 'le="1"' in text
    assert sample(text, "process_cpu_seconds_total") > 0
    assert sample(text, "process_resident_memory_bytes") > 0
    assert "python_info{" in text
    promtool_check(text)


def test_two_agents_in_one_process_each_have_process_figures():
    # Per-object registries: a second Metrics must not clash with the first.
    a, b = Metrics(), Metrics()
    assert "process_open_fds" in a.render() and "process_open_fds" in b.render()


@pytest.fixture
async def agent(start_agent, make_tiny_bundle, keys, tmp_path):
    return await start_agent(agent_config(tmp_path, keys, [make_tiny_bundle("1")]))


async def test_served_metrics_pass_promtool_after_traffic(agent):
    body = {
        "inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": TEST_X[:1].ravel().tolist()}
        ]
    }
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(f"{agent.base}/v2/models/tiny/infer", json=body) as r:
                assert r.status == 200, await r.text()
        async with s.get(f"{agent.base}/v2/models/nope/infer") as r:
            assert r.status in (404, 405)
        async with s.get(f"{agent.base}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    key = {"model": "tiny", "version": "1"}
    assert sample(text, "edgefleet_inference_requests_total", **key, outcome="success") == 3
    assert sample(text, "edgefleet_request_duration_seconds_count", **key) == 3
    assert sample(text, "process_start_time_seconds") > 0
    promtool_check(text)

"""Every way the cloud can fail, against a real cloud-profile agent on loopback.

Each fault: the caller gets the local answer within the timeout plus a small
margin, with the right fallback reason; no request fails because of the cloud;
the breaker opens and later closes; the event loop is never held. Faults a real
agent cannot produce (hanging, slow, a link dying mid-answer) come from a TCP
proxy in front of the real agent; malformed JSON from a small aiohttp server.
"""

from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from edgefleet.agent.server.tls import server_ssl_context
from tests.support.brokers import free_port
from tests.support.cloud_helpers import (
    SEEN,
    TOKEN,
    LagMonitor,
    broken_oip_app,
    cloud_config,
    cloud_reference,
    edge_config,
    infer,
    make_tls,
    probs_of,
)
from tests.support.tiny import TEST_X, tiny_reference

TIMEOUT_MS = 400
# Timer slack, the edge model, HTTP on loopback, a busy CI box: all of it.
MARGIN_MS = 200
# A blocked loop would stall for a whole timeout (400 ms); a busy CI box, for less.
LAG_MS = 200
X1 = TEST_X[:1]


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def cloud(servers, cloud_bundles, keys, tmp_path):
    return await servers.agent(cloud_config(tmp_path / "cloud", keys, cloud_bundles["cloud"]))


async def edge_to(servers, cloud_bundles, keys, tmp_path, url, **kw):
    kw.setdefault("timeout_ms", TIMEOUT_MS)
    return await servers.agent(edge_config(tmp_path, keys, cloud_bundles["edge"], url, **kw))


def assert_local(status, doc, reason):
    """A 200 with the edge model's own answer and the fallback reason."""
    assert status == 200, doc
    p = doc["parameters"]
    assert p["source"] == "edge", p
    assert p["fallback"] == reason, p
    np.testing.assert_allclose(probs_of(doc), tiny_reference(X1), rtol=1e-5)


async def metrics_text(session, base):
    async with session.get(f"{base}/metrics") as r:
        return await r.text()


# ---- the healthy cloud ---------------------------------------------------------------------


async def test_unsure_item_is_answered_by_the_cloud_with_both_answers(
    servers, session, cloud, cloud_bundles, keys, tmp_path
):
    proxy = await servers.proxy(cloud.port)  # passes traffic; lets us see the wire
    edge = await edge_to(servers, cloud_bundles, keys, tmp_path, proxy.base)
    for _ in range(3):
        status, doc, _ = await infer(session, edge.base, X1)
        assert status == 200, doc
    p = doc["parameters"]
    assert p["source"] == "cloud" and "fallback" not in p
    assert doc["model_name"] == "tiny" and doc["model_version"] == "1"
    assert (p["edge_model_version"], p["cloud_model"], p["cloud_model_version"]) == (
        "1",
        "tiny-cloud",
        "1",
    )
    assert p["edge_confidence"] == pytest.approx(tiny_reference(X1).max(), rel=1e-4)
    assert p["cloud_confidence"] == pytest.approx(cloud_reference(X1).max(), rel=1e-4)
    assert p["edge_ms"] > 0 and p["cloud_ms"] > 0
    np.testing.assert_allclose(probs_of(doc), cloud_reference(X1), rtol=1e-5)
    # Our cloud lists the binary extension, so the client used it; and one pooled
    # keep-alive connection carried every call.
    assert b"Inference-Header-Content-Length" in proxy.sent_to_server
    assert f"Bearer {TOKEN}".encode() in proxy.sent_to_server
    assert proxy.connections == 1
    text = await metrics_text(session, edge.base)
    assert (
        'edgefleet_fallback_items_total{model="tiny",version="1",source="cloud",reason="unsure"} 3'
        in text
    )
    assert (
        'edgefleet_cloud_calls_total{model="tiny",version="1",kind="unsure",outcome="ok"} 3' in text
    )
    assert 'edgefleet_cloud_breaker_state{model="tiny"} 0' in text
    assert "edgefleet_cloud_offline 0" in text
    assert 'edgefleet_cloud_call_duration_seconds_count{model="tiny",version="1"} 3' in text


async def test_any_oip_server_without_binary_extension_gets_json(
    servers, session, cloud_bundles, keys, tmp_path
):
    fake = await servers.app(broken_oip_app("json"))
    edge = await edge_to(servers, cloud_bundles, keys, tmp_path, fake.base)
    status, doc, _ = await infer(session, edge.base, TEST_X[:2])
    assert status == 200 and doc["parameters"]["source"] == "cloud", doc
    assert doc["parameters"]["cloud_model_version"] == "7"
    np.testing.assert_allclose(probs_of(doc), cloud_reference(TEST_X[:2]), rtol=1e-5)
    seen = fake.app[SEEN]
    assert seen and all(s["content_type"] == "application/json" for s in seen)
    assert all("Inference-Header-Content-Length" not in s["headers"] for s in seen)


async def test_batch_is_decided_per_item(servers, session, cloud, cloud_bundles, keys, tmp_path):
    conf = tiny_reference(TEST_X).max(axis=1)
    threshold = float(np.median(conf))
    edge = await edge_to(
        servers, cloud_bundles, keys, tmp_path, cloud.base, tiny={"threshold": threshold}
    )
    status, doc, _ = await infer(session, edge.base, TEST_X)
    assert status == 200, doc
    p = doc["parameters"]
    unsure = [i for i, c in enumerate(conf) if c < threshold]
    assert 0 < len(unsure) < len(TEST_X)
    assert p["source"] == "mixed"
    assert p["cloud_items"] == ",".join(map(str, unsure))
    assert len(p["edge_confidence"].split(",")) == len(TEST_X)
    assert len(p["cloud_confidence"].split(",")) == len(unsure)
    want = tiny_reference(TEST_X)
    want[unsure] = cloud_reference(TEST_X[unsure])
    np.testing.assert_allclose(probs_of(doc), want, rtol=1e-5)


async def test_a_request_may_keep_itself_local(
    servers, session, cloud, cloud_bundles, keys, tmp_path
):
    edge = await edge_to(servers, cloud_bundles, keys, tmp_path, cloud.base)
    status, doc, _ = await infer(session, edge.base, X1, cloud=False)
    assert status == 200 and doc["parameters"]["source"] == "edge"
    assert "fallback" not in doc["parameters"] and "cloud_ms" not in doc["parameters"]
    status, doc, _ = await infer(session, edge.base, X1, cloud="no")
    assert status == 400 and "cloud" in doc["error"]


# ---- faults ----------------------------------------------------------------------------------


async def test_cloud_down_is_offline_at_once_and_recovers(
    servers, session, cloud_bundles, keys, tmp_path
):
    port = free_port()  # nothing listens: connection refused
    edge = await edge_to(servers, cloud_bundles, keys, tmp_path, f"http://127.0.0.1:{port}")
    status, doc, ms = await infer(session, edge.base, X1)
    assert_local(status, doc, "offline")
    assert ms < MARGIN_MS  # refused is immediate: no timeout to wait for
    assert "cloud_ms" in doc["parameters"]  # it tried
    # Offline now: the next calls do not even try, until the back-off has passed.
    status, doc, ms = await infer(session, edge.base, X1)
    assert_local(status, doc, "offline")
    assert "cloud_ms" not in doc["parameters"]
    text = await metrics_text(session, edge.base)
    assert "edgefleet_cloud_offline 1" in text
    # The cloud comes up on that port; after the back-off a probe finds it.
    await servers.agent(cloud_config(tmp_path / "cloud", keys, cloud_bundles["cloud"]), port=port)
    await asyncio.sleep(0.35)
    status, doc, _ = await infer(session, edge.base, X1)
    assert status == 200 and doc["parameters"]["source"] == "cloud", doc
    assert "edgefleet_cloud_offline 0" in await metrics_text(session, edge.base)


async def test_hanging_cloud_times_out_then_opens_the_circuit_then_closes(
    servers, session, cloud, cloud_bundles, keys, tmp_path
):
    proxy = await servers.proxy(cloud.port)
    proxy.mode = "hang"
    edge = await edge_to(servers, cloud_bundles, keys, tmp_path, proxy.base)
    async with LagMonitor() as lag:
        for _ in range(3):  # breaker.failures
            status, doc, ms = await infer(session, edge.base, X1)
            assert_local(status, doc, "cloud_timeout")
            assert TIMEOUT_MS <= ms < TIMEOUT_MS + MARGIN_MS
        status, doc, ms = await infer(session, edge.base, X1)
        assert_local(status, doc, "circuit_open")
        assert ms < MARGIN_MS
    assert lag.max_ms < LAG_MS, f"event loop held for {lag.max_ms:.1f} ms"
    assert 'edgefleet_cloud_breaker_state{model="tiny"} 1' in await metrics_text(session, edge.base)
    proxy.mode = "pass"
    await asyncio.sleep(0.35)  # the back-off
    status, doc, _ = await infer(session, edge.base, X1)
    assert status == 200 and doc["parameters"]["source"] == "cloud", doc
    assert 'edgefleet_cloud_breaker_state{model="tiny"} 0' in await metrics_text(session, edge.base)


async def test_slow_cloud_is_not_waited_for(servers, session, cloud, cloud_bundles, keys, tmp_path):
    proxy = await servers.proxy(cloud.port)
    proxy.mode, proxy.delay_s = "delay", 2.0
    edge = await edge_to(servers, cloud_bundles, keys, tmp_path, proxy.base)
    async with LagMonitor() as lag:
        status, doc, ms = await infer(session, edge.base, X1)
    assert_local(status, doc, "cloud_timeout")
    assert TIMEOUT_MS <= ms < TIMEOUT_MS + MARGIN_MS
    assert doc["parameters"]["cloud_ms"] == pytest.approx(TIMEOUT_MS, abs=MARGIN_MS)
    assert lag.max_ms < LAG_MS


async def test_cloud_500s_open_the_circuit(servers, session, cloud_bundles, keys, tmp_path):
    # A real cloud agent whose model fails on some inputs: a genuine 500.
    cloud = await servers.agent(cloud_config(tmp_path / "cloud", keys, cloud_bundles["poison"]))
    edge = await edge_to(
        servers, cloud_bundles, keys, tmp_path, cloud.base, breaker={"failures": 2}
    )
    # Any value >= 10 breaks the cloud model; all-10 keeps the edge merely very sure.
    poison = np.full((1, 4), 10.0, dtype=np.float32)
    for _ in range(2):
        status, doc, ms = await infer(session, edge.base, poison)
        assert status == 200 and doc["parameters"]["fallback"] == "cloud_error", doc
        assert "HTTP 500" in doc["parameters"]["fallback_detail"]
        np.testing.assert_allclose(probs_of(doc), tiny_reference(poison), rtol=1e-5)
        assert ms < TIMEOUT_MS
    status, doc, _ = await infer(session, edge.base, X1)
    assert_local(status, doc, "circuit_open")
    await asyncio.sleep(0.35)
    status, doc, _ = await infer(session, edge.base, X1)  # the probe, with a good input
    assert status == 200 and doc["parameters"]["source"] == "cloud", doc


async def test_malformed_json_is_a_cloud_error(servers, session, cloud_bundles, keys, tmp_path):
    fake = await servers.app(broken_oip_app("malformed"))
    edge = await edge_to(servers, cloud_bundles, keys, tmp_path, fake.base)
    status, doc, ms = await infer(session, edge.base, X1)
    assert_local(status, doc, "cloud_error")
    assert "malformed JSON" in doc["parameters"]["fallback_detail"]
    assert ms < TIMEOUT_MS


@pytest.mark.parametrize(
    ("bundle", "detail"),
    [
        ("five", "cloud output 'probs' has shape [1, 5], expected [1, 3]"),
        ("renamed", "has no output 'probs'"),
    ],
)
async def test_wrong_output_shapes_or_names(
    servers, session, cloud_bundles, keys, tmp_path, bundle, detail
):
    cloud = await servers.agent(cloud_config(tmp_path / "cloud", keys, cloud_bundles[bundle]))
    edge = await edge_to(servers, cloud_bundles, keys, tmp_path, cloud.base)
    status, doc, _ = await infer(session, edge.base, X1)
    assert_local(status, doc, "cloud_error")
    assert detail in doc["parameters"]["fallback_detail"]


async def test_bad_token_is_a_cloud_error(servers, session, cloud, cloud_bundles, keys, tmp_path):
    edge = await edge_to(servers, cloud_bundles, keys, tmp_path, cloud.base, token="not-it")
    status, doc, _ = await infer(session, edge.base, X1)
    assert_local(status, doc, "cloud_error")
    assert "refused our token (401)" in doc["parameters"]["fallback_detail"]


async def test_unreadable_token_file_leaves_the_agent_serving(
    servers, session, cloud, cloud_bundles, keys, tmp_path
):
    edge = await edge_to(
        servers,
        cloud_bundles,
        keys,
        tmp_path,
        cloud.base,
        token=None,
        token_file=str(tmp_path / "missing.token"),
    )
    status, doc, _ = await infer(session, edge.base, X1)
    assert_local(status, doc, "cloud_error")
    assert "cloud_ms" not in doc["parameters"]


async def test_unreadable_ca_file_leaves_the_agent_serving(
    servers, session, cloud_bundles, keys, tmp_path
):
    edge = await edge_to(
        servers,
        cloud_bundles,
        keys,
        tmp_path,
        "https://127.0.0.1:1",
        ca_file=str(tmp_path / "missing-ca.pem"),
    )
    status, doc, _ = await infer(session, edge.base, X1)
    assert_local(status, doc, "cloud_error")
    async with session.get(f"{edge.base}/v1/fallback") as r:
        assert "missing-ca.pem" in (await r.json())["cloud"]["unusable"]


async def test_tls(servers, session, cloud_bundles, keys, tmp_path):
    tls = make_tls(tmp_path / "tls")
    config = cloud_config(
        tmp_path / "cloud",
        keys,
        cloud_bundles["cloud"],
        tls_cert_file=str(tls.cert),
        tls_key_file=str(tls.key),
    )
    cloud = await servers.agent(config, ssl_context=server_ssl_context(config))
    assert cloud.base.startswith("https://")
    # Trusting the right CA: answered over HTTPS.
    good = await edge_to(
        servers, cloud_bundles, keys, tmp_path / "good", cloud.base, ca_file=str(tls.ca)
    )
    status, doc, _ = await infer(session, good.base, X1)
    assert status == 200 and doc["parameters"]["source"] == "cloud", doc
    # A certificate from a CA we do not trust: refused, answered locally.
    bad = await edge_to(
        servers, cloud_bundles, keys, tmp_path / "bad", cloud.base, ca_file=str(tls.other_ca)
    )
    status, doc, ms = await infer(session, bad.base, X1)
    assert_local(status, doc, "cloud_error")
    assert "certificate" in doc["parameters"]["fallback_detail"]
    assert ms < TIMEOUT_MS + MARGIN_MS
    # Plain HTTP to the TLS port: garbage either way, still a local answer.
    plain = await edge_to(
        servers, cloud_bundles, keys, tmp_path / "plain", cloud.base.replace("https://", "http://")
    )
    status, doc, ms = await infer(session, plain.base, X1)
    assert status == 200 and doc["parameters"]["fallback"] in ("cloud_error", "cloud_timeout")
    assert ms < TIMEOUT_MS + MARGIN_MS


@pytest.mark.parametrize("where", ["headers", "body"])
async def test_link_dropping_mid_answer(
    servers, session, cloud, cloud_bundles, keys, tmp_path, where
):
    proxy = await servers.proxy(cloud.port)
    probe = await edge_to(servers, cloud_bundles, keys, tmp_path / "probe", proxy.base)
    await infer(session, probe.base, X1)  # measures one whole infer answer
    size = proxy.last_answer_bytes
    assert size > 100
    proxy.mode = "drop"
    proxy.drop_after = 20 if where == "headers" else size - 10
    edge = await edge_to(servers, cloud_bundles, keys, tmp_path, proxy.base)
    async with LagMonitor() as lag:
        status, doc, ms = await infer(session, edge.base, X1)
    assert_local(status, doc, "cloud_error")
    assert ms < TIMEOUT_MS + MARGIN_MS
    assert lag.max_ms < LAG_MS


async def test_no_request_fails_under_load_while_the_cloud_hangs(
    servers, session, cloud, cloud_bundles, keys, tmp_path
):
    proxy = await servers.proxy(cloud.port)
    proxy.mode = "hang"
    edge = await edge_to(
        servers,
        cloud_bundles,
        keys,
        tmp_path,
        proxy.base,
        tiny={"max_in_flight": 2},
        breaker={"failures": 100},
    )
    results = await asyncio.gather(*(infer(session, edge.base, X1) for _ in range(12)))
    reasons = sorted(doc["parameters"]["fallback"] for _, doc, _ in results)
    assert all(status == 200 for status, _, _ in results)
    # Two calls wait out the timeout; the budget answers the others locally at once.
    assert reasons == ["budget_exhausted"] * 10 + ["cloud_timeout"] * 2
    assert max(ms for _, _, ms in results) < TIMEOUT_MS + 2 * MARGIN_MS


async def test_calls_per_minute_budget(servers, session, cloud, cloud_bundles, keys, tmp_path):
    edge = await edge_to(
        servers, cloud_bundles, keys, tmp_path, cloud.base, tiny={"max_calls_per_minute": 2}
    )
    sources = []
    for _ in range(3):
        _, doc, _ = await infer(session, edge.base, X1)
        sources.append(doc["parameters"].get("fallback") or doc["parameters"]["source"])
    assert sources == ["cloud", "cloud", "budget_exhausted"]

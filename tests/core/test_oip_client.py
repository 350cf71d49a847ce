"""A standard Open Inference Protocol client (tritonclient) against a real agent process."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support.agent_process import AgentProcess
from tests.support.brokers import free_port
from tests.support.tiny import TEST_X, tiny_reference


@pytest.fixture(scope="module")
def agent(tmp_path_factory, make_tiny_bundle, keys):
    work = tmp_path_factory.mktemp("agent-proc")
    config = {
        "store": {"path": str(work / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(make_tiny_bundle("1")), "labels": ["stable"]}],
    }
    proc = AgentProcess(config, work, free_port())
    yield proc
    proc.stop()


@pytest.fixture
def client(agent):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{agent.port}")
    yield c
    c.close()


def test_server_and_model_status(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert client.is_model_ready("tiny", "stable")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"][0]["name"] == "x"
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert client.get_model_repository_index()[0]["name"] == "tiny"


@pytest.mark.parametrize("binary", [True, False])
def test_infer_binary_and_json(client, binary):
    inp = httpclient.InferInput("x", list(TEST_X.shape), "FP32")
    inp.set_data_from_numpy(TEST_X, binary_data=binary)
    out = httpclient.InferRequestedOutput("probs", binary_data=binary)
    result = client.infer("tiny", [inp], outputs=[out], model_version="stable")
    np.testing.assert_allclose(result.as_numpy("probs"), tiny_reference(TEST_X), rtol=1e-5)
    response = result.get_response()
    assert response["model_version"] == "1"
    assert response["parameters"]["source"] == "edge"


def test_default_outputs_come_back_binary(client):
    inp = httpclient.InferInput("x", list(TEST_X.shape), "FP32")
    inp.set_data_from_numpy(TEST_X)
    result = client.infer("tiny", [inp])
    np.testing.assert_allclose(result.as_numpy("probs"), tiny_reference(TEST_X), rtol=1e-5)


def test_errors_reach_the_client(client):
    inp = httpclient.InferInput("x", [1, 5], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 5), np.float32))
    with pytest.raises(InferenceServerException, match="does not fit"):
        client.infer("tiny", [inp])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")

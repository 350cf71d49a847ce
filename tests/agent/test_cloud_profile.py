"""The cloud profile: ``edge-agent serve --config cloud.yaml`` is the cloud endpoint."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest

from edgefleet.agent.config import parse_config
from edgefleet.core.errors import ConfigError
from tests.support.agent_process import AgentProcess
from tests.support.brokers import free_port
from tests.support.cloud_helpers import TOKEN
from tests.support.tiny import TEST_X


def test_profile_defaults_and_rules(tmp_path):
    c = parse_config(f"profile: cloud\nserver: {{auth_token: {TOKEN}}}\n")
    assert (c.server.host, c.server.port) == ("0.0.0.0", 8490)  # routable, DESIGN.md's port
    c = parse_config("profile: cloud\nserver: {auth_token: x, host: 10.0.0.5, port: 9000}\n")
    assert (c.server.host, c.server.port) == ("10.0.0.5", 9000)
    assert parse_config("{}").server.host == "127.0.0.1"  # the edge stays on loopback
    with pytest.raises(ConfigError, match="never serves without a bearer token"):
        parse_config("profile: cloud\n")
    with pytest.raises(ConfigError, match="fallback.cloud.url must be unset"):
        parse_config(
            "profile: cloud\nserver: {auth_token: x}\nfallback: {cloud: {url: 'http://x:1'}}\n"
        )
    with pytest.raises(ConfigError, match="no fleet link"):
        parse_config(
            "profile: cloud\ndevice_id: d1\nserver: {auth_token: x}\nfleet: {host: broker}\n"
        )
    with pytest.raises(ConfigError, match="go together"):
        parse_config("server: {tls_cert_file: a.pem}\n")


def test_token_file_is_read_relative_to_the_config(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "cloud.token").write_text(f"{TOKEN}\n")
    text = "profile: cloud\nserver: {auth_token_file: keys/cloud.token}\n"
    assert parse_config(text, base=tmp_path).server.auth_token == TOKEN
    with pytest.raises(ConfigError, match="cannot read auth_token_file"):
        parse_config(text, base=tmp_path / "elsewhere")
    (tmp_path / "keys" / "cloud.token").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        parse_config(text, base=tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        parse_config("server: {auth_token: a, auth_token_file: b}\n")


def _get(url: str, token: str | None = None, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_edge_agent_serve_in_the_cloud_profile(tmp_path, keys, cloud_bundles):
    token_file = tmp_path / "cloud.token"
    token_file.write_text(TOKEN)
    os.chmod(token_file, 0o600)
    config = {
        "profile": "cloud",
        "server": {"host": "127.0.0.1", "auth_token_file": str(token_file)},
        "store": {"path": str(tmp_path / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(cloud_bundles["cloud"])}],
    }
    proc = AgentProcess(config, tmp_path, free_port())
    try:
        base = proc.base
        assert _get(f"{base}/v2/health/ready")[0] == 200  # health stays open
        status, doc = _get(f"{base}/v2")
        assert status == 401 and "token" in doc["error"]
        status, doc = _get(f"{base}/v2", TOKEN)
        assert status == 200 and "binary_tensor_data" in doc["extensions"]
        body = json.dumps(
            {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": TEST_X[0].tolist()}
                ]
            }
        ).encode()
        status, doc = _get(f"{base}/v2/models/tiny-cloud/infer", TOKEN, body)
        assert status == 200, doc
        # The cloud answers itself; nothing further to fall back to.
        assert doc["parameters"]["source"] == "cloud" and "fallback" not in doc["parameters"]
        status, doc = _get(f"{base}/v1/fallback", TOKEN)
        assert doc["profile"] == "cloud" and doc["cloud"] is None
    finally:
        proc.stop()

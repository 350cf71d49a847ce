"""Config validation: typos and wrong types are errors that name the key and the line."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from pydantic import AfterValidator, BaseModel

from edgefleet.agent.config import AgentConfig, load_config, parse_config
from edgefleet.core.config import load_yaml, rebase_library, rebase_path
from edgefleet.core.errors import ConfigError
from edgefleet.core.mqtt.config import MqttConnectionConfig
from edgefleet.fleet.config import FleetServiceConfig, load_fleet_config, parse_fleet_config


def test_defaults_are_safe():
    config = parse_config("")
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8470
    assert config.trust.allow_unsigned is False


def test_unknown_key_names_key_and_line():
    text = "server:\n  host: 127.0.0.1\n  prot: 9000\n"
    with pytest.raises(ConfigError, match=r"server\.prot \(line 3\): Extra inputs"):
        parse_config(text)


def test_wrong_type_names_key_and_line():
    text = "store:\n  keep_versions: 2\nruntime:\n  onnx:\n    intra_op_threads: many\n"
    with pytest.raises(ConfigError, match=r"runtime\.onnx\.intra_op_threads \(line 5\)"):
        parse_config(text)


def test_yaml_syntax_error_has_line_and_column():
    with pytest.raises(ConfigError, match=r"line 3, column \d+: mapping values"):
        parse_config("server:\n  host: a\n  port: b: c\n")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "store:\n  path: data/models\ntrust:\n  public_keys: [keys/a.pub]\n"
        "models:\n  - bundle: b/x.bundle\n"
    )
    config = load_config(cfg)
    assert config.store.path == tmp_path / "data/models"
    assert config.trust.public_keys == [tmp_path / "keys/a.pub"]
    assert config.models[0].bundle == tmp_path / "b/x.bundle"


def test_cli_reports_bad_config_without_traceback(tmp_path: Path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("server:\n  port: seventy\n")
    proc = subprocess.run(
        [sys.executable, "-m", "edgefleet.agent", "check-config", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "server.port (line 2)" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------- duplicate keys (YAML)


@pytest.mark.parametrize(
    ("text", "line", "first"),
    [
        ("server:\n  port: 1\n  host: a\n  port: 2\n", 4, 2),
        ("device_id: a\nstore:\n  keep_versions: 2\ndevice_id: b\n", 4, 1),
        ("models:\n  - bundle: a.bundle\n    labels: [x]\n    bundle: b.bundle\n", 4, 2),
    ],
    ids=["nested", "top-level", "in-a-list"],
)
def test_duplicate_keys_are_refused_with_their_lines(text: str, line: int, first: int) -> None:
    with pytest.raises(
        ConfigError, match=rf"line {line}: duplicate key .* \(first given at line {first}\)"
    ):
        parse_config(text, "agent.yaml")


def test_duplicate_keys_are_refused_in_the_fleet_config_too() -> None:
    text = "http:\n  port: 8480\nbroker:\n  host: a\n  port: 1883\n  host: b\n"
    with pytest.raises(
        ConfigError, match=r"fleet.yaml: line 6: duplicate key 'host' \(first given at line 4\)"
    ):
        parse_fleet_config(text, "fleet.yaml")


def test_a_merge_key_may_be_overridden() -> None:
    """YAML merges (``<<: *anchor``) are meant to be overridden: not a duplicate."""
    data, _ = load_yaml("base: &b {k: 1, j: 2}\nmine:\n  <<: *b\n  k: 3\n")
    assert data["mine"] == {"k": 3, "j": 2}


# ------------------------------------------- the fleet's broker section is plain MQTT


@pytest.mark.parametrize("device_key", ["sync", "outbox", "telemetry"])
def test_the_fleet_broker_section_refuses_device_settings(device_key: str) -> None:
    text = f"broker:\n  host: mqtt.example.com\n  {device_key}: {{}}\n"
    with pytest.raises(ConfigError, match=rf"broker\.{device_key} \(line 3\): Extra inputs"):
        parse_fleet_config(text, "fleet.yaml")
    cfg = parse_fleet_config("broker:\n  host: mqtt.example.com\n  tls: {}\n")
    assert type(cfg.broker) is MqttConnectionConfig and cfg.broker.effective_port == 8883


# ------------------------------------------------------------- ConfigPath


def _is_rebased(metadata: list[Any]) -> bool:
    return any(
        isinstance(m, AfterValidator) and m.func in (rebase_path, rebase_library) for m in metadata
    )


def _declared_paths(model: type[BaseModel], prefix: str = "") -> dict[str, bool]:
    """Every ``Path`` a model can hold, as ``a.b.*.c`` → whether it is a ConfigPath."""
    found: dict[str, bool] = {}

    def walk(annotation: Any, metadata: list[Any], where: str) -> None:
        origin = get_origin(annotation)
        if annotation is Path or (isinstance(annotation, type) and issubclass(annotation, Path)):
            found[where] = _is_rebased(metadata)
        elif origin is Annotated:
            inner, *meta = get_args(annotation)
            walk(inner, [*metadata, *meta], where)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.update(_declared_paths(annotation, f"{where}."))
        elif origin in (Union, types.UnionType):
            for arg in get_args(annotation):
                walk(arg, metadata, where)
        elif origin in (list, tuple, set, frozenset):
            for arg in get_args(annotation):
                walk(arg, [], f"{where}.*")
        elif origin is dict:
            walk(get_args(annotation)[1], [], f"{where}.*")

    for name, info in model.model_fields.items():
        walk(info.annotation, list(info.metadata), f"{prefix}{name}")
    return found


def _held_paths(obj: Any, where: str = "") -> dict[str, list[Path]]:
    """Every ``Path`` value in a validated config, grouped the same way."""
    out: dict[str, list[Path]] = {}

    def walk(value: Any, at: str) -> None:
        if isinstance(value, Path):
            out.setdefault(at, []).append(value)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), f"{at}.{name}" if at else name)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item, f"{at}.*")
        elif isinstance(value, dict):
            for item in value.values():
                walk(item, f"{at}.*")

    walk(obj, where)
    return out


@pytest.mark.parametrize("model", [AgentConfig, FleetServiceConfig])
def test_every_path_field_is_a_config_path(model: type[BaseModel]) -> None:
    """A plain ``Path`` field would be relative to the working directory (a service's
    is /): every path field must be rebased on the config file's directory."""
    declared = _declared_paths(model)
    assert declared, "the walk found no path fields at all"
    plain = sorted(k for k, rebased in declared.items() if not rebased)
    assert not plain, f"plain Path fields (use edgefleet.core.config.ConfigPath): {plain}"


# Every path field set to a relative path; extend these when adding a path field (the
# test below fails until then).
AGENT_ALL_PATHS = """\
device_id: store-1
server:
  auth_token_file: secrets/token
  tls_cert_file: tls/cert.pem
  tls_key_file: tls/key.pem
store: {path: data/models}
trust: {public_keys: [keys/a.pub, keys/b.pub]}
runtime:
  litert:
    delegates:
      - {library: lib/libdelegate.so}
      - {library: libedgetpu.so.1}
models: [{bundle: bundles/x.bundle}]
fleet:
  host: mqtt.example.com
  password_file: secrets/mqtt.password
  tls: {ca_file: tls/ca.pem, cert_file: tls/client.pem, key_file: tls/client.key}
  outbox: {path: data/outbox.sqlite}
  sync: {download_dir: data/downloads, state_file: data/sync.json, ca_file: tls/fleet-ca.pem}
fallback:
  cloud:
    url: https://cloud.example.com
    token_file: secrets/cloud.token
    ca_file: tls/cloud-ca.pem
  hard_examples: {path: data/hard.sqlite}
"""

FLEET_ALL_PATHS = """\
data_dir: data
http: {tls_cert_file: tls/cert.pem, tls_key_file: tls/key.pem}
auth:
  token_file: secrets/admin.token
  tokens: [{name: dashboard, role: read, token_file: secrets/dashboard.token}]
trust: {public_keys: [keys/release.pub]}
broker:
  host: mqtt.example.com
  password_file: secrets/mqtt.password
  tls: {ca_file: tls/ca.pem, cert_file: tls/client.pem, key_file: tls/client.key}
enrolment: {ca_file: tls/mqtt-ca.pem}
broker_accounts: {mode: dynsec, password_file: secrets/broker-admin.password}
"""


@pytest.mark.parametrize(
    ("model", "text", "load"),
    [
        (AgentConfig, AGENT_ALL_PATHS, load_config),
        (FleetServiceConfig, FLEET_ALL_PATHS, load_fleet_config),
    ],
    ids=["agent", "fleet"],
)
def test_relative_paths_in_every_section_resolve_against_the_config_file(
    model: type[BaseModel],
    text: str,
    load: Callable[[Path], BaseModel],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    etc = tmp_path / "etc"
    (etc / "secrets").mkdir(parents=True)
    (etc / "secrets" / "token").write_text("a-token-read-at-load-time\n")
    path = etc / "config.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)  # somewhere else: a path must not depend on the cwd

    held = _held_paths(load(path))
    assert set(held) == set(_declared_paths(model)), "set every path field in the YAML above"
    for where, values in held.items():
        for value in values:
            if where == "runtime.litert.delegates.*.library" and "/" not in str(value):
                assert value == Path("libedgetpu.so.1")  # for the dynamic loader: as given
                continue
            assert value.is_absolute() and value.is_relative_to(etc), (where, value)
    if model is AgentConfig:
        assert etc / "lib/libdelegate.so" in held["runtime.litert.delegates.*.library"]


def test_without_a_file_relative_paths_stay_as_written() -> None:
    config = parse_config("store:\n  path: data/models\n")
    assert config.store.path == Path("data/models")
    absolute = parse_config("store:\n  path: /srv/models\n", base=Path("/etc/edgefleet"))
    assert absolute.store.path == Path("/srv/models")

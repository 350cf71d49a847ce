"""Config validation: typos and wrong types are errors that name the key and the line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.config import load_config, parse_config
from edgefleet.core.errors import ConfigError


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

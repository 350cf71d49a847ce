"""core/logs.py: JSON lines, checked in the formatter and on the stderr of a real
``edge-fleet serve`` and a real ``edge-agent serve``."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from edgefleet.core import logs
from tests.support.agent_process import AgentProcess
from tests.support.brokers import free_port
from tests.support.fleet_server import ServedFleet

KEYS = {"ts", "level", "logger", "message"}


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log file, each of which must be one JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path} is empty"
    docs = []
    for line in lines:
        doc = json.loads(line)  # a line that is not JSON fails the test here
        assert isinstance(doc, dict) and KEYS <= doc.keys(), line
        docs.append(doc)
    return docs


def test_json_formatter_keeps_message_exception_and_newlines_in_one_line():
    fmt = logs.formatter("json")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.getLogger("edgefleet.test").makeRecord(
            "edgefleet.test",
            logging.ERROR,
            __file__,
            1,
            "failed %s: %d",
            ("job", 3),
            sys.exc_info(),
        )
    line = fmt.format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "ERROR"
    assert doc["logger"] == "edgefleet.test"
    assert doc["message"] == "failed job: 3"
    assert doc["exc_info"].startswith("Traceback") and "ValueError: bad\nthing" in doc["exc_info"]
    assert doc["ts"].endswith("Z") and "T" in doc["ts"]
    text = logs.formatter("text").format(record)
    assert " ERROR edgefleet.test: failed job: 3\nTraceback" in text


def test_configure_refuses_unknown_level_and_format():
    with pytest.raises(ValueError, match="log format must be one of text, json"):
        logs.configure("INFO", "xml", stream=io.StringIO())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log level must be one of"):
        logs.configure("LOUD", "json", stream=io.StringIO())


def test_fleet_serve_logs_json_lines(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    fleet = ServedFleet(
        tmp_path,
        free_port(),
        [
            "--data-dir",
            str(tmp_path / "fleet-data"),
            "--mqtt-port",
            "0",
            "--trust-key",
            str(keys[1]),
            "--log-format",
            "json",
        ],
    )
    assert fleet.stop() == 0
    docs = json_lines(fleet.log_path)
    ready = [d for d in docs if d["message"].startswith("edgefleet fleet ready")]
    assert ready and ready[0]["logger"] == "edgefleet.fleet" and ready[0]["level"] == "INFO"
    assert any(d["message"] == "stopping" for d in docs)


def test_agent_serve_logs_json_lines_from_its_config(tmp_path, make_tiny_bundle, keys) -> None:
    config = {
        "store": {"path": str(tmp_path / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(make_tiny_bundle("1"))}],
        "logging": {"level": "INFO", "format": "json"},
    }
    agent = AgentProcess(config, tmp_path, free_port())
    agent.stop()
    docs = json_lines(tmp_path / "agent.log")
    assert any(d["message"].startswith("event loop:") for d in docs)
    assert {d["logger"] for d in docs} >= {"edgefleet.agent"}

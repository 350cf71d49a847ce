"""The agent's event loop choice: uvloop by default where installed, stdlib on request."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from edgefleet.agent.config import parse_config
from edgefleet.core.aio import event_loop_factory
from tests.support.agent_process import AgentProcess
from tests.support.brokers import free_port


def test_choices():
    assert parse_config("").server.event_loop == "auto"
    for choice, kind in (
        ("auto", uvloop.Loop),
        ("uvloop", uvloop.Loop),
        ("asyncio", asyncio.BaseEventLoop),
    ):
        loop = event_loop_factory(choice)()
        try:
            assert isinstance(loop, kind), choice
        finally:
            loop.close()


def test_missing_uvloop_is_a_config_error_only_when_required(monkeypatch):
    from edgefleet.core.errors import ConfigError

    monkeypatch.setitem(__import__("sys").modules, "uvloop", None)
    assert event_loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        event_loop_factory("uvloop")


def test_served_agent_runs_on_uvloop(tmp_path, make_tiny_bundle, keys):
    config = {
        "store": {"path": str(tmp_path / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(make_tiny_bundle("1"))}],
    }
    proc = AgentProcess(config, tmp_path, free_port())
    try:
        assert "event loop: uvloop" in (tmp_path / "agent.log").read_text()
    finally:
        proc.stop()

"""One name rule (core/names.py), and every place that checks a name uses it.

A trailing newline once passed every check (``re.match`` with ``$``); each kind of
name is tried with one here, through the shared validator and through each caller.
"""

from __future__ import annotations

import pytest

from edgefleet.agent.config import parse_config
from edgefleet.agent.enroll import EnrolError, parse_enrolment
from edgefleet.core import names
from edgefleet.core.bundle.manifest import check_name
from edgefleet.core.errors import BadRequest, ConfigError
from edgefleet.core.mqtt import topics
from edgefleet.fleet import desired, devices

TRAILING = ["x\n", "x\r\n", "x\n\n", "\nx", "x\x00", "x y", "x/y", "x:y", "", ".x", "-x"]
CHECKS = [
    names.check_model_name,
    names.check_version,
    names.check_label,
    names.check_registry_label,
    names.check_device_id,
    names.check_group,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", TRAILING, ids=repr)
def test_every_kind_of_name_refuses_a_trailing_newline_and_other_junk(check, bad):
    with pytest.raises(names.InvalidName) as exc:
        check(bad)
    # A 400 at an HTTP boundary, a ValueError for pydantic and older callers.
    assert isinstance(exc.value, BadRequest) and isinstance(exc.value, ValueError)
    assert exc.value.status == 400 and repr(bad) in exc.value.message


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_good_names_pass_unchanged(check):
    for good in ("a", "tiny", "store-0042", "v1.2_rc-3", "a" * 64):
        assert check(good) == good
    with pytest.raises(names.InvalidName):
        check("a" * 65)
    with pytest.raises(names.InvalidName):
        check(5)


def test_registry_labels_start_with_a_letter():
    assert names.check_label("2024") == "2024"  # the agent's labels: any name
    with pytest.raises(names.InvalidName):
        names.check_registry_label("2024")


def test_no_dot_name_can_be_a_name():
    """The model store keeps its metadata under dot-names: no name can collide."""
    for reserved in (".state.json", ".uploads", ".incoming", ".", ".."):
        assert not names.is_name(reserved)


# ---- each caller, with a trailing newline ---------------------------------------


def test_bundle_manifest_names():
    with pytest.raises(ValueError, match="version"):
        check_name("2\n", "version")


def test_agent_topics_device_id():
    with pytest.raises(ValueError, match="device id"):
        topics.device_topic("store-1\n", "status")
    assert topics.device_topic("store-1", "status") == "edgefleet/v1/devices/store-1/status"


def test_agent_config_device_id(tmp_path):
    with pytest.raises(ConfigError, match="device id"):
        parse_config(f'device_id: "store-1\\n"\nstore: {{path: "{tmp_path}"}}\n')


def test_agent_enrolment_answer_device_id():
    answer = {
        "device_id": "store-1\n",
        "mqtt": {"host": "h", "port": 8883, "tls": True, "username": "u", "password": "p"},
        "trusted_keys": [],
        "fleet_url": "https://fleet.example:8480",
    }
    with pytest.raises(EnrolError, match="device_id"):
        parse_enrolment(answer)


def test_fleet_device_ids_and_groups():
    with pytest.raises(BadRequest, match="device id"):
        devices.check_device_id("store-1\n")
    with pytest.raises(BadRequest, match="group"):
        devices.check_groups(["north\n"])
    assert devices.check_groups(["north", "south", "north"]) == ["north", "south"]


def test_fleet_assignment_targets():
    with pytest.raises(BadRequest, match="device id"):
        desired.check_target("device", "store-1\n")
    with pytest.raises(BadRequest, match="group"):
        desired.check_target("group", "north\n")
    assert desired.check_target("group", "north") == ("group", "north")

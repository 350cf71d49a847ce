"""What a fleet manager could not do before issue 12 (item 5), through the real fleet
service (HTTP on loopback, real SQLite, real bundle files, real Mosquitto for its MQTT
side) and simulated devices on their real MQTT link (tests/support/fleet_sim.py):

- unassign a model from a device, a group or all: the desired documents the devices
  receive over the broker fall back to the next more general assignment, or drop the
  model; refused (409, naming the rollout) while a rollout to that target is unfinished;
- delete a version or a whole model: refused (409, naming devices, assignments,
  rollouts, labels) while anything uses it; otherwise rows and bundle file go;
- ``wave_timeout_s`` per rollout through the API and the CLI, bad values a 400;
- ``edge-fleet ... --json | head``: no BrokenPipe traceback, exit 141.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgefleet.fleet.cli import EXIT_BROKEN_PIPE
from edgefleet.fleet.cli import main as fleet_main
from edgefleet.fleet.service import FleetService
from tests.support.brokers import Mosquitto
from tests.support.fleet_sim import SimDevice
from tests.support.quality_fleet import TOKEN, Fleet, fleet_config, until

M = "tiny"
READER = "reader-" + "0123456789abcdef" * 2  # a token with the read role


@pytest.fixture
async def fleet(
    tmp_path: Path,
    keys: tuple[Path, Path],
    mosquitto: Mosquitto,
    make_tiny_bundle: Callable[..., Path],
) -> AsyncIterator[Fleet]:
    """A running fleet with tiny versions 1 and 2, and devices shop-1, shop-2 (group
    north) and shop-3 (group south) enrolled."""
    auth = {"token": TOKEN, "tokens": [{"name": "dashboard", "role": "read", "token": READER}]}
    svc = await FleetService(fleet_config(tmp_path, keys, mosquitto.port, auth=auth)).start()
    async with aiohttp.ClientSession() as session:
        try:
            async with asyncio.timeout(10):
                await svc.bus.wait_connected()
            f = Fleet(svc, session)
            for version in ("1", "2"):
                bundle = make_tiny_bundle(version)
                await f.call("POST", "/v1/models", data=bundle.read_bytes())
            for name, group in (("shop-1", "north"), ("shop-2", "north"), ("shop-3", "south")):
                await f.enrol(name, [group])
            yield f
        finally:
            await svc.stop()


@pytest.fixture
async def sims(mosquitto: Mosquitto) -> AsyncIterator[Callable[..., Any]]:
    made: list[SimDevice] = []

    async def make(device_id: str, outcome: Any = None) -> SimDevice:
        sim = SimDevice(mosquitto.port, device_id, outcome)
        made.append(sim)
        await sim.start()
        await sim.connected()
        return sim

    yield make
    for sim in made:
        await sim.stop()


def last_models(sim: SimDevice) -> dict[str, Any] | None:
    """The models of the newest desired document the device received over the broker."""
    return sim.desired[-1]["models"] if sim.desired else None


async def received(sim: SimDevice, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    async def models() -> Any:
        return last_models(sim)

    got: dict[str, Any] = await until(models, lambda m: m is not None and check(m))
    return got


def version_of(models: dict[str, Any]) -> str | None:
    entry = models.get(M)
    return None if entry is None else str(entry["version"])


async def cli(*argv: str) -> tuple[int, str, str]:
    """``edge-fleet`` in a thread (the fleet answers on this loop), stdout/stderr kept."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return fleet_main(list(argv))

    code = await asyncio.to_thread(run)
    return code, out.getvalue(), err.getvalue()


def client_args(fleet: Fleet) -> list[str]:
    return ["--url", fleet.base, "--token", TOKEN]


# ------------------------------------------------------------------------ unassign


async def test_unassign_falls_back_to_the_more_general_assignment_then_to_nothing(
    fleet: Fleet, sims: Callable[..., Any]
) -> None:
    s1, s3 = await sims("shop-1"), await sims("shop-3")
    await fleet.call(
        "POST", "/v1/assignments", json={"model": M, "version": "1", "target": {"all": True}}
    )
    await fleet.call(
        "POST", "/v1/assignments", json={"model": M, "version": "2", "target": {"group": "north"}}
    )
    await fleet.call(
        "POST", "/v1/assignments", json={"model": M, "version": "1", "target": {"device": "shop-1"}}
    )
    await received(s1, lambda m: version_of(m) == "1")
    await received(s3, lambda m: version_of(m) == "1")
    listed = await fleet.call("GET", f"/v1/assignments?model={M}")
    assert [(a["target"], a["version"]) for a in listed["assignments"]] == [
        ({"device": "shop-1"}, "1"),
        ({"group": "north"}, "2"),
        ({"all": True}, "1"),
    ]

    code, out, err = await cli("assignments", "--model", M, *client_args(fleet))
    assert code == 0, err
    rows = [line.split()[1:4] for line in out.splitlines()[1:]]
    assert rows == [[M, "1", "device"], [M, "2", "group"], [M, "1", "all"]]

    # device → the group's version (the next more general assignment)
    doc = await fleet.call(
        "DELETE", "/v1/assignments", json={"model": M, "target": {"device": "shop-1"}}
    )
    assert doc["target"] == {"device": "shop-1"} and doc["devices_changed"] == ["shop-1"]
    assert [r["version"] for r in doc["removed"]] == ["1"]
    await received(s1, lambda m: version_of(m) == "2")

    # group → all, through the query form of the same route (the console's)
    status, doc = await fleet.raw("DELETE", f"/v1/assignments?model={M}&group=north")
    assert status == 200, doc
    assert doc["devices_changed"] == ["shop-1", "shop-2"]
    await received(s1, lambda m: version_of(m) == "1")

    # all → nothing: a desired document without the model (the agent then leaves the
    # model as it is, "unmanaged": agent/sync.py), for every device
    revision = s3.desired[-1]["revision"]
    code, out, err = await cli("unassign", M, "--all", *client_args(fleet))
    assert code == 0, err
    assert "unassigned tiny (1) from all" in out
    await received(s1, lambda m: m == {})
    models = await received(s3, lambda m: m == {})
    assert models == {} and s3.desired[-1]["revision"] > revision
    assert (await fleet.call("GET", "/v1/assignments"))["assignments"] == []
    # what the broker keeps for a device that connects later says the same
    late = await sims("shop-2")
    assert (await received(late, lambda m: True)) == {}

    # nothing left to remove: 404, said precisely; the CLI exits 1 with it
    status, doc = await fleet.raw(
        "DELETE", "/v1/assignments", json={"model": M, "target": {"all": True}}
    )
    assert (status, doc) == (404, {"error": "tiny has no assignment to all devices"})
    code, _, err = await cli("unassign", M, "--group", "north", "--json", *client_args(fleet))
    assert code == 1 and "404" in err and "tiny has no assignment to group 'north'" in err


async def test_unassign_refuses_bad_requests_and_a_running_rollout(
    fleet: Fleet, sims: Callable[..., Any]
) -> None:
    bad: list[tuple[dict[str, Any], str, str]] = [
        ({}, "", "model must be a non-empty string"),  # neither body nor query
        ({"json": {"target": {"all": True}}}, "", "model must be a non-empty string"),
        ({"json": {"model": M}}, "", "target must be one of"),
        ({"json": {"model": M, "target": {"planet": "x"}}}, "", "unknown target 'planet'"),
        ({"json": {"model": M, "target": {"all": False}}}, "", "target.all must be true"),
        ({"json": {"model": M, "target": {"group": "no/such"}}}, "", "group"),
        ({"json": {"model": M, "target": {"all": True}, "version": "1"}}, "", "unknown field"),
        ({"json": {"model": M, "target": {"all": True}}}, "?model=tiny&all=true", "not both"),
        ({}, "?model=tiny", "name one target"),
        ({}, "?model=tiny&group=north&all=true", "name one target"),
        ({}, "?model=tiny&all=yes", "all must be true"),
        ({}, "?model=tiny&all=true&force=1", "unknown query parameter(s) 'force'"),
    ]
    for kw, query, message in bad:
        status, doc = await fleet.raw("DELETE", "/v1/assignments" + query, **kw)
        assert status == 400 and message in doc["error"], (kw, query, doc)

    # A rollout to north whose first device holds: running, so north cannot be unassigned.
    await sims("shop-1", lambda d, m, v: "hold")
    await sims("shop-2", lambda d, m, v: "hold")
    await fleet.call(
        "POST", "/v1/assignments", json={"model": M, "version": "1", "target": {"all": True}}
    )
    rollout = await fleet.call(
        "POST",
        "/v1/assignments",
        json={"model": M, "version": "2", "target": {"group": "north"}, "waves": [1, "100%"]},
    )
    assert rollout["state"] == "running"
    status, doc = await fleet.raw(
        "DELETE", "/v1/assignments", json={"model": M, "target": {"group": "north"}}
    )
    assert status == 409, doc
    assert doc["error"] == (
        f"rollout {rollout['id']} of tiny:2 to group 'north' is running: roll it back"
        f" (POST /v1/rollouts/{rollout['id']}/rollback) or let it complete before unassigning"
    )
    assert len((await fleet.call("GET", "/v1/assignments"))["assignments"]) == 2  # untouched
    # Paused is unfinished too; rolled back is not.
    await fleet.call("POST", f"/v1/rollouts/{rollout['id']}/pause")
    status, doc = await fleet.raw("DELETE", f"/v1/assignments?model={M}&group=north")
    assert status == 409 and "is paused" in doc["error"]
    await fleet.call("POST", f"/v1/rollouts/{rollout['id']}/rollback")
    # (a console form's CSRF field riding along in the query is no unknown parameter)
    doc = await fleet.call("DELETE", f"/v1/assignments?model={M}&group=north&csrf_token=x")
    assert doc["removed"][0]["rollout_id"] == rollout["id"]
    # (the rolled-back rollout stays in the history)
    assert (await fleet.call("GET", f"/v1/rollouts/{rollout['id']}"))["state"] == "rolled_back"


# ------------------------------------------------------------------- delete/remove


async def test_a_version_in_use_is_refused_then_deleted_with_its_file(
    fleet: Fleet, sims: Callable[..., Any]
) -> None:
    bundles = fleet.service.cfg.bundle_dir
    v1_file = bundles / M / "1.bundle"
    assert v1_file.is_file()
    s1 = await sims("shop-1")
    await fleet.call(
        "POST", "/v1/assignments", json={"model": M, "version": "1", "target": {"device": "shop-1"}}
    )
    await fleet.call("PUT", f"/v1/models/{M}/labels/stable", json={"version": "1"})
    await until(
        lambda: fleet.device("shop-1"), lambda d: (d["models"].get(M) or {}).get("active") == "1"
    )

    status, doc = await fleet.raw("DELETE", f"/v1/models/{M}/versions/1")
    assert status == 409, doc
    error = doc["error"]
    assert error.startswith("cannot delete tiny:1: run or reported by device(s) shop-1; ")
    assert "in the desired state of device(s) shop-1" in error
    assert "assigned to device shop-1 (assignment " in error and ": unassign first" in error
    assert "label(s) stable -> 1: move them to another version first" in error
    code, _, err = await cli("models", "delete", M, "1", *client_args(fleet))
    assert code == 1 and "409" in err and "run or reported by device(s) shop-1" in err

    # Unassigned, the real agent keeps serving the version as "unmanaged" (agent/sync.py):
    # it still runs it, so the refusal stays, now for that reason (and the label) only.
    await fleet.call("DELETE", f"/v1/assignments?model={M}&device=shop-1")
    await received(s1, lambda m: m == {})
    await s1.report({M: {"active": "1", "previous": None, "desired": None, "state": "unmanaged"}})
    await until(
        lambda: fleet.device("shop-1"),
        lambda d: (d["models"].get(M) or {}).get("state") == "unmanaged",
    )
    status, doc = await fleet.raw("DELETE", f"/v1/models/{M}/versions/1")
    assert status == 409
    assert doc["error"] == (
        "cannot delete tiny:1: run or reported by device(s) shop-1;"
        " label(s) stable -> 1: move them to another version first"
    )

    # The store moves on to version 2 (1 is only its previous now) and the label too.
    await fleet.call(
        "POST", "/v1/assignments", json={"model": M, "version": "2", "target": {"device": "shop-1"}}
    )
    await until(
        lambda: fleet.device("shop-1"), lambda d: (d["models"].get(M) or {}).get("active") == "2"
    )
    await fleet.call("PUT", f"/v1/models/{M}/labels/stable", json={"version": "2"})
    code, out, err = await cli("models", "delete", M, "1", "--json", *client_args(fleet))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["version"] == "1" and doc["versions_removed"] == ["1"]
    assert doc["files_missing"] == [] and doc["labels_removed"] == []
    assert not v1_file.exists()
    assert [p.name for p in (bundles / ".incoming").iterdir()] == []  # no trash left
    assert (bundles / M / "2.bundle").is_file()
    assert [v["version"] for v in (await fleet.call("GET", f"/v1/models/{M}"))["versions"]] == ["2"]
    status, doc = await fleet.raw("GET", f"/v1/bundles/{M}/1")
    assert status == 404
    status, doc = await fleet.raw(
        "POST", "/v1/assignments", json={"model": M, "version": "1", "target": {"all": True}}
    )
    assert (status, doc) == (404, {"error": "model 'tiny' has no version '1'"})
    status, doc = await fleet.raw("DELETE", f"/v1/models/{M}/versions/1")
    assert (status, doc) == (404, {"error": "unknown model version tiny:1"})
    # The same version can be uploaded again afterwards (the registry forgot it).


async def test_removing_a_model_needs_every_version_unused(
    fleet: Fleet, sims: Callable[..., Any], make_tiny_bundle: Callable[..., Path]
) -> None:
    bundles = fleet.service.cfg.bundle_dir
    s3 = await sims("shop-3")
    await fleet.call("PUT", f"/v1/models/{M}/labels/stable", json={"version": "2"})
    rollout = await fleet.call(
        "POST",
        "/v1/assignments",
        json={"model": M, "version": "2", "target": {"group": "south"}, "waves": ["100%"]},
    )
    await until(
        lambda: fleet.call("GET", f"/v1/rollouts/{rollout['id']}"),
        lambda r: r["state"] == "completed",
    )
    status, doc = await fleet.raw("DELETE", f"/v1/models/{M}")
    assert status == 409
    assert doc["error"].startswith("cannot delete model tiny: run or reported by device(s) shop-3;")
    assert (
        f"assigned to group south (assignment 1, tiny:2, rollout {rollout['id']})" in doc["error"]
    )
    assert "label" not in doc["error"]  # a model's own labels go with it

    await fleet.call("DELETE", f"/v1/assignments?model={M}&group=south")
    await received(s3, lambda m: m == {})  # the sim then reports no model (none installed)
    await until(lambda: fleet.device("shop-3"), lambda d: d["models"] == {})
    code, out, err = await cli("models", "delete", M, *client_args(fleet))
    assert code == 0, err
    assert "deleted tiny:1, tiny:2" in out and "labels removed: stable" in out
    assert not (bundles / M).exists()
    status, doc = await fleet.raw("GET", f"/v1/models/{M}")
    assert (status, doc) == (404, {"error": "unknown model 'tiny'"})
    assert (await fleet.call("GET", "/v1/models"))["models"] == []
    status, doc = await fleet.raw("DELETE", f"/v1/models/{M}")
    assert (status, doc) == (404, {"error": "unknown model 'tiny'"})
    # A model removed can come back: the same bytes are a new upload (201).
    status, _ = await fleet.raw("POST", "/v1/models", data=make_tiny_bundle("1").read_bytes())
    assert status == 201


async def test_a_running_rollout_blocks_deleting_its_version(
    fleet: Fleet, sims: Callable[..., Any]
) -> None:
    await sims("shop-1", lambda d, m, v: "hold")
    await sims("shop-2", lambda d, m, v: "hold")
    rollout = await fleet.call(
        "POST",
        "/v1/assignments",
        json={"model": M, "version": "1", "target": {"group": "north"}, "waves": [1, "100%"]},
    )
    status, doc = await fleet.raw("DELETE", f"/v1/models/{M}/versions/1")
    assert status == 409
    assert f"rollout {rollout['id']} (tiny:1, running)" in doc["error"]
    # Version 2 is unused: it goes, while the rollout of 1 goes on.
    doc = await fleet.call("DELETE", f"/v1/models/{M}/versions/2")
    assert doc["versions_removed"] == ["2"]
    # Rolled back, the rollout holds nothing any more: the desired document of the device
    # it had reached no longer names 1 (and that device never reported it).
    await fleet.call("POST", f"/v1/rollouts/{rollout['id']}/rollback")
    doc = await fleet.call("DELETE", f"/v1/models/{M}/versions/1")
    assert doc["versions_removed"] == ["1"]


async def test_a_label_can_be_removed_and_a_revoked_device_does_not_block(
    fleet: Fleet, sims: Callable[..., Any]
) -> None:
    s3 = await sims("shop-3")
    await fleet.call(
        "POST", "/v1/assignments", json={"model": M, "version": "1", "target": {"device": "shop-3"}}
    )
    await fleet.call("PUT", f"/v1/models/{M}/labels/canary", json={"version": "1"})
    await received(s3, lambda m: m.get(M, {}).get("labels") == {"canary": "1"})
    doc = await fleet.call("DELETE", f"/v1/models/{M}/labels/canary")
    assert doc == {"name": M, "label": "canary", "version": "1", "deleted": True}
    # the devices' desired documents lose it (a new revision over the broker)
    await received(s3, lambda m: version_of(m) == "1" and not m[M].get("labels"))
    status, doc = await fleet.raw("DELETE", f"/v1/models/{M}/labels/canary")
    assert (status, doc) == (404, {"error": "model 'tiny' has no label 'canary'"})
    code, _, err = await cli("models", "unlabel", M, "canary", *client_args(fleet))
    assert code == 1 and "no label 'canary'" in err

    await until(
        lambda: fleet.device("shop-3"), lambda d: (d["models"].get(M) or {}).get("active") == "1"
    )
    status, doc = await fleet.raw("DELETE", f"/v1/models/{M}/versions/1")
    assert status == 409 and "run or reported by device(s) shop-3" in doc["error"]
    # A revoked store can download nothing any more: its reports no longer count (its
    # device assignment still does, until it is unassigned).
    await fleet.call("POST", "/v1/devices/shop-3/revoke")
    status, doc = await fleet.raw("DELETE", f"/v1/models/{M}/versions/1")
    assert status == 409
    assert doc["error"].startswith("cannot delete tiny:1: assigned to device shop-3 (assignment")
    await fleet.call("DELETE", f"/v1/assignments?model={M}&device=shop-3")
    doc = await fleet.call("DELETE", f"/v1/models/{M}/versions/1")
    assert doc["versions_removed"] == ["1"]


async def test_unassigning_and_deleting_need_the_operator_role(fleet: Fleet) -> None:
    await fleet.call(
        "POST", "/v1/assignments", json={"model": M, "version": "1", "target": {"all": True}}
    )
    read = {"Authorization": f"Bearer {READER}"}
    for method, path in (
        ("DELETE", f"/v1/models/{M}/versions/2"),
        ("DELETE", f"/v1/models/{M}"),
        ("DELETE", f"/v1/assignments?model={M}&all=true"),
    ):
        status, doc = await fleet.raw(method, path, headers=read)
        assert (status, doc) == (403, {"error": "dashboard (read) may not write"}), path
        async with fleet.session.request(method, fleet.base + path) as r:
            assert r.status == 401, path
    # a reader may look at the assignments
    status, doc = await fleet.raw("GET", "/v1/assignments", headers=read)
    assert status == 200 and [a["version"] for a in doc["assignments"]] == ["1"]
    assert len((await fleet.call("GET", f"/v1/models/{M}"))["versions"]) == 2  # untouched


# ----------------------------------------------------------------- wave timeout


async def test_wave_timeout_round_trip_through_api_and_cli(
    fleet: Fleet, sims: Callable[..., Any]
) -> None:
    await sims("shop-1", lambda d, m, v: "hold")
    rollout = await fleet.call(
        "POST",
        "/v1/assignments",
        json={
            "model": M,
            "version": "1",
            "target": {"group": "north"},
            "waves": [1, "100%"],
            "wave_timeout_s": 30,
        },
    )
    # a plain waves rollout still (no plan, so no promotion), with its timeout
    assert rollout["wave_timeout_s"] == 30 and rollout["plan"] is None
    got = await fleet.call("GET", f"/v1/rollouts/{rollout['id']}")
    assert got["wave_timeout_s"] == 30
    code, out, err = await cli("rollout", "status", rollout["id"], *client_args(fleet))
    assert code == 0, err
    assert "wave timeout: 30 s" in out
    code, out, _ = await cli("rollout", "status", *client_args(fleet))
    assert "30s" in out.splitlines()[1]
    await fleet.call("POST", f"/v1/rollouts/{rollout['id']}/rollback")

    # the CLI, and inside a plan (from a plan file's flags) too
    code, out, err = await cli(
        "assign", M, "2", "--group", "south", "--waves", "1,100%", "--wave-timeout", "45",
        "--json", *client_args(fleet),
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["wave_timeout_s"] == 45 and doc["plan"] is None
    await fleet.call("POST", f"/v1/rollouts/{doc['id']}/rollback")
    code, out, err = await cli(
        "assign", M, "2", "--group", "south", "--waves", "100%", "--wave-timeout", "60.5",
        "--gate", "error_rate <= 0.5", "--json", *client_args(fleet),
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["wave_timeout_s"] == 60.5 and doc["plan"]["wave_timeout_s"] == 60.5
    await fleet.call("POST", f"/v1/rollouts/{doc['id']}/rollback")


async def test_a_bad_wave_timeout_is_a_400_and_stores_nothing(fleet: Fleet) -> None:
    base = {"model": M, "version": "1", "target": {"group": "north"}, "waves": [1, "100%"]}
    bound = "wave_timeout_s must be above 0 and at most 604800 s (7 days)"
    cases: list[tuple[dict[str, Any], str]] = [
        ({**base, "wave_timeout_s": 0}, f"{bound}, not 0"),
        ({**base, "wave_timeout_s": -5}, f"{bound}, not -5"),
        ({**base, "wave_timeout_s": 604801}, f"{bound}, not 604801"),
        ({**base, "wave_timeout_s": "10"}, "wave_timeout_s must be a number of seconds, not '10'"),
        ({**base, "wave_timeout_s": True}, "wave_timeout_s must be a number of seconds, not True"),
        (
            {"model": M, "version": "1", "target": {"group": "north"}, "wave_timeout_s": 30},
            "wave_timeout_s applies to a staged rollout: give waves too",
        ),
        (
            {
                **base,
                "waves": None,
                "plan": {"waves": ["100%"], "wave_timeout_s": 5},
                "wave_timeout_s": 30,
            },
            "give wave_timeout_s either in plan or at the top level",
        ),
        (
            {
                "model": M,
                "version": "1",
                "target": {"group": "north"},
                "plan": {"waves": ["100%"], "wave_timeout_s": 10**7},
            },
            f"{bound}, not 1e+07",
        ),
    ]
    for body, message in cases:
        body = {k: v for k, v in body.items() if v is not None}
        status, doc = await fleet.raw("POST", "/v1/assignments", json=body)
        assert (status, doc) == (400, {"error": message}), body
    assert (await fleet.call("GET", "/v1/rollouts"))["rollouts"] == []
    assert (await fleet.call("GET", "/v1/assignments"))["assignments"] == []
    code, _, err = await cli(
        "assign", M, "1", "--group", "north", "--waves", "1,100%", "--wave-timeout", "0",
        *client_args(fleet),
    )  # fmt: skip
    assert code == 1 and f"{bound}, not 0" in err
    code, _, err = await cli("assign", M, "1", "--group", "north", "--wave-timeout", "9",
                             *client_args(fleet))  # fmt: skip
    assert code == 2 and "--wave-timeout applies to a staged rollout" in err


# ------------------------------------------------------------------- broken pipe


@pytest.mark.parametrize("argv", [["models", "list", "--json"], ["models", "list"]])
async def test_a_reader_that_goes_away_early_gets_no_traceback(
    fleet: Fleet, argv: list[str]
) -> None:
    """``edge-fleet models list --json | head``, the reader gone before the first byte:
    a real child process writing into a real pipe whose read end is closed."""
    env = {**os.environ, "EDGEFLEET_TOKEN": TOKEN, "EDGEFLEET_URL": fleet.base}

    def run() -> tuple[int, bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet.fleet", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # long before the child has imported anything, let alone written
        err = proc.stderr.read()
        return proc.wait(60), err

    code, err = await asyncio.to_thread(run)
    assert code == EXIT_BROKEN_PIPE == 141
    assert err == b"", err.decode()

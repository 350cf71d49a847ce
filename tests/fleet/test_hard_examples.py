"""The fleet's hard-example store and labelling queue (issue 11, part 6), through the real
fleet service's HTTP API on loopback (real SQLite, real files, real Mosquitto for its
MQTT side): uploads authenticated as the device, refusals that store nothing, dedup,
the storage budget, labels, and an export that ``edge-convert calibrate`` reads as is.

Uploads are built with the agent's own encoder (core/hard_example_wire.py); the whole
device path (agent store -> uploader -> fleet) is tests/e2e/test_hard_example_upload.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from edgefleet.converters.cli import EXIT_OK
from edgefleet.converters.cli import main as convert_main
from edgefleet.fleet.cli import main as fleet_main
from edgefleet.fleet.service import FleetService
from tests.support.brokers import Mosquitto
from tests.support.console_fleet import hard_example
from tests.support.quality_fleet import TOKEN, Fleet, fleet_config
from tests.support.tiny import TEST_X, tiny_reference

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40  # the magic is what the fleet checks


@pytest.fixture
def start_fleet(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto
) -> Callable[..., Any]:
    return lambda **extra: FleetService(fleet_config(tmp_path, keys, mosquitto.port, **extra))


@pytest.fixture
async def fleet(start_fleet: Any, cloud_bundles: dict[str, Path]) -> AsyncIterator[Fleet]:
    svc = await start_fleet(hard_examples={"max_bytes": 20_000, "max_example_bytes": 4000}).start()
    async with aiohttp.ClientSession() as session:
        try:
            async with asyncio.timeout(10):
                await svc.bus.wait_connected()
            f = Fleet(svc, session)
            await f.call("POST", "/v1/models", data=cloud_bundles["edge"].read_bytes())
            yield f
        finally:
            await svc.stop()


def example(
    i: int, device: str = "shop-1", *, image: bytes = b"", **header: Any
) -> tuple[str, bytes]:
    """Item ``i`` of TEST_X as the tiny model (labels a, b, c) and the cloud saw it."""
    return hard_example(i, device, image=image, **header)


async def device_put(
    fleet: Fleet, creds: tuple[str, str], hid: str, body: bytes
) -> tuple[int, dict[str, Any]]:
    auth = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
    async with fleet.session.put(
        f"{fleet.base}/v1/hard-examples/{hid}",
        data=body,
        headers={"Authorization": f"Basic {auth}"},
    ) as r:
        return r.status, await r.json(content_type=None)


async def enrolled(fleet: Fleet, name: str) -> tuple[str, str]:
    doc = await fleet.enrol(name, ["north"])
    return doc["device_id"], doc["mqtt"]["password"]


def stored_files(fleet: Fleet) -> list[Path]:
    return sorted((fleet.service.cfg.hard_examples_dir).rglob("*.efh"))


async def test_an_upload_is_stored_once_and_bad_ones_store_nothing(fleet: Fleet) -> None:
    shop = await enrolled(fleet, "shop-1")
    other = await enrolled(fleet, "shop-2")
    hid, body = example(0, image=PNG)
    status, doc = await device_put(fleet, shop, hid, body)
    assert (status, doc) == (201, {"id": hid, "stored": True, "already": False})
    status, doc = await device_put(fleet, shop, hid, body)
    assert (status, doc["stored"], doc["already"]) == (200, False, True)
    # "Already have it" is about these bytes only: other bytes under that id are refused.
    status, doc = await device_put(fleet, shop, hid, example(1)[1])
    assert status == 400 and "sha256" in doc["error"]
    assert len(stored_files(fleet)) == 1

    hid2, body2 = example(1)
    refusals = [
        (shop, hid2, b"garbage" * 10, 400, "sha256"),
        (shop, "not-an-id", body2, 400, "64 hex"),
        (shop, hid2, body2[:-3], 400, "sha256"),
        (other, hid2, body2, 403, "shop-1"),  # shop-2 uploading shop-1's case
        (("shop-1", "wrong-secret"), hid2, body2, 401, "secret"),
        (("ghost", "x"), hid2, body2, 401, "secret"),
    ]
    big = example(2, image=PNG + b"\x00" * 5000)
    refusals.append((shop, big[0], big[1], 413, "limit"))
    import hashlib

    for junk in (b"EFH1" + b"\xff" * 40, b"EFH1\x02\x00\x00\x00{}"):
        refusals.append((shop, hashlib.sha256(junk).hexdigest(), junk, 400, "header"))
    forged_hid, forged = example(3, kind="Not A Kind")
    refusals.append((shop, forged_hid, forged, 400, "kind"))
    for creds, h, b, want, words in refusals:
        status, doc = await device_put(fleet, creds, h, b)
        assert status == want, (want, status, doc)
        assert words in doc["error"], doc
    # A bearer token is no device.
    status, doc = await fleet.raw("PUT", f"/v1/hard-examples/{hid2}", data=body2)
    assert status == 403
    listed = (await fleet.call("GET", "/v1/hard-examples"))["hard_examples"]
    assert [r["id"] for r in listed] == [hid]
    assert len(stored_files(fleet)) == 1, "a refused upload left a file behind"


async def test_the_storage_budget_refuses_with_507_and_stores_nothing(fleet: Fleet) -> None:
    shop = await enrolled(fleet, "shop-1")
    stored = 0
    for i in range(8):
        hid, body = example(i % 8, created_at=float(i), image=PNG + bytes([i]) * 3000)
        status, doc = await device_put(fleet, shop, hid, body)
        if status == 507:
            assert "full" in doc["error"]
            break
        assert status == 201, doc
        stored += len(body)
    else:
        raise AssertionError("the 20,000 byte budget was never reached")
    assert stored <= 20_000
    listed = (await fleet.call("GET", "/v1/hard-examples"))["hard_examples"]
    assert sum(r["bytes"] for r in listed) == stored
    assert len(stored_files(fleet)) == len(listed)
    # An operator deletes one: its bytes are free again, and the refused one fits.
    gone = await fleet.call("DELETE", f"/v1/hard-examples/{listed[0]['id']}")
    assert gone["bytes"] == listed[0]["bytes"]
    assert (await fleet.raw("DELETE", f"/v1/hard-examples/{listed[0]['id']}"))[0] == 404
    assert (await device_put(fleet, shop, hid, body))[0] == 201
    assert len(stored_files(fleet)) == len(listed)


async def test_filter_show_label_and_export_for_calibrate(
    fleet: Fleet,
    cloud_bundles: dict[str, Path],
    keys: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shop, other = await enrolled(fleet, "shop-1"), await enrolled(fleet, "shop-2")
    ids = []
    for i in range(6):
        creds = shop if i < 4 else other
        hid, body = example(
            i, creds[0], image=PNG if i % 2 else b"", kind="audit" if i == 5 else "unsure"
        )
        assert (await device_put(fleet, creds, hid, body))[0] == 201
        ids.append(hid)

    async def ids_of(query: str) -> set[str]:
        rows = (await fleet.call("GET", f"/v1/hard-examples?{query}"))["hard_examples"]
        return {r["id"] for r in rows}

    assert await ids_of("device=shop-2") == set(ids[4:])
    assert await ids_of("reason=audit") == {ids[5]}
    assert await ids_of("model=tiny&version=1") == set(ids)
    assert await ids_of("model=other") == set()
    assert await ids_of(f"prefix={ids[0][:12]}") == {ids[0]}
    status, doc = await fleet.raw("GET", "/v1/hard-examples?labelled=maybe")
    assert status == 400

    one = await fleet.call("GET", f"/v1/hard-examples/{ids[1]}")
    probs = tiny_reference(TEST_X[1:2])
    assert one["edge_label"] == ["a", "b", "c"][int(probs.argmax())]
    assert one["cloud_outputs"]["probs"]["shape"] == [1, 3]
    np.testing.assert_allclose(one["edge_outputs"]["probs"]["data"], probs.ravel(), rtol=1e-6)
    async with fleet.session.get(
        f"{fleet.base}/v1/hard-examples/{ids[1]}/image",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as r:
        assert r.status == 200 and r.content_type == "image/png" and await r.read() == PNG
    status, doc = await fleet.raw("GET", f"/v1/hard-examples/{ids[0]}/image")
    assert status == 404 and "tensors" in doc["error"]

    # Labels: one of the model's, by an operator; anything else is refused.
    assert (await fleet.raw("PUT", f"/v1/hard-examples/{ids[0]}/label", json={"label": "zebra"}))[
        0
    ] == 400
    assert (await fleet.raw("PUT", f"/v1/hard-examples/{ids[0]}/label", json={"label": 3}))[
        0
    ] == 400
    assert (await fleet.raw("PUT", f"/v1/hard-examples/{'0' * 64}/label", json={"label": "a"}))[
        0
    ] == 404
    truth = ["b", "c", "a", "b", "c"]  # five labelled, the sixth left unlabelled
    for hid, label in zip(ids, truth, strict=False):
        doc = await fleet.call("PUT", f"/v1/hard-examples/{hid}/label", json={"label": label})
        assert doc["label"] == label and doc["label_id"] == "abc".index(label)
    assert await ids_of("labelled=false") == {ids[5]}

    # The CLI's label command (its main, in a thread: it is a blocking client).
    env_args = ["--url", fleet.base, "--token", TOKEN]
    cli = ["hard-examples", "label", ids[5][:16]]
    assert await asyncio.to_thread(fleet_main, [*cli, "a", *env_args]) == 0
    assert await asyncio.to_thread(fleet_main, [*cli, "--clear", *env_args]) == 0
    assert await ids_of("labelled=true") == set(ids[:5])

    capsys.readouterr()
    assert (
        await asyncio.to_thread(
            fleet_main, ["hard-examples", "list", "--device", "shop-2", "--json", *env_args]
        )
        == 0
    )
    listed = json.loads(capsys.readouterr().out)["hard_examples"]
    assert {r["id"] for r in listed} == set(ids[4:])
    image = tmp_path / "one.png"
    show = ["hard-examples", "show", ids[1][:20], "--image", str(image), *env_args]
    assert await asyncio.to_thread(fleet_main, show) == 0
    printed = capsys.readouterr().out
    assert "edge answer:" in printed and "cloud answer:" in printed and ids[1] in printed
    assert image.read_bytes() == PNG

    out = tmp_path / "export"
    export = ["hard-examples", "export", "--model", "tiny", "--out", str(out), "--json"]
    assert await asyncio.to_thread(fleet_main, [*export, *env_args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["examples"] == 5 and summary["images"] == 2
    lines = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    with np.load(out / "eval.npz") as npz:
        assert npz["x"].shape == (5, 4)
        assert npz["y"].tolist() == ["abc".index(r["label"]) for r in lines]
        by_id = {hid: i for i, hid in enumerate(ids)}
        for row, x in zip(lines, npz["x"], strict=True):
            np.testing.assert_array_equal(x, TEST_X[by_id[row["id"]]])
    for row in lines:
        if row["image"]:
            assert (out / row["image"]).read_bytes() == PNG

    # edge-convert calibrate reads the export as it is.
    rc = await asyncio.to_thread(
        convert_main,
        [
            "calibrate",
            str(cloud_bundles["edge"]),
            "--eval",
            str(out / "eval.npz"),
            "--cloud-predictions",
            str(out / "cloud.npz"),
            "--pubkey",
            str(keys[1]),
            "--json",
        ],
    )
    assert rc == EXIT_OK

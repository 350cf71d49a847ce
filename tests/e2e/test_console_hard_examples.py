"""The hard-example labelling queue in a real headless Chromium (issue 12).

A real fleet service (this test's loop serves it; Selenium runs on a worker thread
through ``asyncio.to_thread``), the tiny model in its registry (labels a, b, c), a
device enrolled and its hard examples uploaded as the agent uploads them. An operator
signs in and labels three examples with the keyboard only (class keys, Enter, ``s`` to
skip, arrows to go back), sees the queue shrink, sees a new upload appear by itself,
and downloads the export: the same folder ``edge-fleet hard-examples export`` writes
(compared file by file). Screenshots under tests/artifacts/screenshots/.

Also, cheaper: the compact tensor view on its own, and the queue's filters, order,
counts and filtered export over plain HTTP (a cookie-jar client signed in as a browser).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from edgefleet.fleet.cli import Client
from edgefleet.fleet.cli_quality import export_dataset
from edgefleet.fleet.service import FleetService
from tests.support.browser import console_errors, login, screenshot, wait_for
from tests.support.console_fleet import (
    ADMIN,
    OPERATOR,
    ConsoleClient,
    bearer,
    console_config,
    enrol,
    hard_example,
    upload,
)
from tests.support.images import BIG, png

LABELS = {"a": 0, "b": 1, "c": 2}


@pytest.fixture
async def fleet(
    tmp_path: Path, keys: tuple[Path, Path], cloud_bundles: dict[str, Path]
) -> AsyncIterator[FleetService]:
    svc = await FleetService(console_config(tmp_path, keys)).start()
    try:
        async with aiohttp.ClientSession() as http:
            status, doc = await bearer(
                http, svc.url, "POST", "/v1/models", ADMIN, data=cloud_bundles["edge"].read_bytes()
            )
            assert status == 201, doc
        yield svc
    finally:
        await svc.stop()


def press(driver: webdriver.Chrome, *keys: str) -> None:
    """Keys typed on the page itself (nothing focused), as a person labelling does."""
    chain = ActionChains(driver)
    for key in keys:
        chain.send_keys(key)
    chain.perform()


def open_id(driver: webdriver.Chrome) -> str:
    return str(
        driver.execute_script(
            "var i = document.getElementById('he-item'); return i ? i.dataset.id : '';"
        )
    )


def wait_open(driver: webdriver.Chrome, hid: str, timeout: float = 10.0) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: open_id(d) == hid)


def queue_ids(driver: webdriver.Chrome) -> list[str]:
    # One script call: a live update may replace the rows between two WebDriver calls.
    return list(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('#he-table tr.he-row'))"
            ".map((r) => r.dataset.id);"
        )
    )


def fetch_export(driver: webdriver.Chrome) -> tuple[int, str, bytes]:
    """The page's export link fetched by the page (its session cookie): status, type, body."""
    href = driver.find_element(By.ID, "he-export").get_attribute("href")
    doc = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch(arguments[0], {credentials: "same-origin"}).then(async (r) => {
          const buf = new Uint8Array(await r.arrayBuffer());
          let s = ""; for (const b of buf) s += String.fromCharCode(b);
          done({status: r.status, type: r.headers.get("content-type"), b64: btoa(s)});
        }).catch((e) => done({status: 0, type: String(e), b64: ""}));
        """,
        href,
    )
    return int(doc["status"]), str(doc["type"]), base64.b64decode(doc["b64"])


async def test_label_three_with_the_keyboard_watch_the_queue_shrink_and_export(
    fleet: FleetService, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    run = asyncio.to_thread
    async with aiohttp.ClientSession() as http:
        creds = await enrol(http, fleet.url, "shop-1")
        ids = []
        for i in range(5):
            # The last one uploaded (the first in the queue: newest first) has an image.
            hid, body = hard_example(i, "shop-1", image=png(BIG) if i == 4 else b"")
            assert await upload(http, fleet.url, creds, hid, body) == 201
            ids.append(hid)
        queue = list(reversed(ids))  # newest first

        await run(login, browser, fleet.url, OPERATOR)
        await run(browser.get, fleet.url + "/ui/hard-examples")
        await run(wait_for, browser, "#he-unlabelled", "5")
        assert await run(queue_ids, browser) == queue
        await run(wait_open, browser, queue[0])
        # The image, through the API with the session cookie, decoded by the browser.
        size = await run(
            browser.execute_script,
            "var i = document.getElementById('he-image');"
            " return i && i.complete ? [i.naturalWidth, i.naturalHeight] : null;",
        )
        assert size == [40, 40], size
        ctype = await run(
            browser.execute_async_script,
            "const done = arguments[0];"
            " fetch(document.getElementById('he-image').src, {credentials: 'same-origin'})"
            ".then((r) => done([r.status, r.headers.get('content-type')]));",
        )
        assert ctype == [200, "image/png"], ctype
        keys_text = (await run(wait_for, browser, "#he-keys")).text
        assert "Enter" in keys_text and "skip" in keys_text
        # The classes with their keys; the cloud's answer is picked to begin with.
        doc0 = (await bearer(http, fleet.url, "GET", f"/v1/hard-examples/{queue[0]}", ADMIN))[1]
        picked = await run(
            browser.execute_script,
            "return Array.from(document.querySelectorAll('#he-classes .he-class'))"
            ".map(b => [b.dataset.key, b.dataset.label, b.classList.contains('picked')]);",
        )
        assert picked == [[k, k, k == doc0["cloud_label"]] for k in "abc"], picked
        await run(screenshot, browser, "hard examples queue")

        # 1st: "a", Enter → labelled, and the next opens.
        await run(press, browser, "a", Keys.ENTER)
        await run(wait_open, browser, queue[1])
        # 2nd: skipped with "s"; 3rd: "c", Enter.
        await run(press, browser, "s")
        await run(wait_open, browser, queue[2])
        await run(press, browser, "c", Keys.ENTER)
        await run(wait_open, browser, queue[3])
        # Back up to the skipped one with the arrow: "b", Enter.
        await run(press, browser, Keys.ARROW_UP)
        await run(wait_open, browser, queue[1])
        await run(press, browser, "b", Keys.ENTER)
        await run(wait_open, browser, queue[3])
        await run(wait_for, browser, "#he-unlabelled", "2")
        assert await run(queue_ids, browser) == [queue[3], queue[4]]
        await run(screenshot, browser, "hard examples after labelling three")

        want = {queue[0]: "a", queue[2]: "c", queue[1]: "b"}
        for hid, label in want.items():
            doc = (await bearer(http, fleet.url, "GET", f"/v1/hard-examples/{hid}", ADMIN))[1]
            assert (doc["label"], doc["labelled_by"]) == (label, "ops"), doc
        for hid in (queue[3], queue[4]):
            doc = (await bearer(http, fleet.url, "GET", f"/v1/hard-examples/{hid}", ADMIN))[1]
            assert doc["label"] is None
        status, audit = await bearer(http, fleet.url, "GET", "/v1/audit", ADMIN)
        labelled = [e for e in audit["entries"] if e["action"].endswith("/label")]
        assert [(e["actor"], e["via"], e["status"]) for e in labelled] == [
            ("ops", "session", 200)
        ] * 3

        # A new upload shows up by itself (live), and the count grows.
        hid, body = hard_example(5, "shop-1")
        assert await upload(http, fleet.url, creds, hid, body) == 201
        await run(wait_for, browser, f'#he-table tr[data-id="{hid}"]', None, 5.0)
        await run(wait_for, browser, "#he-unlabelled", "3")
        assert open_id(browser) == queue[3], "a live update took the labeller's place away"
        # A label set elsewhere (another labeller, the CLI) leaves this queue by itself.
        status, doc = await bearer(
            http,
            fleet.url,
            "PUT",
            f"/v1/hard-examples/{queue[4]}/label",
            ADMIN,
            json={"label": "a"},
        )
        assert status == 200, doc
        await run(wait_for, browser, "#he-unlabelled", "2")
        assert await run(queue_ids, browser) == [hid, queue[3]]
        want[queue[4]] = "a"

        # Export: the page's link, fetched with the session.
        status, ctype, raw = await run(fetch_export, browser)
        assert status == 200 and ctype == "application/zip", (status, ctype, raw[:200])
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            names = set(zf.namelist())
            assert names == {"eval.npz", "cloud.npz", "index.jsonl", f"images/{queue[0]}.png"}
            assert zf.read(f"images/{queue[0]}.png") == png(BIG)
            index = [json.loads(line) for line in zf.read("index.jsonl").decode().splitlines()]
            ours = {
                n: np.load(io.BytesIO(zf.read(n)), allow_pickle=False)
                for n in ("eval.npz", "cloud.npz")
            }
        assert {r["id"]: r["label"] for r in index} == want
        # The CLI's export of the same examples: the same arrays, the same index.
        out = tmp_path / "cli-export"
        client = Client(fleet.url, ADMIN)
        summary = await run(export_dataset, client, out, {"model": "tiny"})
        assert summary["examples"] == 4
        cli_index = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
        assert cli_index == index
        for name, arrays in ours.items():
            with np.load(out / name, allow_pickle=False) as theirs:
                assert sorted(theirs.files) == sorted(arrays.files)
                for key in theirs.files:
                    np.testing.assert_array_equal(arrays[key], theirs[key])
        assert list(ours["eval.npz"]["y"]) == [LABELS[r["label"]] for r in index]
        assert (out / "images" / f"{queue[0]}.png").read_bytes() == png(BIG)

        errors = await run(console_errors, browser)
        assert errors == [], "the browser's console:\n" + "\n".join(errors)


async def test_a_tensor_example_shows_a_heat_map_and_export_refusals(
    fleet: FleetService, browser: webdriver.Chrome
) -> None:
    """An example without an image shows its input: a 4-feature vector as its top values;
    a 1x1x8x8 input (a tiny image) as a heat-map drawn on a canvas. The export refuses
    several models (400) and an empty selection (404) before sending anything."""
    run = asyncio.to_thread
    async with aiohttp.ClientSession() as http:
        creds = await enrol(http, fleet.url, "shop-1")
        hid, body = hard_example(0, "shop-1")
        assert await upload(http, fleet.url, creds, hid, body) == 201
        await run(login, browser, fleet.url, OPERATOR)
        await run(browser.get, f"{fleet.url}/ui/hard-examples/{hid}")
        await run(wait_open, browser, hid)
        fig = await run(wait_for, browser, "figure.he-tensor", "1×4 float32")
        assert len(fig.find_elements(By.CSS_SELECTOR, "table.he-top tbody tr")) == 4
        await run(screenshot, browser, "hard example tensor")

        square = np.zeros((1, 1, 8, 8), np.float32)
        square[..., 2:6, 2:6] = 1.0
        hid2, body = hard_example(1, "shop-1", inputs={"x": square})
        assert await upload(http, fleet.url, creds, hid2, body) == 201
        await run(browser.get, f"{fleet.url}/ui/hard-examples/{hid2}")
        await run(wait_open, browser, hid2)
        await run(wait_for, browser, "figure.he-tensor", "1×1×8×8 float32")
        pixels = await run(
            browser.execute_script,
            "var c = document.querySelector('canvas.he-heatmap');"
            " if (!c || c.dataset.drawn !== '1') return null;"
            " var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " return [c.width, c.height, [d[0], d[1], d[2]], [d[4*(3*8+3)], d[4*(3*8+3)+1], d[4*(3*8+3)+2]]];",
        )
        assert pixels is not None and pixels[:2] == [8, 8], pixels
        assert pixels[2] != pixels[3], "the hot square looks like the cold border"
        await run(screenshot, browser, "hard example heat map")

        # A stale link to an example that is gone: the queue, saying so.
        await run(browser.get, f"{fleet.url}/ui/hard-examples/{'0' * 64}")
        await run(wait_for, browser, "#he-missing", "no hard example")
        status, doc = await bearer(
            http, fleet.url, "GET", "/ui/hard-examples/export.zip?model=tiny", ADMIN
        )
        assert status == 404 and "no labelled" in doc["error"]
        status, doc = await bearer(
            http, fleet.url, "GET", "/ui/hard-examples/export.zip?agree=maybe", ADMIN
        )
        assert status == 400 and "agree" in doc["error"]
        assert await run(console_errors, browser) == []


def test_heat_map_grid_of_an_image_input() -> None:
    """The compact tensor view (fleet/console/hard_examples.py) on inputs of the shapes
    models take: an NCHW grey image, an NHWC colour one, a flat 28*28 vector."""
    from edgefleet.fleet.console.hard_examples import tensor_views

    def npz(**arrays: Any) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    img = np.zeros((1, 1, 64, 48), np.float32)
    img[..., :32, :] = 1.0
    views = tensor_views(npz(**{"input.x": img, "edge.probs": np.ones((1, 3))}))
    assert [v["name"] for v in views] == ["x"]
    grid = views[0]["grid"]
    assert (len(grid), len(grid[0])) == (32, 24)  # 2x2 blocks, at most 32 a side
    assert grid[0][0] == 1.0 and grid[-1][0] == 0.0
    rgb = np.random.default_rng(0).random((1, 20, 20, 3)).astype(np.float32)
    (view,) = tensor_views(npz(**{"input.image": rgb}))
    assert (len(view["grid"]), len(view["grid"][0])) == (20, 20)
    flat = np.arange(784, dtype=np.float32).reshape(1, 784)
    (view,) = tensor_views(npz(**{"input.x": flat}))
    assert len(view["grid"]) == 28 and view["grid"][-1][-1] == 1.0
    vec = np.array([[0.5, 3.0, -1.0, 2.0, 0.0]], np.float32)
    (view,) = tensor_views(npz(**{"input.x": vec}))
    assert view["grid"] is None and [i for i, _ in view["top"]] == [1, 3, 0, 4, 2]
    odd = np.full((1, 16), np.nan, np.float32)
    odd[0, 3] = np.inf
    view, text = tensor_views(npz(**{"input.x": odd, "input.s": np.array(["a"])}))
    assert json.dumps(view, allow_nan=False)  # what the page's script gets is JSON
    assert len(view["grid"]) == 4 and view["grid"][0][3] == 1.0
    assert (text["shape"], text["grid"], text["top"]) == ([1], None, [])  # named only


async def test_queue_filters_order_and_export_selection_over_http(fleet: FleetService) -> None:
    """The queue's filters (model, version, reason, agreement, state) and order (unlabelled
    first, newest first), and the export of what the filters select, over plain HTTP."""
    async with aiohttp.ClientSession() as http:
        creds = await enrol(http, fleet.url, "shop-1")
        ids = []
        for i, (kind, agree) in enumerate(
            [("unsure", False), ("audit", True), ("unsure", None), ("audit", False)]
        ):
            extra: dict[str, Any] = {"kind": kind, "agree": agree}
            if agree is None:  # no cloud answer at all
                extra.update(cloud_model=None, cloud_version=None, cloud_class=None,
                             cloud_confidence=None, status="expired")  # fmt: skip
            hid, body = hard_example(i, "shop-1", **extra)
            assert await upload(http, fleet.url, creds, hid, body) == 201, extra
            ids.append(hid)
        status, doc = await bearer(
            http, fleet.url, "PUT", f"/v1/hard-examples/{ids[3]}/label", ADMIN, json={"label": "b"}
        )
        assert status == 200, doc

    async with ConsoleClient(fleet.url) as browser:
        assert (await browser.login(OPERATOR)).status == 303

        async def listed(query: str) -> tuple[list[str], str]:
            status, text, _ = await browser.page(f"/ui/hard-examples?{query}")
            assert status == 200, (query, text[:300])
            found = re.findall(r'<tr class="he-row[^"]*" data-id="([0-9a-f]{64})"', text)
            count = re.search(r'id="he-unlabelled">(\d+)<', text)
            return found, count.group(1) if count else ""

        assert await listed("") == ([ids[2], ids[1], ids[0]], "3")  # unlabelled, newest first
        assert await listed("state=all") == ([ids[2], ids[1], ids[0], ids[3]], "3")
        assert await listed("state=labelled") == ([ids[3]], "3")
        assert await listed("reason=audit&state=all") == ([ids[1], ids[3]], "1")
        assert await listed("agree=disagree") == ([ids[0]], "1")
        assert await listed("agree=agree") == ([ids[1]], "1")
        assert await listed("agree=unknown") == ([ids[2]], "1")
        assert await listed("model=tiny&version=1&state=all") == (
            [ids[2], ids[1], ids[0], ids[3]],
            "3",
        )
        assert await listed("model=other") == ([], "0")
        status, text, _ = await browser.page("/ui/hard-examples?state=maybe")
        assert status == 400
        # The fragment live updates fetch: the queue alone.
        status, text, _ = await browser.page("/ui/hard-examples", headers={"HX-Request": "true"})
        assert (
            status == 200 and "he-table" in text and "<html" not in text and "he-item" not in text
        )

        # Export: what the filters select (labelled only), with the page's link.
        status, text, _ = await browser.page("/ui/hard-examples?reason=audit&state=all")
        href = re.search(r'id="he-export" href="([^"]+)"', text)
        assert href is not None, text
        async with browser.session.get(fleet.url + href.group(1).replace("&amp;", "&")) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "application/zip"
            assert "hard-examples-tiny.zip" in r.headers["Content-Disposition"]
            raw = await r.read()
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            index = [json.loads(x) for x in zf.read("index.jsonl").decode().splitlines()]
            with np.load(io.BytesIO(zf.read("eval.npz")), allow_pickle=False) as ev:
                assert ev["x"].shape == (1, 4) and list(ev["y"]) == [1]
        assert [(r["id"], r["label"], r["reason"]) for r in index] == [(ids[3], "b", "audit")]
        async with browser.session.get(
            fleet.url + "/ui/hard-examples/export.zip?reason=unsure"
        ) as r:
            assert r.status == 404  # nothing labelled among them

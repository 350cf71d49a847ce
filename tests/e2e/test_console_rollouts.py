"""The console's model and rollout pages in a real headless Chromium (issue 12): a fleet
manager uploads a bundle through the form and watches the progress reach 100 %, starts
a gated rollout from the model page's form, watches the waves advance live on the
rollout page (no reload) while two real ``edge-agent serve`` processes install the
version and serve traffic, sees the gate's chart drawn from its history, and presses
roll back; the stores go back to version 1.

The fleet service runs in this test's loop on a real Mosquitto; Selenium's blocking
calls go through ``asyncio.to_thread`` so the loop keeps serving the pages. Screenshots
go to tests/artifacts/screenshots/ (not committed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from edgefleet.fleet.service import FleetService
from tests.support.agent_process import AgentProcess
from tests.support.brokers import Mosquitto, free_port
from tests.support.browser import console_errors, login, screenshot, wait_for
from tests.support.quality_fleet import TOKEN, Fleet, fleet_config, fleet_section, until
from tests.support.tiny import TEST_X, W2


@pytest.fixture
async def fleet(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto
) -> AsyncIterator[Fleet]:
    svc = await FleetService(fleet_config(tmp_path, keys, mosquitto.port)).start()
    # Every evaluation a second apart on the gate chart (5 s by default): the test's
    # waves last seconds, the chart should still show a line.
    svc.bus.rollouts.series_interval_s = 1.0
    async with aiohttp.ClientSession() as session:
        async with asyncio.timeout(10):
            await svc.bus.wait_connected()
        yield Fleet(svc, session)
    await svc.stop()


def agent_config(tmp: Path, keys: tuple[Path, Path], enrolled: dict[str, Any], v1: Path) -> Any:
    name = enrolled["device_id"]
    (tmp / name).mkdir()
    return {
        "server": {"host": "127.0.0.1", "port": 0},
        "store": {"path": str(tmp / name / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(v1)}],
        "runtime": {"executor_threads": 1},
        "device_id": name,
        "fleet": fleet_section(enrolled, tmp),
    }


async def traffic(bases: list[str], stop: asyncio.Event) -> dict[str, int]:
    """Each store's local app: the test inputs, one request at a time."""
    seen: dict[str, int] = {}

    async def one(session: aiohttp.ClientSession, base: str) -> None:
        i = 0
        while not stop.is_set():
            x = TEST_X[i % len(TEST_X)].tolist()
            body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x}]}
            async with session.post(f"{base}/v2/models/tiny/infer", json=body) as r:
                doc = await r.json()
                key = f"v{doc['model_version']}" if r.status == 200 else f"HTTP {r.status}"
                seen[key] = seen.get(key, 0) + 1
            i += 1
            await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, b) for b in bases))
    return seen


async def active(fleet: Fleet, device_id: str) -> str | None:
    doc = await fleet.device(device_id)
    return ((doc.get("models") or {}).get("tiny") or {}).get("active")


def in_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return asyncio.to_thread(fn, *args, **kw)


def upload(driver: webdriver.Chrome, base: str, bundle: Path) -> dict[str, Any]:
    """The models page's upload form, as a person uses it; what the progress showed."""
    driver.get(base + "/ui/models")
    wait_for(driver, "#upload-form")
    driver.find_element(By.ID, "upload-file").send_keys(str(bundle))
    driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    wait_for(driver, "#upload-status", text="Uploaded tiny 2", timeout=20)
    # Listed without a reload: the upload fires the models topic, the list refreshes.
    wait_for(driver, '#models-table .version[data-version="2"]')
    bar = driver.find_element(By.ID, "upload-progress")
    return {"value": float(bar.get_property("value")), "max": float(bar.get_property("max"))}


def start_rollout(driver: webdriver.Chrome, base: str) -> str:
    """The model page's assign form: group north, version 2, waves 1 then all, one gate."""
    driver.get(base + "/ui/models/tiny")
    wait_for(driver, "#assign-form")
    Select(driver.find_element(By.ID, "a-kind")).select_by_value("group")
    driver.find_element(By.ID, "a-target").send_keys("north")
    Select(driver.find_element(By.ID, "a-version")).select_by_value("2")
    driver.find_element(By.ID, "a-waves").send_keys("1, 100%")
    driver.find_element(By.ID, "a-gates").send_keys("error_rate <= baseline + 0.1")
    driver.find_element(By.ID, "a-minreq").send_keys("20")
    driver.find_element(By.ID, "a-minbase").send_keys("20")
    # No full-page screenshot here: Chrome's capture beyond the viewport leaves the next
    # click's coordinates off (the click lands on the form, not on its button).
    driver.find_element(By.ID, "assign-submit").click()
    try:
        WebDriverWait(driver, 15, poll_frequency=0.05).until(
            lambda d: urlsplit(d.current_url).path.startswith("/ui/rollouts/r-")
        )
    except TimeoutException:
        toast = driver.find_element(By.ID, "toast").get_attribute("textContent")
        raise AssertionError(
            f"the assign form did not open a rollout: {toast!r}; {console_errors(driver)}"
        ) from None
    wait_for(driver, "#rollout-state")
    # A mark on this document: still there at the end means the page never reloaded.
    driver.execute_script("window.__notReloaded = true;")
    return urlsplit(driver.current_url).path.rsplit("/", 1)[1]


def gate_chart_points(driver: webdriver.Chrome) -> int:
    el = wait_for(driver, ".gate-chart canvas", timeout=15)
    assert el is not None
    return int(driver.find_element(By.CSS_SELECTOR, ".gate-chart").get_attribute("data-points"))


def delete_version_in_use(driver: webdriver.Chrome) -> str:
    button = driver.find_element(By.CSS_SELECTOR, '#versions tr[data-version="1"] button.danger')
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()
    WebDriverWait(driver, 5).until(lambda d: d.switch_to.alert)
    driver.switch_to.alert.accept()
    return str(wait_for(driver, "#toast.bad", timeout=10).text)


def press_rollback(driver: webdriver.Chrome) -> None:
    driver.find_element(By.ID, "btn-rollback").click()
    WebDriverWait(driver, 5).until(lambda d: d.switch_to.alert)
    driver.switch_to.alert.accept()  # the confirm dialog
    wait_for(driver, "#rollout-state", text="rolled_back", timeout=15)


async def test_upload_roll_out_watch_the_waves_and_roll_back_in_the_browser(
    browser: webdriver.Chrome,
    fleet: Fleet,
    make_tiny_bundle: Any,
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    t0 = time.monotonic()
    v1, v2 = make_tiny_bundle("1"), make_tiny_bundle("2", W2)
    await fleet.call("POST", "/v1/models", data=v1.read_bytes())
    docs = [
        agent_config(tmp_path, keys, await fleet.enrol(f"store-{i}", ["north"]), v1)
        for i in range(2)
    ]
    ports = [free_port(), free_port()]
    agents: list[AgentProcess] = list(
        await asyncio.gather(
            *(
                in_thread(AgentProcess, d, tmp_path / d["device_id"], p)
                for d, p in zip(docs, ports, strict=True)
            )
        )
    )
    stop = asyncio.Event()
    load: asyncio.Task[dict[str, int]] | None = None
    try:
        await fleet.call(
            "POST",
            "/v1/assignments",
            json={"model": "tiny", "version": "1", "target": {"all": True}},
        )
        for d in ("store-0", "store-1"):
            await until(lambda d=d: active(fleet, d), lambda v: v == "1", within=20)
        load = asyncio.create_task(traffic([a.base for a in agents], stop))

        await in_thread(login, browser, fleet.base, TOKEN)
        progress = await in_thread(upload, browser, fleet.base, v2)
        assert progress["max"] == v2.stat().st_size and progress["value"] == progress["max"]
        await in_thread(screenshot, browser, "console models after upload")

        rid = await in_thread(start_rollout, browser, fleet.base)
        rollout = await fleet.call("GET", f"/v1/rollouts/{rid}")
        assert rollout["plan"]["gates"] == ["error_rate <= baseline + 0.1"]
        assert rollout["plan"]["waves"] == [1, "100%"] and rollout["plan"]["min_requests"] == 20
        assert rollout["target"] == {"group": "north"}
        await in_thread(screenshot, browser, "console rollout started")

        # Live, without reloading: wave 1 is done (wave 2 pushed), then all of it.
        await in_thread(wait_for, browser, 'tr.wave[data-wave="1"][data-status="done"]', None, 45)
        await in_thread(wait_for, browser, "#rollout-state", "completed", 45)
        await in_thread(wait_for, browser, "#decisions li[data-outcome=pass]", None, 10)
        assert await in_thread(browser.execute_script, "return window.__notReloaded === true")
        points = await in_thread(gate_chart_points, browser)
        assert points >= 2, points
        await in_thread(screenshot, browser, "console rollout completed")
        done = await fleet.call("GET", f"/v1/rollouts/{rid}")
        assert [d["outcome"] for d in done["decisions"]] == ["pass", "pass"], done

        await in_thread(press_rollback, browser)
        await in_thread(screenshot, browser, "console rollout rolled back")
        for d in ("store-0", "store-1"):
            await until(lambda d=d: active(fleet, d), lambda v: v == "1", within=20)
        assert (await fleet.call("GET", f"/v1/rollouts/{rid}"))["state"] == "rolled_back"

        # The model page: version 1 back on both stores, the fleet-wide charts drawn
        # from the time-series API with the requests both versions served.
        await in_thread(browser.get, fleet.base + "/ui/models/tiny")
        await in_thread(wait_for, browser, "#model-charts[data-loaded-at]", None, 15)
        await in_thread(wait_for, browser, '#versions tr[data-version="1"] .active-n', "2")
        lines = await in_thread(
            browser.execute_script,
            "var p = document.querySelector('.series-chart[data-field=requests]')._plot;"
            " return p ? p.series.slice(1).map(function (s) { return s.label; }) : [];",
        )
        assert {"v1", "v2"} <= set(lines), lines
        await in_thread(screenshot, browser, "console model page")
        # Deleting a version two stores run: confirmed, refused, the fleet's reason shown.
        toast = await in_thread(delete_version_in_use, browser)
        assert toast.startswith("cannot delete tiny:1"), toast

        await in_thread(browser.get, fleet.base + "/ui/rollouts")
        await in_thread(wait_for, browser, f'tr[data-rollout="{rid}"] .badge', "rolled_back")
        await in_thread(screenshot, browser, "console rollouts list")
        # The expected 409 is a failed load in the console; nothing else may be there.
        errors = await in_thread(console_errors, browser, (r"versions/1 .* status of 409",))
        assert errors == [], "the browser's console:\n" + "\n".join(errors)
    finally:
        stop.set()
        seen = await load if load is not None else {}
        await asyncio.gather(*(in_thread(a.stop) for a in agents))
    assert seen.get("v2") and not [k for k in seen if k.startswith("HTTP")], seen
    print(f"console rollout story: {time.monotonic() - t0:.1f} s")

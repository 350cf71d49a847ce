"""The console's overview and device pages in a real headless Chromium (issue 12), with
nothing simulated: ``edge-fleet serve`` as its own process (embedded broker), two real
``edge-agent serve`` processes enrolled with one-time tokens, real inference requests
to them, and the browser of a fleet manager signed in with the admin token.

What a person sees is asserted, after live updates where the story needs them:
- the overview counts the real agents online in their groups, and one that stops is
  counted offline on the open page by itself;
- the device list's filters (chosen in the form, kept in the URL) show the right rows;
- a device's page shows its model and, after real traffic, a requests chart with data;
- pressing Resync reaches the real agent: its ``command_done`` event appears on the
  open page by itself; so does Roll back, after a version 2 assigned over the API shows
  up active on the page;
- a group named ``<script>alert(1)</script>`` (which the API refuses, written into the
  database as an older fleet or a hand edit could) prints as text, nothing runs;
- groups edited on a device's page, an enrolment token made from the admin's form
  (shown once, and it enrols a device the open list then shows), a revocation after
  its confirmation;
- the browser's console stays free of errors. Screenshots of each page go to
  tests/artifacts/screenshots/ (not committed).

Selenium blocks the calling thread, so the fleet and agents are separate processes and
the test is synchronous.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.support.agent_process import AgentProcess
from tests.support.brokers import free_port
from tests.support.browser import console_errors, login, screenshot, wait_for
from tests.support.fleet_server import ServedFleet
from tests.support.tiny import TEST_X, W2, agent_config

XSS = "<script>alert(1)</script>"


class Api:
    """Blocking calls to the served fleet with its admin token."""

    def __init__(self, fleet: ServedFleet) -> None:
        self.url = fleet.url
        self.token = (fleet.workdir / "data" / "admin.token").read_text().strip()

    def call(self, method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def upload(self, bundle: Path) -> Any:
        req = urllib.request.Request(
            self.url + "/v1/models", data=bundle.read_bytes(), method="POST"
        )
        req.add_header("Content-Type", "application/octet-stream")
        req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def enrol(self, device_id: str, groups: list[str]) -> dict[str, Any]:
        tok = self.call("POST", "/v1/enrolment-tokens", {"device_id": device_id, "groups": groups})
        return dict(self.call("POST", "/v1/enrol", {"token": tok["token"]}, auth=False))


def until(fetch: Callable[[], Any], check: Callable[[Any], bool], within: float = 30.0) -> Any:
    deadline = time.monotonic() + within
    doc = None
    while time.monotonic() < deadline:
        doc = fetch()
        if check(doc):
            return doc
        time.sleep(0.1)
    raise AssertionError(f"not reached within {within} s; last: {doc}")


def infer(base: str, n: int) -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": TEST_X[0].tolist()}]}
    ).encode()
    for _ in range(n):
        req = urllib.request.Request(f"{base}/v2/models/tiny/infer", data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200


@pytest.fixture
def fleet(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[ServedFleet]:
    served = ServedFleet(
        tmp_path,
        free_port(),
        ["--data-dir", str(tmp_path / "data"), "--mqtt-port", "0", "--trust-key", str(keys[1])],
    )
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def agents(
    fleet: ServedFleet, tmp_path: Path, keys: tuple[Path, Path], make_tiny_bundle: Any
) -> Iterator[dict[str, AgentProcess]]:
    """store-n1 in north and store-s1 in south: real agent processes serving tiny 1."""
    api = Api(fleet)
    bundle = make_tiny_bundle("1")
    running: dict[str, AgentProcess] = {}
    try:
        for name, group in (("store-n1", "north"), ("store-s1", "south")):
            enrolled = api.enrol(name, [group])
            work = tmp_path / name
            work.mkdir()
            config = agent_config(
                work,
                keys,
                [bundle],
                device_id=name,
                fleet={
                    "host": enrolled["mqtt"]["host"],
                    "port": enrolled["mqtt"]["port"],
                    "username": enrolled["mqtt"]["username"],
                    "password": enrolled["mqtt"]["password"],
                    "keepalive_s": 5,
                    "reconnect_min_s": 0.05,
                    "reconnect_max_s": 0.5,
                    "outbox": {"path": str(work / "outbox.sqlite")},
                    "telemetry": {
                        "flush_interval_s": 0.2,
                        "stats_interval_s": 0.3,
                        "ack_timeout_s": 2,
                    },
                },
            ).model_dump(mode="json", exclude_none=True)
            running[name] = AgentProcess(config, work, free_port())
        yield running
    finally:
        for proc in running.values():
            proc.stop()


TINY_CELLS = '#models-table tr[data-model="tiny"] td'


def settled(driver: webdriver.Chrome, fn: Callable[[webdriver.Chrome], Any]) -> Any:
    """``fn(driver)``, tried again while a live refresh replaces the elements it reads
    (a stale element: the part of the page was swapped for its fresh copy)."""
    wait = WebDriverWait(
        driver, 10, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)
    )
    return wait.until(lambda d: (fn(d),))[0]


def read(driver: webdriver.Chrome, css: str) -> str:
    """The text of the first element matching ``css`` (inside a live part or not)."""
    return str(settled(driver, lambda d: d.find_element(By.CSS_SELECTOR, css).text))


def rows(driver: webdriver.Chrome) -> list[str]:
    return [
        el.get_attribute("data-device") or ""
        for el in driver.find_elements(By.CSS_SELECTOR, "#devices-table tbody tr[data-device]")
    ]


def wait_rows(driver: webdriver.Chrome, want: list[str], timeout: float = 10.0) -> None:
    try:
        # A live refresh may replace a row while it is read: look again.
        WebDriverWait(
            driver,
            timeout,
            poll_frequency=0.05,
            ignored_exceptions=(StaleElementReferenceException,),
        ).until(lambda d: rows(d) == want)
    except TimeoutException:
        raise AssertionError(f"rows {rows(driver)} != {want} on {driver.current_url}") from None


def test_overview_devices_and_a_device_page_with_real_agents(
    browser: webdriver.Chrome,
    fleet: ServedFleet,
    agents: dict[str, AgentProcess],
    make_tiny_bundle: Any,
) -> None:
    api = Api(fleet)
    until(
        lambda: api.call("GET", "/v1/devices")["devices"],
        lambda ds: (
            [(d["id"], d["online"], bool(d["models"])) for d in ds]
            == [("store-n1", True, True), ("store-s1", True, True)]
        ),
    )
    login(browser, fleet.url, api.token)

    # The overview: one device online in north, one in south, none offline.
    wait_for(browser, "h1", text="Fleet overview")
    for group in ("north", "south"):
        row = f'#groups tr[data-group="{group}"]'
        assert read(browser, row + " .online-n") == "1"
        assert read(browser, row + " .offline-n") == "0"
    assert read(browser, "#devices-online") == "2"
    assert "tiny" in read(browser, ".model-mix")
    screenshot(browser, "console devices overview")

    # The list, filtered from its form: the URL says what is shown.
    browser.get(fleet.url + "/ui/devices")
    wait_rows(browser, ["store-n1", "store-s1"])
    Select(browser.find_element(By.CSS_SELECTOR, "select[name=group]")).select_by_value("north")
    WebDriverWait(browser, 10).until(lambda d: "group=north" in d.current_url)
    wait_rows(browser, ["store-n1"])
    Select(browser.find_element(By.CSS_SELECTOR, "select[name=online]")).select_by_value("0")
    WebDriverWait(browser, 10).until(lambda d: "online=0" in d.current_url)
    wait_rows(browser, [])
    wait_for(browser, "#no-devices", text="No device matches these filters.")
    browser.get(fleet.url + "/ui/devices?q=s1")
    wait_rows(browser, ["store-s1"])
    assert browser.find_element(By.CSS_SELECTOR, "input[name=q]").get_attribute("value") == "s1"
    browser.get(fleet.url + "/ui/devices?online=1&sort=id&order=desc")
    wait_rows(browser, ["store-s1", "store-n1"])
    screenshot(browser, "console devices list")

    # Real traffic on store-n1, then its page: the model, and a requests chart with data.
    infer(agents["store-n1"].base, 40)
    browser.get(fleet.url + "/ui/devices/store-n1")
    wait_for(browser, '#models-table tr[data-model="tiny"]')
    # Installed from the agent's own config (no assignment): version 1, not fleet-managed.
    cells = settled(
        browser, lambda d: [td.text for td in d.find_elements(By.CSS_SELECTOR, TINY_CELLS)]
    )
    assert cells[:2] == ["tiny", "1"] and cells[4] == "unmanaged", cells
    assert cells[6] == "CPUExecutionProvider", cells
    assert "north" in read(browser, "#device-groups")
    WebDriverWait(browser, 30, poll_frequency=0.2).until(
        lambda d: (
            int(d.find_element(By.ID, "chart-requests").get_attribute("data-points") or "0") > 0
        ),
        message="the requests chart never got data",
    )
    assert browser.find_elements(By.CSS_SELECTOR, "#chart-requests canvas")
    wait_for(browser, "#chart-confidence .hist-bar")
    screenshot(browser, "console device page")

    # Resync from the button: the real agent answers with an event, shown live.
    assert not browser.find_elements(By.CSS_SELECTOR, '#events li[data-kind="command_done"]')
    browser.find_element(By.ID, "resync").click()
    wait_for(browser, "#toast", text="Resync sent")
    wait_for(browser, '#events li[data-kind="command_done"]', timeout=20)
    screenshot(browser, "console device resync event")

    # Groups edited on the page: stored, and the facts show them without a reload.
    field = browser.find_element(By.ID, "groups-input")
    field.clear()
    field.send_keys("north, pilot")
    browser.find_element(By.CSS_SELECTOR, "#groups-form button[type=submit]").click()
    wait_for(browser, "#device-groups", text="pilot")
    assert api.call("GET", "/v1/devices/store-n1")["groups"] == ["north", "pilot"]

    # Version 2 assigned to store-n1 (the API): the open page shows it active, then the
    # Roll back button (after its confirmation) reaches the agent, which answers with
    # an event naming the model.
    for bundle in (make_tiny_bundle("1"), make_tiny_bundle("2", W2)):
        api.upload(bundle)
    api.call(
        "POST",
        "/v1/assignments",
        {"model": "tiny", "version": "2", "target": {"device": "store-n1"}},
    )
    until(
        lambda: api.call("GET", "/v1/devices/store-n1")["models"]["tiny"],
        lambda m: m["active"] == "2" and m["previous"] == "1" and m["state"] == "active",
    )
    wait_for(browser, '#models-table tr[data-model="tiny"]', text="active")
    cells = settled(
        browser, lambda d: [td.text for td in d.find_elements(By.CSS_SELECTOR, TINY_CELLS)]
    )
    assert cells[1] == "2" and cells[3] == "1", cells
    done_before = len(
        browser.find_elements(By.CSS_SELECTOR, '#events li[data-kind="command_done"]')
    )
    settled(
        browser,
        lambda d: d.find_element(
            By.CSS_SELECTOR, '#models-table tr[data-model="tiny"] button.rollback'
        ).click(),
    )
    confirm = WebDriverWait(browser, 5).until(lambda d: d.switch_to.alert)
    assert confirm.text == "Roll tiny back to 1 on store-n1?"
    confirm.accept()
    wait_for(browser, "#toast", text="Rollback sent")
    WebDriverWait(browser, 20, poll_frequency=0.1).until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, '#events li[data-kind="command_done"]'))
            > done_before
        ),
        message="the rollback's event never showed",
    )
    newest = read(browser, '#events li[data-kind="command_done"]')
    assert "tiny" in newest, newest
    screenshot(browser, "console device rollback event")

    # A group named like a script prints as text; nothing runs.
    with sqlite3.connect(fleet.workdir / "data" / "fleet.sqlite", timeout=10) as conn:
        conn.execute("INSERT INTO device_groups (device_id, grp) VALUES ('store-s1', ?)", (XSS,))
    browser.get(fleet.url + "/ui/devices/store-s1")
    assert XSS in wait_for(browser, "#device-groups").text
    browser.get(fleet.url + "/ui/devices")
    wait_rows(browser, ["store-n1", "store-s1"])
    assert XSS in read(browser, 'tr[data-device="store-s1"]')
    browser.get(fleet.url + "/ui/")
    wait_for(browser, "#groups", text=XSS)
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 (an alert would mean the script ran)
    assert not browser.execute_script("return document.querySelectorAll('main script').length")
    screenshot(browser, "console overview escaped group")

    # An agent stops: the open overview counts it offline in its group by itself.
    agents["store-s1"].stop()
    wait_for(browser, '#groups tr[data-group="south"] .offline-n', text="1", timeout=15)
    assert read(browser, "#devices-online") == "1"

    # An enrolment token from the admin's form, shown once, enrols a new device, which
    # the open list then shows by itself.
    browser.get(fleet.url + "/ui/devices")
    wait_rows(browser, ["store-n1", "store-s1"])
    browser.find_element(By.ID, "enrol-device").send_keys("store-new")
    browser.find_element(By.ID, "enrol-groups").send_keys("east")
    browser.find_element(By.CSS_SELECTOR, "#enrol-form button[type=submit]").click()
    token = wait_for(browser, "#enrol-token").text
    assert token.startswith("efe_"), token
    assert "store-new in east" in browser.find_element(By.ID, "enrol-meta").text
    screenshot(browser, "console enrolment token")
    assert api.call("POST", "/v1/enrol", {"token": token}, auth=False)["device_id"] == "store-new"
    wait_rows(browser, ["store-n1", "store-new", "store-s1"])

    # Revoke (admin), after confirming: the page shows it revoked by itself.
    browser.get(fleet.url + "/ui/devices/store-s1")
    browser.find_element(By.ID, "revoke").click()
    confirm = WebDriverWait(browser, 5).until(lambda d: d.switch_to.alert)
    assert "Revoke store-s1?" in confirm.text
    confirm.accept()
    wait_for(browser, "#device-state", text="revoked")
    assert api.call("GET", "/v1/devices/store-s1")["revoked_at"] is not None

    errors = console_errors(browser)
    assert errors == [], "the browser's console:\n" + "\n".join(errors)

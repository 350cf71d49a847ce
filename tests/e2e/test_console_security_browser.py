"""The console's security rules as a person meets them, in a real headless Chromium
(issue 12). A real fleet service (this test's loop serves it; Selenium runs on a worker
thread through ``asyncio.to_thread``) with read, operator and admin tokens.

- A read user sees no action anywhere (overview, devices, a device, models, rollouts,
  hard examples, policies, audit): no button but the filters' own, no action form, no
  labelling; keys typed on the hard-example page label nothing; and a change posted
  from the page's own script anyway (the CSRF token and all) is refused with 403.
- An operator's change made without the CSRF token (a plain ``fetch``) is refused and
  changes nothing; the same change through the console's ``EF.api`` is done.
- A device id, a group, a model name, a hard example's reason and cloud model, and an
  audit row's target and detail carrying ``<script>``-like text are shown as text: no
  script runs (a marker the payloads would set stays unset, no alert), the text is
  visible. Names the API refuses are written into the database directly (as an older
  version or a hand edit could have left them); the cloud model, the audit target and
  detail come through the real API.
- The audit log page shows the actions just made, refusals included.
Screenshots of each page under tests/artifacts/screenshots/.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys

from edgefleet.fleet.service import FleetService
from tests.support.browser import console_errors, login, screenshot, wait_for
from tests.support.console_fleet import (
    ADMIN,
    OPERATOR,
    READER,
    bearer,
    console_config,
    enrol,
    hard_example,
    upload,
)

PAGES = [
    "/ui/",
    "/ui/devices",
    "/ui/devices/shop-1",
    "/ui/models",
    "/ui/models/tiny",
    "/ui/rollouts",
    "/ui/hard-examples",
    "/ui/policies",
    "/ui/audit",
]
# Failed loads the tests cause on purpose (refused API calls) are not page errors.
EXPECTED = (r"status of 40[034]",)

XSS_DEVICE = '<script>window.__xss="device"</script>dev-x'
XSS_GROUP = "<img src=x onerror=\"window.__xss='group'\">grp"
XSS_MODEL = '<script>window.__xss="model"</script>mdl'
XSS_REASON = "<svg onload=\"window.__xss='reason'\">why"
XSS_CLOUD = "<script>window.__xss='cloud'</script>cloud"  # through the real upload
XSS_LABEL = "<script>window.__xss='label'</script>lbl"  # through the real label API
XSS_TARGET = "<img src=x onerror=\"window.__xss='target'\">"  # a URL part, audited


@pytest.fixture
async def fleet(
    tmp_path: Path, keys: tuple[Path, Path], cloud_bundles: dict[str, Path]
) -> AsyncIterator[FleetService]:
    svc = await FleetService(console_config(tmp_path, keys)).start()
    try:
        yield svc
    finally:
        await svc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def populate(
    svc: FleetService, http: aiohttp.ClientSession, bundle: Path, **example: Any
) -> str:
    """The tiny model, shop-1 in group north, one hard example of it; its id."""
    status, doc = await bearer(http, svc.url, "POST", "/v1/models", ADMIN, data=bundle.read_bytes())
    assert status == 201, doc
    creds = await enrol(http, svc.url, "shop-1")
    status, doc = await bearer(
        http, svc.url, "PUT", "/v1/devices/shop-1/groups", ADMIN, json={"groups": ["north"]}
    )
    assert status == 200, doc
    hid, body = hard_example(0, "shop-1", **example)
    assert await upload(http, svc.url, creds, hid, body) == 201
    return hid


def page_api(driver: webdriver.Chrome, method: str, url: str, body: Any, csrf: bool) -> list[Any]:
    """A call made by the page's own script: through the console's ``EF.api`` (with the
    CSRF token) or a bare ``fetch`` with the cookie only. [status, error text]."""
    return list(
        driver.execute_async_script(
            """
            const [method, url, body, csrf, done] = arguments;
            if (csrf) {
              EF.api(method, url, body).then(() => done([200, ""]),
                (e) => done([e.status || 0, e.message]));
            } else {
              fetch(url, {method, credentials: "same-origin",
                headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)})
                .then(async (r) => done([r.status, await r.text()]));
            }
            """,
            method,
            url,
            body,
            csrf,
        )
    )


def no_script_ran(driver: webdriver.Chrome) -> None:
    try:
        alert = driver.switch_to.alert
    except NoAlertPresentException:
        alert = None
    assert alert is None, f"an alert on {driver.current_url}: {alert.text if alert else ''}"
    marker = driver.execute_script("return window.__xss === undefined ? null : window.__xss")
    assert marker is None, f"the {marker!r} payload ran on {driver.current_url}"


def offered_actions(driver: webdriver.Chrome) -> list[str]:
    """What a page offers to change something with: buttons outside a GET filter form,
    action attributes, the labelling keys' buttons (the header's sign-out is everyone's;
    a chart's time-range buttons only change the view)."""
    return list(
        driver.execute_script(
            """
            const main = document.querySelector("main");
            const found = [];
            // Buttons that only change the view (a chart's time range) change nothing.
            main.querySelectorAll("button:not([data-range]), input[type=submit]").forEach((b) => {
              const form = b.closest("form");
              const filter = form && (form.getAttribute("method") || "get").toLowerCase() === "get"
                && !form.dataset.api && !form.dataset.upload;
              if (!filter) found.push("button: " + (b.id || b.textContent.trim()));
            });
            main.querySelectorAll("[data-action], form[data-api], form[data-upload], .he-class")
              .forEach((el) => found.push(el.tagName + ": " + (el.id || el.textContent.trim())));
            return found;
            """
        )
    )


async def test_a_read_user_sees_no_actions_and_is_refused_when_posting_anyway(
    fleet: FleetService,
    http: aiohttp.ClientSession,
    browser: webdriver.Chrome,
    cloud_bundles: dict[str, Path],
) -> None:
    run = asyncio.to_thread
    hid = await populate(fleet, http, cloud_bundles["edge"])
    await run(login, browser, fleet.url, READER)
    for path in PAGES:
        await run(browser.get, fleet.url + path)
        await run(wait_for, browser, "main h1")
        assert await run(offered_actions, browser) == [], path
        await run(screenshot, browser, f"read user {path.strip('/').replace('/', ' ') or 'ui'}")

    # The labelling keys do nothing for a read user.
    await run(browser.get, f"{fleet.url}/ui/hard-examples/{hid}")
    await run(wait_for, browser, "#he-item")
    await run(lambda: ActionChains(browser).send_keys("a", Keys.ENTER).perform())
    await asyncio.sleep(0.5)
    doc = (await bearer(http, fleet.url, "GET", f"/v1/hard-examples/{hid}", ADMIN))[1]
    assert doc["label"] is None

    # Posting from the page's script anyway, with the page's CSRF token: the role refuses.
    for method, url, body in (
        ("PUT", f"/v1/hard-examples/{hid}/label", {"label": "a"}),
        ("POST", "/v1/devices/shop-1/commands", {"command": "resync"}),
        ("PUT", "/v1/devices/shop-1/groups", {"groups": ["south"]}),
        ("POST", "/v1/rollouts/r-none/pause", None),
    ):
        status, error = await run(page_api, browser, method, url, body, True)
        assert status == 403 and "viewer (read) may not" in error, (url, status, error)
    doc = (await bearer(http, fleet.url, "GET", "/v1/devices/shop-1", ADMIN))[1]
    assert doc["groups"] == ["north"]
    doc = (await bearer(http, fleet.url, "GET", f"/v1/hard-examples/{hid}", ADMIN))[1]
    assert doc["label"] is None
    assert await run(console_errors, browser, EXPECTED) == []


async def test_a_change_without_the_csrf_token_is_refused_and_the_audit_log_shows_it(
    fleet: FleetService,
    http: aiohttp.ClientSession,
    browser: webdriver.Chrome,
    cloud_bundles: dict[str, Path],
) -> None:
    run = asyncio.to_thread
    await populate(fleet, http, cloud_bundles["edge"])
    await run(login, browser, fleet.url, OPERATOR)
    await run(browser.get, fleet.url + "/ui/devices/shop-1")
    await run(wait_for, browser, "main h1")
    body = {"groups": ["south"]}
    status, error = await run(page_api, browser, "PUT", "/v1/devices/shop-1/groups", body, False)
    assert status == 403 and "CSRF" in error, (status, error)
    doc = (await bearer(http, fleet.url, "GET", "/v1/devices/shop-1", ADMIN))[1]
    assert doc["groups"] == ["north"], "a refused change was made"
    status, error = await run(page_api, browser, "PUT", "/v1/devices/shop-1/groups", body, True)
    assert status == 200, error
    doc = (await bearer(http, fleet.url, "GET", "/v1/devices/shop-1", ADMIN))[1]
    assert doc["groups"] == ["south"]

    await run(browser.get, fleet.url + "/ui/audit")
    await run(wait_for, browser, "#audit-table", "PUT /v1/devices/{id}/groups")
    # Read in one script call: a live update may replace the table at any moment.
    rows = await run(
        browser.execute_script,
        "return Array.from(document.querySelectorAll('#audit-table tbody tr'))"
        ".map((tr) => Array.from(tr.cells).map((td) => td.innerText.trim()));",
    )
    # when, who, role, via, action, target, status, from, detail — newest first.
    mine = [r for r in rows if r[1] == "ops"]
    assert [(r[4], r[5], r[6]) for r in mine[:2]] == [
        ("PUT /v1/devices/{id}/groups", "id=shop-1", "200"),
        ("PUT /v1/devices/{id}/groups", "id=shop-1", "403"),
    ], rows
    assert mine[1][3] == "session" and mine[1][7] == "127.0.0.1" and "CSRF" in mine[1][8]
    assert mine[-1][4] == "login" and mine[-1][7] == "127.0.0.1"
    await run(screenshot, browser, "audit log after a refused and a done change")
    assert await run(console_errors, browser, EXPECTED) == []


async def test_hostile_names_are_shown_as_text_and_run_nothing(
    fleet: FleetService,
    http: aiohttp.ClientSession,
    browser: webdriver.Chrome,
    cloud_bundles: dict[str, Path],
) -> None:
    run = asyncio.to_thread
    hid = await populate(fleet, http, cloud_bundles["edge"], cloud_model=XSS_CLOUD)
    now = time.time()

    def plant(conn: Any) -> None:
        conn.execute(
            "INSERT INTO devices (id, created_at, secret_hash, online, status_at, last_seen,"
            " agent_version, last_error) VALUES (?, ?, 'x', 1, ?, ?, ?, ?)",
            (XSS_DEVICE, now, now, now, XSS_MODEL, XSS_REASON),
        )
        conn.executemany(
            "INSERT INTO device_groups (device_id, grp) VALUES (?, ?)",
            [(XSS_DEVICE, XSS_GROUP), ("shop-1", XSS_GROUP)],
        )
        conn.execute(
            "INSERT INTO model_versions (name, version, sha256, size, path, runtime, manifest,"
            " key_id, uploaded_at) SELECT ?, version, sha256, size, path, runtime, manifest,"
            " key_id, uploaded_at FROM model_versions WHERE name = 'tiny'",
            (XSS_MODEL,),
        )
        conn.execute(
            "INSERT INTO device_models (device_id, model, active, state, provider, last_error,"
            " updated_at) VALUES (?, ?, '1', 'ready', 'CPUExecutionProvider', ?, ?)",
            (XSS_DEVICE, XSS_MODEL, XSS_GROUP, now),
        )
        conn.execute("UPDATE hard_examples SET reason = ? WHERE id = ?", (XSS_REASON, hid))

    await fleet.db.write(plant)
    await run(login, browser, fleet.url, ADMIN)
    # Through the real API, from the page: a label and a device id the API refuses — the
    # refusals' messages (the toast) and their audit rows carry the text.
    await run(browser.get, f"{fleet.url}/ui/hard-examples/{hid}")
    await run(wait_for, browser, "#he-item")
    status, error = await run(
        page_api, browser, "PUT", f"/v1/hard-examples/{hid}/label", {"label": XSS_LABEL}, True
    )
    assert status == 400 and XSS_LABEL in error, (status, error)
    url = f"/v1/devices/{quote(XSS_TARGET, safe='')}/commands"
    status, error = await run(page_api, browser, "POST", url, {"command": "resync"}, True)
    assert status in (400, 404), (status, error)

    shown = [  # page, the hostile texts it must show, screenshot name
        ("/ui/", [XSS_GROUP, XSS_MODEL], "overview"),
        ("/ui/devices", [XSS_DEVICE, XSS_GROUP], "devices"),
        (f"/ui/devices/{quote(XSS_DEVICE, safe='')}", [XSS_DEVICE], "device"),
        ("/ui/models", [XSS_MODEL], "models"),
        (f"/ui/models/{quote(XSS_MODEL, safe='')}", [XSS_MODEL], "model"),
        ("/ui/rollouts", [], "rollouts"),
        ("/ui/hard-examples", [XSS_REASON, XSS_CLOUD], "hard examples"),
        (f"/ui/hard-examples/{hid}", [XSS_REASON, XSS_CLOUD], "hard example"),
        ("/ui/audit", [XSS_LABEL, XSS_TARGET], "audit"),
    ]
    for path, texts, name in shown:
        await run(browser.get, fleet.url + path)
        await run(wait_for, browser, "main h1")
        await asyncio.sleep(0.3)  # an onerror/onload would have fired by now
        await run(no_script_ran, browser)
        text = await run(browser.execute_script, "return document.body.innerText")
        for t in texts:
            assert t in text, (path, t, text[:2000])
        await run(screenshot, browser, f"escaped {name}")
    assert await run(console_errors, browser, EXPECTED) == []

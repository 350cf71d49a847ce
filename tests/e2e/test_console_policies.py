"""The console's fallback-policy page in a real headless Chromium (issue 12): an
operator sets a group's policy from the form, the fleet stores it and pushes it in the
group's devices' desired states, the table shows it live, and the clear button removes
it; a read user sees the table but no form and no button.

The fleet runs in this test's loop on a real Mosquitto; every browser step runs in a
worker thread (selenium blocks), so the fleet keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.support.brokers import Mosquitto
from tests.support.browser import console_errors, login, screenshot, wait_for
from tests.support.quality_fleet import TOKEN, Fleet, fleet_config, running_fleet, until

READ_TOKEN = "console-read-token-0123456789abcdef"


@pytest.fixture
async def fleet(
    tmp_path: Path, keys: tuple[Path, Path], mosquitto: Mosquitto
) -> AsyncIterator[Fleet]:
    cfg = fleet_config(
        tmp_path,
        keys,
        mosquitto.port,
        auth={"token": TOKEN, "tokens": [{"name": "viewer", "role": "read", "token": READ_TOKEN}]},
    )
    async with running_fleet(cfg) as client:
        yield client


def _set_group_policy(driver: webdriver.Chrome, base: str) -> None:
    login(driver, base, TOKEN)
    driver.get(base + "/ui/policies")
    wait_for(driver, "#policy-table", text="No fleet policy")
    Select(driver.find_element(By.ID, "p-model")).select_by_visible_text("tiny")
    Select(driver.find_element(By.ID, "p-kind")).select_by_value("group")
    driver.find_element(By.ID, "p-target").send_keys("north")
    Select(driver.find_element(By.ID, "p-mode")).select_by_value("edge_only")
    driver.find_element(By.ID, "p-threshold").send_keys("0.7")
    driver.find_element(By.CSS_SELECTOR, "#policy-form button[type=submit]").click()
    # The table refreshes by itself (live notice on the models topic).
    wait_for(driver, "#policy-table", text="edge_only")
    row = wait_for(driver, "#policy-table tbody tr", text="north")
    assert "threshold: 0.7" in row.text, row.text
    screenshot(driver, "console policies set")


def _clear_policy(driver: webdriver.Chrome) -> None:
    driver.find_element(By.CSS_SELECTOR, "#policy-table button[data-action]").click()
    WebDriverWait(driver, 5).until(lambda d: d.switch_to.alert).accept()
    wait_for(driver, "#policy-table", text="No fleet policy")


def _read_user_view(driver: webdriver.Chrome, base: str) -> dict[str, Any]:
    driver.delete_all_cookies()
    login(driver, base, READ_TOKEN)
    driver.get(base + "/ui/policies")
    wait_for(driver, "#policy-table", text="edge_only")
    return {
        "forms": len(driver.find_elements(By.ID, "policy-form")),
        "buttons": len(driver.find_elements(By.CSS_SELECTOR, "[data-action]")),
        # The page's own script, asked to clear anyway: the API refuses the role.
        "status": driver.execute_async_script(
            "var done = arguments[arguments.length - 1];"
            "EF.api('POST', '/v1/policies/tiny/clear', {target: {group: 'north'}})"
            ".then(function () { done(200); }, function (e) { done(e.status); });"
        ),
    }


async def test_an_operator_sets_and_clears_a_group_policy_from_the_console(
    fleet: Fleet, browser: webdriver.Chrome, cloud_bundles: dict[str, Path]
) -> None:
    await fleet.call("POST", "/v1/models", data=cloud_bundles["edge"].read_bytes())
    await fleet.enrol("store-n1", ["north"])
    await fleet.call(
        "POST",
        "/v1/assignments",
        json={"model": "tiny", "version": "1", "target": {"group": "north"}},
    )
    base = fleet.base

    await asyncio.to_thread(_set_group_policy, browser, base)
    policies = (await fleet.call("GET", "/v1/policies"))["policies"]
    assert policies == [
        {
            "model": "tiny",
            "target": {"group": "north"},
            "fallback": {"mode": "edge_only", "threshold": 0.7},
            "updated_at": policies[0]["updated_at"],
        }
    ]
    # Pushed: the group's device's desired state carries it.
    device = await until(
        lambda: fleet.device("store-n1"),
        lambda d: (d.get("desired") or {}).get("models", {}).get("tiny", {}).get("fallback"),
    )
    assert device["desired"]["models"]["tiny"]["fallback"] == {
        "mode": "edge_only",
        "threshold": 0.7,
    }

    seen = await asyncio.to_thread(_read_user_view, browser, base)
    assert seen == {"forms": 0, "buttons": 0, "status": 403}
    assert len((await fleet.call("GET", "/v1/policies"))["policies"]) == 1

    # Back as the operator: clear it from the row's button.
    await asyncio.to_thread(browser.delete_all_cookies)
    await asyncio.to_thread(login, browser, base, TOKEN)
    await asyncio.to_thread(browser.get, base + "/ui/policies")
    await asyncio.to_thread(_clear_policy, browser)
    assert (await fleet.call("GET", "/v1/policies"))["policies"] == []

    audit = (await fleet.call("GET", "/v1/audit"))["entries"]
    actions = [(e["actor"], e["action"], e["status"]) for e in audit]
    assert ("admin", "PUT /v1/policies/{model}", 200) in actions
    assert ("viewer", "POST /v1/policies/{model}/clear", 403) in actions
    assert ("admin", "POST /v1/policies/{model}/clear", 200) in actions
    assert await asyncio.to_thread(console_errors, browser, (r"status of 403",)) == []

"""The console screenshots in docs/img/, taken from the README's demo fleet.

``python -m bench.console_screenshots`` starts ``edge-demo --keep`` (four real
agents, a cloud endpoint, the bad version stopped by a gate and version 2 promoted),
waits for its story to end, signs in to its console in Debian's headless Chromium
(tests/support/browser.py) and saves the overview, the rolled-back rollout (with its
evidence and gate charts), the promoted one, a store's page and the model's page as
PNGs of the window (1366×900), then stops the demo. Not a benchmark: it lives here
beside the console bench because it needs the same browser and the built models
(`python -m models`).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from selenium.webdriver.common.by import By

from tests.support.browser import login, start_chromium, wait_for

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"
READY = re.compile(r"the fleet keeps running: (http://\S+)/ui/ \(token (\S+)\)")


def _start_demo() -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.demo", "--keep", "--build", "models/build"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        print(line, end="")
        if m := READY.search(line):
            return proc, m.group(1), m.group(2)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the demo did not reach its end")


def _shot(driver: object, name: str) -> None:
    path = OUT / f"console-{name}.png"
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    print(f"wrote {path.relative_to(ROOT)}")


def main() -> int:
    if shutil.which("chromium") is None:
        raise SystemExit("Debian's chromium is missing: run deploy/ensure-test-tools.sh")
    OUT.mkdir(parents=True, exist_ok=True)
    proc, url, token = _start_demo()
    browser = start_chromium()
    driver = browser.driver
    try:
        login(driver, url, token)
        time.sleep(1.0)  # the live dot connects
        _shot(driver, "overview")
        driver.get(url + "/ui/rollouts")
        wait_for(driver, "table")
        links = {
            row.find_element(By.CSS_SELECTOR, ".badge").text: row.find_element(
                By.CSS_SELECTOR, "a"
            ).get_attribute("href")
            for row in driver.find_elements(By.CSS_SELECTOR, "tbody tr")
            if row.find_elements(By.CSS_SELECTOR, ".badge")
            and row.find_elements(By.CSS_SELECTOR, "a")
        }
        for state, name in (
            ("rolled_back", "rollout-rolled-back"),
            ("completed", "rollout-promoted"),
        ):
            href = links.get(state)
            if href:
                driver.get(href)
                time.sleep(1.5)  # the gate charts fetch and draw
                _shot(driver, name)
                if state != "rolled_back":
                    continue
                # The failed gate's evidence, then the gates over time.
                for part, suffix in (("Decisions", "evidence"), ("Gates over time", "gates")):
                    driver.execute_script(
                        "for (const h of document.querySelectorAll('h2'))"
                        " if (h.textContent.startsWith(arguments[0]))"
                        " { h.scrollIntoView(); window.scrollBy(0, -60); break; }",
                        part,
                    )
                    time.sleep(0.3)
                    _shot(driver, f"{name}-{suffix}")
        driver.get(url + "/ui/devices/store-0001")
        time.sleep(1.5)
        _shot(driver, "device")
        driver.get(url + "/ui/models/digits-edge")
        time.sleep(1.5)
        _shot(driver, "model")
    finally:
        browser.quit()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())

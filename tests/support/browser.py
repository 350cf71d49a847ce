"""Debian's headless Chromium, driven by Selenium through Debian's ChromeDriver, for the
console's browser tests (issue 12).

A pytest plugin (tests/conftest.py lists it in ``pytest_plugins``) with two fixtures:

- ``chromium`` (session): one Chromium for the whole run (starting one costs about a
  second). Quit at the end of the session, chromedriver reaped, and any Chromium process
  still running on its profile killed.
- ``browser`` (function): that Chromium, reset for the test: before it, the console log
  is drained (errors of an earlier test are not this test's); after it, every cookie is
  cleared and the tab is on ``about:blank``, so a sign-in does not leak into the next
  test. Each test serves its pages from its own port, so storage keyed by origin does not
  leak either. A browser that died during a test is replaced.

and plain functions on a driver: :func:`login`, :func:`wait_for`, :func:`screenshot`
(PNGs under ``tests/artifacts/screenshots/``, not committed), :func:`navigation_timing`
(Navigation Timing and paint entries) and :func:`console_errors` (what the page wrote to
the console at level SEVERE, uncaught exceptions and failed loads included).

Nothing is downloaded: the driver is ``/usr/bin/chromedriver`` given to
``Service(executable_path=...)`` and the browser ``/usr/bin/chromium`` given as the
binary location, so Selenium Manager is never run (it runs only when no driver path is
given). Both come from Debian (deploy/ensure-test-tools.sh installs them).

Threads: Selenium's calls are blocking HTTP requests to chromedriver on the calling
thread; it starts no thread of its own (BiDi, which would, stays off), so the leak check
(tests/support/leaks.py) has nothing to find. The page under test must therefore be
served by another thread or process than the one calling the driver: a fleet in its own
process (tests/support/fleet_server.py), or an async test that calls these functions
through ``asyncio.to_thread`` while its loop serves (an in-process ``FleetService``:
``await asyncio.to_thread(login, browser, svc.url, TOKEN)``; seen to pass the leak check).
A test asks for its server's fixture before ``browser``, so that the browser leaves the
page (and its open live-update stream) before the server stops.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
WINDOW = (1366, 900)
PAGE_LOAD_TIMEOUT_S = 30.0

# Why each flag (the machine's notes, and Chromium's behaviour on it):
FLAGS = (
    "--headless=new",  # the real browser without a screen (not the old headless shell)
    "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",  # no GPU here: software rendering
    "--disable-dev-shm-usage",  # /dev/shm may be small in a container: use /tmp
    # The network has nothing but loopback and the package registries: without these,
    # Chromium tries Google's hosts at every start and logs refused connections.
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-default-browser-check",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)

# Console entries collected so far per driver: get_log() drains chromedriver's buffer,
# so what one call read would otherwise be lost to the next.
_console: weakref.WeakKeyDictionary[webdriver.Chrome, list[dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class Chromium:
    """A running Chromium: its driver, its profile folder, its chromedriver service."""

    driver: webdriver.Chrome
    profile: Path
    service: Service
    started_s: float  # seconds from starting chromedriver to the browser's first tab

    def quit(self) -> None:
        """Quit the browser and chromedriver, reap both, and remove the profile.

        Any Chromium process still running on this profile afterwards (chromedriver
        killed before it closed the browser) is killed: they are ours, found by the
        profile folder on their command line.
        """
        try:
            self.driver.quit()  # closes Chromium, then stops (and waits for) chromedriver
        except Exception:  # already gone (WebDriverException, or urllib3's errors)
            pass  # whatever is left is reaped below
        finally:
            self.service.stop()  # idempotent; after quit() the process is already reaped
            proc = self.service.process
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait(10)  # Selenium's SIGKILL path does not wait: no zombie
            for pid in _processes_using(self.profile):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)

    def restart(self) -> None:
        """Quit this browser and start a new one in its place (same object)."""
        self.quit()
        fresh = start_chromium()
        self.driver, self.profile, self.service = fresh.driver, fresh.profile, fresh.service
        self.started_s = fresh.started_s


def start_chromium() -> Chromium:
    """Start Debian's Chromium headless through Debian's ChromeDriver (blocking, ~1 s).

    Raises AssertionError naming the missing binary when deploy/ensure-test-tools.sh
    has not run.
    """
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            raise AssertionError(f"{binary} is missing: run deploy/ensure-test-tools.sh")
    profile = Path(tempfile.mkdtemp(prefix="edgefleet-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # The page's console (and failed loads) through driver.get_log("browser").
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.page_load_strategy = "normal"  # get() returns after the load event
    # chromedriver's own log goes nowhere: its failures reach us as exceptions.
    service = Service(executable_path=str(CHROMEDRIVER), log_output=os.devnull)
    t0 = time.perf_counter()
    try:
        driver = webdriver.Chrome(service=service, options=options)
    except BaseException:
        service.stop()
        shutil.rmtree(profile, ignore_errors=True)
        raise
    started = time.perf_counter() - t0
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    driver.set_script_timeout(PAGE_LOAD_TIMEOUT_S)
    _console[driver] = []
    return Chromium(driver, profile, service, started)


def _processes_using(profile: Path) -> list[int]:
    """Pids of the processes whose command line names this profile folder."""
    needle = f"--user-data-dir={profile}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def _alive(driver: webdriver.Chrome) -> bool:
    try:
        driver.execute_script("return 1")
        return True
    except Exception:  # WebDriverException, or urllib3's errors once chromedriver is gone
        return False


@pytest.fixture(scope="session")
def chromium() -> Iterator[Chromium]:
    """One Chromium for the test session (see the module's docstring)."""
    browser = start_chromium()
    try:
        yield browser
    finally:
        browser.quit()


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Note a failed test body, so ``browser`` screenshots the page it failed on."""
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_CALL_FAILED] = True
    return report


@pytest.fixture
def browser(chromium: Chromium, request: pytest.FixtureRequest) -> Iterator[webdriver.Chrome]:
    """The session's Chromium, reset for this test; restarted if an earlier test killed it.
    A test that fails leaves ``failed-<test>.png`` of the page it was on."""
    if not _alive(chromium.driver):
        chromium.restart()
    driver = chromium.driver
    console_errors(driver)  # read what is pending
    _console[driver] = []  # and forget it: an earlier test's errors are not this test's
    try:
        yield driver
    finally:
        if _alive(driver):
            if request.node.stash.get(_CALL_FAILED, False):
                screenshot(driver, f"failed-{request.node.name}")
            # All cookies of every origin (delete_all_cookies() clears the current one's).
            driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
            driver.get("about:blank")


def console_errors(driver: webdriver.Chrome, ignore: tuple[str, ...] = ()) -> list[str]:
    """Every SEVERE console entry the page wrote since the test's start, as
    ``"source: message"`` strings: uncaught exceptions, ``console.error`` calls, and
    loads that failed (a 404 for a script, a refused request). Entries matching one of
    the ``ignore`` regular expressions are left out (a test that expects a 403 says so).
    """
    seen = _console.setdefault(driver, [])
    seen.extend(driver.get_log("browser"))  # type: ignore[no-untyped-call]
    return [
        f"{e.get('source', '?')}: {e['message']}"
        for e in seen
        if e.get("level") == "SEVERE" and not any(re.search(p, e["message"]) for p in ignore)
    ]


def wait_for(
    driver: webdriver.Chrome, css: str, text: str | None = None, timeout: float = 10.0
) -> WebElement:
    """The first element matching ``css`` that is displayed (and whose text contains
    ``text``, when given), waiting up to ``timeout`` seconds. On timeout, AssertionError
    with the URL, the page's title, the start of its visible text and its console errors.
    """

    def found(d: webdriver.Chrome) -> WebElement | None:
        for el in d.find_elements(By.CSS_SELECTOR, css):
            try:
                if el.is_displayed() and (text is None or text in el.text):
                    return el
            except WebDriverException:  # replaced by a live update meanwhile: look again
                return None
        return None

    try:
        el = WebDriverWait(driver, timeout, poll_frequency=0.05).until(found)
        assert el is not None  # until() returns only a truthy answer
    except TimeoutException:
        want = f"{css!r}" + (f" containing {text!r}" if text is not None else "")
        raise AssertionError(
            f"no {want} within {timeout} s on {driver.current_url} ({driver.title!r})\n"
            f"page text: {_page_text(driver)[:1500]!r}\n"
            f"console errors: {console_errors(driver)}"
        ) from None
    return el


def _page_text(driver: webdriver.Chrome) -> str:
    try:
        return str(driver.execute_script("return document.body ? document.body.innerText : ''"))
    except WebDriverException as exc:
        return f"<unreadable: {exc.msg}>"


def login(driver: webdriver.Chrome, base_url: str, token: str, timeout: float = 10.0) -> None:
    """Sign in to the console as a person does: open ``/ui/login``, type the token into
    the form's ``token`` field, press Enter, and wait to be taken off the sign-in page.
    AssertionError (with what the page says) when the sign-in does not go through.
    """
    driver.get(base_url.rstrip("/") + "/ui/login")
    field = wait_for(driver, "input[name=token]", timeout=timeout)
    field.clear()
    field.send_keys(token, Keys.ENTER)
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.05).until(
            lambda d: (
                urlsplit(d.current_url).path != "/ui/login"
                and d.execute_script("return document.readyState") == "complete"
            )
        )
    except TimeoutException:
        raise AssertionError(
            f"still on {driver.current_url} {timeout} s after signing in; the page says: "
            f"{_page_text(driver)[:1000]!r}; console errors: {console_errors(driver)}"
        ) from None


def screenshot(driver: webdriver.Chrome, name: str, full_page: bool = True) -> Path:
    """Save the page as ``tests/artifacts/screenshots/<name>.png`` (a person looks at
    these; they are not committed) and return the path. ``full_page``: the whole page,
    not just the window (1366×900, of which 1366×757 show the page) (Chrome's DevTools capture beyond the viewport).
    """
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") + ".png")
    if full_page:
        metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size, view = metrics["cssContentSize"], metrics["cssLayoutViewport"]
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": max(size["width"], view["clientWidth"]),
                    "height": max(size["height"], view["clientHeight"]),
                    "scale": 1,
                },
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))
    elif not driver.save_screenshot(str(path)):
        raise AssertionError(f"Chromium did not write the screenshot {path}")
    return path


@dataclass
class NavigationTiming:
    """The current page's load, in milliseconds from the start of its navigation
    (``performance.getEntriesByType("navigation"/"paint")``)."""

    url: str
    response_start_ms: float  # first byte of the page (server time + loopback)
    response_end_ms: float
    dom_interactive_ms: float
    dom_content_loaded_ms: float  # domContentLoadedEventEnd
    load_ms: float  # loadEventEnd
    first_paint_ms: float | None
    first_contentful_paint_ms: float | None  # None: nothing with content was painted
    transfer_size: int  # bytes of the page itself (0 when served from the cache)


def navigation_timing(driver: webdriver.Chrome, timeout: float = 5.0) -> NavigationTiming:
    """The Navigation Timing and paint figures of the page now shown, waiting (up to
    ``timeout`` s) for its load event to end and for its first contentful paint.
    A page with no contentful paint in that time gets ``None`` for it.
    """
    script = """
        const n = performance.getEntriesByType("navigation")[0];
        const paint = {};
        for (const p of performance.getEntriesByType("paint")) paint[p.name] = p.startTime;
        return {nav: n ? n.toJSON() : null, paint: paint};
    """
    deadline = time.monotonic() + timeout
    while True:
        doc = driver.execute_script(script)
        nav, paint = doc["nav"], doc["paint"]
        done = nav is not None and nav["loadEventEnd"] > 0
        if (done and "first-contentful-paint" in paint) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not done:
        raise AssertionError(f"{driver.current_url} did not finish loading in {timeout} s")
    return NavigationTiming(
        url=nav["name"],
        response_start_ms=nav["responseStart"],
        response_end_ms=nav["responseEnd"],
        dom_interactive_ms=nav["domInteractive"],
        dom_content_loaded_ms=nav["domContentLoadedEventEnd"],
        load_ms=nav["loadEventEnd"],
        first_paint_ms=paint.get("first-paint"),
        first_contentful_paint_ms=paint.get("first-contentful-paint"),
        transfer_size=int(nav.get("transferSize", 0)),
    )

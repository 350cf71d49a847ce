"""The console in a real headless Chromium (issue 12), and the browser support module
itself (tests/support/browser.py).

- The support module against a plain aiohttp page (served by a thread of this test
  process): its helpers find what is there and report what is wrong (a JS error, a
  sign-in that does not go through, an element that never shows), so a console test
  built on them can fail.
- The smoke test: ``edge-fleet serve`` as a real process (embedded broker), ``/``
  sends an anonymous browser to the sign-in form, the admin token signs in, the
  overview shows, with a session cookie the page's scripts cannot read, and no error in
  the browser's console. Screenshots go to tests/artifacts/screenshots/.

Selenium's calls block the calling thread, so every page is served by another thread
or process than the test's.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from selenium import webdriver

from edgefleet.fleet.console.sessions import COOKIE
from tests.support.brokers import free_port
from tests.support.browser import (
    console_errors,
    login,
    navigation_timing,
    screenshot,
    wait_for,
)
from tests.support.fleet_server import ServedFleet

PLAIN_TOKEN = "plain-page-token-0123456789"

PAGE = """<!doctype html><html><head><title>{title}</title>
<link rel="icon" href="data:,"></head><body>{body}</body></html>"""


async def _plain_login_form(request: web.Request) -> web.Response:
    return web.Response(
        text=PAGE.format(
            title="sign in",
            body='<form method="post"><input name="token" type="password">'
            "<button>Sign in</button></form>",
        ),
        content_type="text/html",
    )


async def _plain_login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    if form.get("token") != PLAIN_TOKEN:
        return web.Response(
            text=PAGE.format(title="sign in", body="Wrong token."),
            status=401,
            content_type="text/html",
        )
    response = web.HTTPSeeOther("/ui/")
    response.set_cookie("plain", "1", httponly=True, samesite="Strict")
    raise response


async def _plain_overview(request: web.Request) -> web.Response:
    if request.cookies.get("plain") != "1":
        raise web.HTTPSeeOther("/ui/login")
    # The list shows up 0.3 s after the load, as a live page's would.
    body = (
        "<h1>Plain overview</h1><ul id=later></ul><script>"
        "setTimeout(() => { document.getElementById('later').innerHTML ="
        " '<li>device-1 online</li>'; }, 300);</script>"
    )
    return web.Response(text=PAGE.format(title="overview", body=body), content_type="text/html")


async def _plain_broken(request: web.Request) -> web.Response:
    body = "<p>broken</p><script>console.error('told'); notDefinedAnywhere();</script>"
    return web.Response(text=PAGE.format(title="broken", body=body), content_type="text/html")


class PlainSite:
    """An aiohttp app on a loopback port, served by its own thread and loop."""

    def __init__(self) -> None:
        app = web.Application()
        app.router.add_get("/ui/login", _plain_login_form)
        app.router.add_post("/ui/login", _plain_login)
        app.router.add_get("/ui/", _plain_overview)
        app.router.add_get("/broken", _plain_broken)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self.thread = threading.Thread(target=self.loop.run_forever, name="plain-site")
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


@pytest.fixture(scope="module")
def plain_site() -> Iterator[PlainSite]:
    site = PlainSite()
    try:
        yield site
    finally:
        site.stop()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_browser_helpers_on_a_plain_page(browser: webdriver.Chrome, plain_site: PlainSite) -> None:
    # A wrong token leaves the browser on the form: login() says so, with the page's words.
    with pytest.raises(AssertionError, match="Wrong token"):
        login(browser, plain_site.url, "not-the-token", timeout=1)
    login(browser, plain_site.url, PLAIN_TOKEN)
    assert browser.current_url == plain_site.url + "/ui/"
    # An element written by the page's script after the load is waited for.
    assert wait_for(browser, "#later li", text="online").text == "device-1 online"
    with pytest.raises(AssertionError, match=r"no '#later li' containing 'offline'"):
        wait_for(browser, "#later li", text="offline", timeout=0.5)

    timing = navigation_timing(browser)
    assert timing.url == plain_site.url + "/ui/"
    assert 0 < timing.response_start_ms <= timing.dom_content_loaded_ms <= timing.load_ms
    assert timing.first_contentful_paint_ms is not None and timing.first_contentful_paint_ms > 0

    shot = screenshot(browser, "plain page overview")
    assert shot.name == "plain_page_overview.png"
    assert png_size(shot)[0] == 1366
    # The wrong token's 401 was a failed load: reported, and ignorable by pattern.
    assert console_errors(browser, ignore=(r"status of 401",)) == []
    assert any("401" in e for e in console_errors(browser))

    browser.get(plain_site.url + "/broken")
    wait_for(browser, "p", text="broken")
    errors = console_errors(browser, ignore=(r"status of 401",))
    assert any("notDefinedAnywhere is not defined" in e for e in errors), errors
    assert any('"told"' in e for e in errors), errors


def test_browser_starts_clean_after_a_test(
    browser: webdriver.Chrome, plain_site: PlainSite
) -> None:
    """The previous test's cookie and console errors do not reach this one."""
    assert console_errors(browser) == []
    browser.get(plain_site.url + "/ui/")
    wait_for(browser, "input[name=token]")  # no cookie: sent back to the form


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[ServedFleet]:
    served = ServedFleet(
        tmp_path, free_port(), ["--data-dir", str(tmp_path / "data"), "--mqtt-port", "0"]
    )
    try:
        yield served
    finally:
        served.stop()


def test_console_sign_in_lands_on_the_overview(
    fleet: ServedFleet, browser: webdriver.Chrome
) -> None:
    # The fleet is asked for first so that it stops last: the browser leaves the page
    # (closing its live-update stream) before the server goes away.
    token = (fleet.workdir / "data" / "admin.token").read_text().strip()
    # An anonymous visitor of / is sent to the sign-in form.
    browser.get(fleet.url + "/")
    wait_for(browser, "input[name=token]")
    assert browser.current_url.startswith(fleet.url + "/ui/login")
    screenshot(browser, "console login")

    login(browser, fleet.url, token)
    assert browser.current_url == fleet.url + "/ui/"
    wait_for(browser, "h1", text="Fleet overview")
    screenshot(browser, "console overview")

    cookie = browser.get_cookie(COOKIE)
    assert cookie is not None, browser.get_cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie").find(COOKIE) == -1
    errors = console_errors(browser)
    assert errors == [], "the browser's console:\n" + "\n".join(errors)

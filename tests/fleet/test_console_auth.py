"""The console's security as a whole, over real HTTP (issue 12): a real fleet service
(its own embedded broker, real SQLite), signed in to as a browser does (a form post, a
cookie jar that keeps 127.0.0.1's cookies, the CSRF token read from the page).

- sign-in: the cookie is HttpOnly, SameSite=Strict, and Secure when the fleet serves
  HTTPS; a wrong token is a 401 and an audit row ``login_failed``; a form posted from
  another site is refused; ``next=`` never leads off the console;
- CSRF: a state-changing call with the cookie but without (or with a wrong, or another
  session's) CSRF token is a 403 and changes nothing; with it, it is done and audited
  with who, what, when and from where;
- roles: a read session gets 403 on an operator action and its pages offer no action;
- sessions end at sign-out (the old cookie no longer works) and at expiry (pages send
  to the sign-in form);
- the static handler serves only its own files, with nosniff; every page has the CSP
  header and no inline script; ``/`` leads to ``/ui/``;
- the live stream ``/ui/events`` names the topic of a stored change within 2 s and ends
  when the fleet stops (the leak check, tests/support/leaks.py, finds no task left).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import yarl

from edgefleet.fleet.console.sessions import COOKIE
from edgefleet.fleet.service import FleetService
from tests.support.console_fleet import (
    ADMIN,
    OPERATOR,
    READER,
    ConsoleClient,
    bearer,
    console_config,
    enrol,
    hard_example,
    upload,
)
from tests.support.tls import make_tls

PAGES = [
    "/ui/",
    "/ui/devices",
    "/ui/models",
    "/ui/rollouts",
    "/ui/hard-examples",
    "/ui/policies",
    "/ui/audit",
]
# What a page offers a person to change something with (console.js and the area scripts).
ACTION_MARKS = re.compile(
    r'data-action=|data-api=|data-upload=|id="he-confirm"|id="he-classes"|<form[^>]*method="post"'
)


@pytest.fixture
async def fleet(tmp_path: Path, keys: tuple[Path, Path]) -> AsyncIterator[FleetService]:
    svc = await FleetService(console_config(tmp_path, keys)).start()
    try:
        yield svc
    finally:
        await svc.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def audit_rows(http: aiohttp.ClientSession, svc: FleetService) -> list[dict[str, Any]]:
    status, doc = await bearer(http, svc.url, "GET", "/v1/audit?limit=50", ADMIN)
    assert status == 200, doc
    return list(doc["entries"])


async def groups_of(http: aiohttp.ClientSession, svc: FleetService, device: str) -> list[str]:
    status, doc = await bearer(http, svc.url, "GET", f"/v1/devices/{device}", ADMIN)
    assert status == 200, doc
    return list(doc["groups"])


async def test_sign_in_sets_a_strict_http_only_cookie_and_a_wrong_token_is_audited(
    fleet: FleetService, http: aiohttp.ClientSession
) -> None:
    async with ConsoleClient(fleet.url) as browser:
        # / leads to the console, which sends an anonymous visitor to the sign-in form.
        async with browser.session.get(fleet.url + "/", allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (302, "/ui/")
        status, _, headers = await browser.page("/ui/hard-examples?state=all")
        assert status == 303
        login_url = urlsplit(headers["Location"])
        assert login_url.path == "/ui/login"
        assert parse_qs(login_url.query)["next"] == ["/ui/hard-examples?state=all"]

        t0 = time.time()
        r = await browser.login("not-a-token-at-all-0000")
        assert r.status == 401 and COOKIE not in r.cookies and browser.cookie() is None
        rows = await audit_rows(http, fleet)
        failed = [e for e in rows if e["action"] == "login_failed"]
        assert len(failed) == 1, rows
        assert failed[0]["status"] == 401 and failed[0]["remote"] == "127.0.0.1"
        assert t0 - 1 <= failed[0]["at"] <= time.time() + 1
        assert "not-a-token" not in str(rows), "a tried token reached the audit log"

        r = await browser.login(READER, next_url="/ui/hard-examples?state=all")
        assert r.status == 303 and r.headers["Location"] == "/ui/hard-examples?state=all"
        morsel = r.cookies[COOKIE]
        assert morsel["httponly"] is True
        assert morsel["samesite"] == "Strict"
        assert not morsel["secure"], "plain HTTP: a Secure cookie would never come back"
        assert morsel["path"] == "/"
        assert browser.cookie() is not None and browser.csrf
        assert browser.cookie() not in (await fleet.db.read(_session_dump)), (
            "the database holds the cookie itself, not its hash"
        )
        status, text, _ = await browser.page("/ui/")
        assert status == 200 and 'data-user="viewer"' in text
        logins = [e for e in await audit_rows(http, fleet) if e["action"] == "login"]
        assert [(e["actor"], e["role"], e["remote"]) for e in logins] == [
            ("viewer", "read", "127.0.0.1")
        ]


def _session_dump(conn: Any) -> str:
    return str([tuple(r) for r in conn.execute("SELECT * FROM console_sessions")])


async def test_the_cookie_is_secure_when_the_fleet_serves_https(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    tls = make_tls(tmp_path / "tls")
    svc = await FleetService(console_config(tmp_path, keys, tls=tls)).start()
    try:
        assert svc.url.startswith("https://")
        async with ConsoleClient(svc.url, ca=tls.ca) as browser:
            r = await browser.login(OPERATOR)
            assert r.status == 303
            morsel = r.cookies[COOKIE]
            assert morsel["secure"] is True and morsel["httponly"] is True
            assert morsel["samesite"] == "Strict"
            status, text, _ = await browser.page("/ui/")  # the Secure cookie comes back
            assert status == 200 and 'data-user="ops"' in text
    finally:
        await svc.stop()


async def test_state_changes_need_the_sessions_csrf_token_and_are_audited(
    fleet: FleetService, http: aiohttp.ClientSession
) -> None:
    device, _ = await enrol(http, fleet.url, "shop-1")
    path = f"/v1/devices/{device}/groups"
    async with ConsoleClient(fleet.url) as ops, ConsoleClient(fleet.url) as other:
        assert (await ops.login(OPERATOR)).status == 303
        assert (await other.login(OPERATOR)).status == 303
        assert ops.csrf and other.csrf and ops.csrf != other.csrf
        refused = [
            None,  # no token
            "",  # an empty one
            "x" * len(ops.csrf),  # a wrong one of the right length
            other.csrf,  # another session's (same user): tokens are per session
        ]
        for token in refused:
            status, doc = await ops.api("PUT", path, csrf=token, json={"groups": ["north"]})
            assert status == 403, (token, status, doc)
            assert "CSRF" in doc["error"]
        # The same refusal for a form post (the sign-out form's field).
        async with ops.session.post(
            fleet.url + "/ui/logout", data={"csrf_token": other.csrf}, allow_redirects=False
        ) as r:
            assert r.status == 403
        assert await groups_of(http, fleet, device) == [], "a refused call changed something"
        status, _, _ = await ops.page("/ui/")  # and the session still works
        assert status == 200

        t0 = time.time()
        status, doc = await ops.api("PUT", path, json={"groups": ["north"]})
        assert status == 200, doc
        assert await groups_of(http, fleet, device) == ["north"]

    rows = [
        e for e in await audit_rows(http, fleet) if e["action"] == "PUT /v1/devices/{id}/groups"
    ]
    assert [e["status"] for e in rows] == [200, 403, 403, 403, 403], rows  # newest first
    done = rows[0]
    assert (done["actor"], done["role"], done["via"]) == ("ops", "operator", "session")
    assert done["target"] == f"id={device}" and done["remote"] == "127.0.0.1"
    assert t0 - 1 <= done["at"] <= time.time() + 1
    assert all("CSRF" in e["detail"] for e in rows[1:])


async def test_a_read_session_sees_no_actions_and_is_refused_anyway(
    fleet: FleetService, http: aiohttp.ClientSession, cloud_bundles: dict[str, Path]
) -> None:
    status, doc = await bearer(
        http, fleet.url, "POST", "/v1/models", ADMIN, data=cloud_bundles["edge"].read_bytes()
    )
    assert status == 201, doc
    device = await enrol(http, fleet.url, "shop-1")
    hid, body = hard_example(0, "shop-1")
    assert await upload(http, fleet.url, device, hid, body) == 201

    async with ConsoleClient(fleet.url) as viewer, ConsoleClient(fleet.url) as ops:
        assert (await viewer.login(READER)).status == 303
        assert (await ops.login(OPERATOR)).status == 303
        for page in [*PAGES, f"/ui/hard-examples/{hid}"]:
            status, text, _ = await viewer.page(page)
            assert status == 200, (page, status)
            main = text[text.index("<main>") :]  # the header's sign-out form is everyone's
            assert not ACTION_MARKS.search(main), (page, ACTION_MARKS.search(main))
        # The operator's hard-example page does offer the labelling (the marks are real).
        status, text, _ = await ops.page(f"/ui/hard-examples/{hid}")
        assert status == 200 and 'id="he-confirm"' in text and 'data-label="a"' in text

        # The read session posts anyway, with a valid CSRF token: the role refuses it.
        status, doc = await viewer.api("PUT", f"/v1/hard-examples/{hid}/label", json={"label": "a"})
        assert status == 403 and "viewer (read) may not write" in doc["error"], doc
        status, doc = await viewer.api(
            "POST", "/v1/devices/shop-1/commands", json={"command": "resync"}
        )
        assert status == 403, doc
        status, doc = await bearer(http, fleet.url, "GET", f"/v1/hard-examples/{hid}", ADMIN)
        assert doc["label"] is None
        # The operator may.
        status, doc = await ops.api("PUT", f"/v1/hard-examples/{hid}/label", json={"label": "a"})
        assert status == 200 and doc["label"] == "a" and doc["labelled_by"] == "ops"

    rows = [e for e in await audit_rows(http, fleet) if e["action"].startswith("PUT /v1/hard")]
    assert [(e["actor"], e["status"]) for e in rows] == [("ops", 200), ("viewer", 403)]


async def test_sign_out_ends_the_session_and_an_expired_one_goes_to_sign_in(
    fleet: FleetService, http: aiohttp.ClientSession
) -> None:
    async with ConsoleClient(fleet.url) as browser:
        assert (await browser.login(OPERATOR)).status == 303
        old = browser.cookie()
        assert old is not None
        async with browser.session.post(
            fleet.url + "/ui/logout", data={"csrf_token": browser.csrf}, allow_redirects=False
        ) as r:
            assert (r.status, r.headers["Location"]) == (303, "/ui/login")
            assert r.cookies[COOKIE].value == ""  # the browser forgets it
        assert browser.cookie() is None
    # The old cookie, kept by someone who copied it, no longer works.
    async with aiohttp.ClientSession() as thief:
        headers = {"Cookie": f"{COOKIE}={old}"}
        async with thief.get(fleet.url + "/ui/", headers=headers, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"].startswith("/ui/login")
        async with thief.get(fleet.url + "/v1/devices", headers=headers) as r:
            assert r.status == 401
    assert "logout" in [e["action"] for e in await audit_rows(http, fleet)]

    async with ConsoleClient(fleet.url) as browser:
        assert (await browser.login(READER)).status == 303
        assert (await browser.page("/ui/audit"))[0] == 200

        def expire(conn: Any) -> None:
            conn.execute("UPDATE console_sessions SET expires_at = ?", (time.time() - 1,))

        await fleet.db.write(expire)
        status, _, headers = await browser.page("/ui/audit")
        assert status == 303
        to = urlsplit(headers["Location"])
        assert (to.path, parse_qs(to.query)) == ("/ui/login", {"next": ["/ui/audit"]})
        status, _ = await browser.api("GET", "/v1/devices")
        assert status == 401
        assert await fleet.db.read(_session_dump) == "[]", "the expired session was kept"


@pytest.mark.parametrize(
    "next_url",
    [
        "//evil.example",
        "https://evil.example/ui/",
        "/\\evil.example",
        "/ui/\\\\evil.example",
        "\\\\evil.example",
        "javascript:alert(1)",
        "http:/ui/x",
        "/\t/evil.example",
        "/\r\n/evil.example",
        "/elsewhere",
    ],
)
async def test_next_never_leads_off_the_console(fleet: FleetService, next_url: str) -> None:
    async with ConsoleClient(fleet.url) as browser:
        r = await browser.login(READER, next_url=next_url)
        assert r.status == 303 and r.headers["Location"] == "/ui/", r.headers.get("Location")
        async with browser.session.get(
            fleet.url + "/ui/login", params={"next": next_url}, allow_redirects=False
        ) as resp:
            assert resp.status == 200
            assert 'name="next" value="/ui/"' in await resp.text()


async def test_a_good_next_is_followed_and_control_characters_inject_nothing(
    fleet: FleetService,
) -> None:
    async with ConsoleClient(fleet.url) as browser:
        r = await browser.login(READER, next_url="/ui/audit?actor=ops")
        assert r.headers["Location"] == "/ui/audit?actor=ops"
    for next_url in ("/ui/\r\nSet-Cookie: x=1", "/ui/\tx"):
        async with ConsoleClient(fleet.url) as browser:
            r = await browser.login(READER, next_url=next_url)
            # A line break never reaches the headers (no header injection); what is left
            # is a path inside the console.
            assert r.status == 303 and "x" not in r.cookies, r.headers
            location = r.headers["Location"]
            assert location.startswith("/ui/") and not re.search(r"[\r\n\t]", location)


async def test_a_sign_in_form_posted_from_another_site_is_refused(fleet: FleetService) -> None:
    async with ConsoleClient(fleet.url) as browser:
        host = urlsplit(fleet.url).netloc
        for origin in ("https://evil.example", "null", f"http://{host}.evil.example"):
            r = await browser.login(OPERATOR, headers={"Origin": origin})
            assert r.status == 403, origin
            assert browser.cookie() is None
        r = await browser.login(OPERATOR, headers={"Origin": f"http://{host}"})
        assert r.status == 303 and browser.cookie() is not None


async def test_static_files_only_with_nosniff_and_every_page_has_the_csp(
    fleet: FleetService, http: aiohttp.ClientSession
) -> None:
    for path, ctype in (
        ("console.js", "text/javascript"),
        ("console.css", "text/css"),
        ("hard_examples.js", "text/javascript"),
        ("vendor/htmx.min.js", "text/javascript"),
    ):
        async with http.get(f"{fleet.url}/ui/static/{path}") as r:
            assert r.status == 200, path
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Content-Type"].split(";")[0] in (ctype, "application/javascript")
    for path in (
        "../pages.py",
        "%2e%2e/pages.py",
        "..%2fpages.py",
        "vendor/../../render.py",
        "./console.js/../../sessions.py",
        "%2fetc%2fpasswd",
        "vendor/htmx.LICENSE",
        "vendor/README.md",
        "nope.js",
    ):
        # encoded=True: the client sends the path as it is, ".." and all.
        url = yarl.URL(f"{fleet.url}/ui/static/{path}", encoded=True)
        async with http.get(url, allow_redirects=False) as r:
            body = await r.read()
            assert r.status in (400, 404), (path, r.status)
            assert b"import" not in body and b"root:" not in body, path

    creds = await enrol(http, fleet.url, "shop-1")
    device = creds[0]
    hid, body = hard_example(0, "shop-1")
    assert await upload(http, fleet.url, creds, hid, body) == 201
    async with ConsoleClient(fleet.url) as browser:
        status, text, headers = await browser.page("/ui/login")
        pages = [("/ui/login", text, headers)]
        assert (await browser.login(ADMIN)).status == 303
        for path in [*PAGES, f"/ui/devices/{device}", f"/ui/hard-examples/{hid}"]:
            status, text, headers = await browser.page(path)
            assert status == 200, (path, status)
            pages.append((path, text, headers))
    inline = re.compile(r"<script(?![^>]*\bsrc=)(?![^>]*type=\"application/json\")[^>]*>", re.I)
    handler = re.compile(r"<[^>]+\son[a-z]+\s*=", re.I)
    for path, text, headers in pages:
        csp = headers["Content-Security-Policy"]
        script_src = re.search(r"script-src ([^;]*)", csp)
        assert script_src and script_src.group(1).strip() == "'self'", (path, csp)
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert not inline.search(text), (path, inline.search(text))
        assert not handler.search(text), (path, handler.search(text))


async def test_the_live_stream_names_the_topic_within_2_s_and_ends_when_the_fleet_stops(
    tmp_path: Path, keys: tuple[Path, Path], http: aiohttp.ClientSession
) -> None:
    svc = await FleetService(console_config(tmp_path, keys)).start()
    stopped = False
    try:
        async with ConsoleClient(svc.url) as browser:
            assert (await browser.login(READER)).status == 303
            async with browser.session.get(svc.url + "/ui/events") as stream:
                assert stream.status == 200
                assert stream.headers["Content-Type"].startswith("text/event-stream")
                assert (await stream.content.readline()).startswith(b"retry:")
                await asyncio.sleep(1.2)  # the feed has read its first stamps
                for change, topic in (
                    (enrol(http, svc.url, "shop-1"), "devices"),
                    (browser.login("wrong-token-0000000000000"), "audit"),
                ):
                    await change  # stored when it returns: the 2 s count from here
                    topics = await _next_change(stream, within=2.0)
                    assert topic in topics, (topic, topics)
                # The fleet stops while the page still listens: the stream ends, cleanly.
                stopping = asyncio.create_task(svc.stop())
                async with asyncio.timeout(10):
                    rest = await stream.content.read()
                await stopping
                stopped = True
                assert b"change" not in rest or rest.endswith(b"\n\n")
    finally:
        if not stopped:
            await svc.stop()


async def _next_change(stream: aiohttp.ClientResponse, within: float) -> list[str]:
    import json

    async with asyncio.timeout(within):
        event = ""
        while True:
            line = (await stream.content.readline()).decode()
            if not line:
                raise AssertionError("the stream ended")
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "change":
                return list(json.loads(line.split(":", 1)[1])["topics"])

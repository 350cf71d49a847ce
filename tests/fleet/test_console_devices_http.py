"""The console's device pages and overview over plain HTTP (issue 12): the server-side
rules, cheaper than a browser.

A real fleet (``FleetService`` from a YAML config with read, operator and admin tokens,
its embedded broker, real HTTP on loopback, a real SQLite file). Devices are enrolled
over the API and speak for themselves over MQTT with their own credentials (a plain
paho client publishing their ``status`` and ``reported``, as an agent does); bulk
devices for the paging come from ``create_device`` (no MQTT round trip needed).

- filters (id substring, group, online, agent version, model version, provider, no
  group), sorting and pagination give exactly the devices they should, and the links
  carry the filters (a shareable URL); bad parameters are a 400 naming them;
- an unknown device is a 404 page; a live refresh (``HX-Request``) gets the fragment,
  a browser the whole page;
- a read user's pages carry no action button or form, an operator's no admin ones,
  and the server refuses a read user's action through the session anyway;
- names a device or an old database carry with ``<script>`` print escaped;
- the overview's alerts: an accelerator fallback read from the real ``reported``
  shape, a telemetry backlog growing (records arriving later and later), drift over
  the threshold (telemetry rows written as the ingest stores them).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from edgefleet.core.mqtt import topics
from edgefleet.fleet.config import load_fleet_config
from edgefleet.fleet.console.overview import BACKLOG_WINDOW_S, fallback_of, read_overview
from edgefleet.fleet.devices import create_device
from edgefleet.fleet.service import FleetService
from tests.support.brokers import Peer
from tests.support.quality_fleet import until

ADMIN = "console-admin-token-0000000000000"
READ = "console-read-token-11111111111111"
OPERATOR = "console-operator-token-222222222"
XSS = "<script>alert(1)</script>"


def write_config(tmp: Path, keys: tuple[Path, Path]) -> Path:
    doc: dict[str, Any] = {
        "data_dir": "data",
        "http": {"host": "127.0.0.1", "port": 0},
        "embedded_broker": {"host": "127.0.0.1", "port": 0},
        "auth": {
            "token": ADMIN,
            "tokens": [
                {"name": "wall", "role": "read", "token": READ},
                {"name": "ops", "role": "operator", "token": OPERATOR},
            ],
        },
        "trust": {"public_keys": [str(keys[1])]},
    }
    path = tmp / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Console:
    """HTTP calls to the fleet as a bearer token or a signed-in console session."""

    def __init__(self, svc: FleetService, session: aiohttp.ClientSession) -> None:
        self.svc, self.session = svc, session
        self.devices: dict[str, Peer] = {}

    async def get(self, path: str, token: str | None = ADMIN, hx: bool = False) -> tuple[int, str]:
        headers = {"HX-Request": "true"} if hx else {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.get(
            self.svc.url + path, headers=headers, allow_redirects=False
        ) as r:
            return r.status, await r.text()

    async def api(self, method: str, path: str, token: str = ADMIN, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {token}"}
        async with self.session.request(method, self.svc.url + path, headers=headers, **kw) as r:
            doc = await r.json(content_type=None)
            assert r.status < 300, f"{method} {path}: {r.status} {doc}"
            return doc

    async def enrol(self, device_id: str, groups: list[str]) -> Peer:
        """Enrol over the API and connect as the device (its own broker login)."""
        tok = await self.api(
            "POST", "/v1/enrolment-tokens", json={"device_id": device_id, "groups": groups}
        )
        async with self.session.post(self.svc.url + "/v1/enrol", json={"token": tok["token"]}) as r:
            assert r.status == 200, await r.text()
            creds = (await r.json())["mqtt"]
        peer = await asyncio.to_thread(
            Peer,
            creds["port"],
            device_id,
            username=creds["username"],
            password=creds["password"],
        )
        self.devices[device_id] = peer
        return peer

    async def speak(
        self,
        device_id: str,
        *,
        online: bool = True,
        agent: str = "1.2.0",
        models: dict[str, Any] | None = None,
        accelerators: dict[str, list[str]] | None = None,
    ) -> None:
        """Publish the device's status and reported documents, as its agent does, and
        wait until the fleet stored them."""
        peer = self.devices[device_id]
        now = time.time()
        status: dict[str, Any] = {
            "schema": 1,
            "state": "online" if online else "offline",
            "device_id": device_id,
            "agent_version": agent,
            "protocol": "1",
            "at": now,
        }
        if not online:
            status["reason"] = "clean stop"
        reported = {
            "schema": 1,
            "device_id": device_id,
            "revision": 0,
            "agent_version": agent,
            "at": now,
            "accelerators": accelerators or {"onnx": ["CPUExecutionProvider"], "litert": []},
            "models": models or {},
        }
        await asyncio.to_thread(
            peer.publish,
            topics.device_topic(device_id, "reported"),
            json.dumps(reported),
            1,
            True,
        )
        await asyncio.to_thread(
            peer.publish, topics.device_topic(device_id, "status"), json.dumps(status), 1, True
        )

        await until(
            lambda: self.api("GET", f"/v1/devices/{device_id}"),
            lambda doc: bool(
                doc["online"] == online
                and doc["agent_version"] == agent
                and set(doc["models"]) == set(models or {})
            ),
        )

    async def sign_in(self, token: str) -> tuple[aiohttp.ClientSession, str]:
        """A browser-like session (cookie jar for 127.0.0.1) signed in with ``token``;
        returns it and its CSRF token (from the page's meta tag)."""
        session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        async with session.post(
            self.svc.url + "/ui/login", data={"token": token, "next": "/ui/devices"}
        ) as r:
            assert r.status == 200 and r.url.path == "/ui/devices", r.status
            page = await r.text()
        found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page)
        assert found is not None
        return session, found.group(1)


def model(
    active: str | None, provider: str | None, state: str = "active", **extra: Any
) -> dict[str, Any]:
    return {
        "active": active,
        "previous": extra.pop("previous", None),
        "desired": active,
        "state": state,
        "provider": provider,
        "labels": {},
        **extra,
    }


@pytest.fixture
async def console(tmp_path: Path, keys: tuple[Path, Path]) -> AsyncIterator[Console]:
    svc = await FleetService(load_fleet_config(write_config(tmp_path, keys))).start()
    c = None
    try:
        async with aiohttp.ClientSession() as session:
            c = Console(svc, session)
            yield c
    finally:
        if c is not None:
            for peer in c.devices.values():
                await asyncio.to_thread(peer.close)
        await svc.stop()


def listed(page: str) -> list[str]:
    """The device ids of the list's rows, in order."""
    return re.findall(r'<tr data-device="([^"]*)">', page)


@pytest.fixture
async def fleet_of_devices(console: Console) -> Console:
    """store-a (north, online, 1.2.0, tiny 2 on the CPU though CUDA is offered),
    store-b (south, online, 1.3.0, tiny 1 on CUDA), store-c (north, offline), lonely
    (no group) and bulk-000..059 (group bulk, never connected)."""
    for device_id, groups in (("store-a", ["north"]), ("store-b", ["south"])):
        await console.enrol(device_id, groups)
    await console.enrol("store-c", ["north", "pilot"])
    await console.speak(
        "store-a",
        models={"tiny": model("2", "CPUExecutionProvider", previous="1")},
        accelerators={"onnx": ["CUDAExecutionProvider", "CPUExecutionProvider"], "litert": []},
    )
    await console.speak(
        "store-b",
        agent="1.3.0",
        models={"tiny": model("1", "CUDAExecutionProvider")},
        accelerators={"onnx": ["CUDAExecutionProvider", "CPUExecutionProvider"], "litert": []},
    )
    await console.speak("store-c", online=False, models={"tiny": model("1", "XNNPACK")})
    db = console.svc.db
    assert db is not None
    await create_device(db, "lonely")
    for i in range(60):
        await create_device(db, f"bulk-{i:03d}", ["bulk"])
    return console


async def test_filters_sorting_and_pages(fleet_of_devices: Console) -> None:
    c = fleet_of_devices
    cases: list[tuple[str, list[str]]] = [
        ("?group=north", ["store-a", "store-c"]),
        ("?online=1", ["store-a", "store-b"]),
        ("?online=0&group=north", ["store-c"]),
        ("?agent=1.3.0", ["store-b"]),
        ("?model=tiny&version=2", ["store-a"]),
        ("?model=tiny&version=1", ["store-b", "store-c"]),
        ("?provider=CUDAExecutionProvider", ["store-b"]),
        ("?provider=XNNPACK", ["store-c"]),
        ("?q=ORE-", ["store-a", "store-b", "store-c"]),  # a substring, any case
        ("?q=e-b", ["store-b"]),
        ("?group=(no+group)", ["lonely"]),
        ("?group=north&sort=id&order=desc", ["store-c", "store-a"]),
        ("?group=nowhere", []),
    ]
    for query, want in cases:
        status, page = await c.get("/ui/devices" + query)
        assert status == 200, (query, page[:300])
        assert listed(page) == want, query
    status, page = await c.get("/ui/devices?group=nowhere")
    assert "No device matches these filters." in page
    # The filter form shows what is filtered on (a shared URL opens the same view).
    status, page = await c.get("/ui/devices?group=north&online=1&agent=1.2.0")
    assert listed(page) == ["store-a"]
    assert re.search(r'<option value="north" selected>north \(2\)</option>', page)
    assert '<option value="1" selected>online</option>' in page
    assert '<option value="1.2.0" selected>' in page

    # Pages of 25 over the 60 bulk devices, newest id first.
    status, page = await c.get("/ui/devices?group=bulk&per=25&sort=id&order=desc")
    rows = listed(page)
    assert rows == [f"bulk-{i:03d}" for i in range(59, 34, -1)]
    assert "60 of 64 devices · page 1 of 3" in page
    nxt = re.search(r'<a href="([^"]+)" rel="next"', page)
    assert nxt is not None
    href = nxt.group(1).replace("&amp;", "&")
    assert href == "/ui/devices?group=bulk&order=desc&page=2&per=25"
    status, page = await c.get(href)
    assert listed(page) == [f"bulk-{i:03d}" for i in range(34, 9, -1)]
    status, page = await c.get("/ui/devices?group=bulk&per=25&page=3")
    assert listed(page) == [f"bulk-{i:03d}" for i in range(50, 60)]
    assert 'rel="next"' not in page and 'rel="prev"' in page
    # Default page size 50, sorted by id.
    status, page = await c.get("/ui/devices")
    assert len(listed(page)) == 50 and listed(page)[0] == "bulk-000"

    for query, fragment in (
        ("?page=x", "page must be a whole number"),
        ("?page=0", "page must be a whole number"),
        ("?per=7", "per must be one of 25, 50, 100, 200"),
        ("?sort=secret_hash", "sort must be one of"),
        ("?order=sideways", "order must be asc or desc"),
        ("?online=maybe", "online must be 1"),
        ("?q=" + "x" * 65, "q is longer than 64 characters"),
    ):
        status, body = await c.get("/ui/devices" + query)
        assert status == 400 and fragment in json.loads(body)["error"], (query, body)


async def test_device_page_fragment_and_unknown_device(fleet_of_devices: Console) -> None:
    c = fleet_of_devices
    status, page = await c.get("/ui/devices/store-a")
    assert status == 200
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert 'id="device-charts" data-series="/v1/series/devices/store-a"' in page
    facts = page[page.index('id="device-facts"') : page.index('id="device-events"')]
    assert "1.2.0" in facts and "north" in facts and "CUDAExecutionProvider" in facts
    models = page[page.index('id="models-table"') :]
    assert '<tr data-model="tiny"' in models
    assert "CPU fallback" in models  # runs on the CPU though the device offers CUDA
    # The live refresh gets only the fragment: no document, no second copy of the nav.
    status, frag = await c.get("/ui/devices/store-a", hx=True)
    assert status == 200
    assert "<html" not in frag and "<nav" not in frag and 'id="device-facts"' in frag
    assert 'id="device-charts"' not in frag  # the charts are not redrawn by the refresh
    status, frag = await c.get("/ui/devices?group=north", hx=True)
    assert "<html" not in frag and listed(frag) == ["store-a", "store-c"]
    assert 'id="device-filters"' not in frag  # the form the user is typing in stays

    status, page = await c.get("/ui/devices/no-such-store")
    assert status == 404 and "Unknown device" in page and "no-such-store" in page
    status, page = await c.get("/ui/devices/%3Cb%3Ebold")
    assert status == 404 and "&lt;b&gt;bold" in page and "<b>bold" not in page
    # Without a session or token, a page sends the browser to sign in.
    status, _ = await c.get("/ui/devices/store-a", token=None)
    assert status == 303


async def test_buttons_by_role_and_the_server_refuses_anyway(fleet_of_devices: Console) -> None:
    c = fleet_of_devices
    read, read_csrf = await c.sign_in(READ)
    operator, _ = await c.sign_in(OPERATOR)
    admin, _ = await c.sign_in(ADMIN)
    try:
        pages = {}
        for name, session in (("read", read), ("operator", operator), ("admin", admin)):
            async with session.get(c.svc.url + "/ui/devices/store-a") as r:
                assert r.status == 200
                pages[name] = await r.text()
            async with session.get(c.svc.url + "/ui/devices") as r:
                pages[name + "-list"] = await r.text()
        for marker in ("data-action", 'id="resync"', "data-groups", "Roll back", 'id="revoke"'):
            assert marker not in pages["read"], marker
        assert "data-enrol" not in pages["read-list"]
        assert 'id="resync"' in pages["operator"] and "data-groups" in pages["operator"]
        assert 'class="rollback"' in pages["operator"]  # tiny has a previous version
        assert 'id="revoke"' not in pages["operator"]
        assert "data-enrol" not in pages["operator-list"]
        assert 'id="revoke"' in pages["admin"] and "data-enrol" in pages["admin-list"]

        # The read user's session posting the action anyway (with its CSRF token): 403.
        async with read.post(
            c.svc.url + "/v1/devices/store-a/commands",
            json={"command": "resync"},
            headers={"X-CSRF-Token": read_csrf},
        ) as r:
            assert r.status == 403, await r.text()
        async with read.put(
            c.svc.url + "/v1/devices/store-a/groups",
            json={"groups": []},
            headers={"X-CSRF-Token": read_csrf},
        ) as r:
            assert r.status == 403
        doc = await c.api("GET", "/v1/devices/store-a")
        assert doc["groups"] == ["north"]
    finally:
        for session in (read, operator, admin):
            await session.close()


async def test_script_names_print_escaped(console: Console) -> None:
    # The API refuses such a group outright (the name rule)...
    await console.enrol("store-x", ["north"])
    async with console.session.put(
        console.svc.url + "/v1/devices/store-x/groups",
        json={"groups": [XSS]},
        headers={"Authorization": f"Bearer {ADMIN}"},
    ) as r:
        assert r.status == 400
    # ...but a device may say anything in its own documents, and a database written by
    # hand (or by an older fleet) may hold any group name.
    await console.speak(
        "store-x",
        agent=XSS,
        models={
            '<img src=x onerror="alert(2)">': model(
                "1", "CPUExecutionProvider", state="failed", last_error=XSS
            )
        },
    )
    db = console.svc.db
    assert db is not None
    await db.write(
        lambda conn: conn.execute(
            "INSERT INTO device_groups (device_id, grp) VALUES ('store-x', ?)", (XSS,)
        )
    )
    for path in ("/ui/", "/ui/devices", "/ui/devices/store-x", "/ui/devices?group=" + XSS):
        status, page = await console.get(path)
        assert status == 200, path
        assert "<script>alert" not in page and "<img src=x" not in page, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path
    status, page = await console.get("/ui/devices/store-x")
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in page
    # In links the name is URL-encoded.
    assert "/ui/devices?group=%3Cscript%3Ealert%281%29%3C/script%3E" in page


async def test_overview_alerts_accelerator_fallback_and_backlog(
    fleet_of_devices: Console,
) -> None:
    c = fleet_of_devices
    status, page = await c.get("/ui/")
    assert status == 200
    alerts = re.findall(
        r'<li class="alert (\w+)" data-kind="(\w+)"><a href="([^"]*)">([^<]*)', page
    )
    accel = [a for a in alerts if a[1] == "accelerator"]
    assert len(accel) == 1, alerts
    assert accel[0][3] == (
        "tiny runs on CPUExecutionProvider although the device offers"
        " CUDAExecutionProvider on 1 device(s): store-a"
    )
    href = accel[0][2].replace("&amp;", "&")
    status, listing = await c.get(href)
    assert listed(listing) == ["store-a"]
    assert not [a for a in alerts if a[1] == "backlog"]
    # Groups online/offline as stored.
    rows = dict(re.findall(r'<tr data-group="([^"]+)">.*?online=1">(\d+)</a>', page, re.S))
    assert rows == {"bulk": "0", "north": "1", "pilot": "0", "south": "1", "(no group)": "0"}

    # store-b's records arrive later and later: 30 s late five minutes ago, 5 min late now.
    db = c.svc.db
    assert db is not None
    now = time.time()

    def rows_of_lag(conn: Any) -> None:
        for i, (received, lag) in enumerate(
            [(now - 400, 20.0), (now - 350, 30.0), (now - 100, 200.0), (now - 20, 300.0)]
        ):
            conn.execute(
                "INSERT INTO telemetry (id, device_id, seq, kind, priority, ts, received_at,"
                " data) VALUES (?, 'store-b', ?, 'event', 0, ?, ?, '{}')",
                (f"lag{i:028d}", 100 + i, received - lag, received),
            )
        # store-a is steadily 10 min late (its clock): no growth, no alert.
        for i, received in enumerate((now - 450, now - 30)):
            conn.execute(
                "INSERT INTO telemetry (id, device_id, seq, kind, priority, ts, received_at,"
                " data) VALUES (?, 'store-a', ?, 'event', 0, ?, ?, '{}')",
                (f"steady{i:025d}", 100 + i, received - 600, received),
            )

    await db.write(rows_of_lag)

    # Drift over the threshold: tiny 2's roll-up minute, and two devices' records (one
    # of them an hour ago: only the last quarter hour counts devices).
    def drift_rows(conn: Any) -> None:
        conn.execute(
            "INSERT INTO ts_version_minute (model, version, bucket, drift_records, psi_max)"
            " VALUES ('tiny', '2', ?, 1, 0.41)",
            (int(now // 60 * 60),),
        )
        for i, (device_id, received, psi) in enumerate(
            [("store-a", now - 30, 0.41), ("store-b", now - 3000, 0.5), ("store-c", now, 0.1)]
        ):
            conn.execute(
                "INSERT INTO drift_stats (id, device_id, model, version, window_start,"
                " window_s, samples, psi_max, received_at) VALUES (?, ?, 'tiny', '2', ?, 60,"
                " 100, ?, ?)",
                (f"drift{i}", device_id, received - 60, psi, received),
            )

    await db.write(drift_rows)
    overview = await db.read(read_overview)
    drift = [a for a in overview.alerts if a["kind"] == "drift"]
    assert [a["text"] for a in drift] == [
        "tiny 2: input drift PSI up to 0.41 in the last hour (threshold 0.25);"
        " 1 device(s) above it in the last 15 min"
    ]
    assert drift[0]["href"] == "/ui/models/tiny"
    backlog = [a for a in overview.alerts if a["kind"] == "backlog"]
    assert len(backlog) == 1, overview.alerts
    assert "on 1 device(s): store-b" in backlog[0]["text"]
    assert "up to 5 min late" in backlog[0]["text"]
    assert backlog[0]["href"] == "/ui/devices/store-b"
    assert BACKLOG_WINDOW_S > 400  # the rows above are inside the window


@pytest.mark.parametrize(
    ("provider", "accelerators", "why"),
    [
        # The shape agents report (agent/sync.py report_accelerators).
        (
            "CPUExecutionProvider",
            {
                "onnx": [
                    "TensorrtExecutionProvider",
                    "CUDAExecutionProvider",
                    "CPUExecutionProvider",
                ]
            },
            "runs on CPUExecutionProvider although the device offers"
            " TensorrtExecutionProvider, CUDAExecutionProvider",
        ),
        ("CUDAExecutionProvider", {"onnx": ["CUDAExecutionProvider"]}, ""),
        # Azure is not an accelerator (core/backends/accelerators.py CPU_PROVIDERS).
        ("CPUExecutionProvider", {"onnx": ["AzureExecutionProvider", "CPUExecutionProvider"]}, ""),
        (
            "XNNPACK",
            {"litert": ["xnnpack", "/usr/lib/libedgetpu.so.1"]},
            "runs on XNNPACK although the device offers /usr/lib/libedgetpu.so.1",
        ),
        (
            "cpu-builtin",
            {"litert": ["xnnpack"]},
            "runs on cpu-builtin although the device offers XNNPACK",
        ),
        ("delegate:libedgetpu.so.1", {"litert": ["xnnpack", "libedgetpu.so.1"]}, ""),
        ("XNNPACK", {"litert": ["xnnpack"]}, ""),
        (None, {"onnx": ["CUDAExecutionProvider"]}, ""),
        ("CPUExecutionProvider", None, ""),
        ("CPUExecutionProvider", ["not", "a", "dict"], ""),
    ],
)
def test_accelerator_fallback_reads_the_reported_shape(
    provider: str | None, accelerators: Any, why: str
) -> None:
    assert fallback_of(provider, accelerators) == why

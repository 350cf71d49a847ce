"""A real fleet service for the console's security and hard-example tests (issue 12):
its own embedded broker, three tokens (read, operator, admin), optionally HTTPS, and a
console client that signs in as a browser does (a form post, a cookie jar that keeps
cookies for 127.0.0.1, the CSRF token read from the page it was given).

Also hard examples as a device uploads them (the agent's own encoder,
core/hard_example_wire.py), for the labelling queue.
"""

from __future__ import annotations

import base64
import re
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from edgefleet.core.hard_example_wire import encode_upload, pack
from edgefleet.fleet.config import FleetServiceConfig
from edgefleet.fleet.console.sessions import COOKIE
from tests.support.tiny import TEST_X, tiny_reference
from tests.support.tls import TlsFiles

ADMIN = "console-admin-token-0000000000"
OPERATOR = "console-operator-token-11111111"
READER = "console-read-token-222222222222"
NAMES = {ADMIN: "admin", OPERATOR: "ops", READER: "viewer"}


def console_config(
    tmp: Path, keys: tuple[Path, Path], *, tls: TlsFiles | None = None, **extra: Any
) -> FleetServiceConfig:
    http: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
    if tls is not None:
        http.update(tls_cert_file=str(tls.cert), tls_key_file=str(tls.key))
    return FleetServiceConfig.model_validate(
        {
            "data_dir": str(tmp / "fleet"),
            "http": http,
            "embedded_broker": {"host": "127.0.0.1", "port": 0},
            "auth": {
                "token": ADMIN,
                "tokens": [
                    {"name": "ops", "role": "operator", "token": OPERATOR},
                    {"name": "viewer", "role": "read", "token": READER},
                ],
            },
            "trust": {"public_keys": [str(keys[1])]},
            **extra,
        }
    )


_CSRF = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


class ConsoleClient:
    """One browser's worth of console: its own cookie jar and CSRF token."""

    def __init__(self, base: str, ca: Path | None = None) -> None:
        self.base = base
        ctx = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
        self.session = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            connector=aiohttp.TCPConnector(ssl=ctx) if ctx is not None else None,
        )
        self.csrf = ""

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> ConsoleClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def login(
        self, token: str, next_url: str = "", headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """Post the sign-in form (no redirect followed); reads the CSRF token after a
        303 from the page it leads to."""
        async with self.session.post(
            self.base + "/ui/login",
            data={"token": token, "next": next_url},
            allow_redirects=False,
            headers=headers or {},
        ) as resp:
            await resp.read()
        if resp.status == 303:
            await self.page("/ui/")
        return resp

    async def page(self, path: str, **kw: Any) -> tuple[int, str, Any]:
        """GET a page (redirects not followed): status, body, headers. Remembers the
        page's CSRF token when it has one."""
        async with self.session.get(self.base + path, allow_redirects=False, **kw) as resp:
            text = await resp.text()
            found = _CSRF.search(text)
            if found and found.group(1):
                self.csrf = found.group(1)
            return resp.status, text, resp.headers

    async def api(
        self, method: str, path: str, *, csrf: str | None = "page", **kw: Any
    ) -> tuple[int, Any]:
        """A JSON API call with the cookie: ``csrf="page"`` sends the page's token,
        None sends none, any other string is sent as is."""
        headers = dict(kw.pop("headers", {}))
        token = self.csrf if csrf == "page" else csrf
        if token is not None:
            headers["X-CSRF-Token"] = token
        async with self.session.request(method, self.base + path, headers=headers, **kw) as r:
            return r.status, await r.json(content_type=None)

    def cookie(self) -> str | None:
        for c in self.session.cookie_jar:
            if c.key == COOKIE:
                return c.value
        return None


async def bearer(
    session: aiohttp.ClientSession, base: str, method: str, path: str, token: str, **kw: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}", **kw.pop("headers", {})}
    async with session.request(method, base + path, headers=headers, **kw) as r:
        return r.status, await r.json(content_type=None)


async def enrol(session: aiohttp.ClientSession, base: str, device_id: str) -> tuple[str, str]:
    """A device enrolled with the admin token: (id, secret)."""
    status, tok = await bearer(
        session, base, "POST", "/v1/enrolment-tokens", ADMIN, json={"device_id": device_id}
    )
    assert status == 201, tok
    async with session.post(base + "/v1/enrol", json={"token": tok["token"]}) as r:
        assert r.status == 200, await r.text()
        doc = await r.json()
    return doc["device_id"], doc["mqtt"]["password"]


def hard_example(
    i: int,
    device: str,
    *,
    image: bytes = b"",
    inputs: dict[str, np.ndarray] | None = None,
    **header: Any,
) -> tuple[str, bytes]:
    """Item ``i`` of TEST_X as the tiny model (labels a, b, c) and a cloud saw it: the
    upload's id (its sha256) and body. ``inputs``: other input tensors than TEST_X's."""
    x = TEST_X[i % len(TEST_X) : i % len(TEST_X) + 1]
    probs = tiny_reference(x)
    doc = {
        "device_id": device,
        "model": "tiny",
        "version": "1",
        "kind": "unsure",
        "status": "answered",
        "created_at": 1_700_000_000.0 + i,
        "cloud_model": "tiny-cloud",
        "cloud_version": "1",
        "edge_class": int(probs.argmax()),
        "edge_confidence": float(probs.max()),
        "cloud_class": (int(probs.argmax()) + 1) % 3,
        "cloud_confidence": 0.9,
        "agree": False,
        "image_type": "image/png" if image else None,
        **header,
    }
    parts = {
        "inputs": pack(inputs if inputs is not None else {"x": x}),
        "edge_outputs": pack({"probs": probs}),
        "cloud_outputs": pack({"probs": np.ascontiguousarray(probs[:, ::-1])}),
        "image": image,
    }
    return encode_upload(doc, parts)


async def upload(
    session: aiohttp.ClientSession, base: str, creds: tuple[str, str], hid: str, body: bytes
) -> int:
    """PUT one hard example as the device; the status."""
    auth = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
    async with session.put(
        f"{base}/v1/hard-examples/{hid}", data=body, headers={"Authorization": f"Basic {auth}"}
    ) as r:
        await r.read()
        return r.status

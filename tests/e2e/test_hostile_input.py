"""Hostile bundles and names against a real agent process and a real fleet process.

- Tar header bombs (a GNU long-name entry or a pax header declaring 1 GiB, in about
  1 MiB of gzip): a 400 naming the header, and the service's peak resident memory
  (``VmHWM``) grows by far less than the declared size;
- member floods: refused by count;
- malformed ``manifest.sig`` documents: a 400, never a 500;
- names with a trailing newline: refused by both services' HTTP APIs.

Each service keeps serving afterwards.
"""

from __future__ import annotations

import json
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.core.bundle.archive import MAX_MEMBERS, canonical_manifest_bytes
from edgefleet.core.bundle.signing import load_private_key, sign_manifest
from tests.support.agent_process import AgentProcess
from tests.support.brokers import free_port
from tests.support.fleet_server import ServedFleet
from tests.support.hostile_bundles import (
    MALFORMED_SIGNATURES,
    GiB,
    MiB,
    header_bomb,
    member_flood,
    peak_rss_bytes,
    reset_peak_rss,
    with_members,
)

# The bound is on correctness (nothing of the declared size is allocated), not speed:
# unguarded, the agent grew by about 1 GiB per bomb and the fleet by about 3 GiB.
MAX_GROWTH = 100 * MiB
BOMBS = {"GNU long-name": b"L", "pax extended": b"x"}


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw


class Service:
    """One real process and how to send it a bundle."""

    def __init__(self, base: str, pid: int, upload_path: str, auth: dict[str, str]) -> None:
        self.base, self.pid, self.upload_path, self.auth = base, pid, upload_path, auth

    def upload(self, bundle: Path) -> tuple[int, Any]:
        headers = {**self.auth, "Content-Type": "application/octet-stream"}
        return http("POST", self.base + self.upload_path, bundle.read_bytes(), headers)

    def call(self, method: str, path: str, doc: Any = None) -> tuple[int, Any]:
        body = None if doc is None else json.dumps(doc).encode()
        headers = {**self.auth, "Content-Type": "application/json"}
        return http(method, self.base + path, body, headers)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bombs")
    made = {
        what: header_bomb(d / f"{kind.decode()}.bundle", kind, GiB) for what, kind in BOMBS.items()
    }
    for path in made.values():
        assert path.stat().st_size < 2 * MiB  # small on the wire
    return made


@pytest.fixture(scope="module")
def agent(tmp_path_factory, keys, make_tiny_bundle) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("agent")
    config = {
        "store": {"path": str(work / "store")},
        "trust": {"public_keys": [str(keys[1])]},
        "models": [{"bundle": str(make_tiny_bundle("1"))}],
        "runtime": {"executor_threads": 1},
    }
    proc = AgentProcess(config, work, free_port())
    yield Service(proc.base, proc.proc.pid, "/v1/bundles", {})
    proc.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, keys) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("fleet")
    args = ["--data-dir", str(work / "data"), "--mqtt-port", "0", "--trust-key", str(keys[1])]
    proc = ServedFleet(work, free_port(), args)
    token = (work / "data" / "admin.token").read_text().strip()
    yield Service(proc.url, proc.proc.pid, "/v1/models", {"Authorization": f"Bearer {token}"})
    assert proc.stop() == 0


def still_serves(svc: Service) -> None:
    if svc.upload_path == "/v1/bundles":  # the agent
        body = {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
        }
        status, doc = svc.call("POST", "/v2/models/tiny/infer", body)
        assert (status, doc["model_version"]) == (200, "1")
    else:
        status, doc = svc.call("GET", "/v1/health")
        assert status == 200, doc


@pytest.mark.parametrize("service", ["agent", "fleet"])
@pytest.mark.parametrize("what", sorted(BOMBS))
def test_header_bombs_are_refused_before_they_cost_memory(request, service, what, bombs):
    svc: Service = request.getfixturevalue(service)
    reset_peak_rss(svc.pid)
    before = peak_rss_bytes(svc.pid)
    status, doc = svc.upload(bombs[what])
    grown = peak_rss_bytes(svc.pid) - before
    assert grown < MAX_GROWTH, f"{service} peak memory grew by {grown / MiB:.0f} MiB: {doc}"
    assert status == 400, doc
    assert what.split()[0] in doc["error"] and "header" in doc["error"], doc
    still_serves(svc)


@pytest.mark.parametrize("service", ["agent", "fleet"])
def test_member_floods_are_refused_by_count(request, service, tmp_path):
    svc: Service = request.getfixturevalue(service)
    status, doc = svc.upload(member_flood(tmp_path / "flood.bundle", 20 * MAX_MEMBERS))
    assert status == 400 and f"more than {MAX_MEMBERS} members" in doc["error"], doc
    still_serves(svc)


@pytest.mark.parametrize("service", ["agent", "fleet"])
def test_malformed_signatures_are_a_400(request, service, make_tiny_bundle, tmp_path):
    svc: Service = request.getfixturevalue(service)
    good = make_tiny_bundle("1")
    answers = {}
    for i, (kind, sig) in enumerate(sorted(MALFORMED_SIGNATURES.items())):
        bad = with_members(good, tmp_path / f"sig-{i}.bundle", {"manifest.sig": sig})
        answers[kind] = svc.upload(bad)
    assert {k: s for k, (s, _) in answers.items() if s != 400} == {}
    for kind, (_, doc) in answers.items():
        assert "manifest.sig" in doc["error"], (kind, doc)
    still_serves(svc)


def renamed(source: Path, out: Path, keys: tuple[Path, Path], **fields: str) -> Path:
    """``source`` with manifest fields changed and signed again by the trusted key."""
    with tarfile.open(source, "r:*") as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        doc = json.loads(member.read())
    manifest = canonical_manifest_bytes({**doc, **fields})
    signature = sign_manifest(manifest, load_private_key(keys[0]))
    return with_members(source, out, {"manifest.json": manifest, "manifest.sig": signature})


@pytest.mark.parametrize("service", ["agent", "fleet"])
def test_names_with_a_trailing_newline_are_refused(
    request, service, make_tiny_bundle, keys, tmp_path
):
    svc: Service = request.getfixturevalue(service)
    good = make_tiny_bundle("1")
    status, doc = svc.upload(renamed(good, tmp_path / "v.bundle", keys, version="2\n"))
    assert status == 400 and "version '2\\n'" in doc["error"], doc
    status, doc = svc.upload(renamed(good, tmp_path / "n.bundle", keys, name="tiny\n"))
    assert status == 400 and "model name 'tiny\\n'" in doc["error"], doc
    if service == "fleet":  # a version to label (the agent serves one already)
        status, doc = svc.upload(good)
        assert status in (200, 201), doc
    status, doc = svc.call("PUT", "/v1/models/tiny/labels/stable%0A", {"version": "1"})
    assert status == 400 and "label 'stable\\n'" in doc["error"], doc
    if service == "fleet":
        status, doc = svc.call("POST", "/v1/enrolment-tokens", {"device_id": "store-1\n"})
        assert status == 400 and "device id 'store-1\\n'" in doc["error"], doc
        status, doc = svc.call("POST", "/v1/enrolment-tokens", {"groups": ["north\n"]})
        assert status == 400 and "group" in doc["error"], doc
        status, doc = svc.call(
            "POST",
            "/v1/assignments",
            {"model": "tiny", "version": "1", "target": {"group": "north\n"}},
        )
        assert status == 400 and "group name 'north\\n'" in doc["error"], doc
    still_serves(svc)

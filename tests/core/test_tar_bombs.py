"""Tar headers are bounded before Python's tarfile reads them, and members are counted.

Every reader of a bundle is tried: the agent's install (``peek_manifest``, then
``read_bundle``), ``resign_bundle``, and the fleet's streaming upload check. The
service-level tests (real agent and fleet processes, their peak memory) are in
tests/e2e/test_hostile_input.py.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet.core.bundle.archive import (
    MAX_MEMBERS,
    peek_manifest,
    read_bundle,
    resign_bundle,
)
from edgefleet.core.bundle.signing import TrustStore, load_private_key
from edgefleet.core.errors import BundleError
from edgefleet.fleet.bundle_registry import verify_bundle_file
from tests.support.hostile_bundles import MiB, header_bomb, member_flood

MAX_MEMBER = 512 * MiB


@pytest.fixture
def trust(keys: tuple[Path, Path]) -> TrustStore:
    return TrustStore.from_files([keys[1]])


def readers(trust: TrustStore, tmp: Path) -> dict[str, Callable[[Path], object]]:
    """Each way a bundle file is read, as one call."""
    return {
        "peek_manifest": peek_manifest,
        "read_bundle": lambda b: read_bundle(b, tmp / "out", trust),
        "resign_bundle": lambda b: resign_bundle(b, None, tmp / "resigned.bundle"),
        "fleet upload check": lambda b: verify_bundle_file(
            b, trust, MAX_MEMBER, sha256="0" * 64, size=b.stat().st_size
        ),
    }


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (tarfile.GNUTYPE_LONGNAME, "GNU long-name header"),
        (tarfile.GNUTYPE_LONGLINK, "GNU long-link header"),
        (tarfile.GNUTYPE_SPARSE, "GNU sparse member"),
        (tarfile.XGLTYPE, "pax global header"),
        (tarfile.XHDTYPE, r"pax extended header of 8388608 bytes, over the 8192 byte limit"),
        (tarfile.SOLARIS_XHDTYPE, r"pax extended header of 8388608 bytes"),
    ],
    ids=lambda v: v.decode() if isinstance(v, bytes) else None,
)
def test_header_bombs_are_refused_by_every_reader(trust, tmp_path, kind, message):
    bomb = header_bomb(tmp_path / "bomb.bundle", kind, declared=8 * MiB)
    for what, read in readers(trust, tmp_path).items():
        with pytest.raises(BundleError, match=message):
            read(bomb)
        assert not (tmp_path / "out").exists(), what


def _ustar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A gzip tar of raw headers and data, pax headers spelled out by hand."""
    raw = io.BytesIO()
    for info, data in members:
        raw.write(info.tobuf(tarfile.USTAR_FORMAT))
        raw.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
    raw.write(bytes(2 * tarfile.BLOCKSIZE))
    path.write_bytes(gzip.compress(raw.getvalue()))
    return path


def _pax(records: dict[str, str]) -> tuple[tarfile.TarInfo, bytes]:
    body = b""
    for key, value in records.items():
        rec = f" {key}={value}\n".encode()
        n = len(rec) + 1
        while len(str(n)) + len(rec) != n:
            n = len(str(n)) + len(rec)
        body += str(n).encode() + rec
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(body)
    return info, body


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}, "pax keyword 'GNU.sparse.major'"),
        ({"GNU.sparse.map": "0,1"}, "pax keyword 'GNU.sparse.map'"),
        ({"linkpath": "/etc/passwd"}, "pax keyword 'linkpath'"),
        ({"size": "99999999999"}, "pax keyword 'size'"),
    ],
)
def test_pax_records_outside_the_allowed_few_are_refused(trust, tmp_path, records, message):
    bomb = _ustar(tmp_path / "b.bundle", [_pax(records), _file("manifest.json", b"{}")])
    for read in readers(trust, tmp_path).values():
        with pytest.raises(BundleError, match=message):
            read(bomb)


def test_a_chain_of_pax_headers_is_refused(trust, tmp_path):
    """Each pax header makes tarfile recurse into the next one: a chain of them would
    end in a RecursionError (a 500) if it were not refused at the second."""
    chain = [_pax({"mtime": "1"}) for _ in range(5000)] + [_file("manifest.json", b"{}")]
    bomb = _ustar(tmp_path / "b.bundle", chain)
    for read in readers(trust, tmp_path).values():
        with pytest.raises(BundleError, match="pax extended header followed by another"):
            read(bomb)


def test_malformed_pax_records_are_refused(trust, tmp_path):
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    body = b"999 mtime=1\n"  # a length past the header's end
    info.size = len(body)
    bomb = _ustar(tmp_path / "b.bundle", [(info, body), _file("manifest.json", b"{}")])
    for read in readers(trust, tmp_path).values():
        with pytest.raises(BundleError, match="malformed pax"):
            read(bomb)


def test_bundles_written_with_pax_mtime_records_still_read(make_tiny_bundle, keys, trust, tmp_path):
    """Bundles built before the writer moved to ustar carry a small pax header (the
    float mtime) per file: they keep installing everywhere."""
    with tarfile.open(make_tiny_bundle("1"), "r:*") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    old = tmp_path / "old.bundle"
    with tarfile.open(old, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1733600000.25  # a float: written as a pax record
            info.uname = "data-scientist"
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(old, "r:*") as tar:
        assert all(m.pax_headers for m in tar.getmembers())  # the case under test
    assert read_bundle(old, tmp_path / "out", trust).manifest.version == "1"
    assert b'"version": "1"' in peek_manifest(old)
    v = verify_bundle_file(old, trust, MAX_MEMBER, sha256="0" * 64, size=old.stat().st_size)
    assert v.manifest.version == "1"
    resign_bundle(old, load_private_key(keys[0]), tmp_path / "resigned.bundle")


def test_member_floods_are_refused_by_count(trust, tmp_path):
    flood = member_flood(tmp_path / "flood.bundle", MAX_MEMBERS + 5)
    early = member_flood(tmp_path / "early.bundle", MAX_MEMBERS + 5, manifest_last=False)
    for bundle in (flood, early):
        for what, read in readers(trust, tmp_path).items():
            if what == "peek_manifest" and bundle is early:
                continue  # finds the manifest first and looks no further
            with pytest.raises(BundleError, match=f"more than {MAX_MEMBERS} members"):
                read(bundle)
    ok = member_flood(tmp_path / "ok.bundle", MAX_MEMBERS - 1)
    assert peek_manifest(ok) == b"{}"

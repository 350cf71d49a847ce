"""Reading and writing bundle files (tar, optionally gzip-compressed).

Reading never trusts the archive: members are checked before anything is written,
only files the signed manifest lists are extracted, each streamed through sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from edgefleet.core.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from edgefleet.core.bundle.signing import TrustStore, sign_manifest
from edgefleet.core.durable import fsync_dir
from edgefleet.core.errors import BundleError

DEFAULT_MAX_MEMBER_BYTES = 512 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BundleContents:
    manifest: Manifest
    directory: Path
    signed_by: str | None


def _check_member(member: tarfile.TarInfo, max_member_bytes: int) -> None:
    name = member.name
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute() or "\\" in name or ":" in name:
        raise BundleError(f"bundle member {name!r} has an absolute path")
    if any(part == ".." for part in path.parts):
        raise BundleError(f"bundle member {name!r} escapes the bundle (..)")
    if member.issym() or member.islnk():
        raise BundleError(f"bundle member {name!r} is a link")
    if not member.isfile():
        raise BundleError(f"bundle member {name!r} is not a regular file")
    if len(path.parts) != 1:
        raise BundleError(f"bundle member {name!r} is in a sub-directory; bundles are flat")
    if member.size > max_member_bytes:
        raise BundleError(
            f"bundle member {name!r} is {member.size} bytes, over the {max_member_bytes} limit"
        )


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise BundleError(f"{member.name} is {member.size} bytes, over the {limit} limit")
    f = tar.extractfile(member)
    assert f is not None  # _check_member admitted only regular files
    return f.read()


def read_bundle(
    bundle: Path,
    dest: Path,
    trust: TrustStore,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> BundleContents:
    """Verify ``bundle`` and extract it into ``dest`` (which must not exist yet).

    On any failure ``dest`` is left absent: extraction goes to a sibling temporary
    directory renamed into place only when every check has passed.
    """
    if dest.exists():
        raise BundleError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        contents = _extract_verified(bundle, tmp, trust, max_member_bytes)
        _fsync_dir_tree(tmp)
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
        return BundleContents(contents.manifest, dest, contents.signed_by)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _extract_verified(
    bundle: Path, out: Path, trust: TrustStore, max_member_bytes: int
) -> BundleContents:
    try:
        tar = tarfile.open(bundle, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{bundle.name} is not a readable bundle: {exc}") from exc
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BundleError(f"{bundle.name} is truncated or corrupt: {exc}") from exc
        by_name: dict[str, tarfile.TarInfo] = {}
        for m in members:
            _check_member(m, max_member_bytes)
            if m.name in by_name:
                raise BundleError(f"bundle member {m.name!r} appears twice")
            by_name[m.name] = m
        if MANIFEST_NAME not in by_name:
            raise BundleError("bundle has no manifest.json")
        try:
            manifest_bytes = _read_small(tar, by_name[MANIFEST_NAME], MAX_MANIFEST_BYTES)
            sig = by_name.get(SIGNATURE_NAME)
            sig_bytes = _read_small(tar, sig, 64 * 1024) if sig is not None else None
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BundleError(f"{bundle.name} is truncated or corrupt: {exc}") from exc
        # Signature first: nothing from an unverified manifest is acted upon.
        signed_by = trust.verify(manifest_bytes, sig_bytes)
        manifest = parse_manifest(manifest_bytes)
        listed = set(manifest.files)
        extra = set(by_name) - listed - {MANIFEST_NAME, SIGNATURE_NAME}
        if extra:
            raise BundleError(f"bundle holds files the manifest does not list: {sorted(extra)}")
        missing = listed - set(by_name)
        if missing:
            raise BundleError(f"bundle lacks files the manifest lists: {sorted(missing)}")
        for name, entry in manifest.files.items():
            member = by_name[name]
            if member.size != entry.size:
                raise BundleError(
                    f"{name}: size {member.size} differs from the manifest's {entry.size}"
                )
            digest = hashlib.sha256()
            try:
                src = tar.extractfile(member)
                assert src is not None
                with open(out / name, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise BundleError(
                    f"{bundle.name} is truncated or corrupt at {name}: {exc}"
                ) from exc
            if digest.hexdigest() != entry.sha256:
                raise BundleError(f"{name}: sha256 mismatch, the file was altered")
        (out / MANIFEST_NAME).write_bytes(manifest_bytes)
        if sig_bytes is not None:
            (out / SIGNATURE_NAME).write_bytes(sig_bytes)
    return BundleContents(manifest, out, signed_by)


def peek_manifest(bundle: Path) -> bytes:
    """The bundle's manifest bytes, UNVERIFIED: only to recognise a version already
    installed (whose verified manifest must then be byte-identical)."""
    try:
        with tarfile.open(bundle, "r:*") as tar:
            for member in tar:
                if member.name == MANIFEST_NAME:
                    _check_member(member, MAX_MANIFEST_BYTES)
                    return _read_small(tar, member, MAX_MANIFEST_BYTES)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{bundle.name} is not a readable bundle: {exc}") from exc
    raise BundleError("bundle has no manifest.json")


def parse_manifest(data: bytes) -> Manifest:
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise BundleError(f"manifest.json invalid at {loc}: {first['msg']}") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def canonical_manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"


def write_bundle(
    out: Path,
    manifest: Mapping[str, Any],
    files: Mapping[str, Path],
    private_key: Ed25519PrivateKey | None,
) -> Manifest:
    """Write a bundle: ``manifest`` without ``files`` (filled in here), member files, signature.

    The result is validated with the same parser the agent uses, so a converter can
    never write a bundle the agent would refuse for its form.
    """
    doc = dict(manifest)
    doc["files"] = {
        name: {"sha256": sha256_file(path), "size": path.stat().st_size}
        for name, path in sorted(files.items())
    }
    doc.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
    manifest_bytes = canonical_manifest_bytes(doc)
    parsed = parse_manifest(manifest_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, MANIFEST_NAME, manifest_bytes)
        if private_key is not None:
            _add_bytes(tar, SIGNATURE_NAME, sign_manifest(manifest_bytes, private_key))
        for name, path in sorted(files.items()):
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, out)
    return parsed


def resign_bundle(bundle: Path, private_key: Ed25519PrivateKey | None, out: Path) -> None:
    """Copy ``bundle`` to ``out`` with a new signature (or none), members unchanged."""
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(bundle, "r:*") as src, tarfile.open(tmp, "w:gz") as dst:
        manifest_bytes = b""
        for m in src.getmembers():
            _check_member(m, DEFAULT_MAX_MEMBER_BYTES)
            if m.name == SIGNATURE_NAME:
                continue
            f = src.extractfile(m)
            assert f is not None
            data = f.read()
            if m.name == MANIFEST_NAME:
                manifest_bytes = data
            _add_bytes(dst, m.name, data)
        if not manifest_bytes:
            raise BundleError("bundle has no manifest.json")
        if private_key is not None:
            _add_bytes(dst, SIGNATURE_NAME, sign_manifest(manifest_bytes, private_key))
    os.replace(tmp, out)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _fsync_dir_tree(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(path)

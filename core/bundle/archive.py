"""Reading and writing bundle files (tar, optionally gzip-compressed).

Reading never trusts the archive: every header is bounded before Python's tarfile
acts on it (``BoundedTarInfo``), members are counted and checked before anything is
written, only files the signed manifest lists are extracted, each streamed through
sha256. Writing uses plain ustar headers only (see docs/bundle-format.md).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from edgefleet.core.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from edgefleet.core.bundle.signing import TrustStore, sign_manifest
from edgefleet.core.durable import fsync_dir
from edgefleet.core.errors import BundleError

DEFAULT_MAX_MEMBER_BYTES = 512 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 64 * 1024
# A real bundle has a handful of members; this bounds the work (and the TarInfo list)
# a bad one causes. The agent and the fleet share it.
MAX_MEMBERS = 1000
# The largest pax extended header read. Bundles written before the writer moved to
# ustar carry one per file holding a float mtime (about 30 bytes).
MAX_PAX_HEADER_BYTES = 8 * 1024
# pax records a bundle may carry: times and ownership (ignored when extracting) and the
# member's path (then checked like any name). Anything else, GNU.sparse.* above all
# (which makes tarfile read an unbounded sparse map), is refused.
PAX_KEYWORDS = frozenset({"path", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname"})
_CHUNK = 1 << 20
_PAX_RECORD = re.compile(rb"(\d{1,5}) ")

# Header types that make tarfile read more than the 512-byte header itself, each with
# the reason a bundle never needs it.
_REFUSED_HEADERS = {
    tarfile.GNUTYPE_LONGNAME: "GNU long-name header",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link header",
    tarfile.GNUTYPE_SPARSE: "GNU sparse member",
    tarfile.XGLTYPE: "pax global header",
}
_PAX_HEADERS = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)


class BoundedTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` that refuses what would make tarfile allocate on a header's word.

    Unguarded, tarfile reads a GNU long-name/long-link entry or a pax header whole
    into memory before returning the member (a 1 MiB gzip bundle declaring a 1 GiB
    long name costs 1 GiB), follows sparse maps of any length, and recurses once per
    chained pax header. Here GNU long-name/long-link, sparse and pax global headers
    are refused outright (``write_bundle`` writes none), a pax extended header is read
    only up to ``MAX_PAX_HEADER_BYTES``, must hold well-formed records with
    ``PAX_KEYWORDS`` only, and must be followed by a member, not another header.

    Pass it as ``tarinfo=BoundedTarInfo`` to every ``tarfile.open`` that reads a
    bundle (``open_bundle_tar`` does). Raises ``BundleError``, on purpose not a
    ``tarfile.HeaderError``: tarfile turns those into "end of archive" after the
    first member, or tries the next compression method and loses the reason.
    """

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile's documented extension point (see its "_proc_*() methods" comment).
        refused = _REFUSED_HEADERS.get(self.type)
        if refused is not None:
            raise BundleError(
                f"bundle has a {refused} (declaring {self.size} bytes);"
                " bundles use plain ustar headers"
            )
        if self.type in _PAX_HEADERS:
            return self._proc_bounded_pax(tarfile_)
        if self.size < 0:
            raise BundleError(f"bundle member {self.name!r} has a negative size")
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return member

    def _proc_bounded_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size > MAX_PAX_HEADER_BYTES:
            raise BundleError(
                f"bundle has a pax extended header of {self.size} bytes,"
                f" over the {MAX_PAX_HEADER_BYTES} byte limit"
            )
        fileobj = tarfile_.fileobj
        blocks = -(-self.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        data = fileobj.read(blocks)
        if len(data) != blocks:
            raise BundleError("bundle is truncated in a pax extended header")
        records = _parse_pax(data[: self.size])
        header = fileobj.read(tarfile.BLOCKSIZE)
        try:
            member = type(self).frombuf(header, tarfile_.encoding, tarfile_.errors)
        except tarfile.HeaderError as exc:
            raise BundleError(f"bundle has no valid member after a pax header: {exc}") from exc
        if member.type in _PAX_HEADERS:
            raise BundleError("bundle has a pax extended header followed by another")
        member.offset = fileobj.tell() - tarfile.BLOCKSIZE
        processed = member._proc_member(tarfile_)  # refuses L/K/S/g headers here too
        _apply_pax(processed, records)
        processed.offset = self.offset  # tarfile's way: the member starts at its pax header
        return processed


def _parse_pax(data: bytes) -> dict[str, str]:
    """pax records (``LENGTH KEYWORD=VALUE`` and a newline each), strictly: every byte
    of the header's data belongs to a record, and only ``PAX_KEYWORDS`` are allowed."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        m = _PAX_RECORD.match(data, pos)
        length = int(m.group(1)) if m else 0
        record = data[pos : pos + length]
        if m is None or length <= len(m.group(0)) or len(record) != length or record[-1:] != b"\n":
            raise BundleError(f"bundle has a malformed pax record at byte {pos} of its header")
        key, sep, value = record[len(m.group(0)) : -1].partition(b"=")
        try:
            keyword, text = key.decode("utf-8"), value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BundleError("bundle has a malformed pax record: not UTF-8") from exc
        if not sep:
            raise BundleError(f"bundle has a malformed pax record at byte {pos} of its header")
        if keyword not in PAX_KEYWORDS:
            raise BundleError(
                f"bundle has pax keyword {keyword[:40]!r}; bundles may carry only"
                f" {sorted(PAX_KEYWORDS)}"
            )
        records[keyword] = text
        pos += length
    return records


def _apply_pax(member: tarfile.TarInfo, records: dict[str, str]) -> None:
    for keyword, value in records.items():
        if keyword == "path":
            member.name = value.rstrip("/")
        elif keyword in ("uname", "gname"):
            setattr(member, keyword, value)
        else:
            try:
                number = float(value) if keyword.endswith("time") else int(value)
            except ValueError as exc:
                raise BundleError(f"bundle has a malformed pax {keyword} record") from exc
            setattr(member, keyword, number)
    member.pax_headers = dict(records)


def open_bundle_tar(path: Path) -> tarfile.TarFile:
    """``tarfile.open`` of a bundle file (any compression), every header bounded.

    Raises ``BundleError`` for a refused header (possibly the first, read here) and
    tarfile's own errors for an unreadable archive; the caller words those.
    """
    return tarfile.open(path, "r:*", tarinfo=BoundedTarInfo)


def open_bundle_stream(fileobj: IO[bytes] | gzip.GzipFile) -> tarfile.TarFile:
    """``tarfile.open`` of an uncompressed tar stream read once, front to back (the
    fleet's upload check decompresses with gzip itself), every header bounded."""
    return tarfile.open(fileobj=fileobj, mode="r|", tarinfo=BoundedTarInfo)


def iter_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members, at most ``MAX_MEMBERS`` of them (``BundleError`` past it).

    The count is checked as headers are read, so a flood of tiny members costs
    ``MAX_MEMBERS`` headers, not a list of all of them.
    """
    for count, member in enumerate(tar, start=1):
        if count > MAX_MEMBERS:
            raise BundleError(f"bundle has more than {MAX_MEMBERS} members")
        yield member


@dataclass(frozen=True)
class BundleContents:
    manifest: Manifest
    directory: Path
    signed_by: str | None


def check_member(member: tarfile.TarInfo, max_member_bytes: int) -> None:
    """A member may be only a flat regular file of at most ``max_member_bytes``."""
    name = member.name
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute() or "\\" in name or ":" in name:
        raise BundleError(f"bundle member {name!r} has an absolute path")
    if any(part == ".." for part in path.parts):
        raise BundleError(f"bundle member {name!r} escapes the bundle (..)")
    if member.issym() or member.islnk():
        raise BundleError(f"bundle member {name!r} is a link")
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise BundleError(f"bundle member {name!r} is not a regular file")
    if len(path.parts) != 1:
        raise BundleError(f"bundle member {name!r} is in a sub-directory; bundles are flat")
    if member.size > max_member_bytes:
        raise BundleError(
            f"bundle member {name!r} is {member.size} bytes, over the {max_member_bytes} limit"
        )


def read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    """A member checked by ``check_member``, read whole (manifest, signature)."""
    if member.size > limit:
        raise BundleError(f"{member.name} is {member.size} bytes, over the {limit} limit")
    f = tar.extractfile(member)
    assert f is not None  # check_member admitted only regular files
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
        tar = open_bundle_tar(bundle)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{bundle.name} is not a readable bundle: {exc}") from exc
    with tar:
        # Member by member, each checked (and counted) as its header is read: a bad
        # member stops the reading there, before tarfile seeks past its data.
        by_name: dict[str, tarfile.TarInfo] = {}
        try:
            for m in iter_members(tar):
                check_member(m, max_member_bytes)
                if m.name in by_name:
                    raise BundleError(f"bundle member {m.name!r} appears twice")
                by_name[m.name] = m
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BundleError(f"{bundle.name} is truncated or corrupt: {exc}") from exc
        if MANIFEST_NAME not in by_name:
            raise BundleError("bundle has no manifest.json")
        try:
            manifest_bytes = read_small(tar, by_name[MANIFEST_NAME], MAX_MANIFEST_BYTES)
            sig = by_name.get(SIGNATURE_NAME)
            sig_bytes = read_small(tar, sig, MAX_SIGNATURE_BYTES) if sig is not None else None
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
        with open_bundle_tar(bundle) as tar:
            for member in iter_members(tar):
                if member.name == MANIFEST_NAME:
                    check_member(member, MAX_MANIFEST_BYTES)
                    return read_small(tar, member, MAX_MANIFEST_BYTES)
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
    # Plain ustar: no pax, GNU long-name or sparse header, which readers refuse or
    # bound (BoundedTarInfo). Flat names of at most 64 characters and members under
    # 8 GiB always fit; tarfile raises ValueError for anything that would not.
    with tarfile.open(tmp, "w:gz", format=tarfile.USTAR_FORMAT) as tar:
        _add_bytes(tar, MANIFEST_NAME, manifest_bytes)
        if private_key is not None:
            _add_bytes(tar, SIGNATURE_NAME, sign_manifest(manifest_bytes, private_key))
        for name, path in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = path.stat().st_size
            info.mode = 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, out)
    return parsed


def resign_bundle(bundle: Path, private_key: Ed25519PrivateKey | None, out: Path) -> None:
    """Copy ``bundle`` to ``out`` with a new signature (or none), members unchanged."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        with (
            open_bundle_tar(bundle) as src,
            tarfile.open(tmp, "w:gz", format=tarfile.USTAR_FORMAT) as dst,
        ):
            manifest_bytes = b""
            for m in iter_members(src):
                check_member(m, DEFAULT_MAX_MEMBER_BYTES)
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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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

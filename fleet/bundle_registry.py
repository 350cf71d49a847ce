"""The fleet's model registry: verified bundle uploads, versions, labels, bundle files.

An upload is checked exactly as strictly as an agent checks a bundle at install
(core/bundle/archive.py): bounded headers, member count, names and types, the
manifest's Ed25519 signature against the fleet's trusted keys, the manifest's form,
and the size and sha256 of every listed file. It never extracts anything: each
member is streamed through sha256 in one pass over the archive. A bundle the fleet
accepted is therefore one every agent trusting the same keys will accept too, and a
tampered or unsigned one is refused at the door with the reason, not later on two
thousand store PCs.

Files live at ``<data_dir>/bundles/<name>/<version>.bundle`` (names and versions are
restricted by the manifest to ``[A-Za-z0-9._-]``, so they are safe path parts). A
version is immutable: the same name and version with other bytes is a 409.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os
import sqlite3
import tarfile
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edgefleet.core.bundle.archive import (
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    check_member,
    iter_members,
    open_bundle_stream,
    parse_manifest,
    read_small,
)
from edgefleet.core.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from edgefleet.core.bundle.signing import TrustStore
from edgefleet.core.durable import fsync_dir
from edgefleet.core.errors import BadRequest, BundleError, EdgeError, NotFound, PayloadTooLarge
from edgefleet.core.names import check_registry_label, check_version
from edgefleet.fleet.db import FleetDB, dumps, loads, now

log = logging.getLogger(__name__)

MAX_TAIL_BYTES = 1024 * 1024  # padding after the end marker (tar writes records of 10 KiB)
_CHUNK = 1 << 20


class Conflict(EdgeError):
    """The request clashes with what exists (a version re-uploaded with other bytes)."""

    status = 409


@dataclass(frozen=True)
class VerifiedBundle:
    manifest: Manifest
    manifest_bytes: bytes
    key_id: str | None  # None: unsigned, accepted only with trust.allow_unsigned
    sha256: str  # of the bundle file
    size: int


@dataclass(frozen=True)
class BundleFile:
    path: Path
    sha256: str
    size: int


def verify_bundle_file(
    path: Path, trust: TrustStore, max_member_bytes: int, *, sha256: str, size: int
) -> VerifiedBundle:
    """Check ``path`` like an agent's install would, without extracting it.

    Blocking (reads and hashes the whole archive): run it in a thread. Raises
    ``BundleError`` (400) naming the first problem, in the agent's order: archive and
    member form, then the signature, then the manifest, then each file.
    """
    digests: dict[str, tuple[int, str]] = {}
    manifest_bytes: bytes | None = None
    sig_bytes: bytes | None = None
    seen: set[str] = set()
    try:
        with open(path, "rb") as raw:
            # Stream mode ("r|"): one sequential pass, so a gzip bundle is decompressed
            # once (random access re-inflates from the start for every member). gzip's
            # own reader, not tarfile's, because it checks the CRC and length trailer.
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream: IO[bytes] | gzip.GzipFile = gzip.GzipFile(fileobj=raw) if gz else raw
            # Every header bounded before tarfile acts on it, members counted as read.
            with open_bundle_stream(stream) as tar:
                for member in iter_members(tar):
                    check_member(member, max_member_bytes)
                    if member.name in seen:
                        raise BundleError(f"bundle member {member.name!r} appears twice")
                    seen.add(member.name)
                    if member.name == MANIFEST_NAME:
                        manifest_bytes = read_small(tar, member, MAX_MANIFEST_BYTES)
                    elif member.name == SIGNATURE_NAME:
                        sig_bytes = read_small(tar, member, MAX_SIGNATURE_BYTES)
                    else:
                        digests[member.name] = _hash_member(tar, member)
                _check_end(tar)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        # EOFError/BadGzipFile (an OSError): a cut or corrupt gzip stream; ValueError:
        # tarfile on some malformed headers.
        raise BundleError(f"bundle is not a readable archive, or truncated: {exc}") from exc
    if manifest_bytes is None:
        raise BundleError("bundle has no manifest.json")
    # Signature first, as the agent does: nothing from an unverified manifest counts.
    key_id = trust.verify(manifest_bytes, sig_bytes)
    manifest = parse_manifest(manifest_bytes)
    listed = set(manifest.files)
    extra = set(digests) - listed
    if extra:
        raise BundleError(f"bundle holds files the manifest does not list: {sorted(extra)}")
    missing = listed - set(digests)
    if missing:
        raise BundleError(f"bundle lacks files the manifest lists: {sorted(missing)}")
    for name, entry in sorted(manifest.files.items()):
        got_size, got_sha = digests[name]
        if got_size != entry.size:
            raise BundleError(f"{name}: size {got_size} differs from the manifest's {entry.size}")
        if got_sha != entry.sha256:
            raise BundleError(
                f"{name}: sha256 mismatch (manifest {entry.sha256[:12]}…, file {got_sha[:12]}…),"
                " the file was altered"
            )
    return VerifiedBundle(manifest, manifest_bytes, key_id, sha256, size)


def _hash_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[int, str]:
    src = tar.extractfile(member)
    assert src is not None  # check_member admitted only regular files
    digest, got = hashlib.sha256(), 0
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        got += len(chunk)
    if got != member.size:
        raise BundleError(f"bundle is truncated at {member.name}")
    return got, digest.hexdigest()


def _check_end(tar: tarfile.TarFile) -> None:
    """The archive must end with its end-of-archive blocks.

    tarfile stops quietly when the file ends exactly between two members, so a bundle
    cut there would otherwise pass as a smaller one (and then fail as "lacks files",
    a misleading reason). Stream-mode iteration stops after reading the first zero
    block; the second must follow. Reading the rest also makes gzip check its trailer.
    """
    stream = tar.fileobj
    assert stream is not None
    tail = stream.read(MAX_TAIL_BYTES)
    if len(tail) < tarfile.BLOCKSIZE or any(tail[: tarfile.BLOCKSIZE]):
        raise BundleError("bundle is truncated: the archive's end marker is missing")
    if stream.read(1):
        raise BundleError(f"bundle has over {MAX_TAIL_BYTES} bytes after the archive's end")


def _version_record(row: sqlite3.Row | dict[str, Any], labels: list[str]) -> dict[str, Any]:
    manifest = loads(row["manifest"], {})
    return {
        "name": row["name"],
        "version": row["version"],
        "sha256": row["sha256"],
        "size": row["size"],
        "runtime": row["runtime"],
        "key_id": row["key_id"],
        "uploaded_at": row["uploaded_at"],
        "description": manifest.get("description", ""),
        "created_at": manifest.get("created_at", ""),
        "metrics": manifest.get("metrics", {}),
        "labels": labels,
        "url": f"/v1/bundles/{row['name']}/{row['version']}",
    }


class Registry:
    """Bundles on disk and their rows in ``model_versions`` / ``model_labels``."""

    def __init__(
        self,
        db: FleetDB,
        bundle_dir: Path,
        trust: TrustStore,
        *,
        max_upload_bytes: int = 1024 * 1024 * 1024,
        max_member_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        self.db = db
        self.bundle_dir = bundle_dir
        self.trust = trust
        self.max_upload_bytes = max_upload_bytes
        self.max_member_bytes = max_member_bytes
        self._incoming = bundle_dir / ".incoming"

    def prepare(self) -> None:
        """Create the directories and drop uploads a crash left half-written."""
        self._incoming.mkdir(parents=True, exist_ok=True)
        for stale in self._incoming.iterdir():
            stale.unlink(missing_ok=True)

    # ----------------------------------------------------------------- upload

    async def upload(
        self, chunks: AsyncIterator[bytes], content_length: int | None
    ) -> tuple[dict[str, Any], bool]:
        """Store a bundle from ``chunks``; return (its version record, created?).

        Created is False for a re-upload of the very same bytes (idempotent).
        """
        if content_length is not None and content_length > self.max_upload_bytes:
            raise PayloadTooLarge(
                f"bundle of {content_length} bytes is over the {self.max_upload_bytes} byte limit"
            )
        tmp = await asyncio.to_thread(self._new_temp)
        try:
            sha256, size = await self._receive(chunks, tmp)
            if size == 0:
                raise BadRequest("empty body: send the bundle file as the request body")
            verified = await asyncio.to_thread(
                verify_bundle_file,
                tmp,
                self.trust,
                self.max_member_bytes,
                sha256=sha256,
                size=size,
            )
            return await self._commit(tmp, verified)
        finally:
            # After a commit the temp file was renamed away: nothing to remove.
            await asyncio.to_thread(tmp.unlink, missing_ok=True)

    def _new_temp(self) -> Path:
        # In the bundle directory, so the final rename stays on one filesystem (atomic).
        self._incoming.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self._incoming)
        os.close(fd)
        return Path(name)

    async def _receive(self, chunks: AsyncIterator[bytes], tmp: Path) -> tuple[str, int]:
        """Write ``chunks`` to ``tmp`` under the size cap; return (sha256, size).

        Writes and hashing happen in a thread, a megabyte at a time, so a large upload
        never stalls the event loop (and the other devices' downloads on it).
        """
        digest = hashlib.sha256()
        size = 0
        pending: list[bytes] = []
        pending_bytes = 0
        f = await asyncio.to_thread(open, tmp, "wb")

        def flush(parts: list[bytes]) -> None:
            for part in parts:
                digest.update(part)
                f.write(part)

        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_upload_bytes:
                    raise PayloadTooLarge(
                        f"bundle is over the {self.max_upload_bytes} byte upload limit"
                    )
                pending.append(chunk)
                pending_bytes += len(chunk)
                if pending_bytes >= _CHUNK:
                    parts, pending, pending_bytes = pending, [], 0
                    await asyncio.to_thread(flush, parts)
            await asyncio.to_thread(flush, pending)

            # Durable before it is renamed into place and recorded in the database.
            def sync() -> None:
                f.flush()
                os.fsync(f.fileno())

            await asyncio.to_thread(sync)
        finally:
            await asyncio.to_thread(f.close)
        return digest.hexdigest(), size

    async def _commit(self, tmp: Path, v: VerifiedBundle) -> tuple[dict[str, Any], bool]:
        name, version = v.manifest.name, v.manifest.version
        rel = f"{name}/{version}.bundle"
        final = self.bundle_dir / rel
        await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)

        def job(conn: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
            # On the writer thread, inside its transaction: the check, the rename and
            # the insert cannot interleave with another upload of the same version (or,
            # through BEGIN IMMEDIATE, with another fleet worker's). A rename whose
            # commit then fails leaves a file no row points at; the next upload of
            # that version simply replaces it.
            conn.row_factory = sqlite3.Row
            try:
                row = conn.execute(
                    "SELECT * FROM model_versions WHERE name = ? AND version = ?",
                    (name, version),
                ).fetchone()
                if row is not None:
                    if row["sha256"] != v.sha256:
                        raise Conflict(
                            f"{name} version {version} already exists with other bytes"
                            f" (sha256 {row['sha256'][:12]}…, this upload {v.sha256[:12]}…);"
                            " versions are immutable: give the new one another version"
                        )
                    return _version_record(row, _labels_of(conn, name, version)), False
                os.replace(tmp, final)
                fsync_dir(final.parent)
                record = {
                    "name": name,
                    "version": version,
                    "sha256": v.sha256,
                    "size": v.size,
                    "path": rel,
                    "runtime": v.manifest.runtime,
                    "manifest": v.manifest_bytes.decode("utf-8"),
                    "key_id": v.key_id,
                    "uploaded_at": now(),
                }
                conn.execute(
                    "INSERT INTO model_versions (name, version, sha256, size, path, runtime,"
                    " manifest, key_id, uploaded_at) VALUES (:name, :version, :sha256, :size,"
                    " :path, :runtime, :manifest, :key_id, :uploaded_at)",
                    record,
                )
                return _version_record(record, []), True
            finally:
                conn.row_factory = None

        record, created = await self.db.write(job)
        if created:
            log.info(
                "bundle %s:%s stored (%d bytes, sha256 %s, signed by %s)",
                name,
                version,
                v.size,
                v.sha256[:12],
                v.key_id or "nobody (unsigned)",
            )
        return record, created

    # ------------------------------------------------------------------ reads

    async def list_models(self) -> list[dict[str, Any]]:
        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            versions = conn.execute(
                "SELECT * FROM model_versions ORDER BY name, uploaded_at"
            ).fetchall()
            labels = conn.execute("SELECT name, label, version FROM model_labels").fetchall()
            return _assemble(versions, labels)

        return await self.db.read(q)

    async def get_model(self, name: str) -> dict[str, Any]:
        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            versions = conn.execute(
                "SELECT * FROM model_versions WHERE name = ? ORDER BY uploaded_at", (name,)
            ).fetchall()
            labels = conn.execute(
                "SELECT name, label, version FROM model_labels WHERE name = ?", (name,)
            ).fetchall()
            return _assemble(versions, labels)

        models = await self.db.read(q)
        if not models:
            raise NotFound(f"unknown model {name!r}")
        return models[0]

    async def get_version(self, name: str, version: str) -> dict[str, Any]:
        def q(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                "SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version)
            ).fetchone()
            return None if row is None else _version_record(row, _labels_of(conn, name, version))

        record = await self.db.read(q)
        if record is None:
            raise NotFound(f"unknown model version {name}:{version}")
        return record

    async def bundle_file(self, name: str, version: str) -> BundleFile:
        def q(conn: sqlite3.Connection) -> tuple[str, str, int] | None:
            row = conn.execute(
                "SELECT path, sha256, size FROM model_versions WHERE name = ? AND version = ?",
                (name, version),
            ).fetchone()
            return None if row is None else (row[0], row[1], row[2])

        found = await self.db.read(q)
        if found is None:
            raise NotFound(f"unknown model version {name}:{version}")
        rel, sha256, size = found
        return BundleFile(self.bundle_dir / rel, sha256, size)

    # ----------------------------------------------------------------- labels

    async def set_label(self, name: str, label: str, version: str) -> dict[str, Any]:
        check_registry_label(label)  # InvalidName: a 400
        check_version(version)

        def job(conn: sqlite3.Connection) -> dict[str, Any]:
            exists = conn.execute(
                "SELECT 1 FROM model_versions WHERE name = ? AND version = ?", (name, version)
            ).fetchone()
            if exists is None:
                raise NotFound(f"unknown model version {name}:{version}: upload it first")
            at = now()
            conn.execute(
                "INSERT INTO model_labels (name, label, version, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (name, label)"
                " DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
                (name, label, version, at),
            )
            return {"name": name, "label": label, "version": version, "updated_at": at}

        return await self.db.write(job)

    async def delete_label(self, name: str, label: str) -> dict[str, Any]:
        """Remove a fleet label (``NotFound``, 404, when the model has no such label).
        The caller refreshes the desired documents (they carry the labels)."""
        check_registry_label(label)  # InvalidName: a 400

        def job(conn: sqlite3.Connection) -> dict[str, Any]:
            row = conn.execute(
                "DELETE FROM model_labels WHERE name = ? AND label = ? RETURNING version",
                (name, label),
            ).fetchone()
            if row is None:
                raise NotFound(f"model {name!r} has no label {label!r}")
            return {"name": name, "label": label, "version": row[0], "deleted": True}

        return await self.db.write(job)

    # ----------------------------------------------------------------- delete

    async def delete_version(self, name: str, version: str) -> dict[str, Any]:
        """Remove one version: its row and its bundle file.

        Refused with ``InUse`` (409, naming each reason) while anything still needs it:
        a device (not revoked) reports it active, desired, as shadow or split
        candidate; a device's current desired document names it; an assignment that
        can still decide something points at it (see ``_blockers_in``); a rollout of
        it is running, paused or stopped; a label points at it. ``NotFound`` (404) for
        an unknown version. Assignments that can never apply again (superseded by a
        newer plain one on the same target, or of a rolled-back rollout) are removed
        with it; rollout rows, telemetry and events stay (history).
        """
        check_version(version)
        return await self._delete(name, [version], whole_model=False)

    async def delete_model(self, name: str) -> dict[str, Any]:
        """Remove every version of a model, its labels and its bundle directory.

        The same rule as ``delete_version`` for every version, except that the model's
        own labels are removed with it rather than refusing (they could point nowhere
        else). ``NotFound`` (404) for an unknown model.
        """
        return await self._delete(name, None, whole_model=True)

    async def _delete(
        self, name: str, versions: list[str] | None, *, whole_model: bool
    ) -> dict[str, Any]:
        trash = self._incoming  # .incoming is emptied at every start (prepare)
        moved: list[tuple[Path, Path]] = []

        def job(conn: sqlite3.Connection) -> dict[str, Any]:
            # Writer thread, one transaction: the checks and the deletion cannot
            # interleave with an assignment or rollout naming the version, which check
            # model_versions in their own write jobs.
            if versions is None:
                rows = conn.execute(
                    "SELECT version, path FROM model_versions WHERE name = ? ORDER BY uploaded_at",
                    (name,),
                ).fetchall()
                if not rows:
                    raise NotFound(f"unknown model {name!r}")
            else:
                rows = conn.execute(
                    "SELECT version, path FROM model_versions WHERE name = ?"
                    " AND version IN (SELECT value FROM json_each(?))",
                    (name, dumps(versions)),
                ).fetchall()
                if len(rows) != len(versions):
                    raise NotFound(f"unknown model version {name}:{versions[0]}")
            gone = [str(r[0]) for r in rows]
            reasons = _blockers_in(conn, name, gone, labels=not whole_model)
            if reasons:
                what = f"model {name}" if whole_model else f"{name}:{gone[0]}"
                raise InUse(f"cannot delete {what}: " + "; ".join(reasons))
            dead = conn.execute(
                "DELETE FROM assignments WHERE model = ?"
                " AND version IN (SELECT value FROM json_each(?)) RETURNING id",
                (name, dumps(gone)),
            ).fetchall()
            labels_removed = [
                str(r[0])
                for r in conn.execute(
                    "DELETE FROM model_labels WHERE name = ?"
                    " AND version IN (SELECT value FROM json_each(?)) RETURNING label",
                    (name, dumps(gone)),
                )
            ]
            conn.execute(
                "DELETE FROM model_versions WHERE name = ?"
                " AND version IN (SELECT value FROM json_each(?))",
                (name, dumps(gone)),
            )
            # Last, so a failure above leaves the files alone: each file leaves its
            # place by a rename into the trash (atomic, same filesystem); the caller
            # puts them back if the commit fails, or unlinks them once it succeeded.
            missing: list[str] = []
            for version, rel in rows:
                src = self.bundle_dir / rel
                dst = trash / f"deleted-{name}-{version}-{os.urandom(6).hex()}.bundle"
                try:
                    os.replace(src, dst)
                except FileNotFoundError:
                    missing.append(str(version))
                    continue
                moved.append((src, dst))
            doc: dict[str, Any] = {
                "name": name,
                "versions_removed": gone,
                "labels_removed": sorted(labels_removed),
                "assignments_removed": len(dead),
                "files_missing": missing,  # versions whose file was already gone
            }
            if versions is not None:
                doc["version"] = gone[0]
            return doc

        await asyncio.to_thread(trash.mkdir, parents=True, exist_ok=True)
        try:
            doc = await self.db.write(job)
        except BaseException:
            # Rolled back (a refusal leaves ``moved`` empty): the files go back.
            for src, dst in moved:
                await asyncio.to_thread(os.replace, dst, src)
            raise
        for _, dst in moved:
            await asyncio.to_thread(dst.unlink, True)
        if whole_model:
            await asyncio.to_thread(_remove_empty_dir, self.bundle_dir / name)
        log.info("deleted %s %s (%d file(s))", name, ", ".join(doc["versions_removed"]), len(moved))
        return doc


class InUse(Conflict):
    """A version (or model) still in use cannot be deleted (HTTP 409, naming the users)."""


_IN = "IN (SELECT value FROM json_each(?))"  # ? = a JSON list
MAX_NAMED = 20  # devices named in a refusal; the rest are counted


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_NAMED])
    return shown if len(items) <= MAX_NAMED else f"{shown} and {len(items) - MAX_NAMED} more"


def _blockers_in(
    conn: sqlite3.Connection, name: str, versions: list[str], *, labels: bool
) -> list[str]:
    """Why these versions of ``name`` cannot be deleted (any thread), one phrase per
    kind of use; empty when nothing uses them.

    An assignment blocks while it can still decide something: not superseded by a
    newer plain assignment of the model to the same target (``desired._prune``), and
    not of a rolled-back rollout. Revoked devices do not count: they can no longer
    download anything.
    """
    from edgefleet.fleet.desired import ROLLOUT_LIVE, Snapshot

    vs = dumps(versions)
    path = '$.models."' + name + '"'  # model names are [A-Za-z0-9._-] (core/names.py)
    out: list[str] = []
    running = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT d.id FROM devices d JOIN device_models dm ON dm.device_id = d.id"
            " WHERE d.revoked_at IS NULL AND dm.model = ?"
            " AND (dm.active IN (SELECT value FROM json_each(?))"
            " OR dm.desired IN (SELECT value FROM json_each(?)))"
            " UNION SELECT d.id FROM devices d WHERE d.revoked_at IS NULL"
            f" AND (json_extract(d.reported, ? || '.shadow.version') {_IN}"
            f" OR json_extract(d.reported, ? || '.split.version') {_IN})"
            " ORDER BY 1",
            (name, vs, vs, path, vs, path, vs),
        )
    ]
    if running:
        out.append(f"run or reported by device(s) {_names(running)}")
    named = [
        r[0]
        for r in conn.execute(
            "SELECT id FROM devices WHERE revoked_at IS NULL AND desired IS NOT NULL"
            f" AND (json_extract(desired, ? || '.version') {_IN}"
            f" OR json_extract(desired, ? || '.shadow.version') {_IN})"
            " ORDER BY id",
            (path, vs, path, vs),
        )
    ]
    if named:
        out.append(f"in the desired state of device(s) {_names(named)}")
    live = ",".join("?" * len(ROLLOUT_LIVE))
    rollouts = [
        f"{r[0]} ({r[1]}:{r[2]}, {r[3]})"
        for r in conn.execute(
            "SELECT id, model, version, state FROM rollouts WHERE model = ?"
            f" AND version IN (SELECT value FROM json_each(?)) AND state IN ({live})"
            " ORDER BY created_at",
            (name, vs, *ROLLOUT_LIVE),
        )
    ]
    if rollouts:
        out.append(f"rollout {_names(rollouts)}")
    model = Snapshot.load(conn).models.get(name)
    if model is not None:
        found = [
            a
            for a in [
                *(a for v in model.device.values() for a in v),
                *(a for v in model.group.values() for a in v),
                *model.all,
            ]
            if a.version in versions
            and a.rollout_state != "rolled_back"
            and (a.rollout_id is None or a.rollout_state is not None)
        ]
        if found:
            found.sort(key=lambda a: a.id)
            out.append(
                "assigned to "
                + _names(
                    [
                        ("all devices" if a.kind == "all" else f"{a.kind} {a.target}")
                        + f" (assignment {a.id}, {name}:{a.version}"
                        + (f", rollout {a.rollout_id})" if a.rollout_id else ")")
                        for a in found
                    ]
                )
                + ": unassign first"
            )
    if labels:
        named_by = [
            f"{r[0]} -> {r[1]}"
            for r in conn.execute(
                "SELECT label, version FROM model_labels WHERE name = ?"
                " AND version IN (SELECT value FROM json_each(?)) ORDER BY label",
                (name, vs),
            )
        ]
        if named_by:
            out.append(f"label(s) {_names(named_by)}: move them to another version first")
    return out


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (a file no row names) or already gone: left as it is


def _labels_of(conn: sqlite3.Connection, name: str, version: str) -> list[str]:
    rows = conn.execute(
        "SELECT label FROM model_labels WHERE name = ? AND version = ? ORDER BY label",
        (name, version),
    ).fetchall()
    return [r[0] for r in rows]


def _assemble(versions: list[sqlite3.Row], labels: list[sqlite3.Row]) -> list[dict[str, Any]]:
    by_model: dict[str, dict[str, str]] = {}
    for row in labels:
        by_model.setdefault(row["name"], {})[row["label"]] = row["version"]
    models: dict[str, dict[str, Any]] = {}
    for row in versions:
        name = row["name"]
        model_labels = by_model.get(name, {})
        entry = models.setdefault(name, {"name": name, "versions": [], "labels": model_labels})
        on_this = sorted(lb for lb, v in model_labels.items() if v == row["version"])
        entry["versions"].append(_version_record(row, on_this))
    for entry in models.values():
        entry["latest"] = entry["versions"][-1]["version"] if entry["versions"] else None
    return list(models.values())

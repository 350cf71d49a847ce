"""Hard examples uploaded by devices, and the labelling queue (issue 11, part 6;
docs/fleet.md, "Hard examples").

A device sends each kept case as ``PUT /v1/hard-examples/<sha256>`` with its HTTP Basic
credentials (agent/cloud/hard_example_upload.py); the body is
``core.hard_example_wire``'s upload container and its sha256 is the id. Here:

- **Checks before anything is stored**: the body's size (413 past
  ``hard_examples.max_example_bytes``), its sha256 against the id (400), the container
  and every part (400 with the reason), the header's ``device_id`` against the caller
  (403). Nothing half-stored: the file is written (atomically) before the row, and
  removed again if the row is refused.
- **Dedup**: an id the fleet has answers 200 ``{"stored": false, "already": true}``
  without writing anything (the device then deletes its copy); a new one 201.
- **Storage budget**: the bytes of all stored examples stay under
  ``hard_examples.max_bytes``; an upload that would pass it is refused with 507 and
  the reason (the device keeps it and tries later).
- **Files**: ``<data_dir>/hard-examples/<id[:2]>/<id>.efh``, the body as received;
  the row (``hard_examples`` table, fleet/db.py) holds what the queue filters and
  shows, and the label.
- **The queue**: list and filter (model, version, reason, device, labelled, id
  prefix), one example with both answers, its image, its tensors as ``.npz``
  (``input.<name>``, ``edge.<name>``, ``cloud.<name>``), and the label (one of the
  model version's labels, set by an operator).

Threads: file reads and writes in worker threads (``asyncio.to_thread``), SQLite on the
fleet database's writer and readers; the coroutines run on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.core.durable import atomic_write
from edgefleet.core.errors import BadRequest, EdgeError, NotFound
from edgefleet.core.hard_example_wire import decode_upload, unpack
from edgefleet.fleet.db import FleetDB, dumps, loads, now

_ID = re.compile(r"^[0-9a-f]{64}$")
_LIST_LIMIT = 100_000
_COLUMNS = (
    "id, device_id, model, version, reason, status, created_at, received_at, bytes,"
    " has_image, edge_class, edge_confidence, cloud_model, cloud_version, cloud_class,"
    " cloud_confidence, agree, label, label_id, labelled_by, labelled_at"
)


class PayloadTooLarge(EdgeError):
    status = 413


class InsufficientStorage(EdgeError):
    status = 507


class Forbidden(EdgeError):
    status = 403


def check_id(value: str) -> str:
    if not _ID.match(value):
        raise BadRequest("a hard example's id is the sha256 of its upload: 64 hex digits")
    return value


class HardExamples:
    """The fleet's hard-example store (one per service)."""

    def __init__(self, db: FleetDB, root: Path, max_bytes: int, max_example_bytes: int) -> None:
        self.db = db
        self.root = root
        self.max_bytes = max_bytes
        self.max_example_bytes = max_example_bytes

    def path(self, hid: str) -> Path:
        return self.root / hid[:2] / f"{hid}.efh"

    # ---- uploads ----------------------------------------------------------------------

    async def has(self, hid: str, device_id: str | None = None) -> bool:
        def q(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT device_id FROM hard_examples WHERE id = ?", (hid,))
            found = row.fetchone()
            return found is not None and (device_id is None or found[0] == device_id)

        return await self.db.read(q)

    async def upload(self, hid: str, device_id: str, body: bytes) -> dict[str, Any]:
        """Store one upload from ``device_id`` (the authenticated caller); returns
        ``{"id", "stored": bool, "already": bool}``. Refusals: module doc."""
        check_id(hid)
        if len(body) > self.max_example_bytes:
            raise PayloadTooLarge(
                f"hard example of {len(body)} bytes, over the fleet's"
                f" {self.max_example_bytes} byte limit per example"
            )
        # The hash first: "already have it" makes the device delete its copy, so it
        # must be about these very bytes.
        if await asyncio.to_thread(_sha256, body) != hid:
            raise BadRequest("the body's sha256 is not the id in the URL")
        if await self.has(hid):
            return {"id": hid, "stored": False, "already": True}
        try:
            header, _ = await asyncio.to_thread(decode_upload, body)
        except ValueError as exc:
            raise BadRequest(f"invalid hard example: {exc}") from None
        if header.device_id != device_id:
            raise Forbidden(f"device {device_id} may not upload for {header.device_id!r}")
        path = self.path(hid)
        await asyncio.to_thread(_write, path, body)
        received = now()

        def job(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM hard_examples WHERE id = ?", (hid,)).fetchone():
                return False  # the same body, arrived meanwhile by another request
            used = conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM hard_examples").fetchone()
            if int(used[0]) + len(body) > self.max_bytes:
                raise InsufficientStorage(
                    f"the fleet's hard-example storage is full ({int(used[0])} of"
                    f" {self.max_bytes} bytes used; this one is {len(body)}): try later"
                )
            conn.execute(
                "INSERT INTO hard_examples (id, device_id, model, version, reason, status,"
                " created_at, received_at, bytes, has_image, edge_class, edge_confidence,"
                " cloud_model, cloud_version, cloud_class, cloud_confidence, agree, meta)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    hid,
                    device_id,
                    header.model,
                    header.version,
                    header.kind,
                    header.status,
                    header.created_at,
                    received,
                    len(body),
                    int(header.image_type is not None),
                    header.edge_class,
                    header.edge_confidence,
                    header.cloud_model,
                    header.cloud_version,
                    header.cloud_class,
                    header.cloud_confidence,
                    None if header.agree is None else int(header.agree),
                    dumps(header.model_dump(mode="json", by_alias=True)),
                ),
            )
            return True

        try:
            stored = await self.db.write(job)
        except BaseException:
            if not await self.has(hid):
                await asyncio.to_thread(_unlink, path)  # nothing stored half-way
            raise
        return {"id": hid, "stored": stored, "already": not stored}

    # ---- the queue --------------------------------------------------------------------

    async def list(
        self,
        *,
        model: str | None = None,
        version: str | None = None,
        reason: str | None = None,
        device: str | None = None,
        labelled: bool | None = None,
        prefix: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Newest first; every filter optional."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("model", model),
            ("version", version),
            ("reason", reason),
            ("device_id", device),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if labelled is not None:
            where.append("label IS NOT NULL" if labelled else "label IS NULL")
        if prefix is not None:
            if not re.fullmatch(r"[0-9a-f]{1,64}", prefix):
                raise BadRequest("prefix must be hex digits")
            where.append("id LIKE ?")
            args.append(prefix + "%")
        sql = f"SELECT {_COLUMNS} FROM hard_examples"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY received_at DESC, id LIMIT ?"
        args.append(limit)

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return [_row(r) for r in conn.execute(sql, args)]

        return await self.db.read(q)

    async def get(self, hid: str) -> dict[str, Any]:
        """One example: its row, the answers' labels and output tensors."""
        check_id(hid)

        def q(conn: sqlite3.Connection) -> tuple[dict[str, Any] | None, list[str]]:
            row = conn.execute(
                f"SELECT {_COLUMNS}, meta FROM hard_examples WHERE id = ?", (hid,)
            ).fetchone()
            if row is None:
                return None, []
            return _row(row) | {"image_type": loads(row["meta"], {}).get("image_type")}, (
                _labels(conn, row["model"], row["version"])
            )

        doc, labels = await self.db.read(q)
        if doc is None:
            raise NotFound(f"no hard example {hid}")
        parts = await self._parts(hid)

        def name(c: Any) -> str | None:
            return labels[c] if isinstance(c, int) and 0 <= c < len(labels) else None

        doc["edge_label"] = name(doc["edge_class"])
        doc["cloud_label"] = name(doc["cloud_class"])
        doc["labels"] = labels
        doc["edge_outputs"] = _tensors_json(unpack(parts["edge_outputs"]))
        cloud = parts.get("cloud_outputs")
        doc["cloud_outputs"] = _tensors_json(unpack(cloud)) if cloud else None
        return doc

    async def _parts(self, hid: str) -> dict[str, bytes]:
        try:
            body = await asyncio.to_thread(self.path(hid).read_bytes)
        except FileNotFoundError:
            raise NotFound(f"hard example {hid}: its file is missing on the fleet") from None
        _, parts = await asyncio.to_thread(decode_upload, body)
        return parts

    async def image(self, hid: str) -> tuple[bytes, str]:
        check_id(hid)
        doc = await self.get(hid)
        parts = await self._parts(hid)
        if "image" not in parts:
            raise NotFound(f"hard example {hid} has no image (its tensors are at /tensors)")
        return parts["image"], str(doc.get("image_type") or "application/octet-stream")

    async def tensors(self, hid: str) -> bytes:
        """``.npz``: ``input.<name>``, ``edge.<name>``, ``cloud.<name>``."""
        check_id(hid)
        if not await self.has(hid):
            raise NotFound(f"no hard example {hid}")
        parts = await self._parts(hid)

        def build() -> bytes:
            arrays: dict[str, np.ndarray] = {}
            for prefix, part in (("input", "inputs"), ("edge", "edge_outputs"),
                                 ("cloud", "cloud_outputs")):  # fmt: skip
                if part in parts:
                    for name, value in unpack(parts[part]).items():
                        arrays[f"{prefix}.{name}"] = value
            buf = io.BytesIO()
            np.savez(buf, **arrays)  # type: ignore[arg-type]
            return buf.getvalue()

        return await asyncio.to_thread(build)

    async def label(self, hid: str, label: object, by: str) -> dict[str, Any]:
        """Set (a label of the example's model version) or clear (None) the label."""
        check_id(hid)
        if label is not None and (not isinstance(label, str) or not label):
            raise BadRequest("label must be a non-empty string, or null to clear it")

        def job(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT model, version FROM hard_examples WHERE id = ?", (hid,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no hard example {hid}")
            if label is None:
                conn.execute(
                    "UPDATE hard_examples SET label = NULL, label_id = NULL, labelled_by = ?,"
                    " labelled_at = ? WHERE id = ?",
                    (by, now(), hid),
                )
                return
            labels = _labels(conn, row[0], row[1])
            if label not in labels:
                known = ", ".join(labels[:20]) or "none: the model is not in the registry"
                raise BadRequest(f"{label!r} is not a label of {row[0]}:{row[1]} ({known})")
            conn.execute(
                "UPDATE hard_examples SET label = ?, label_id = ?, labelled_by = ?,"
                " labelled_at = ? WHERE id = ?",
                (label, labels.index(str(label)), by, now(), hid),
            )

        await self.db.write(job)
        return await self.get(hid)

    async def delete(self, hid: str) -> dict[str, Any]:
        """Remove one example (row, then file): frees its bytes of the budget."""
        check_id(hid)

        def job(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "DELETE FROM hard_examples WHERE id = ? RETURNING bytes", (hid,)
            ).fetchone()
            return None if row is None else int(row[0])

        freed = await self.db.write(job)
        if freed is None:
            raise NotFound(f"no hard example {hid}")
        await asyncio.to_thread(_unlink, self.path(hid))
        return {"id": hid, "deleted": True, "bytes": freed}


def _labels(conn: sqlite3.Connection, model: str, version: str) -> list[str]:
    """The version's labels from its manifest (any version of the model if that one
    was deleted from the registry)."""
    row = conn.execute(
        "SELECT manifest FROM model_versions WHERE name = ?"
        " ORDER BY (version = ?) DESC, uploaded_at DESC LIMIT 1",
        (model, version),
    ).fetchone()
    labels = loads(row[0], {}).get("labels") if row else None
    return [str(x) for x in labels] if isinstance(labels, list) else []


def _row(r: Any) -> dict[str, Any]:
    doc = {k: r[k] for k in _COLUMNS.replace(" ", "").split(",")}
    doc["has_image"] = bool(doc["has_image"])
    doc["agree"] = None if doc["agree"] is None else bool(doc["agree"])
    return doc


def _tensors_json(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        name: {"shape": list(a.shape), "dtype": a.dtype.str, "data": a.ravel().tolist()}
        for name, a in arrays.items()
    }


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _write(path: Path, body: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, body)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)

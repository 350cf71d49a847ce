"""Console pages for hard examples (issue 12): the labelling queue, one example, export.

- ``GET /ui/hard-examples``: the queue (unlabelled first; filters model, version,
  reason, agreement, state), the counts, and the selected example's panel. Labelling is
  ``static/hard_examples.js``: keys pick a class, Enter confirms through the JSON API
  (``PUT /v1/hard-examples/{id}/label`` with the session's CSRF token), so the role
  check, the label's validation and the audit row are the API's.
- ``GET /ui/hard-examples/{id}``: one example's panel (a fragment for htmx/JS; the whole
  queue page with it selected otherwise). Its image is ``GET /v1/hard-examples/{id}/image``
  (an ``<img>`` from the same origin: the CSP allows it); an example without an image
  shows its input tensors instead (shape, dtype, range, a small heat-map drawn by the
  page's script from a downsampled grid, or the top values).
- ``GET /ui/hard-examples/export.zip`` (``read``, like the API's reads it is built from):
  the labelled examples matching the filters as the CLI's ``hard-examples export``
  folder (``eval.npz``, ``cloud.npz``, ``images/``, ``index.jsonl``; fleet/cli_quality.py)
  in one ZIP, streamed: each example is read and compressed on a worker thread and its
  bytes written to the response before the next is read.

Threads: handlers run on the event loop; SQL on the database's reader threads; file
reads, ``.npz`` decoding and ZIP compression on worker threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import io
import re
import sqlite3
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from edgefleet.core.errors import BadRequest, NotFound
from edgefleet.core.hard_example_wire import decode_upload, unpack
from edgefleet.fleet.api import READ, _api, requires
from edgefleet.fleet.console.render import is_fragment, page
from edgefleet.fleet.db import loads
from edgefleet.fleet.hard_example_export import ExportWriter
from edgefleet.fleet.hard_examples import HardExamples, _labels, check_id

routes = web.RouteTableDef()

QUEUE_LIMIT = 200  # rows shown; the counts cover them all
COUNT_CAP = 10_000  # counts above it show as "10,000+"
EXPORT_LIMIT = 100_000  # the API list's own ceiling
HEATMAP_MAX = 32  # cells per side of a tensor's heat-map
TOP_VALUES = 8
STATES = ("unlabelled", "labelled", "all")
AGREEMENT = {"": None, "disagree": "agree = 0", "agree": "agree = 1", "unknown": "agree IS NULL"}
# Keys that pick a class when a label has no one-character name of its own; never "s"
# (skip), and never a key the page uses for something else.
_KEY_POOL = "1234567890abcdefghijklmnopqrtuvwxyz"
_RESERVED = frozenset("s")


@dataclass
class Filters:
    model: str = ""
    version: str = ""
    reason: str = ""
    agree: str = ""
    state: str = "unlabelled"

    @classmethod
    def of(cls, request: web.Request) -> Filters:
        q = request.query
        agree = q.get("agree", "")
        state = q.get("state", "unlabelled")
        if agree not in AGREEMENT:
            raise BadRequest(f"agree must be one of {sorted(a for a in AGREEMENT if a)}")
        if state not in STATES:
            raise BadRequest(f"state must be one of {list(STATES)}")
        return cls(q.get("model", ""), q.get("version", ""), q.get("reason", ""), agree, state)

    def where(self, *, with_state: bool = True) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        for column, value in (("model", self.model), ("version", self.version),
                              ("reason", self.reason)):  # fmt: skip
            if value:
                # "+column": no index. The one on (model, version, reason) would make
                # SQLite fetch every matching row at random and sort them by rowid;
                # walking the table backwards stops after a page of matches.
                clauses.append(f"+{column} = ?")
                args.append(value)
        if self.agree:
            clauses.append(str(AGREEMENT[self.agree]))
        if with_state and self.state != "all":
            clauses.append("label IS NULL" if self.state == "unlabelled" else "label IS NOT NULL")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def query(self, **override: str) -> dict[str, str]:
        """The filters as query parameters (empty ones left out), for links."""
        doc = {"model": self.model, "version": self.version, "reason": self.reason,
               "agree": self.agree, "state": self.state} | override  # fmt: skip
        return {k: v for k, v in doc.items() if v and not (k == "state" and v == "unlabelled")}


@dataclass
class Queue:
    rows: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0  # matching the filters, any state
    unlabelled: int = 0
    labelled: int = 0
    models: list[tuple[str, str]] = field(default_factory=list)  # (model, version) stored
    reasons: list[str] = field(default_factory=list)


def read_queue(conn: sqlite3.Connection, f: Filters) -> Queue:
    """The queue page's data (reader thread): unlabelled first, newest first.

    Cheap on a large store (the budget allows hundreds of thousands): rows come in
    rowid order (the order they were stored, i.e. ``received_at``'s) walked backwards,
    so a page stops after ``QUEUE_LIMIT`` matches instead of sorting the table; the
    filter choices come from a skip-scan of the (model, version, reason) index. The
    counts are the one full pass.
    """
    out = Queue()
    columns = (
        "SELECT id, device_id, model, version, reason, status, received_at, has_image,"
        " edge_class, edge_confidence, cloud_class, cloud_confidence, agree, label"
        " FROM hard_examples"
    )
    rows: list[sqlite3.Row] = []
    states = ["unlabelled", "labelled"] if f.state == "all" else [f.state]
    for state in states:
        if len(rows) >= QUEUE_LIMIT:
            break
        where, args = Filters(f.model, f.version, f.reason, f.agree, state).where()
        rows += conn.execute(
            f"{columns}{where} ORDER BY rowid DESC LIMIT ?", [*args, QUEUE_LIMIT - len(rows)]
        ).fetchall()
    names: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        key = (r["model"], r["version"])
        if key not in names:
            names[key] = _labels(conn, *key)
        labels = names[key]
        doc = dict(r)
        doc["edge_label"] = _name(labels, r["edge_class"])
        doc["cloud_label"] = _name(labels, r["cloud_class"])
        doc["agree"] = None if r["agree"] is None else bool(r["agree"])
        out.rows.append(doc)

    # Counted up to COUNT_CAP (then shown as "10,000+"): a count stops at the cap
    # instead of reading every row of a large store.
    def count(state: str, cap: int = COUNT_CAP + 1) -> int:
        where, args = Filters(f.model, f.version, f.reason, f.agree, state).where()
        sql = f"SELECT count(*) FROM (SELECT 1 FROM hard_examples{where} LIMIT ?)"
        return int(conn.execute(sql, [*args, cap]).fetchone()[0])

    out.unlabelled = count("unlabelled")
    out.labelled = count("labelled", 1)  # only whether there are any (for the export)
    out.total = count("all")
    triples = _distinct_triples(conn)
    out.models = sorted({(m, v) for m, v, _ in triples})
    out.reasons = sorted({r for _, _, r in triples})
    return out


def _distinct_triples(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """Every stored (model, version, reason), a few index seeks each (a skip-scan of
    the index on those columns, fleet/db.py: ``min()`` of a prefix is one seek) rather
    than a pass over every row."""
    found: list[tuple[str, str, str]] = []

    def first(sql: str, *args: str) -> str | None:
        row = conn.execute(sql, args).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    model = first("SELECT min(model) FROM hard_examples")
    while model is not None and len(found) < 10_000:
        version = first("SELECT min(version) FROM hard_examples WHERE model = ?", model)
        while version is not None:
            reason = first(
                "SELECT min(reason) FROM hard_examples WHERE model = ? AND version = ?",
                model,
                version,
            )
            while reason is not None:
                found.append((model, version, reason))
                reason = first(
                    "SELECT min(reason) FROM hard_examples WHERE model = ? AND version = ?"
                    " AND reason > ?",
                    model,
                    version,
                    reason,
                )
            version = first(
                "SELECT min(version) FROM hard_examples WHERE model = ? AND version > ?",
                model,
                version,
            )
        model = first("SELECT min(model) FROM hard_examples WHERE model > ?", model)
    return found


def _name(labels: list[str], cls: Any) -> str | None:
    return labels[cls] if isinstance(cls, int) and 0 <= cls < len(labels) else None


def label_keys(labels: list[str]) -> list[tuple[str, str]]:
    """(key, label) per class: a label's own one-character name when it has one (the
    digits model's "7" is key 7), else the next free key of the pool. No key for a
    class beyond the pool (it is still a button)."""
    taken: set[str] = set(_RESERVED)
    own: dict[int, str] = {}
    for i, label in enumerate(labels):
        k = label.lower()
        if len(label) == 1 and k in _KEY_POOL and k not in taken:
            own[i] = k
            taken.add(k)
    pool = (k for k in _KEY_POOL if k not in taken)
    out = []
    for i, label in enumerate(labels):
        out.append((own.get(i) or next(pool, ""), label))
    return out


def _top(outputs: dict[str, Any] | None, labels: list[str], n: int = 3) -> list[dict[str, Any]]:
    """The answer's best classes from its first output with one score per class."""
    if not outputs:
        return []
    for tensor in outputs.values():
        shape = tensor.get("shape") or []
        data = tensor.get("data") or []
        width = shape[-1] if shape else 0
        if width and width == len(labels) and len(data) >= width:
            scores = [float(x) for x in data[:width]]  # the first row: one example
            order = sorted(range(width), key=lambda i: -scores[i])[:n]
            return [
                {
                    "label": labels[i],
                    "score": scores[i],
                    "w": round(100 * min(1.0, max(0.0, scores[i])), 1),
                }
                for i in order
            ]
    return []


def tensor_views(npz: bytes) -> list[dict[str, Any]]:
    """The inputs of an example, compact (worker thread): shape, dtype, range, and a
    heat-map grid (values 0..1, at most HEATMAP_MAX a side) for anything that is an
    image once its size-1 axes (and a channel axis of ≤ 4) are dropped, else the top
    values with their flat indices."""
    views: list[dict[str, Any]] = []
    with np.load(io.BytesIO(npz), allow_pickle=False) as arrays:  # never unpickle
        for key in arrays.files:
            if not key.startswith("input."):
                continue
            a = arrays[key]
            view: dict[str, Any] = {
                "name": key.removeprefix("input."),
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "grid": None,
                "top": [],
            }
            if a.size and a.dtype.kind in "biuf":  # bool, integers, floats
                # NaN/inf shown as 0/the dtype's extremes: a heat-map needs numbers.
                x = np.nan_to_num(a.astype(np.float64))
                view.update(min=float(x.min()), max=float(x.max()), mean=float(x.mean()))
                sq = np.squeeze(x)
                if sq.ndim == 3 and min(sq.shape[0], sq.shape[-1]) <= 4:
                    sq = sq.mean(axis=0 if sq.shape[0] <= 4 else -1)  # channels → grey
                if sq.ndim == 1 and int(np.sqrt(sq.size)) ** 2 == sq.size and sq.size >= 16:
                    side = int(np.sqrt(sq.size))  # a flattened square image (28*28 = 784)
                    sq = sq.reshape(side, side)
                if sq.ndim == 2:
                    view["grid"] = _grid(sq)
                else:
                    flat = x.ravel()
                    order = np.argsort(-flat, kind="stable")[:TOP_VALUES]
                    view["top"] = [[int(i), float(flat[i])] for i in order]
            views.append(view)
    return views


def _grid(a: np.ndarray) -> list[list[float]]:
    """Block means down to HEATMAP_MAX a side, scaled to 0..1, 3 decimals."""
    h, w = a.shape
    sh, sw = max(1, -(-h // HEATMAP_MAX)), max(1, -(-w // HEATMAP_MAX))
    rows = []
    for i in range(0, h, sh):
        rows.append([float(a[i : i + sh, j : j + sw].mean()) for j in range(0, w, sw)])
    g = np.asarray(rows)
    lo, hi = float(g.min()), float(g.max())
    g = (g - lo) / (hi - lo) if hi > lo else np.zeros_like(g)
    return np.round(g, 3).tolist()  # type: ignore[no-any-return]


def _store(request: web.Request) -> HardExamples | None:
    store = _api(request).hard_examples
    return store if isinstance(store, HardExamples) else None


async def _detail(request: web.Request, store: HardExamples, hid: str) -> dict[str, Any]:
    doc = await store.get(hid)
    labels: list[str] = doc["labels"]
    doc["keys"] = label_keys(labels)
    doc["edge_top"] = _top(doc.get("edge_outputs"), labels)
    doc["cloud_top"] = _top(doc.get("cloud_outputs"), labels)
    doc["tensors"] = (
        [] if doc["has_image"] else await asyncio.to_thread(tensor_views, await store.tensors(hid))
    )
    # The class picked when the panel opens: the label it has, else the cloud's answer
    # (a suggestion: Enter accepts it; a key picks another).
    doc["suggested"] = doc.get("label") or doc.get("cloud_label") or ""
    return doc


@routes.get("/ui/hard-examples")
@requires(READ)
async def queue_page(request: web.Request) -> web.Response:
    return await _queue_page(request, request.query.get("id") or None)


async def _queue_page(request: web.Request, selected: str | None) -> web.Response:
    f = Filters.of(request)
    store = _store(request)
    fragment = is_fragment(request)
    q = (
        await _api(request).registry.db.read(lambda c: read_queue(c, f))
        if store is not None
        else Queue()
    )
    item = None
    missing = ""
    if store is not None and not fragment:
        if selected is None:
            first = next((r for r in q.rows if r["label"] is None), q.rows[0] if q.rows else None)
            selected = first["id"] if first else None
        if selected is not None:
            try:
                item = await _detail(request, store, check_id(selected))
            except NotFound as exc:  # deleted meanwhile, or a stale link: the queue still
                missing = exc.message
    stored_models = sorted({m for m, _ in q.models})
    export_model = f.model or (stored_models[0] if len(stored_models) == 1 else "")
    template = "hard_examples_queue.html" if fragment else "hard_examples.html"
    return page(
        request,
        template,
        active="hard_examples",
        title="Hard examples",
        q=q,
        f=f,
        item=item,
        missing=missing,
        enabled=store is not None,
        query=f.query(),
        export_query=f.query(model=export_model, state="") if export_model and q.labelled else None,
        several_models=len(stored_models) > 1 and not f.model and q.labelled > 0,
        agreements=[a for a in AGREEMENT if a],
        states=STATES,
        limit=QUEUE_LIMIT,
        cap=COUNT_CAP,
    )


@routes.get("/ui/hard-examples/export.zip")
@requires(READ)
async def export_zip(request: web.Request) -> web.StreamResponse:
    """The labelled examples matching ``model, version, reason, agree`` (module doc).
    Refused before anything is sent: no store or nothing labelled matches (404),
    several models (400: their inputs differ, as the CLI says)."""
    store = _store(request)
    if store is None:
        raise NotFound("this fleet keeps no hard examples")
    f = Filters.of(request)
    f.state = "labelled"
    where, args = f.where()

    def rows_of(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        out = []
        names: dict[tuple[str, str], list[str]] = {}
        for r in conn.execute(
            f"SELECT {_EXPORT_COLUMNS} FROM hard_examples{where}"
            " ORDER BY received_at DESC, id LIMIT ?",
            [*args, EXPORT_LIMIT],
        ):
            key = (r["model"], r["version"])
            labels = names[key] if key in names else names.setdefault(key, _labels(conn, *key))
            doc = {k: r[k] for k in _EXPORT_KEYS if k in r.keys()}
            doc["edge_label"] = _name(labels, r["edge_class"])
            doc["cloud_label"] = _name(labels, r["cloud_class"])
            doc["image_type"] = loads(r["meta"], {}).get("image_type")
            out.append(doc)
        return out

    rows = await _api(request).registry.db.read(rows_of)
    if not rows:
        raise NotFound("no labelled hard examples match")
    models = sorted({r["model"] for r in rows})
    if len(models) > 1:
        raise BadRequest(f"examples of several models {models}: pick one with model=")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", models[0])
    response = web.StreamResponse(
        headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="hard-examples-{name}.zip"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        }
    )
    await response.prepare(request)
    export = _Export()
    for doc in rows:
        # One worker-thread job per example (read, decode, compress), then its bytes
        # go out before the next is read: memory holds one example's ZIP entry at a time
        # (plus the stacked inputs for eval.npz, which the format needs whole).
        await asyncio.to_thread(export.add, store.path(doc["id"]), doc)
        await response.write(export.sink.take())
    await asyncio.to_thread(export.finish)
    await response.write(export.sink.take())
    await response.write_eof()
    return response


_EXPORT_KEYS = ("id", "device_id", "model", "version", "reason", "label", "label_id",
                "edge_class", "edge_confidence", "cloud_class", "cloud_confidence")  # fmt: skip
_EXPORT_COLUMNS = ", ".join(_EXPORT_KEYS) + ", meta"


class _Sink(io.RawIOBase):
    """A write-only, non-seekable file for ``zipfile``: it buffers what is written until
    the handler takes it for the response (zipfile then uses data descriptors)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.buf += b
        return len(b)

    def take(self) -> bytes:
        out, self.buf = bytes(self.buf), bytearray()
        return out


class _Export:
    """The export format (fleet/hard_example_export.py) into a streamed ZIP.
    ``add`` and ``finish`` run on worker threads, one at a time."""

    def __init__(self) -> None:
        self.sink = _Sink()
        self.zf = zipfile.ZipFile(self.sink, "w", compression=zipfile.ZIP_DEFLATED)
        self.writer = ExportWriter(self.zf.writestr)

    def add(self, path: Path, doc: dict[str, Any]) -> None:
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            return  # deleted since the list was read: not part of the export
        _, parts = decode_upload(body)
        image = parts["image"] if "image" in parts else None
        self.writer.add(doc, unpack(parts["inputs"]), image, doc["image_type"])

    def finish(self) -> None:
        """The dataset's closing files, then the ZIP's directory."""
        self.writer.finish()
        self.zf.close()


@routes.get(r"/ui/hard-examples/{id:[0-9a-f]{64}}")
@requires(READ)
async def one(request: web.Request) -> web.Response:
    """One example's panel (fragment for ``HX-Request``), else the queue with it selected."""
    hid = request.match_info["id"]
    if not is_fragment(request):
        return await _queue_page(request, hid)
    store = _store(request)
    if store is None:
        raise NotFound("this fleet keeps no hard examples")
    item = await _detail(request, store, hid)
    return page(request, "hard_example_detail.html", item=item)

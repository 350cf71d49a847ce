"""The hard-example export format, written once for the CLI and the console.

A calibrate-ready dataset of labelled hard examples of one model (docs/fleet.md,
"Hard examples"): ``eval.npz`` (the stacked inputs by name and ``y``, the labels'
indices: ``edge-convert calibrate --eval`` reads it), ``cloud.npz`` (``y_pred``, the
cloud's answers, only when every example has one), ``index.jsonl`` (one line per
example: who, what, the labels, its image file) and ``images/<id>.<ext>``.

``edge-fleet hard-examples export`` (fleet/cli_quality.py) writes it into a folder
from the API's answers; the console (fleet/console/hard_examples.py) streams it as a
ZIP from the stored uploads. Both hand each file to ``write(name, bytes)``.
Not thread-safe: one caller at a time (the console's calls run on worker threads,
one after another).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np

IMAGE_EXT = {"image/jpeg": "jpg", "image/png": "png"}
INDEX_KEYS = ("id", "device_id", "model", "version", "reason", "label", "label_id",
              "edge_class", "edge_label", "edge_confidence", "cloud_class", "cloud_label",
              "cloud_confidence")  # fmt: skip


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class ExportWriter:
    """``add`` each labelled example, then ``finish``; files go to ``write``."""

    def __init__(self, write: Callable[[str, bytes], None]) -> None:
        self.write = write
        self.inputs: dict[str, list[np.ndarray]] = {}
        self.ys: list[int] = []
        self.cloud: list[int | None] = []
        self.lines: list[str] = []
        self.images = 0

    def add(
        self,
        doc: dict[str, Any],
        inputs: dict[str, np.ndarray],
        image: bytes | None = None,
        image_type: str | None = None,
    ) -> None:
        """One example: its record (``INDEX_KEYS``, ``label_id`` set), its input
        tensors by name, and its image when it has one."""
        image_file = None
        if image is not None:
            image_file = f"images/{doc['id']}.{IMAGE_EXT.get(image_type or '', 'bin')}"
            self.write(image_file, image)
            self.images += 1
        for name, value in inputs.items():
            self.inputs.setdefault(name, []).append(value)
        self.ys.append(int(doc["label_id"]))
        self.cloud.append(doc.get("cloud_class"))
        self.lines.append(json.dumps({**{k: doc.get(k) for k in INDEX_KEYS}, "image": image_file}))

    @property
    def with_cloud(self) -> bool:
        return bool(self.ys) and all(c is not None for c in self.cloud)

    def finish(self) -> None:
        """``eval.npz``, ``cloud.npz`` (when every example has a cloud answer) and
        ``index.jsonl``."""
        arrays: dict[str, Any] = {n: np.concatenate(p, axis=0) for n, p in self.inputs.items()}
        arrays["y"] = np.asarray(self.ys, dtype=np.int64)
        self.write("eval.npz", _npz(**arrays))
        if self.with_cloud:
            self.write("cloud.npz", _npz(y_pred=np.asarray(self.cloud, dtype=np.int64)))
        self.write("index.jsonl", "".join(line + "\n" for line in self.lines).encode())

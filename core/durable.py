"""Writes that survive a power cut: fsync the data, rename atomically, fsync the directory.

A rename is atomic for readers at once, but only durable once the directory entry is
on disk: without the directory fsync a power cut can bring back the old name (or
neither). Every file the agent or the fleet must find intact after a crash (model
store state, extracted bundles, finished downloads, sync state, uploaded bundles)
goes through these helpers.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src: Path, dst: Path) -> None:
    """Flush ``src`` to disk, rename it over ``dst``, and make the rename durable."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    fsync_dir(dst.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Readers see the old content or the new one, never a torn file, even after a crash."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)

"""Writes that survive a power cut: fsync the data, rename atomically, fsync the directory.

A rename is atomic for readers at once, but only durable once the directory entry is
on disk: without the directory fsync a power cut can bring back the old name (or
neither). Every file the agent or the fleet must find intact after a crash (model
store state, extracted bundles, finished downloads, sync state, uploaded bundles, the
credentials and config ``edge-agent enroll`` writes) goes through these helpers.
"""

from __future__ import annotations

import contextlib
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


def atomic_write(
    path: Path, data: bytes, mode: int | None = None, uid: int = -1, gid: int = -1
) -> None:
    """Replace ``path`` with ``data``: readers see the old content or the new one, never a
    torn file, even after a crash (temp file in the same directory, fsync, rename,
    directory fsync).

    ``mode`` (exact, whatever the umask) and ``uid``/``gid`` are set on the temp file
    before the data goes in, and the temp file is created 0600 until then: a secret
    never sits in a file more readable than its final mode, not even between create
    and chmod. Without ``mode`` the file gets the umask's usual mode (0644 under 022).
    A failed write removes the temp file and leaves ``path`` as it was. Blocking: call
    it off the event loop.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    f = os.fdopen(os.open(tmp, flags, 0o666 if mode is None else 0o600), "wb")
    try:
        with f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            if uid != -1 or gid != -1:
                os.fchown(f.fileno(), uid, gid)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)

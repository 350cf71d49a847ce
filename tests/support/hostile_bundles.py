"""Hostile bundle files (header bombs, member floods, forged signatures) and a way to
watch a real process's peak memory while it refuses them.

The bombs are small on disk and huge when read naively: a gzip stream may hold many
members, so one compressed megabyte of zeros is written once and repeated.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB


def _gzip_member(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def header_bomb(path: Path, kind: bytes, declared: int = GiB) -> Path:
    """A gzip tar whose first header is of ``kind`` (``tarfile.GNUTYPE_LONGNAME``,
    ``tarfile.XHDTYPE``, ...) declaring ``declared`` bytes of header data, which
    follow as zeros; then a small regular member and the end-of-archive blocks.

    About 1 MiB on disk per GiB declared. Python's tarfile, unguarded, reads the whole
    declared header into memory before any member check can run.
    """
    assert declared % MiB == 0
    head = tarfile.TarInfo("././@LongLink" if kind in (b"L", b"K") else "././@PaxHeader")
    head.type = kind
    head.size = declared
    zeros = _gzip_member(bytes(MiB))
    with open(path, "wb") as f:
        f.write(_gzip_member(head.tobuf(tarfile.USTAR_FORMAT)))
        for _ in range(declared // MiB):
            f.write(zeros)
        tail = tarfile.TarInfo("manifest.json")
        tail.size = 2
        f.write(_gzip_member(tail.tobuf(tarfile.USTAR_FORMAT) + b"{}".ljust(512, b"\0")))
        f.write(_gzip_member(bytes(2 * tarfile.BLOCKSIZE)))
    return path


def member_flood(path: Path, count: int, manifest_last: bool = True) -> Path:
    """A gzip tar of ``count`` one-byte members (and a manifest, last by default)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        if not manifest_last:
            add("manifest.json", b"{}")
        for i in range(count):
            add(f"f{i}", b"x")
        if manifest_last:
            add("manifest.json", b"{}")
    path.write_bytes(zlib.compress(buf.getvalue(), 9, wbits=31))
    return path


def with_members(source: Path, out: Path, replace: dict[str, bytes]) -> Path:
    """``source``'s members with some replaced (or added), as a plain ustar gzip tar."""
    with tarfile.open(source, "r:*") as tar:
        files = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            files[m.name] = f.read()
    files.update(replace)
    with tarfile.open(out, "w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


# manifest.sig documents that are not a signature: each must be a 400, never a 500.
MALFORMED_SIGNATURES: dict[str, bytes] = {
    "key_id a list": b'{"alg": "ed25519", "key_id": ["a"], "signature": "AAAA"}',
    "key_id an object": b'{"alg": "ed25519", "key_id": {"a": 1}, "signature": "AAAA"}',
    "alg a list": b'{"alg": ["ed25519"], "key_id": "k", "signature": "AAAA"}',
    "signature a number": b'{"alg": "ed25519", "key_id": "k", "signature": 5}',
    "not an object": b'["ed25519", "k", "AAAA"]',
    "a bare string": b'"ed25519"',
    "deeply nested": b"[" * 30_000 + b"]" * 30_000,
    "nested in a field": b'{"alg": "ed25519", "key_id": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    "not utf-8": b'{"alg": "\xff\xfe"}',
    "huge integer": b'{"alg": "ed25519", "key_id": ' + b"9" * 5000 + b', "signature": ""}',
}


def reset_peak_rss(pid: int) -> None:
    """Set the process's peak resident set back to its current one (Linux >= 4.0), so
    the next ``peak_rss_bytes`` measures from now on, not since the process started."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (Linux ``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")

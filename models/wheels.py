"""Take one file out of a published wheel, without installing the package.

Real sample data and pretrained models ship inside ordinary PyPI wheels (an image in
scikit-image, TFLite models in mediapipe 0.10.14). Fetching them through pip keeps the
build on the same index, proxy and cache settings as every other dependency, and a
pinned sha256 makes the result reproducible whatever mirror served the wheel.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Any platform's wheel carries the same data files; pinning one family makes the
# download independent of the build machine (an ARM laptop fetches the x86 wheel).
# pip 23 does not widen manylinux_2_28 to older tags by itself, so list them.
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
DEFAULT_PYTHON = "3.11"
MAX_MEMBER_BYTES = 256 * 1024 * 1024


class WheelDownloadError(RuntimeError):
    """pip could not fetch the wheel (offline, index down, no such version)."""


@dataclass(frozen=True)
class WheelMember:
    """A pinned file inside a pinned wheel."""

    package: str
    version: str
    member: str
    sha256: str

    def fetch(self, cache_dir: Path) -> Path:
        return wheel_member(self.package, self.version, self.member, self.sha256, cache_dir)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe_member_path(member: str) -> PurePosixPath:
    p = PurePosixPath(member)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"refusing wheel member path {member!r}")
    return p


def download_wheel(
    package: str,
    version: str,
    dest: Path,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    python_version: str = DEFAULT_PYTHON,
) -> Path:
    """``pip download`` exactly one binary wheel of ``package==version`` into ``dest``."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--python-version", python_version,
        *(arg for p in platforms for arg in ("--platform", p)),
        "-d", str(dest),
        f"{package}=={version}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise WheelDownloadError(f"pip download {package}=={version} failed: " + " | ".join(tail))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {package}=={version} left {len(wheels)} wheels")
    return wheels[0]


def wheel_member(
    package: str,
    version: str,
    member: str,
    sha256: str,
    cache_dir: Path,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    python_version: str = DEFAULT_PYTHON,
) -> Path:
    """Path of ``member`` from ``package==version``'s wheel, cached under ``cache_dir``.

    A cached copy is re-hashed on every call (these files are small) and fetched again
    if it was damaged. The wheel itself is not kept: only the member is. Raises
    ``WheelDownloadError`` when pip fails, ``RuntimeError`` when the member is missing
    or its sha256 is not the pinned one.
    """
    rel = _safe_member_path(member)
    target = cache_dir / f"{package}-{version}" / Path(*rel.parts)
    if target.is_file():
        if _sha256(target) == sha256:
            return target
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wheel-", dir=cache_dir) as tmp:
        wheel = download_wheel(package, version, Path(tmp), platforms, python_version)
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise RuntimeError(f"{wheel.name} has no member {member!r}") from None
            if info.file_size > MAX_MEMBER_BYTES:
                raise RuntimeError(f"{member} is {info.file_size} bytes, over the limit")
            data = zf.read(info)
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise RuntimeError(f"{package}=={version}:{member} has sha256 {got}, pinned {sha256}")
        # Write then rename: a concurrent or interrupted build never sees half a file.
        part = Path(tmp) / "member.part"
        part.write_bytes(data)
        os.replace(part, target)
    return target

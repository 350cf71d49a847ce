"""core/durable.py: the one atomic, power-cut-safe file write (store, bundles, sync
state, fleet registry, and enrolment's secrets with their mode and owner)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.core.durable import atomic_write


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_replaces_the_content_and_leaves_no_temp_file(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert mode(target) == 0o644  # no mode given: a normal file, as the umask says


def test_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "pub", b"key", 0o644)
    finally:
        os.umask(old)
    atomic_write(tmp_path / "secret", b"s3cret", mode=0o600)
    assert mode(tmp_path / "pub") == 0o644 and mode(tmp_path / "secret") == 0o600
    # replacing an existing, more open file does not keep its mode
    (tmp_path / "was-open").write_bytes(b"x")
    os.chmod(tmp_path / "was-open", 0o666)
    atomic_write(tmp_path / "was-open", b"y", 0o600)
    assert mode(tmp_path / "was-open") == 0o600


def test_the_temp_file_is_never_more_readable_than_the_final_mode(
    tmp_path: Path, umask_022: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret must not sit in a 0644 file between create and chmod."""
    seen: list[int] = []
    real_fchmod = os.fchmod

    def spy(fd: int, m: int) -> None:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fchmod(fd, m)

    monkeypatch.setattr(os, "fchmod", spy)
    atomic_write(tmp_path / "mqtt.password", b"s3cret", 0o600)
    assert seen == [0o600]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    target.mkdir()  # the rename over a directory fails after the data was written
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.is_dir() and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_owner(tmp_path: Path) -> None:
    uid, gid = os.getuid(), os.getgid()
    atomic_write(tmp_path / "f", b"x", 0o640, uid, gid)
    st = (tmp_path / "f").stat()
    assert (st.st_uid, st.st_gid) == (uid, gid)

"""Bundle verification: signatures, hashes and safe extraction, on real tar files."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from edgefleet.core.bundle.archive import read_bundle, resign_bundle
from edgefleet.core.bundle.signing import TrustStore, key_id, load_private_key
from edgefleet.core.errors import BundleError, SignatureError
from tests.support.hostile_bundles import MALFORMED_SIGNATURES


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle, "r:*") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def write_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


@pytest.fixture
def trust(keys: tuple[Path, Path]) -> TrustStore:
    return TrustStore.from_files([keys[1]])


def test_signed_bundle_verifies_and_extracts(make_tiny_bundle, trust, keys, tmp_path):
    bundle = make_tiny_bundle("1")
    contents = read_bundle(bundle, tmp_path / "out", trust)
    assert contents.manifest.name == "tiny"
    assert contents.signed_by == key_id(load_private_key(keys[0]).public_key())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "manifest.sig",
        "model.onnx",
        "selftest.npz",
    ]


def test_altered_model_file_is_refused(make_tiny_bundle, trust, tmp_path):
    files = members(make_tiny_bundle("1"))
    model = bytearray(files["model.onnx"])
    model[-5] ^= 0xFF
    files["model.onnx"] = bytes(model)
    bad = write_tar(tmp_path / "bad.bundle", files)
    with pytest.raises(BundleError, match="model.onnx: sha256 mismatch"):
        read_bundle(bad, tmp_path / "out", trust)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".extract") for p in tmp_path.iterdir())


def test_altered_manifest_breaks_the_signature(make_tiny_bundle, trust, tmp_path):
    files = members(make_tiny_bundle("1"))
    doc = json.loads(files["manifest.json"])
    doc["fallback"] = {"threshold": 0.01}
    files["manifest.json"] = json.dumps(doc).encode()
    bad = write_tar(tmp_path / "bad.bundle", files)
    with pytest.raises(SignatureError, match="bad signature"):
        read_bundle(bad, tmp_path / "out", trust)


def test_unsigned_bundle_refused_unless_allowed(make_tiny_bundle, keys, tmp_path):
    unsigned = tmp_path / "unsigned.bundle"
    resign_bundle(make_tiny_bundle("1"), None, unsigned)
    with pytest.raises(SignatureError, match="not signed"):
        read_bundle(unsigned, tmp_path / "a", TrustStore.from_files([keys[1]]))
    dev = TrustStore.from_files([keys[1]], allow_unsigned=True)
    assert read_bundle(unsigned, tmp_path / "b", dev).signed_by is None


def test_bundle_signed_by_unknown_key_is_refused(make_tiny_bundle, other_keys, trust, tmp_path):
    other = tmp_path / "other.bundle"
    resign_bundle(make_tiny_bundle("1"), load_private_key(other_keys[0]), other)
    with pytest.raises(SignatureError, match="untrusted key"):
        read_bundle(other, tmp_path / "out", trust)
    # ...and accepted by an agent that trusts that key.
    assert read_bundle(other, tmp_path / "ok", TrustStore.from_files([other_keys[1]])).signed_by


def test_garbage_signature_is_refused(make_tiny_bundle, trust, tmp_path):
    files = members(make_tiny_bundle("1"))
    files["manifest.sig"] = b"\x00not json"
    with pytest.raises(SignatureError, match="malformed"):
        read_bundle(write_tar(tmp_path / "b.bundle", files), tmp_path / "out", trust)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil.txt", r"escapes the bundle"),
        ("/etc/evil.txt", r"absolute path"),
        ("sub/evil.txt", r"sub-directory"),
    ],
)
def test_unsafe_member_names_are_refused(make_tiny_bundle, trust, tmp_path, name, message):
    files = members(make_tiny_bundle("1"))
    files[name] = b"x"
    with pytest.raises(BundleError, match=message):
        read_bundle(write_tar(tmp_path / "b.bundle", files), tmp_path / "out", trust)
    assert not (tmp_path.parent / "evil.txt").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_are_refused(make_tiny_bundle, trust, tmp_path, kind):
    link = tarfile.TarInfo("link")
    link.type = kind
    link.linkname = "/etc/passwd"
    bad = write_tar(tmp_path / "b.bundle", members(make_tiny_bundle("1")), [link])
    with pytest.raises(BundleError, match="is a link"):
        read_bundle(bad, tmp_path / "out", trust)


def test_oversized_member_is_refused(make_tiny_bundle, trust, tmp_path):
    with pytest.raises(BundleError, match="over the 100 limit"):
        read_bundle(make_tiny_bundle("1"), tmp_path / "out", trust, max_member_bytes=100)


def test_truncated_bundle_is_refused(make_tiny_bundle, trust, tmp_path):
    data = make_tiny_bundle("1").read_bytes()
    cut = tmp_path / "cut.bundle"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or corrupt|not a readable"):
        read_bundle(cut, tmp_path / "out", trust)
    assert not (tmp_path / "out").exists()


def test_not_a_bundle_at_all(trust, tmp_path):
    junk = tmp_path / "junk.bundle"
    junk.write_bytes(b"PK\x03\x04 definitely not a tar" * 10)
    with pytest.raises(BundleError, match="not a readable bundle"):
        read_bundle(junk, tmp_path / "out", trust)


def test_unlisted_and_missing_members_are_refused(make_tiny_bundle, trust, tmp_path):
    files = members(make_tiny_bundle("1"))
    with pytest.raises(BundleError, match="does not list"):
        read_bundle(
            write_tar(tmp_path / "extra.bundle", {**files, "extra.bin": b"1"}),
            tmp_path / "o1",
            trust,
        )
    del files["selftest.npz"]
    with pytest.raises(BundleError, match="lacks files"):
        read_bundle(write_tar(tmp_path / "missing.bundle", files), tmp_path / "o2", trust)


@pytest.mark.parametrize("kind", sorted(MALFORMED_SIGNATURES))
def test_malformed_signature_documents_are_signature_errors(
    make_tiny_bundle, trust, tmp_path, kind
):
    """Whatever manifest.sig holds, the answer is a SignatureError (a 400), never a
    TypeError or RecursionError (a 500)."""
    files = members(make_tiny_bundle("1"))
    files["manifest.sig"] = MALFORMED_SIGNATURES[kind]
    bad = write_tar(tmp_path / "b.bundle", files)
    with pytest.raises(SignatureError, match="manifest.sig"):
        read_bundle(bad, tmp_path / "out", trust)
    with pytest.raises(SignatureError, match="manifest.sig"):
        trust.verify(files["manifest.json"], MALFORMED_SIGNATURES[kind])


def test_signature_of_the_wrong_length_is_refused(make_tiny_bundle, trust, keys):
    files = members(make_tiny_bundle("1"))
    doc = json.loads(files["manifest.sig"])
    for sig in ("", "AAAA", "not base64!", "A" * 200):
        forged = json.dumps({**doc, "signature": sig}).encode()
        with pytest.raises(SignatureError):
            trust.verify(files["manifest.json"], forged)


def test_the_writer_uses_plain_ustar_headers(make_tiny_bundle, keys, tmp_path):
    """No pax, GNU long-name or sparse header: the readers refuse those outright or
    bound them (docs/bundle-format.md), and a bundle must never depend on them."""
    bundle = make_tiny_bundle("1")
    resigned = tmp_path / "resigned.bundle"
    resign_bundle(bundle, load_private_key(keys[0]), resigned)
    for path in (bundle, resigned):
        with tarfile.open(path, "r:*") as tar:
            for m in tar.getmembers():
                assert m.type == tarfile.REGTYPE and not m.pax_headers, (path.name, m.name)
                assert isinstance(m.mtime, int)

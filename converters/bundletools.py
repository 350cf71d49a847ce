"""Sign, verify and inspect bundle files from a workstation or CI.

``verify`` goes through the agent's own ``read_bundle`` (into a throw-away
directory), so a bundle that verifies here is accepted by an agent trusting the
same keys, and a refusal carries the agent's exact message.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.core.backends import create_backend
from edgefleet.core.backends.config import BackendConfig
from edgefleet.core.bundle.archive import (
    DEFAULT_MAX_MEMBER_BYTES,
    MAX_MANIFEST_BYTES,
    parse_manifest,
    read_bundle,
    resign_bundle,
)
from edgefleet.core.bundle.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest
from edgefleet.core.bundle.selftest import run_self_test
from edgefleet.core.bundle.signing import TrustStore, key_id, load_private_key
from edgefleet.core.errors import BundleError


def sign_bundle(bundle: Path, key: Path | Ed25519PrivateKey, out: Path | None = None) -> str:
    """(Re-)sign ``bundle`` with ``key`` (a PEM file or a loaded key); return the key id."""
    private = key if isinstance(key, Ed25519PrivateKey) else load_private_key(key)
    resign_bundle(bundle, private, out or bundle)
    return key_id(private.public_key())


@dataclass(frozen=True)
class VerifyResult:
    manifest: Manifest
    key_id: str | None
    self_test: str | None


def verify_bundle(
    bundle: Path, public_keys: list[Path] | TrustStore, *, self_test: bool = False
) -> VerifyResult:
    """Verify signature, member hashes and form as an agent would; optionally run the
    self-test vectors on this machine. Raises BundleError (or SelfTestError)."""
    trust = (
        public_keys if isinstance(public_keys, TrustStore) else TrustStore.from_files(public_keys)
    )
    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        contents = read_bundle(bundle, Path(tmp) / "bundle", trust, DEFAULT_MAX_MEMBER_BYTES)
        summary = None
        if self_test:
            manifest = contents.manifest
            backend = create_backend(
                contents.directory / manifest.model_file, manifest, BackendConfig()
            )
            backend.load()
            try:
                summary = run_self_test(backend, manifest, contents.directory)
            finally:
                backend.unload()
    return VerifyResult(contents.manifest, contents.signed_by, summary)


def read_manifest_unverified(bundle: Path) -> tuple[Manifest, str | None]:
    """The manifest and the signer's key id as the bundle claims them, without any key.

    For display only: nothing here proves who made the bundle (``verify_bundle`` does).
    """
    try:
        with tarfile.open(bundle, "r:*") as tar:
            manifest_bytes = _member(tar, MANIFEST_NAME)
            sig = _member(tar, SIGNATURE_NAME, required=False)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleError(f"{bundle.name} is not a readable bundle: {exc}") from exc
    assert manifest_bytes is not None
    manifest = parse_manifest(manifest_bytes)
    signer = None
    if sig is not None:
        try:
            signer = str(json.loads(sig)["key_id"])
        except (ValueError, KeyError, TypeError):
            signer = "(malformed signature)"
    return manifest, signer


def _member(tar: tarfile.TarFile, name: str, required: bool = True) -> bytes | None:
    try:
        info = tar.getmember(name)
    except KeyError:
        if required:
            raise BundleError(f"bundle has no {name}") from None
        return None
    if not info.isfile() or info.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{name} in the bundle is not a small regular file")
    f = tar.extractfile(info)
    assert f is not None
    return f.read()


def inspect_bundle(bundle: Path) -> dict[str, Any]:
    """A JSON-able summary of a bundle (unverified; see ``read_manifest_unverified``)."""
    manifest, signer = read_manifest_unverified(bundle)
    return {
        "bundle": str(bundle),
        "bundle_bytes": bundle.stat().st_size,
        "name": manifest.name,
        "version": manifest.version,
        "runtime": manifest.runtime,
        "model_file": manifest.model_file,
        "description": manifest.description,
        "inputs": [t.model_dump() for t in manifest.inputs],
        "outputs": [t.model_dump() for t in manifest.outputs],
        "labels": manifest.labels,
        "task": manifest.task,
        "preprocessing": manifest.preprocessing.model_dump() if manifest.preprocessing else None,
        "postprocessing": manifest.postprocessing.model_dump(),
        "confidence": manifest.confidence.model_dump(),
        "fallback": manifest.fallback.model_dump(),
        "self_test": manifest.self_test.model_dump() if manifest.self_test else None,
        "metrics": manifest.metrics,
        "files": {name: entry.model_dump() for name, entry in manifest.files.items()},
        "signed_by": signer,
        "created_at": manifest.created_at,
        "created_by": manifest.created_by,
    }


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable ``inspect`` output."""

    def tensor(t: dict[str, Any]) -> str:
        return f"{t['name']} {t['datatype']} {t['shape']}"

    labels = info["labels"]
    shown = ", ".join(labels[:12]) + (f", ... ({len(labels)} labels)" if len(labels) > 12 else "")
    lines = [
        f"{info['name']}:{info['version']}  runtime {info['runtime']}  task {info['task']}",
        f"  bundle     {info['bundle']} ({info['bundle_bytes']} bytes)",
        f"  signed by  {info['signed_by'] or '(unsigned)'}  (claimed; `verify` checks it)",
        f"  created    {info['created_at']} by {info['created_by'] or '?'}",
        "  inputs     " + "; ".join(tensor(t) for t in info["inputs"]),
        "  outputs    " + "; ".join(tensor(t) for t in info["outputs"]),
        f"  labels     {shown or '(none)'}",
    ]
    pre = info["preprocessing"]
    if pre:
        lines.append(
            f"  preprocess {pre['width']}x{pre['height']} {pre['color']} {pre['layout']}"
            f" resize {pre['resize']}/{pre['interpolation']} invert {pre['invert']}"
            f" scale {pre['scale']:.6g}"
        )
    fb = info["fallback"]
    lines.append(
        f"  fallback   {fb['mode']} below {fb['threshold']} ({info['confidence']['rule']})"
        f" to {fb['cloud_model'] or '(no cloud model)'}"
    )
    if info["metrics"]:
        lines.append("  metrics")
        lines += [f"    {k:<22} {v}" for k, v in sorted(info["metrics"].items())]
    lines.append("  files")
    lines += [
        f"    {name:<22} {e['size']:>10} bytes  sha256 {e['sha256'][:16]}..."
        for name, e in sorted(info["files"].items())
    ]
    return "\n".join(lines)

"""What every sample-model recipe gets: where to build, what to sign with, which version.

A recipe is a module exposing ``build(ctx: BuildContext) -> list[Path]`` that writes
its bundles into ``ctx.build_dir`` and returns their paths. Layout of a build:

    models/build/
      keys/signing.key, keys/signing.pub   created once, reused by later builds
      keys/cloud.token                     dev bearer token of the cloud endpoint (0600)
      <name>-<version>.bundle              one per model (signed)
      agent.yaml                           an agent config serving every bundle
      cloud.yaml                           the cloud-profile agent (models others fall back to)
      build.json                           which recipe built which bundle
      work/<recipe>/                       intermediate files (fp32/int8 ONNX models)
      digits-test.npz                      held-out digits split (x, y)
    models/.cache/                         downloads, kept across `make clean` of build/
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet.agent.config import parse_config
from edgefleet.core.bundle.signing import generate_keypair, key_id, load_private_key

log = logging.getLogger("models")

MODELS_DIR = Path(__file__).resolve().parent
DEFAULT_BUILD_DIR = MODELS_DIR / "build"
DEFAULT_CACHE_DIR = MODELS_DIR / ".cache"
DEFAULT_VERSION = "1"
KEY_NAME = "signing"
AGENT_CONFIG = "agent.yaml"
CLOUD_CONFIG = "cloud.yaml"
BUILD_STAMP = "build.json"
CLOUD_PORT = 8490
CLOUD_TOKEN = "cloud.token"
EDGE_STORE, CLOUD_STORE = "store", "store-cloud"
# The edge waits this long for the cloud before answering locally (fallback cloud_timeout).
CLOUD_TIMEOUT_MS = 300


class RecipeError(Exception):
    """A recipe cannot produce a correct bundle (the message says which check failed)."""


@dataclass(frozen=True)
class BuildContext:
    build_dir: Path
    cache_dir: Path
    private_key: Ed25519PrivateKey
    private_key_path: Path
    public_key_path: Path
    version: str = DEFAULT_VERSION

    @classmethod
    def create(
        cls,
        build_dir: Path | None = None,
        cache_dir: Path | None = None,
        version: str = DEFAULT_VERSION,
    ) -> BuildContext:
        """A context for ``build_dir`` (default models/build), with its keys made or reused."""
        build_dir = (build_dir or DEFAULT_BUILD_DIR).resolve()
        cache_dir = (cache_dir or DEFAULT_CACHE_DIR).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
        priv, pub = ensure_keys(build_dir / "keys")
        return cls(build_dir, cache_dir, load_private_key(priv), priv, pub, version)

    def bundle_path(self, name: str) -> Path:
        return self.build_dir / f"{name}-{self.version}.bundle"

    def work_dir(self, recipe: str) -> Path:
        """Scratch space for one recipe's intermediate files, kept for inspection."""
        path = self.build_dir / "work" / recipe
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def key_id(self) -> str:
        return key_id(self.private_key.public_key())


def ensure_keys(directory: Path, name: str = KEY_NAME) -> tuple[Path, Path]:
    """``NAME.key``/``NAME.pub`` in ``directory``: reused if present, else created.

    Only one of the two present means someone deleted a key by hand; replacing the
    other silently would orphan every bundle signed before, so that is an error.
    """
    priv, pub = directory / f"{name}.key", directory / f"{name}.pub"
    if priv.exists() and pub.exists():
        return priv, pub
    if priv.exists() or pub.exists():
        missing = pub if priv.exists() else priv
        raise RecipeError(f"{missing} is missing but its pair exists; restore it or remove both")
    log.info("creating signing key pair in %s", directory)
    return generate_keypair(directory, name)


def ensure_token(path: Path) -> Path:
    """A random bearer token in ``path`` (mode 0600), created once and then reused."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    log.info("created the cloud endpoint's development token %s", path)
    return path


def _rel(path: Path, base: Path) -> str:
    """Relative to the config file when inside the build, so the build can be moved."""
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def write_agent_configs(ctx: BuildContext, bundles: Iterable[Path]) -> list[Path]:
    """Write ``agent.yaml`` (every edge bundle, label stable) and ``cloud.yaml``.

    ``cloud.yaml`` is the cloud-profile agent on port 8490 serving the models other
    bundles name as ``fallback.cloud_model``; it is written only when there are some,
    and then ``agent.yaml``'s fallback points at it with the shared development token
    ``keys/cloud.token``. Both are checked with the agent's own config parser before
    they are written.
    """
    from edgefleet.converters.bundletools import read_manifest_unverified

    bundles = sorted(set(bundles))
    manifests = {b: read_manifest_unverified(b)[0] for b in bundles}
    # The stores of an earlier build hold the old bundles' versions, which the new
    # bundles (same version, new signature and date) may not replace: versions are
    # immutable. A build directory's stores are derived from its bundles: start over.
    for store in (EDGE_STORE, CLOUD_STORE):
        shutil.rmtree(ctx.build_dir / store, ignore_errors=True)
    cloud_names = {m.fallback.cloud_model for m in manifests.values() if m.fallback.cloud_model}
    base = ctx.build_dir
    common: dict[str, Any] = {"trust": {"public_keys": [_rel(ctx.public_key_path, base)]}}
    cloud_bundles = [b for b in bundles if manifests[b].name in cloud_names]
    token = ensure_token(ctx.build_dir / "keys" / CLOUD_TOKEN) if cloud_bundles else None
    # Cloud models (digits-cloud) belong to the cloud endpoint, not to a store PC.
    edge = {
        "store": {"path": EDGE_STORE},
        **common,
        "models": [
            {"bundle": _rel(b, base), "labels": ["stable"]}
            for b in bundles
            if b not in cloud_bundles
        ],
    }
    if token is not None:
        # Unsure answers go to the cloud-profile agent of cloud.yaml (edge-agent demo
        # starts it too); when it is not running they are answered locally (offline).
        edge["fallback"] = {
            "cloud": {
                "url": f"http://127.0.0.1:{CLOUD_PORT}",
                "token_file": _rel(token, base),
                "timeout_ms": CLOUD_TIMEOUT_MS,
            }
        }
    written = [_write_config(base / AGENT_CONFIG, edge, "edge agent: the edge sample bundles")]
    if cloud_bundles:
        assert token is not None
        cloud = {
            "profile": "cloud",
            # The cloud profile binds 0.0.0.0 by default; this development build stays
            # on loopback. A real cloud host drops `host` and sets tls_cert_file/tls_key_file.
            "server": {
                "host": "127.0.0.1",
                "port": CLOUD_PORT,
                "auth_token_file": _rel(token, base),
            },
            "store": {"path": CLOUD_STORE},
            **common,
            "models": [{"bundle": _rel(b, base), "labels": ["stable"]} for b in cloud_bundles],
        }
        written.append(
            _write_config(
                base / CLOUD_CONFIG,
                cloud,
                "cloud-profile agent (the cloud endpoint agent.yaml falls back to), on loopback"
                " for development; on a cloud host drop server.host (0.0.0.0) and set"
                " server.tls_cert_file/tls_key_file",
            )
        )
    else:
        (base / CLOUD_CONFIG).unlink(missing_ok=True)  # no stale cloud config from a past build
    return written


def _write_config(path: Path, doc: Mapping[str, Any], what: str) -> Path:
    text = (
        f"# {what}. Generated by `python -m models`; paths are relative to this file.\n"
        + yaml.safe_dump(dict(doc), sort_keys=False)
    )
    parse_config(text, str(path), base=path.parent)  # refuse to write what the agent rejects
    path.write_text(text, encoding="utf-8")
    log.info("wrote %s", path)
    return path


def read_stamp(build_dir: Path) -> dict[str, Any]:
    """``build.json``: {"version": str, "key_id": str, "recipes": {name: [bundle file names]}}."""
    try:
        doc = json.loads((build_dir / BUILD_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def write_stamp(ctx: BuildContext, recipes: Mapping[str, list[Path]]) -> Path:
    doc = {
        "version": ctx.version,
        "key_id": ctx.key_id,
        "recipes": {
            name: sorted(_rel(p, ctx.build_dir) for p in paths)
            for name, paths in sorted(recipes.items())
        },
    }
    path = ctx.build_dir / BUILD_STAMP
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path

"""The on-disk model store: installed versions per model, and which one is active.

Layout::

    <root>/<model>/<version>/     an extracted, verified bundle (manifest.json, model, ...)
    <root>/<model>/state.json     active / previous version, labels, install order
    <root>/.incoming/             bundles being extracted (renamed into place when verified)

Every write is a temp file + fsync + rename, so a power cut leaves either the old
or the new state, never half of one. All methods are blocking: call them from a
worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgefleet.core.bundle.archive import (
    DEFAULT_MAX_MEMBER_BYTES,
    parse_manifest,
    peek_manifest,
    read_bundle,
)
from edgefleet.core.bundle.manifest import MANIFEST_NAME, Manifest, check_name
from edgefleet.core.bundle.signing import TrustStore
from edgefleet.core.durable import atomic_write
from edgefleet.core.errors import BundleError, NotFound

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass
class ModelState:
    active: str | None = None
    previous: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    installed: list[str] = field(default_factory=list)  # oldest first
    last_error: str | None = None

    def pinned(self) -> set[str]:
        """Versions that must not be pruned."""
        keep = {v for v in (self.active, self.previous) if v}
        return keep | set(self.labels.values())


class ModelStore:
    def __init__(
        self,
        root: Path,
        trust: TrustStore,
        keep_versions: int = 3,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ) -> None:
        self.root = root
        self.trust = trust
        self.keep_versions = keep_versions
        self.max_member_bytes = max_member_bytes
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of an extraction a power cut interrupted.
        shutil.rmtree(root / ".incoming", ignore_errors=True)

    def model_names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def _model_dir(self, name: str) -> Path:
        try:
            check_name(name, "model name")
        except ValueError as exc:
            raise NotFound(str(exc)) from exc
        return self.root / name

    def version_dir(self, name: str, version: str) -> Path:
        try:
            check_name(version, "version")
        except ValueError as exc:
            raise NotFound(str(exc)) from exc
        path = self._model_dir(name) / version
        if not (path / MANIFEST_NAME).is_file():
            raise NotFound(f"model {name!r} has no installed version {version!r}")
        return path

    def manifest(self, name: str, version: str) -> Manifest:
        return parse_manifest((self.version_dir(name, version) / MANIFEST_NAME).read_bytes())

    def state(self, name: str) -> ModelState:
        path = self._model_dir(name) / STATE_FILE
        if not path.is_file():
            if not path.parent.is_dir():
                raise NotFound(f"unknown model {name!r}")
            return ModelState()
        try:
            return ModelState(**json.loads(path.read_bytes()))
        except (ValueError, TypeError) as exc:
            # Cannot happen with atomic writes unless the disk lies; start clean
            # rather than refuse to serve, and say so.
            log.error("state of %s unreadable (%s); rebuilding from installed versions", name, exc)
            return ModelState(installed=self._installed_on_disk(name))

    def save_state(self, name: str, state: ModelState) -> None:
        atomic_write(
            self._model_dir(name) / STATE_FILE,
            json.dumps(asdict(state), indent=2, sort_keys=True).encode(),
        )

    def _installed_on_disk(self, name: str) -> list[str]:
        d = self._model_dir(name)
        return sorted(
            (p.name for p in d.iterdir() if (p / MANIFEST_NAME).is_file()),
            key=lambda v: (d / v).stat().st_mtime,
        )

    def install(self, bundle: Path) -> Manifest:
        """Verify and extract ``bundle``; a version already installed is left as is.

        Installing never changes what is active: that is ``activate``'s business.
        """
        # On every boot the configured bundles are installed again: recognise a
        # version already here by its manifest (the installed copy was verified when
        # it arrived) instead of extracting and hashing the whole bundle again.
        peeked = peek_manifest(bundle)
        claimed = parse_manifest(peeked)
        installed = self.root / claimed.name / claimed.version / MANIFEST_NAME
        if installed.is_file() and installed.read_bytes() == peeked:
            return claimed
        incoming = self.root / ".incoming" / uuid.uuid4().hex
        contents = read_bundle(bundle, incoming, self.trust, self.max_member_bytes)
        manifest = contents.manifest
        try:
            model_dir = self._model_dir(manifest.name)
            model_dir.mkdir(exist_ok=True)
            dest = model_dir / manifest.version
            if dest.exists():
                existing = (dest / MANIFEST_NAME).read_bytes()
                if existing != (incoming / MANIFEST_NAME).read_bytes():
                    raise BundleError(
                        f"{manifest.name} version {manifest.version} is already installed"
                        " with different contents; versions are immutable"
                    )
                return manifest
            os.rename(incoming, dest)
            state = self.state(manifest.name)
            if manifest.version not in state.installed:
                state.installed.append(manifest.version)
            self.save_state(manifest.name, state)
            log.info(
                "installed %s:%s (signed by %s)",
                manifest.name,
                manifest.version,
                contents.signed_by or "nobody: unsigned",
            )
            return manifest
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def prune(self, name: str) -> list[str]:
        """Delete the oldest versions past ``keep_versions``, never a pinned one."""
        state = self.state(name)
        pinned = state.pinned()
        removable = [v for v in state.installed if v not in pinned]
        excess = len(state.installed) - self.keep_versions
        doomed = removable[: max(0, excess)]
        if not doomed:
            return []
        state.installed = [v for v in state.installed if v not in doomed]
        self.save_state(
            name, state
        )  # state first: a crash leaves an orphan dir, not a dangling entry
        for v in doomed:
            shutil.rmtree(self._model_dir(name) / v, ignore_errors=True)
        log.info("pruned %s versions %s", name, doomed)
        return doomed

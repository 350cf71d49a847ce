"""The on-disk model store: installed versions per model, and which one is active.

Layout::

    <root>/<model>/<version>/     an extracted, verified bundle (manifest.json, model, ...)
    <root>/<model>/.state.json    active / previous version, labels, install order
    <root>/.incoming/             bundles being extracted (renamed into place when verified)
    <root>/.uploads/              bundles being received by the local API (admin.py)

Store metadata lives under dot-names, which no model or version name can take
(core/names.py), so a version named ``state.json`` is just a version. A store written
before that (``<model>/state.json``) is migrated when the store opens.

Every write is a temp file + fsync + rename, so a power cut leaves either the old
or the new state, never half of one. What a crash can leave behind is cleaned when
the store opens: half-extracted bundles, half-received uploads, and version
directories no state lists (a kill during pruning, which forgets a version before it
deletes its files, or during an install, which writes the files before the state).

All methods are blocking: call them from a worker thread. Those that change the store
hold one lock, so an install never mistakes another's just-renamed version for an
orphan.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgefleet.core.bundle.archive import (
    DEFAULT_MAX_MEMBER_BYTES,
    parse_manifest,
    peek_manifest,
    read_bundle,
)
from edgefleet.core.bundle.manifest import MANIFEST_NAME, Manifest
from edgefleet.core.bundle.signing import TrustStore
from edgefleet.core.durable import atomic_write, fsync_dir
from edgefleet.core.errors import BundleError, NotFound
from edgefleet.core.names import InvalidName, check_model_name, check_version, is_name

log = logging.getLogger(__name__)

STATE_FILE = ".state.json"
LEGACY_STATE_FILE = "state.json"  # before the store kept its metadata under dot-names
INCOMING_DIR = ".incoming"
UPLOADS_DIR = ".uploads"


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

    def known(self) -> set[str]:
        """Every version the state refers to: its directory is no orphan."""
        return set(self.installed) | self.pinned()


class ModelStore:
    def __init__(
        self,
        root: Path,
        trust: TrustStore,
        keep_versions: int = 3,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ) -> None:
        """Open (create) the store at ``root``: migrate an old layout, clean what a
        crash left behind. Blocking; runs before the agent serves."""
        self.root = root
        self.trust = trust
        self.keep_versions = keep_versions
        self.max_member_bytes = max_member_bytes
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of an extraction or an upload a crash interrupted.
        shutil.rmtree(root / INCOMING_DIR, ignore_errors=True)
        shutil.rmtree(root / UPLOADS_DIR, ignore_errors=True)
        for name in self.model_names():
            self._migrate_state(name)
            self._remove_orphans(name)

    def model_names(self) -> list[str]:
        """Models in the store: its directories named like a model (dot-names are the
        store's own; anything else was not made by the store and is ignored)."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_name(p.name))

    def _model_dir(self, name: str) -> Path:
        try:
            check_model_name(name)
        except InvalidName as exc:
            raise NotFound(exc.message) from exc
        return self.root / name

    def version_dir(self, name: str, version: str) -> Path:
        try:
            check_version(version)
        except InvalidName as exc:
            raise NotFound(exc.message) from exc
        path = self._model_dir(name) / version
        if not (path / MANIFEST_NAME).is_file():
            raise NotFound(f"model {name!r} has no installed version {version!r}")
        return path

    def manifest(self, name: str, version: str) -> Manifest:
        return parse_manifest((self.version_dir(name, version) / MANIFEST_NAME).read_bytes())

    def state(self, name: str) -> ModelState:
        state = self._read_state(name)
        if state is None:
            # Cannot happen with atomic writes unless the disk lies; start clean
            # rather than refuse to serve (the error was logged).
            return ModelState(installed=self._installed_on_disk(name))
        return state

    def _read_state(self, name: str) -> ModelState | None:
        """The model's state; empty when it has none yet, None when it is unreadable."""
        path = self._model_dir(name) / STATE_FILE
        if not path.is_file():
            if not path.parent.is_dir():
                raise NotFound(f"unknown model {name!r}")
            return ModelState()
        try:
            return ModelState(**json.loads(path.read_bytes()))
        except (ValueError, TypeError) as exc:
            log.error("state of %s unreadable (%s); rebuilding from installed versions", name, exc)
            return None

    def _migrate_state(self, name: str) -> None:
        """``<model>/state.json`` (the old layout) becomes ``<model>/.state.json``."""
        d = self._model_dir(name)
        legacy, current = d / LEGACY_STATE_FILE, d / STATE_FILE
        if not legacy.is_file() or legacy.is_symlink():
            return  # none, or already a version directory named state.json
        if current.exists():
            legacy.unlink()  # a migration cut short after its rename: the copy is stale
        else:
            os.rename(legacy, current)
            log.info("model store: moved %s/%s to %s", name, LEGACY_STATE_FILE, STATE_FILE)
        fsync_dir(d)

    def _remove_orphans(self, name: str) -> None:
        """Delete version directories the state does not list (crash leftovers)."""
        state = self._read_state(name)
        if state is None:
            return  # unreadable state: every version on disk is kept (see state())
        known = state.known()
        d = self._model_dir(name)
        for child in sorted(d.iterdir()):
            if child.name.startswith(".") or not child.is_dir() or child.name in known:
                continue
            log.warning(
                "model store: removing %s/%s, a version no state lists"
                " (left by an interrupted install or prune)",
                name,
                child.name,
            )
            shutil.rmtree(child)

    def save_state(self, name: str, state: ModelState) -> None:
        with self._lock:
            self._save_state(name, state)

    def _save_state(self, name: str, state: ModelState) -> None:
        atomic_write(
            self._model_dir(name) / STATE_FILE,
            json.dumps(asdict(state), indent=2, sort_keys=True).encode(),
        )

    def _installed_on_disk(self, name: str) -> list[str]:
        d = self._model_dir(name)
        return sorted(
            (
                p.name
                for p in d.iterdir()
                if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
            ),
            key=lambda v: (d / v).stat().st_mtime,
        )

    def install(self, bundle: Path) -> Manifest:
        """Verify and extract ``bundle``; a version already installed is left as is.

        Installing never changes what is active: that is ``activate``'s business. When
        this returns, the version is on disk whole and listed in the model's state: a
        directory of the same version that the state does not list (an orphan a crash
        left, maybe half-deleted) is replaced, never taken for the installed version.
        """
        # On every boot the configured bundles are installed again: recognise a
        # version already here by its manifest (the installed copy was verified when
        # it arrived) instead of extracting and hashing the whole bundle again.
        peeked = peek_manifest(bundle)
        claimed = parse_manifest(peeked)
        if self._is_installed(claimed.name, claimed.version, peeked):
            return claimed
        incoming = self.root / INCOMING_DIR / uuid.uuid4().hex
        contents = read_bundle(bundle, incoming, self.trust, self.max_member_bytes)
        manifest = contents.manifest
        try:
            with self._lock:
                self._commit(manifest, incoming)
            log.info(
                "installed %s:%s (signed by %s)",
                manifest.name,
                manifest.version,
                contents.signed_by or "nobody: unsigned",
            )
            return manifest
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def _is_installed(self, name: str, version: str, manifest_bytes: bytes) -> bool:
        """The version is listed in the state and its manifest is ``manifest_bytes``."""
        installed = self.root / name / version / MANIFEST_NAME
        if not installed.is_file() or installed.read_bytes() != manifest_bytes:
            return False
        with self._lock:
            state = self._read_state(name)
        return state is not None and version in state.installed

    def _commit(self, manifest: Manifest, incoming: Path) -> None:
        """Move a verified extraction into place and list it (under the lock)."""
        name, version = manifest.name, manifest.version
        model_dir = self._model_dir(name)
        model_dir.mkdir(exist_ok=True)
        dest = model_dir / version
        state = self.state(name)
        if dest.exists():
            if version in state.installed:
                existing = (dest / MANIFEST_NAME).read_bytes()
                if existing != (incoming / MANIFEST_NAME).read_bytes():
                    raise BundleError(
                        f"{name} version {version} is already installed"
                        " with different contents; versions are immutable"
                    )
                return
            log.warning("model store: replacing %s/%s, a version no state lists", name, version)
            shutil.rmtree(dest)
        os.rename(incoming, dest)
        fsync_dir(model_dir)
        if version not in state.installed:
            state.installed.append(version)
        self._save_state(name, state)

    def prune(self, name: str) -> list[str]:
        """Delete the oldest versions past ``keep_versions``, never a pinned one."""
        with self._lock:
            state = self.state(name)
            pinned = state.pinned()
            removable = [v for v in state.installed if v not in pinned]
            excess = len(state.installed) - self.keep_versions
            doomed = removable[: max(0, excess)]
            if not doomed:
                return []
            state.installed = [v for v in state.installed if v not in doomed]
            # State first: a crash in between leaves an orphan directory (removed when
            # the store next opens, or replaced by a new install), never a listed
            # version with half its files.
            self._save_state(name, state)
            for v in doomed:
                shutil.rmtree(self._model_dir(name) / v, ignore_errors=True)
        log.info("pruned %s versions %s", name, doomed)
        return doomed

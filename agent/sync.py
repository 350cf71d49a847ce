"""The agent's desired-state sync: ``desired`` → download → verify → activate → ``reported``.

Contract: docs/fleet.md; the messages are core/protocol.py's ``Desired``,
``Command`` (received), ``Reported`` and ``Event`` (sent). One
:class:`DesiredStateSync` per agent with a ``fleet`` section, started and stopped by
:class:`edgefleet.agent.fleet_link.FleetConnection`.

- **Inputs.** The retained ``desired`` of this device and its ``commands``. Both
  are validated strictly by the protocol models (schema, types, sizes, names);
  anything else is logged, counted (``SyncStats.refused`` by reason, e.g.
  ``newer_schema`` for a fleet upgraded first) and dropped without touching the rest.
- **One worker.** Desired states are applied one at a time by a single task. A
  newer one that arrives meanwhile waits; only the newest waiting one is kept (an
  intermediate state nobody wants any more is never applied).
- **Revisions.** A desired state is applied only if its revision is greater than
  the last one processed (or by a ``resync`` command). Revisions are at most
  ``MAX_REVISION`` (2^53 - 1: exact in every JSON reader). A ``resync`` carries the
  fleet's current revision for this device; a processed revision *ahead* of it
  (a ``desired`` the fleet never sent, or a fleet restored from an older backup)
  is rewound to just below it, so the fleet's document applies again instead of
  every later one being ignored for good. The processed revision and
  the per-model results are written to a small JSON state file *after* the revision
  is processed, atomically. A crash or SIGKILL mid-download or mid-activation leaves
  the old revision there, so after a restart the retained ``desired`` (delivered
  again on subscribe) is applied again; the download resumes from its ``.part``
  file, and a version that got installed meanwhile is not downloaded again.
- **Per model.** ``downloading`` → ``verifying`` (size, sha256, then the store's
  signature and per-file hash checks) → ``activating`` (the registry loads and
  self-tests the new version while the old one serves, then swaps) → ``active``;
  any failure leaves the old version serving, sets ``failed`` + ``last_error`` and
  emits a ``*_failed`` event. Labels are applied after a successful activation.
- **Outputs.** ``reported`` (retained) after every state change and on every
  (re)connect; events on ``events`` when connected *and* in the outbox as HIGH
  records (the history survives being offline; the fleet dedups by event id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from edgefleet.agent.cloud.policy import FallbackPolicy
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.download import (
    BundleDownloader,
    BundleSpec,
    Credentials,
    CredentialScope,
    DownloadError,
    DownloadIntegrityError,
    basic_auth,
)
from edgefleet.agent.mqtt_link import MqttLink
from edgefleet.agent.outbox import Outbox, OutboxClosed, Priority, new_record_id
from edgefleet.agent.serving_registry import ModelRegistry
from edgefleet.core import protocol
from edgefleet.core.bundle.archive import parse_manifest, peek_manifest
from edgefleet.core.bundle.manifest import Manifest
from edgefleet.core.durable import atomic_write
from edgefleet.core.errors import BundleError, EdgeError, NotFound
from edgefleet.core.mqtt import topics
from edgefleet.core.mqtt.errors import LinkError
from edgefleet.core.mqtt.messages import Message, Subscription
from edgefleet.core.protocol import (
    MAX_REASON_CHARS,
    MAX_REVISION,
    Command,
    Desired,
    DesiredModel,
    DesiredShadow,
    DesiredSplit,
    Event,
    FallbackEffective,
    FleetFallback,
    Reported,
    ReportedModel,
    ReportedShadow,
    ReportedSplit,
    SyncState,
)

log = logging.getLogger(__name__)

_RECENT_DESIRED = 8  # received documents kept by revision, for a resync to find
# The state file's own format (not a wire message: it never leaves the device).
STATE_FILE_SCHEMA = 1


# ---------------------------------------------------------------------- payloads


def parse_desired(payload: bytes, device_id: str) -> Desired:
    """A validated ``desired`` for this device (core/protocol.py); ``WireError`` (a
    ValueError) with the reason counter key and a one-line detail otherwise."""
    return protocol.decode(
        Desired, payload, max_bytes=protocol.MAX_BYTES[topics.DESIRED], device_id=device_id
    )


def parse_command(payload: bytes) -> Command:
    """A validated ``commands`` message; ``WireError`` (a ValueError) otherwise."""
    return protocol.decode(Command, payload, max_bytes=protocol.MAX_BYTES[topics.COMMANDS])


def _short(reason: str) -> str:
    line = " ".join(reason.split())
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 1] + "…"


# ----------------------------------------------------------------- local state


@dataclass
class ModelSync:
    """What the sync knows about one managed model (the ``reported`` fields it owns)."""

    desired: str
    state: SyncState
    last_error: str | None = None
    rollout: str | None = None
    # Issue 11: the fleet's shadow candidate and split (core.protocol.DesiredShadow /
    # DesiredSplit as JSON) and how far the device got with them. Kept in the state
    # file, so they are set up again after a restart.
    shadow: dict[str, Any] | None = None
    shadow_state: str | None = None
    shadow_error: str | None = None
    split: dict[str, Any] | None = None
    split_state: str | None = None
    split_error: str | None = None
    # The fleet's fallback policy (core.protocol.FleetFallback as JSON): kept in the
    # state file, so it applies again after a restart (the retained desired is then
    # not applied again: its revision was processed).
    fallback: dict[str, Any] | None = None


@dataclass
class SyncStats:
    desired_received: int = 0
    desired_bad: int = 0  # not a valid desired for this device (core/protocol.py): ignored
    desired_stale: int = 0  # revision not newer than the last processed (or pending)
    desired_superseded: int = 0  # a newer one arrived before the worker took it
    revisions_processed: int = 0
    commands_received: int = 0
    commands_bad: int = 0
    reported_published: int = 0
    events: int = 0
    rewinds: int = 0  # resyncs that found the processed revision ahead of the fleet's
    # Refused desired/commands by protocol reason (newer_schema, invalid, not_json...).
    refused: dict[str, int] = field(default_factory=dict)


@dataclass
class _Job:
    desired: Desired | None
    force: bool = False  # a resync: apply even if the revision was processed
    # A resync naming the fleet's current revision: first rewind a processed revision
    # ahead of it, then apply that revision's document if it was received.
    rewind_to: int | None = None


def _load_state(path: Path) -> tuple[int, dict[str, ModelSync]]:
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return 0, {}
    except (OSError, ValueError) as exc:
        # Atomic writes make this a lying disk; starting from revision 0 re-applies the
        # retained desired, which is harmless (active versions are skipped).
        log.error("sync state %s unreadable (%s); starting from revision 0", path, exc)
        return 0, {}
    try:
        models = {n: ModelSync(**m) for n, m in raw.get("models", {}).items()}
        revision = raw["revision"]
        if type(revision) is not int or not 0 <= revision <= MAX_REVISION:
            raise ValueError(f"revision {revision!r} is not an integer in 0..{MAX_REVISION}")
        return revision, models
    except (KeyError, TypeError, ValueError) as exc:
        log.error("sync state %s malformed (%s); starting from revision 0", path, exc)
        return 0, {}


def _save_state(path: Path, revision: int, models: dict[str, ModelSync]) -> None:
    doc = {
        "schema": STATE_FILE_SCHEMA,
        "revision": revision,
        "models": {n: asdict(m) for n, m in models.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=2, sort_keys=True).encode())


def _check_bundle(path: Path, name: str, version: str) -> None:
    """Refuse a bundle that is not the promised model/version before installing it.

    The manifest is only peeked here (unverified); ``registry.install`` verifies it.
    A validly signed bundle of another model must not get installed by a desired
    entry for this one.
    """
    manifest = parse_manifest(peek_manifest(path))
    if (manifest.name, manifest.version) != (name, version):
        raise BundleError(
            f"bundle holds {manifest.name}:{manifest.version}, desired is {name}:{version}"
        )


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def report_accelerators(found: dict[str, Any]) -> dict[str, list[str]]:
    """``{"onnx": [providers], "litert": [...]}`` for ``reported`` from registry.accelerators."""
    onnx = found.get("onnx") or {}
    litert = found.get("litert") or {}
    lite: list[str] = []
    if litert.get("package") and litert.get("xnnpack"):
        lite.append("xnnpack")
    lite += [str(r["library"]) for r in litert.get("delegates", []) if r.get("found")]
    return {"onnx": list(onnx.get("available", [])), "litert": lite}


# ------------------------------------------------------------------------ sync


class FallbackPolicies(Protocol):
    """Where fleet fallback policies go (the cloud router, agent/cloud/router.py)."""

    def set_fleet_policy(self, model: str, policy: FleetFallback | None) -> bool: ...

    def policy(self, manifest: Manifest) -> FallbackPolicy: ...


class DesiredStateSync:
    def __init__(
        self,
        config: AgentConfig,
        link: MqttLink,
        outbox: Outbox,
        registry: ModelRegistry,
        *,
        agent_version: str = "",
    ) -> None:
        if config.fleet is None or config.device_id is None:
            raise ValueError("the sync needs the fleet section and a device_id")
        self.fleet_config = config.fleet
        sync = config.fleet.sync
        self.device_id = config.device_id
        self.link = link
        self.outbox = outbox
        self.registry = registry
        self.agent_version = agent_version
        self.download_dir = sync.download_dir or config.store.path / ".downloads"
        self.state_file = sync.state_file or config.store.path / ".sync-state.json"
        self.downloader = BundleDownloader(
            self.download_dir,
            timeout_s=sync.download_timeout_s,
            max_bytes=sync.max_bundle_bytes,
            retry_min_s=sync.retry_min_s,
            retry_max_s=sync.retry_max_s,
            attempts=sync.download_attempts,
            ca_file=sync.ca_file,
        )
        self.desired_topic = topics.device_topic(self.device_id, topics.DESIRED)
        self.commands_topic = topics.device_topic(self.device_id, topics.COMMANDS)
        self.reported_topic = topics.device_topic(self.device_id, topics.REPORTED)
        self.events_topic = topics.device_topic(self.device_id, topics.EVENTS)
        self.stats = SyncStats()
        self.revision = 0  # last processed
        self.models: dict[str, ModelSync] = {}
        self.last_desired: Desired | None = None  # newest valid one received
        self._received: dict[int, Desired] = {}  # the last few, by revision
        self.applying: int | None = None  # revision the worker is on
        self._pending: _Job | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._subs: list[Subscription] = []
        self._worker: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        # The cloud router, set by the app (agent/server/app.py) before start(): fleet
        # fallback policies are applied there and reported from there.
        self.policies: FallbackPolicies | None = None
        # A split set or ended locally (PUT /v1/models/{m}/split) is reported at once.
        registry.split_listeners.append(lambda name: self._publish_reported())

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load the state file and subscribe. Call before ``link.start()``, so the very
        first connect already subscribes (and gets the retained ``desired``)."""
        if self._worker is not None:
            raise RuntimeError("sync already started")
        self.revision, self.models = await asyncio.to_thread(_load_state, self.state_file)
        for name, entry in self.models.items():
            self._set_policy(name, entry.fallback)
        cfg = self.fleet_config
        password = await asyncio.to_thread(cfg.secret)
        # HTTP Basic device_id:secret, the same secret as the MQTT login (docs/fleet.md),
        # for the enrolled fleet's origin only (agent/download.py, CredentialScope).
        scope = CredentialScope.for_fleet(cfg.sync.fleet_url, cfg.host)
        if cfg.sync.fleet_url is None and password is not None:
            log.warning(
                "fleet.sync.fleet_url is not set (a config from before edge-agent enroll"
                " recorded it): bundle downloads send the device credentials only to"
                " https://%s (any port); run edge-agent enroll again or set it",
                cfg.host,
            )
        self.downloader.credentials = (
            Credentials(basic_auth(self.device_id, password), scope)
            if password is not None
            else None
        )
        await self.downloader.open()
        self._subs.append(await self.link.subscribe(self.desired_topic, self._on_desired))
        self._subs.append(await self.link.subscribe(self.commands_topic, self._on_command))
        self._worker = asyncio.create_task(self._run(), name="sync-worker")
        log.info(
            "fleet sync: last processed revision %d, downloads in %s",
            self.revision,
            self.download_dir,
        )

    def link_started(self) -> None:
        """Call after ``link.start()``: publish ``reported`` on every (re)connect."""
        if self._watcher is None and self._worker is not None:
            self._watcher = asyncio.create_task(self._watch_link(), name="sync-link-watch")

    async def stop(self) -> None:
        """Idempotent. A download in progress stops; its ``.part`` stays for next time."""
        tasks = [t for t in (self._worker, self._watcher) if t is not None]
        self._worker = self._watcher = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await self.link.unsubscribe(sub)
        self._subs.clear()
        await self.downloader.close()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Until nothing is being applied or waiting (for tests and the local API)."""
        while not (self._idle.is_set() and self._pending is None):
            await self._idle.wait()
            await asyncio.sleep(0)

    def describe(self) -> dict[str, Any]:
        """The sync's state for the local API (``GET /v1/fleet``)."""
        return {
            "revision": self.revision,
            "applying": self.applying,
            "pending": self._pending.desired.revision
            if self._pending is not None and self._pending.desired is not None
            else None,
            "models": {n: asdict(m) for n, m in self.models.items()},
            "state_file": str(self.state_file),
            "download_dir": str(self.download_dir),
            "stats": asdict(self.stats),
            "downloads": asdict(self.downloader.stats),
        }

    # ------------------------------------------------------------------ inputs

    async def _on_desired(self, msg: Message) -> None:
        # The link's delivery task for ``desired``: validate and queue, never apply
        # here (a slow download would hold up the next message's validation).
        self.stats.desired_received += 1
        try:
            desired = parse_desired(msg.payload, self.device_id)
        except protocol.WireError as exc:
            self.stats.desired_bad += 1
            self._refused(exc)
            log.warning("ignored a desired state (%s): %s", exc.reason, exc.detail)
            return
        if self.last_desired is None or desired.revision >= self.last_desired.revision:
            # Kept even when already processed: a resync re-applies it.
            self.last_desired = desired
        self._received.pop(desired.revision, None)
        self._received[desired.revision] = desired
        while len(self._received) > _RECENT_DESIRED:
            del self._received[next(iter(self._received))]
        pending = self._pending.desired if self._pending is not None else None
        newest_seen = max(
            self.revision,
            self.applying or 0,
            pending.revision if pending is not None else 0,
        )
        if desired.revision <= newest_seen:
            # The retained desired comes back on every (re)connect: that is this case.
            self.stats.desired_stale += 1
            log.debug("desired revision %d not newer than %d", desired.revision, newest_seen)
            return
        self._queue(_Job(desired))

    def _queue(self, job: _Job) -> None:
        if self._pending is not None:
            self.stats.desired_superseded += 1
            # A resync of an older document must not lose its force flag (or its
            # rewind) to a newer one.
            job.force = job.force or self._pending.force
            if job.rewind_to is None:
                job.rewind_to = self._pending.rewind_to
            if job.desired is None:
                job.desired = self._pending.desired
        self._pending = job
        self._idle.clear()
        self._wake.set()

    async def _on_command(self, msg: Message) -> None:
        self.stats.commands_received += 1
        try:
            cmd = parse_command(msg.payload)
        except protocol.WireError as exc:
            self.stats.commands_bad += 1
            self._refused(exc)
            log.warning("ignored a command (%s): %s", exc.reason, exc.detail)
            return
        log.info("command %s: %s %s", cmd.id, cmd.command, cmd.model or "")
        if cmd.command == "resync":
            self._publish_reported()
            if cmd.revision is not None:
                # The worker rewinds (in order with any apply in progress), then applies
                # the fleet's document: received already, or republished by the fleet.
                self._queue(_Job(None, force=True, rewind_to=cmd.revision))
            elif self.last_desired is not None:  # a fleet that sends no revision
                self._queue(_Job(self.last_desired, force=True))
            await self._event("command_done", command_id=cmd.id, reason=None)
        elif cmd.command == "rollback":
            await self._rollback(cmd)
        else:
            self.stats.commands_bad += 1
            await self._event(
                "command_failed", command_id=cmd.id, reason=f"unknown command {cmd.command!r}"
            )

    def _refused(self, exc: protocol.WireError) -> None:
        self.stats.refused[exc.reason] = self.stats.refused.get(exc.reason, 0) + 1

    async def _rollback(self, cmd: Command) -> None:
        name = cmd.model
        if name is None:
            await self._event("command_failed", command_id=cmd.id, reason="rollback needs a model")
            return
        try:
            before = self.registry.known_state(name).active
            lv = await self.registry.rollback(name)
        except EdgeError as exc:
            reason = _short(exc.message)
            await self._event("command_failed", command_id=cmd.id, model=name, reason=reason)
            return
        version = lv.manifest.version
        entry = self.models.get(name)
        if entry is not None and entry.desired != version:
            # No longer serving what the fleet wants: honest "failed", so a rollout
            # does not count this device as a success; a resync re-applies desired.
            entry.state = "failed"
            entry.last_error = f"rolled back to {version} by command {cmd.id}"
            await self._persist()
        self._publish_reported()
        await self._event("rolled_back", model=name, version=version, previous=before)
        await self._event("command_done", command_id=cmd.id, model=name, version=version)

    # ------------------------------------------------------------------ worker

    async def _run(self) -> None:
        await self._restore_candidates()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending is not None:
                job, self._pending = self._pending, None
                if job.rewind_to is not None:
                    await self._rewind(job.rewind_to)
                    if job.desired is None or job.desired.revision < job.rewind_to:
                        job.desired = self._received.get(job.rewind_to)
                desired = job.desired
                if desired is None:
                    continue  # the fleet's document arrives later as a newer revision
                if desired.revision <= self.revision and not job.force:
                    self.stats.desired_stale += 1
                    continue
                self.applying = desired.revision
                try:
                    await self._apply(desired)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug, not a refusal: the revision stays unprocessed, so the next
                    # start (or a resync) tries again. The worker itself must go on.
                    log.exception("applying desired revision %d failed", desired.revision)
                finally:
                    self.applying = None
            self._idle.set()

    async def _rewind(self, fleet_revision: int) -> None:
        """Worker task: a processed revision ahead of the fleet's current one came from
        no fleet (or from a fleet restored from a backup): go back to just below it."""
        if self.revision <= fleet_revision:
            return
        log.warning(
            "processed desired revision %d is ahead of the fleet's current %d:"
            " rewinding so that the fleet's document applies again",
            self.revision,
            fleet_revision,
        )
        self.revision = max(0, fleet_revision - 1)
        self.stats.rewinds += 1
        await self._persist()

    def _set_policy(self, name: str, doc: dict[str, Any] | None) -> bool:
        """The fleet's fallback policy for ``name`` into the router (None: none)."""
        if self.policies is None:
            return False
        policy = None
        if doc is not None:
            try:
                policy = FleetFallback.from_obj(doc)
            except protocol.WireError as exc:  # a hand-edited state file
                log.error("fallback policy of %s in the state file ignored: %s", name, exc)
        return self.policies.set_fleet_policy(name, policy)

    async def _apply(self, desired: Desired) -> None:
        log.info(
            "applying desired revision %d (last processed %d): %s",
            desired.revision,
            self.revision,
            {n: m.version for n, m in desired.models.items()} or "no models",
        )
        # Fallback policies first, at once: an emergency edge_only must not wait for
        # a download of another model (or of this one) to finish.
        changed = False
        for name in set(self.models) | set(desired.models):
            want = desired.models.get(name)
            doc = want.fallback.to_wire() if want is not None and want.fallback else None
            changed |= self._set_policy(name, doc)
            if name in self.models:
                self.models[name].fallback = doc
        if changed:
            self._publish_reported()
        for name, want in desired.models.items():
            await self._apply_model(desired.revision, name, want)
            await self._apply_candidates(name, want)
        for name in set(self.models) - set(desired.models):
            await self._drop_candidates(name)
        # Models no longer in desired are left alone: they become "unmanaged".
        self.models = {n: m for n, m in self.models.items() if n in desired.models}
        self.revision = max(self.revision, desired.revision)
        await self._persist()  # only now: a crash before this re-applies the revision
        self.stats.revisions_processed += 1
        self._publish_reported()
        keep = {self._spec(n, m).stem for n, m in desired.models.items()}
        keep |= {self._candidate_spec(n, c).stem for n, c in _candidates(desired)}
        removed = await self.downloader.cleanup(keep)
        if removed:
            log.info("removed superseded downloads %s", removed)

    def _spec(self, name: str, want: DesiredModel) -> BundleSpec:
        return BundleSpec(name, want.version, want.url, want.sha256, want.size)

    def _active(self, name: str) -> tuple[str | None, list[str]]:
        try:
            state = self.registry.known_state(name)
        except NotFound:
            return None, []
        return state.active, list(state.installed)

    def _set(self, name: str, entry: ModelSync, state: SyncState, error: str | None = None) -> None:
        old = self.models.get(name)
        if old is not None and old is not entry:  # candidates outlive a version's entry
            for f in _CANDIDATE_FIELDS:
                setattr(entry, f, getattr(old, f))
        entry.state = state
        entry.last_error = error
        self.models[name] = entry
        self._publish_reported()

    async def _apply_model(self, revision: int, name: str, want: DesiredModel) -> None:
        entry = ModelSync(
            desired=want.version,
            state="activating",
            rollout=want.rollout,
            fallback=want.fallback.to_wire() if want.fallback else None,
        )
        active, installed = self._active(name)
        if active == want.version:
            self._set(name, entry, "active")
            await self._apply_labels(name, want)
            return
        ctx = {"model": name, "version": want.version, "previous": active, "revision": revision,
               "rollout": want.rollout}  # fmt: skip
        if want.version not in installed:
            spec = self._spec(name, want)
            self._set(name, entry, "downloading")
            try:
                path = await self.downloader.fetch(spec)
            except DownloadError as exc:
                kind = "verify_failed" if isinstance(exc, DownloadIntegrityError) else None
                await self._fail(name, entry, kind or "download_failed", exc.reason, ctx)
                return
            self._set(name, entry, "verifying")
            try:
                await asyncio.to_thread(_check_bundle, path, name, want.version)
                await self.registry.install(path)
            except EdgeError as exc:
                await self._fail(name, entry, "verify_failed", exc.message, ctx)
                return
            except OSError as exc:
                await self._fail(name, entry, "verify_failed", f"cannot read bundle: {exc}", ctx)
                return
            finally:
                # The store keeps the extracted copy; the bundle file is not needed
                # again (a failed one is downloaded again only by a new revision).
                await asyncio.to_thread(_unlink, path)
        self._set(name, entry, "activating")
        try:
            await self.registry.activate(name, want.version)
        except EdgeError as exc:
            await self._fail(name, entry, "activation_failed", exc.message, ctx)
            return
        self._set(name, entry, "active")
        await self._event("activated", **ctx)
        await self._apply_labels(name, want)

    async def _fail(
        self, name: str, entry: ModelSync, kind: str, reason: str, ctx: dict[str, Any]
    ) -> None:
        reason = _short(reason)
        log.error("%s:%s %s: %s", name, entry.desired, kind.replace("_", " "), reason)
        self._set(name, entry, "failed", reason)
        await self._event(kind, **ctx, reason=reason)

    async def _apply_labels(self, name: str, want: DesiredModel) -> None:
        """Labels for installed versions; others are ignored (docs/fleet.md)."""
        if not want.labels:
            return
        _, installed = self._active(name)
        current = self.registry.known_state(name).labels
        changed = False
        for label, version in want.labels.items():
            if version not in installed or current.get(label) == version:
                continue
            try:
                await self.registry.set_label(name, label, version)
                changed = True
            except EdgeError as exc:
                # Not a failure of the desired version itself: log it, keep going.
                log.warning("label %s -> %s:%s not set: %s", label, name, version, exc.message)
        if changed:
            self._publish_reported()

    async def _persist(self) -> None:
        try:
            await asyncio.to_thread(_save_state, self.state_file, self.revision, self.models)
        except OSError as exc:
            # Worst case after a restart: the revision is applied again (idempotent).
            log.error("cannot write sync state %s: %s", self.state_file, exc)

    # ---------------------------------------------------------------- outputs

    def reported(self) -> Reported:
        """The ``reported`` document (docs/fleet.md, ``core.protocol.Reported``)."""
        models: dict[str, ReportedModel] = {}
        for name in sorted(set(self.registry.model_names()) | set(self.models)):
            try:
                state = self.registry.known_state(name)
                active, previous, labels = state.active, state.previous, dict(state.labels)
            except NotFound:
                active, previous, labels = None, None, {}
            lv = self.registry.loaded_versions(name).get(active or "")
            entry = self.models.get(name)
            effective, sources = self._fallback_report(lv.manifest if lv is not None else None)
            models[name] = ReportedModel(
                fallback_effective=effective,
                fallback_source=sources,
                active=active,
                previous=previous,
                desired=entry.desired if entry else None,
                state=entry.state if entry else "unmanaged",
                rollout=entry.rollout if entry else None,
                provider=lv.backend.info.provider if lv is not None else None,
                last_error=entry.last_error if entry else None,
                labels=labels,
                shadow=self._shadow_report(entry),
                split=self._split_report(name, entry),
            )
        return Reported(
            device_id=self.device_id,
            revision=self.revision,
            agent_version=self.agent_version,
            at=round(time.time(), 3),
            accelerators=report_accelerators(self.registry.accelerators),
            models=models,
        )

    def _fallback_report(
        self, manifest: Manifest | None
    ) -> tuple[FallbackEffective | None, dict[str, Any] | None]:
        """The active version's fallback policy and each setting's source."""
        if self.policies is None or manifest is None:
            return None, None
        policy = self.policies.policy(manifest)
        try:
            effective = FallbackEffective.model_validate(policy.effective(manifest.labels))
        except ValidationError as exc:  # a bug, not the device's fault: report the rest
            log.error("%s: fallback policy not reportable: %s", manifest.name, exc)
            return None, None
        return effective, policy.effective_sources()

    # ------------------------------------------------ shadow and split (issue 11)

    def _candidate_spec(self, name: str, want: DesiredShadow | DesiredSplit) -> BundleSpec:
        return BundleSpec(name, want.version, want.url, want.sha256, want.size)

    async def _install_candidate(
        self, name: str, want: DesiredShadow | DesiredSplit, entry: ModelSync, what: str
    ) -> str | None:
        """Download, verify and install a candidate version unless it is installed
        (the same checks as the version to run); the reason it failed, or None."""
        _, installed = self._active(name)
        if want.version in installed:
            return None
        setattr(entry, f"{what}_state", "downloading")
        self._publish_reported()
        try:
            path = await self.downloader.fetch(self._candidate_spec(name, want))
        except DownloadError as exc:
            return exc.reason
        setattr(entry, f"{what}_state", "verifying")
        self._publish_reported()
        try:
            await asyncio.to_thread(_check_bundle, path, name, want.version)
            await self.registry.install(path)
        except EdgeError as exc:
            return exc.message
        except OSError as exc:
            return f"cannot read bundle: {exc}"
        finally:
            await asyncio.to_thread(_unlink, path)
        return None

    async def _apply_candidates(self, name: str, want: DesiredModel) -> None:
        """The shadow candidate and split of ``want``, after its version: a failure of
        either is reported (``reported.models.<m>.shadow/split``) and changes nothing
        else; the active version serves whatever happens here."""
        entry = self.models.get(name)
        if entry is None:
            return
        if want.shadow is None:
            await self._drop_shadow(name, entry)
        else:
            await self._apply_shadow(name, entry, want.shadow)
        if want.split is None:
            await self._drop_split(name, entry)
        else:
            await self._apply_split(name, entry, want.split)
        self._publish_reported()

    async def _apply_shadow(self, name: str, entry: ModelSync, want: DesiredShadow) -> None:
        loaded = self.registry.shadow_for(name)
        entry.shadow = want.to_wire()
        if loaded is not None and loaded.version == want.version:
            loaded.sample_rate = want.sample_rate
            entry.shadow_state, entry.shadow_error = "ready", None
            return
        entry.shadow_error = None
        reason = await self._install_candidate(name, want, entry, "shadow")
        if reason is None:
            try:
                await self.registry.load_shadow(name, want.version, want.sample_rate)
            except EdgeError as exc:
                reason = exc.message
        if reason is not None:
            reason = _short(reason)
            log.error("%s:%s shadow candidate failed: %s", name, want.version, reason)
            entry.shadow_state, entry.shadow_error = "failed", reason
        else:
            entry.shadow_state, entry.shadow_error = "ready", None
        await self._persist()

    async def _apply_split(self, name: str, entry: ModelSync, want: DesiredSplit) -> None:
        current = self.registry.split_for(name)
        entry.split = want.to_wire()
        if (
            current is not None
            and current.version == want.version
            and entry.split_state == "serving"
        ):
            if current.weight != want.weight or current.source != "fleet":
                await self.registry.set_split(name, want.version, want.weight, "fleet")
            return
        entry.split_error = None
        reason = await self._install_candidate(name, want, entry, "split")
        if reason is None:
            try:
                await self.registry.set_split(name, want.version, want.weight, "fleet")
            except EdgeError as exc:
                reason = exc.message
        if reason is not None:
            reason = _short(reason)
            log.error("%s:%s split failed: %s", name, want.version, reason)
            entry.split_state, entry.split_error = "failed", reason
        else:
            entry.split_state, entry.split_error = "serving", None
        await self._persist()

    async def _drop_shadow(self, name: str, entry: ModelSync | None) -> None:
        with contextlib.suppress(NotFound):
            await self.registry.unload_shadow(name)
        if entry is not None:
            entry.shadow = entry.shadow_state = entry.shadow_error = None

    async def _drop_split(self, name: str, entry: ModelSync | None) -> None:
        split = self.registry.split_for(name)
        if split is not None and split.source == "fleet":  # a local one stays
            with contextlib.suppress(NotFound):
                await self.registry.clear_split(name)
        if entry is not None:
            entry.split = entry.split_state = entry.split_error = None

    async def _drop_candidates(self, name: str) -> None:
        """``name`` left the desired state: its shadow and fleet split go too."""
        entry = self.models.get(name)
        await self._drop_shadow(name, entry)
        await self._drop_split(name, entry)

    async def _restore_candidates(self) -> None:
        """Worker task, at start: the candidates of the state file set up again (the
        retained desired is not applied again after a restart: its revision was)."""
        for name, entry in list(self.models.items()):
            try:
                if entry.shadow is not None:
                    await self._apply_shadow(name, entry, DesiredShadow.from_obj(entry.shadow))
                if entry.split is not None:
                    await self._apply_split(name, entry, DesiredSplit.from_obj(entry.split))
            except protocol.WireError as exc:  # a hand-edited state file
                log.error("candidates of %s in the state file ignored: %s", name, exc)
            except Exception:  # a bug: the sync must still start
                log.exception("candidates of %s not restored", name)
        self._publish_reported()

    def _shadow_report(self, entry: ModelSync | None) -> ReportedShadow | None:
        if entry is None or entry.shadow is None:
            return None
        state = entry.shadow_state if entry.shadow_state in _SHADOW_STATES else "downloading"
        return ReportedShadow.model_validate(
            {"version": entry.shadow["version"], "state": state, "last_error": entry.shadow_error}
        )

    def _split_report(self, name: str, entry: ModelSync | None) -> ReportedSplit | None:
        split = self.registry.split_for(name)
        want = entry.split if entry is not None else None
        if entry is not None and want is not None and entry.split_state != "serving":
            state = entry.split_state if entry.split_state in _SPLIT_STATES else "downloading"
            return ReportedSplit.model_validate(
                {
                    "version": want["version"],
                    "weight": want["weight"],
                    "source": "fleet",
                    "state": state,
                    "last_error": entry.split_error,
                }
            )
        if split is None:
            return None
        return ReportedSplit(version=split.version, weight=split.weight, source=split.source)

    def _publish_reported(self) -> None:
        # Only when connected: while offline the watcher publishes the then-current
        # state on reconnect, so stale intermediate states never pile up in paho.
        if not self.link.connected:
            return
        try:
            payload = self.reported().to_json()
            fut = self.link.publish_nowait(self.reported_topic, payload, qos=1, retain=True)
        except LinkError as exc:
            log.debug("reported not published: %s", exc)
            return
        fut.add_done_callback(_consume)
        self.stats.reported_published += 1

    async def _event(self, kind: str, **fields: Any) -> None:
        """Publish an event (when connected) and keep it in the outbox (HIGH)."""
        doc = {"revision": self.revision, **fields}
        event = Event(
            id=new_record_id(), device_id=self.device_id, at=round(time.time(), 3), kind=kind, **doc
        )
        self.stats.events += 1
        if self.link.connected:
            with contextlib.suppress(LinkError):
                fut = self.link.publish_nowait(self.events_topic, event.to_json(), qos=1)
                fut.add_done_callback(_consume)
        try:
            await self.outbox.add_one("event", event.to_wire(), Priority.HIGH)
        except (OutboxClosed, OSError, RuntimeError) as exc:
            log.error("event %s not stored in the outbox: %s", kind, exc)

    async def _watch_link(self) -> None:
        while True:
            try:
                await self.link.wait_connected()
            except LinkError:
                return  # stopped, or the login was refused: nothing will connect
            self._publish_reported()
            await self.link.wait_disconnected()


_CANDIDATE_FIELDS = (
    "shadow",
    "shadow_state",
    "shadow_error",
    "split",
    "split_state",
    "split_error",
)
_SHADOW_STATES = ("downloading", "verifying", "ready", "failed")
_SPLIT_STATES = ("downloading", "verifying", "serving", "failed")


def _candidates(desired: Desired) -> list[tuple[str, DesiredShadow | DesiredSplit]]:
    out: list[tuple[str, DesiredShadow | DesiredSplit]] = []
    for name, m in desired.models.items():
        out += [(name, c) for c in (m.shadow, m.split) if c is not None]
    return out


def _consume(fut: asyncio.Future[None]) -> None:
    # Best effort: a PUBACK that never came is not worth an "exception never
    # retrieved" warning; the outbox carries events, and reported is republished.
    if not fut.cancelled():
        fut.exception()

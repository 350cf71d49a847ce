"""Assignments → each device's ``desired`` document (docs/fleet.md, "Desired-state computation").

Everything here is computed from the database inside one write job, never from
process memory (DESIGN.md, Scale): a restarted fleet, or a second fleet worker,
computes the same documents, and the fleet-wide revision sequence
(``fleet.db.next_revision``) is taken in the same transaction that stores the
document, so revisions only grow for every device.

Precedence, for each device and model: a **device** assignment beats a **group**
one beats one for **all**; within a level the newest assignment wins (among all the
device's groups together). An assignment made by a staged rollout applies only to
the devices the rollout has reached (its ``rollout_devices`` rows that are not
``waiting``) while the rollout is ``running``, ``paused`` or ``stopped``; to every
target device once it is ``completed``; and to none once ``rolled_back``. A device
the rollout has not reached therefore falls through to the next assignment, which
is the version it was meant to run before ("held at its previous desired
version"), and a rollback is just the rollout's assignment ceasing to apply.
Rows a gate stop withdrew (``rolled_back`` in a stopped rollout: devices that had not
activated the version) count as not reached: the version is withdrawn from them
(sticky aborts, fleet/rollouts.py). During a rollout's shadow stage its shadow devices
(``rollout_devices.shadow``) get the candidate as ``shadow`` of the model they run.
An assignment may name a fleet label instead of a version (``resolve_version_in``):
the version it names when the assignment is made. ``unassign`` removes every
assignment of a model to one target (refused while a rollout to that target is
unfinished), so its devices fall to the next more general level, or to a document
without the model.

Threads: the ``*_in(conn, ...)`` functions run on the database's writer thread (inside
``FleetDB.write``); the coroutines run on the event loop and call ``publish`` there,
synchronously, right after the write job's future resolved. The writer resolves
futures in commit order and nothing awaits between the resolution and the publish,
so within one process retained ``desired`` messages leave in revision order.

The document is ``core.protocol.Desired`` (built here, validated by the agent with the
same model); it is stored as JSON text with sorted keys and published as stored.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from edgefleet.core import protocol
from edgefleet.core.errors import BadRequest, EdgeError, NotFound
from edgefleet.core.mqtt import topics
from edgefleet.core.names import check_group
from edgefleet.fleet.db import FleetDB, dumps, loads, next_revision, now

if TYPE_CHECKING:
    from edgefleet.fleet.policies import PolicyRow

log = logging.getLogger(__name__)

TargetKind = Literal["device", "group", "all"]
TARGET_KINDS: tuple[str, ...] = ("device", "group", "all")
# Rollout states in which its assignment applies only to the devices it reached.
ROLLOUT_LIVE = ("running", "paused", "stopped")

# Queue a message now, on the loop thread (retained, QoS 1). It must not await: the
# order of calls is the order on the wire (see the module doc).
Publish = Callable[[str, bytes], None]
BundleUrl = Callable[[str, str], str]


class UnknownModelVersion(NotFound, LookupError):
    """The assigned model version is not in the registry (HTTP 404)."""


class UnknownDevice(NotFound, LookupError):
    """A device assignment names a device the fleet does not know (HTTP 404)."""


class NoSuchAssignment(NotFound, LookupError):
    """An unassign names a model and target that have no assignment (HTTP 404)."""


class AssignmentConflict(EdgeError):
    """An unassign while a rollout of that model to that target is unfinished (HTTP 409)."""

    status = 409


@dataclass(frozen=True, slots=True)
class Assignment:
    id: int
    model: str
    version: str
    kind: str
    target: str
    rollout_id: str | None
    rollout_state: str | None  # None: no rollout, or its row is missing


@dataclass(slots=True)
class _Model:
    """One model's assignments, newest first, by level."""

    device: dict[str, list[Assignment]] = field(default_factory=dict)
    group: dict[str, list[Assignment]] = field(default_factory=dict)
    all: list[Assignment] = field(default_factory=list)


@dataclass(slots=True)
class Snapshot:
    """What the computation reads, loaded once per write job (writer thread)."""

    models: dict[str, _Model]
    reached: set[tuple[str, str]]  # (rollout id, device id) of live rollouts
    versions: dict[tuple[str, str], tuple[str, int]]  # (name, version) → (sha256, size)
    labels: dict[str, dict[str, str]]  # model → label → version
    # Fallback policies by model (fleet/policies.py), merged per device in compute().
    policies: dict[str, list[PolicyRow]] = field(default_factory=dict)
    # (model, device) → (candidate version, sample rate): shadow stages of live rollouts
    shadows: dict[tuple[str, str], tuple[str, float]] = field(default_factory=dict)

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> Snapshot:
        models: dict[str, _Model] = {}
        rows = conn.execute(
            "SELECT a.id, a.model, a.version, a.target_kind, a.target, a.rollout_id, r.state"
            " FROM assignments a LEFT JOIN rollouts r ON r.id = a.rollout_id"
            " ORDER BY a.id DESC"
        ).fetchall()
        for row in rows:
            a = Assignment(int(row[0]), row[1], row[2], row[3], row[4] or "", row[5], row[6])
            m = models.setdefault(a.model, _Model())
            if a.kind == "device":
                m.device.setdefault(a.target, []).append(a)
            elif a.kind == "group":
                m.group.setdefault(a.target, []).append(a)
            elif a.kind == "all":
                m.all.append(a)
        _prune(models)
        placeholders = ",".join("?" * len(ROLLOUT_LIVE))
        reached = {
            (r[0], r[1])
            for r in conn.execute(
                "SELECT rd.rollout_id, rd.device_id FROM rollout_devices rd"
                " JOIN rollouts r ON r.id = rd.rollout_id"
                # rolled_back rows: devices a gate stop withdrew (sticky abort)
                f" WHERE r.state IN ({placeholders})"
                " AND rd.state NOT IN ('waiting', 'rolled_back')",
                ROLLOUT_LIVE,
            )
        }
        shadows: dict[tuple[str, str], tuple[str, float]] = {}
        for model, version, device_id, plan in conn.execute(
            "SELECT r.model, r.version, rd.device_id, r.plan FROM rollouts r"
            " JOIN rollout_devices rd ON rd.rollout_id = r.id"
            " WHERE r.state IN ('running', 'paused') AND r.stage = 'shadow' AND rd.shadow = 1"
        ):
            rate = float(((loads(plan) or {}).get("shadow") or {}).get("sample_rate", 1.0))
            shadows[(model, device_id)] = (version, rate)
        versions = {
            (r[0], r[1]): (r[2], int(r[3]))
            for r in conn.execute("SELECT name, version, sha256, size FROM model_versions")
        }
        labels: dict[str, dict[str, str]] = {}
        for name, label, version in conn.execute("SELECT name, label, version FROM model_labels"):
            labels.setdefault(name, {})[label] = version
        from edgefleet.fleet.policies import load_policies  # it imports this module

        return cls(models, reached, versions, labels, load_policies(conn), shadows)

    def applies(self, a: Assignment, device_id: str) -> bool:
        if a.rollout_id is None:
            return True
        if a.rollout_state == "completed":
            return True
        if a.rollout_state in ROLLOUT_LIVE:
            return (a.rollout_id, device_id) in self.reached
        return False  # rolled back (or a rollout row that vanished)

    def winner(self, model: str, device_id: str, groups: Iterable[str]) -> Assignment | None:
        """The assignment that decides ``model`` on this device (device > group > all)."""
        m = self.models.get(model)
        if m is None:
            return None
        for a in m.device.get(device_id, ()):
            if self.applies(a, device_id):
                return a
        in_groups = sorted(
            (a for g in groups for a in m.group.get(g, ())), key=lambda a: a.id, reverse=True
        )
        for a in in_groups:
            if self.applies(a, device_id):
                return a
        for a in m.all:
            if self.applies(a, device_id):
                return a
        return None

    def candidate_models(self, device_id: str, groups: Iterable[str]) -> list[str]:
        gs = list(groups)
        return sorted(
            name
            for name, m in self.models.items()
            if m.all or device_id in m.device or any(g in m.group for g in gs)
        )


def _prune(models: dict[str, _Model]) -> None:
    """Drop assignments that can never win again: older than the newest one of the same
    model and target that applies to everyone (no rollout, or a completed one)."""

    def cut(lst: list[Assignment]) -> list[Assignment]:
        for i, a in enumerate(lst):
            if a.rollout_id is None or a.rollout_state == "completed":
                return lst[: i + 1]
        return lst

    for m in models.values():
        m.device = {k: cut(v) for k, v in m.device.items()}
        m.group = {k: cut(v) for k, v in m.group.items()}
        m.all = cut(m.all)


def _groups_of(conn: sqlite3.Connection, device_ids: Sequence[str] | None) -> dict[str, list[str]]:
    if device_ids is None:
        rows = conn.execute("SELECT device_id, grp FROM device_groups").fetchall()
    else:
        rows = conn.execute(
            "SELECT device_id, grp FROM device_groups"
            " WHERE device_id IN (SELECT value FROM json_each(?))",
            (dumps(list(device_ids)),),
        ).fetchall()
    out: dict[str, list[str]] = {}
    for device_id, grp in rows:
        out.setdefault(device_id, []).append(grp)
    return out


def target_devices(conn: sqlite3.Connection, kind: str, target: str) -> list[str]:
    """Device ids an assignment target covers today (writer or reader thread)."""
    # Revoked devices are no target: they cannot connect, and a rollout wave must not
    # wait for their reports.
    if kind == "device":
        row = conn.execute(
            "SELECT id FROM devices WHERE id = ? AND revoked_at IS NULL", (target,)
        ).fetchone()
        return [row[0]] if row else []
    if kind == "group":
        return [
            r[0]
            for r in conn.execute(
                "SELECT g.device_id FROM device_groups g JOIN devices d ON d.id = g.device_id"
                " WHERE g.grp = ? AND d.revoked_at IS NULL ORDER BY g.device_id",
                (target,),
            )
        ]
    rows = conn.execute("SELECT id FROM devices WHERE revoked_at IS NULL ORDER BY id")
    return [r[0] for r in rows]


def check_target(kind: str, target: str) -> tuple[str, str]:
    if kind not in TARGET_KINDS:
        raise BadRequest(f"target kind must be one of {', '.join(TARGET_KINDS)}, not {kind!r}")
    if kind == "all":
        if target:
            raise BadRequest("an assignment to all devices takes no target")
        return kind, ""
    if not isinstance(target, str) or not target or len(target) > 200:
        raise BadRequest(f"a {kind} assignment needs a target name (1..200 characters)")
    if kind == "device":
        try:
            topics.check_device_id(target)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    if kind == "group":
        check_group(target)  # InvalidName: a BadRequest
    return kind, target


def _target_text(kind: str, target: str) -> str:
    return "all devices" if kind == "all" else f"{kind} {target!r}"


def resolve_version_in(conn: sqlite3.Connection, model: str, version: str) -> str:
    """``version`` if the registry has it, else the version the fleet label ``version``
    names now (``edge-fleet assign digits-edge staging``); unchanged when neither (the
    caller's ``insert_assignment`` then refuses it). Any thread."""
    found = conn.execute(
        "SELECT 1 FROM model_versions WHERE name = ? AND version = ?", (model, version)
    ).fetchone()
    if found is not None:
        return version
    row = conn.execute(
        "SELECT version FROM model_labels WHERE name = ? AND label = ?", (model, version)
    ).fetchone()
    return version if row is None else str(row[0])


def insert_assignment(
    conn: sqlite3.Connection,
    model: str,
    version: str,
    kind: str,
    target: str,
    rollout_id: str | None,
) -> int:
    """Writer thread. Checks the version exists (and the device, for a device target);
    ``version`` may be a fleet label (``resolve_version_in``)."""
    version = resolve_version_in(conn, model, version)
    found = conn.execute(
        "SELECT 1 FROM model_versions WHERE name = ? AND version = ?", (model, version)
    ).fetchone()
    if found is None:
        raise UnknownModelVersion(f"model {model!r} has no version {version!r}")
    if kind == "device" and not target_devices(conn, "device", target):
        raise UnknownDevice(f"unknown device {target!r}")
    row = conn.execute(
        "INSERT INTO assignments (model, version, target_kind, target, rollout_id, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (model, version, kind, target, rollout_id, now()),
    ).fetchone()
    return int(row[0])


class DesiredStates:
    """Assignments in, retained ``desired`` documents out.

    ``publish(topic, payload)`` queues a retained QoS 1 message (see ``Publish``);
    ``bundle_url(name, version)`` is the absolute URL devices download from.
    """

    def __init__(self, db: FleetDB, publish: Publish, bundle_url: BundleUrl) -> None:
        self.db = db
        self.publish = publish
        self.bundle_url = bundle_url

    # ------------------------------------------------------------------ public API

    async def assign(
        self,
        model: str,
        version: str,
        *,
        target_kind: TargetKind,
        target: str = "",
        rollout_id: str | None = None,
    ) -> int:
        """Record an assignment and push the devices it changes; returns its id.

        ``UnknownModelVersion`` (a ``LookupError``, HTTP 404) when the registry has no
        such version, ``UnknownDevice`` for a device target the fleet does not know,
        ``BadRequest`` for a malformed target. A staged rollout uses ``Rollouts.start``.
        """
        kind, target = check_target(target_kind, target)

        def job(conn: sqlite3.Connection) -> tuple[int, list[tuple[str, bytes]]]:
            aid = insert_assignment(conn, model, version, kind, target, rollout_id)
            ids = None if kind == "all" else target_devices(conn, kind, target)
            return aid, self.refresh_in(conn, ids)

        aid, docs = await self.db.write(job)
        self.send(docs)
        return aid

    async def unassign(
        self, model: str, *, target_kind: TargetKind, target: str = ""
    ) -> dict[str, Any]:
        """Remove every assignment of ``model`` to exactly this target and push the
        devices it changes (loop thread; the work is one write job).

        Every row for the (model, kind, target) goes, older superseded ones and those of
        finished rollouts included, so nothing older at the same level resurfaces: each
        device falls back to the next more general assignment (device > group > all) or,
        with none, to a ``desired`` without the model (the agent then leaves the model
        as it is, ``unmanaged``: agent/sync.py). Rollout rows stay (history).

        ``BadRequest`` (400) for a malformed target, ``NoSuchAssignment`` (404) when
        there is nothing to remove, ``AssignmentConflict`` (409, naming it) while a
        rollout of the model to this target is running, paused or stopped: roll it back
        (or let it complete) first. Nothing changes when it raises.
        """
        kind, target = check_target(target_kind, target)

        def job(conn: sqlite3.Connection) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
            placeholders = ",".join("?" * len(ROLLOUT_LIVE))
            live = conn.execute(
                "SELECT id, version, state FROM rollouts WHERE model = ? AND target_kind = ?"
                f" AND COALESCE(target, '') = ? AND state IN ({placeholders})"
                " ORDER BY created_at",
                (model, kind, target, *ROLLOUT_LIVE),
            ).fetchone()
            if live is not None:
                raise AssignmentConflict(
                    f"rollout {live[0]} of {model}:{live[1]} to {_target_text(kind, target)}"
                    f" is {live[2]}: roll it back (POST /v1/rollouts/{live[0]}/rollback) or let"
                    " it complete before unassigning"
                )
            rows = conn.execute(
                "DELETE FROM assignments WHERE model = ? AND target_kind = ?"
                " AND COALESCE(target, '') = ? RETURNING id, version, rollout_id",
                (model, kind, target),
            ).fetchall()
            if not rows:
                raise NoSuchAssignment(f"{model} has no assignment to {_target_text(kind, target)}")
            # Every device the target covers, revoked ones too (their stored document
            # must not keep naming what was unassigned).
            ids: list[str] | None
            if kind == "all":
                ids = None
            elif kind == "device":
                ids = [target]
            else:
                ids = [
                    r[0]
                    for r in conn.execute(
                        "SELECT device_id FROM device_groups WHERE grp = ?", (target,)
                    )
                ]
            docs = self.refresh_in(conn, ids)
            removed = [
                {"assignment_id": int(r[0]), "version": r[1], "rollout_id": r[2]}
                for r in sorted(rows, key=lambda r: -int(r[0]))
            ]
            doc = {
                "model": model,
                "target": {"all": True} if kind == "all" else {kind: target},
                "removed": removed,
                "devices_changed": sorted(d for d, _ in docs),
            }
            return doc, docs

        result, docs = await self.db.write(job)
        self.send(docs)
        log.info(
            "unassigned %s from %s (%d assignment(s), %d device(s) changed)",
            model,
            _target_text(kind, target),
            len(result["removed"]),
            len(docs),
        )
        return result

    async def list_assignments(self, model: str | None = None) -> list[dict[str, Any]]:
        """The assignments that can still decide something (reader thread): per model
        and target, newest first, without those superseded by a newer plain one and
        without those of rolled-back rollouts. ``in_effect`` is false for a live
        rollout's (it applies only to the devices it reached)."""

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            snap = Snapshot.load(conn)
            out: list[dict[str, Any]] = []
            created = dict(conn.execute("SELECT id, created_at FROM assignments").fetchall())
            for name in sorted(snap.models):
                if model is not None and name != model:
                    continue
                m = snap.models[name]
                groups = [a for g in sorted(m.group) for a in m.group[g]]
                devices = [a for d in sorted(m.device) for a in m.device[d]]
                for a in [*devices, *groups, *m.all]:
                    if a.rollout_id is not None and a.rollout_state not in (
                        *ROLLOUT_LIVE,
                        "completed",
                    ):
                        continue
                    out.append(
                        {
                            "assignment_id": a.id,
                            "model": a.model,
                            "version": a.version,
                            "target": {"all": True} if a.kind == "all" else {a.kind: a.target},
                            "rollout_id": a.rollout_id,
                            "rollout_state": a.rollout_state,
                            "in_effect": a.rollout_id is None or a.rollout_state == "completed",
                            "created_at": created.get(a.id),
                        }
                    )
            return out

        return await self.db.read(q)

    async def refresh(self, device_ids: Iterable[str] | None = None) -> int:
        """Recompute these devices' documents (None: every device); store and publish
        a new revision for each one whose models changed. Returns how many changed.

        Call it after anything the computation reads changed outside this module:
        a device's groups, a label, a deleted model version, a new device.
        """
        ids = None if device_ids is None else list(device_ids)
        docs = await self.db.write(lambda conn: self.refresh_in(conn, ids))
        self.send(docs)
        return len(docs)

    async def republish(self, device_ids: Iterable[str] | None = None) -> int:
        """Publish the stored documents again (same revisions: devices ignore repeats).

        For a broker that lost its retained messages. Read in a write job on purpose:
        it is then ordered with every refresh, so an older document can never be
        published after a newer one (see the module doc).
        """
        ids = None if device_ids is None else list(device_ids)

        def job(conn: sqlite3.Connection) -> list[tuple[str, bytes]]:
            sql = "SELECT id, desired FROM devices WHERE desired IS NOT NULL"
            args: tuple[Any, ...] = ()
            if ids is not None:
                sql += " AND id IN (SELECT value FROM json_each(?))"
                args = (dumps(ids),)
            return [(r[0], r[1].encode()) for r in conn.execute(sql + " ORDER BY id", args)]

        docs = await self.db.write(job)
        self.send(docs)
        return len(docs)

    async def get(self, device_id: str) -> dict[str, Any] | None:
        """The stored desired document of a device (None: never published)."""

        def q(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT desired FROM devices WHERE id = ?", (device_id,)).fetchone()
            return None if row is None else row[0]

        doc: dict[str, Any] | None = loads(await self.db.read(q))
        return doc

    # ------------------------------------------------------- writer-thread helpers

    def refresh_in(
        self, conn: sqlite3.Connection, device_ids: Sequence[str] | None
    ) -> list[tuple[str, bytes]]:
        """Writer thread: recompute, store new revisions; returns (device id, payload)
        to hand to ``send`` once the transaction committed."""
        if device_ids is not None and not device_ids:
            return []
        snap = Snapshot.load(conn)
        if device_ids is None:
            rows = conn.execute("SELECT id, desired FROM devices ORDER BY id").fetchall()
        else:
            rows = conn.execute(
                "SELECT id, desired FROM devices"
                " WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
                (dumps(sorted(set(device_ids))),),
            ).fetchall()
        groups = _groups_of(conn, None if device_ids is None else [r[0] for r in rows])
        out: list[tuple[str, bytes]] = []
        for device_id, stored_text in rows:
            models = self.compute(snap, device_id, groups.get(device_id, ()))
            stored = loads(stored_text)
            if stored is None and not models:
                continue  # nothing managed, nothing ever published: nothing to say
            wire_models = {name: m.to_wire() for name, m in models.items()}
            if stored is not None and stored.get("models") == wire_models:
                continue
            revision = next_revision(conn)
            doc = protocol.Desired(
                device_id=device_id,
                revision=revision,
                issued_at=round(now(), 3),
                models=models,
            )
            text = dumps(doc.to_wire())
            conn.execute(
                "UPDATE devices SET desired = ?, desired_revision = ? WHERE id = ?",
                (text, revision, device_id),
            )
            out.append((device_id, text.encode()))
        return out

    def compute(
        self, snap: Snapshot, device_id: str, groups: Iterable[str]
    ) -> dict[str, protocol.DesiredModel]:
        """The ``models`` part of a device's document (pure, writer thread)."""
        from edgefleet.fleet.policies import effective as policy_effective  # (a cycle)

        gs = list(groups)
        models: dict[str, protocol.DesiredModel] = {}
        for name in snap.candidate_models(device_id, gs):
            a = snap.winner(name, device_id, gs)
            if a is None:
                continue
            info = snap.versions.get((name, a.version))
            if info is None:
                # The version was deleted from the registry after the assignment: leave
                # the model alone on the device rather than send a URL that 404s.
                log.warning("assignment %d: %s %s is not in the registry", a.id, name, a.version)
                continue
            models[name] = protocol.DesiredModel(
                version=a.version,
                url=self.bundle_url(name, a.version),
                sha256=info[0],
                size=info[1],
                # Only the labels that point at this version: the device can apply no
                # other (it applies labels to installed versions), and a label moved
                # elsewhere then changes only the documents it concerns.
                labels={k: v for k, v in snap.labels.get(name, {}).items() if v == a.version},
                rollout=a.rollout_id,
                fallback=policy_effective(snap.policies.get(name, ()), device_id, gs),
                shadow=self._shadow(snap, name, device_id, a.version),
            )
        return models

    def _shadow(
        self, snap: Snapshot, model: str, device_id: str, version: str
    ) -> protocol.DesiredShadow | None:
        """The shadow candidate of a rollout's shadow stage for this device, if any."""
        found = snap.shadows.get((model, device_id))
        if found is None or found[0] == version:
            return None
        info = snap.versions.get((model, found[0]))
        if info is None:
            return None
        return protocol.DesiredShadow(
            version=found[0],
            url=self.bundle_url(model, found[0]),
            sha256=info[0],
            size=info[1],
            sample_rate=found[1],
        )

    # ------------------------------------------------------------------ loop side

    def send(self, docs: Iterable[tuple[str, bytes]]) -> None:
        """Loop thread, right after the write committed: no await before publishing."""
        for device_id, payload in docs:
            self.publish(topics.device_topic(device_id, topics.DESIRED), payload)

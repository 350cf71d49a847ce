"""Staged rollouts: waves, auto-stop, pause/resume/rollback (docs/fleet.md).

A rollout is one assignment (to a group or to all devices) carrying the rollout's
id, plus a snapshot of the devices it targets in ``rollout_devices``, each placed in
a wave. ``fleet/desired.py`` applies the assignment only to the devices reached so
far (state not ``waiting``), so a device of a later wave keeps its previous desired
version until its wave is pushed; a rollback is the assignment ceasing to apply.

Every decision (reaching the next wave, stopping, completing) is made inside a
write job from what the database says, never from process memory: a restarted
fleet, or another fleet worker on the same database, continues the same rollout,
and two workers deciding at once are serialised by the writer's transaction.

Rules, in one place:

- **Waves** are cumulative, as fleet managers write them: ``[1, "10%", "100%"]`` is
  1 device, then up to 10 % of the targeted devices in total, then the rest. An int
  is a cumulative device count, ``"p%"`` a cumulative share (rounded up). The last
  wave always takes every device left, and empty waves are skipped.
- **Order**: devices online at the start come first (a canary that is offline would
  hold the first wave), then a stable pseudo-random order (sha256 of rollout id and
  device id), so wave 1 is not always the same store.
- **Excluded**: a targeted device on which the rollout's assignment could not win
  (it has a more specific assignment for the model: a device assignment, or for an
  ``all`` rollout a group one) is not part of the rollout.
- **Done**: a device has succeeded when its ``reported`` model shows
  ``desired == version``, ``state == "active"`` and ``active == version``; it has
  failed when ``desired == version`` and ``state == "failed"`` (reason: its
  ``last_error``, or the latest failure event for the rollout). A failed device that
  later reports success counts as succeeded.
- **Advance**: when no device of the current wave is pending, the next wave is
  pushed if the wave's failure share is at most ``max_failure_share``.
- **Auto-stop**: as soon as ``failed / wave size`` exceeds ``max_failure_share``
  (the outcome can no longer be good) the rollout is ``stopped`` with a reason;
  later waves never get the version. Devices already reached keep it.
- **Wave timeout** (optional, ``wave_timeout_s``, at most ``MAX_WAVE_TIMEOUT_S``;
  per rollout from ``POST /v1/assignments`` or ``edge-fleet assign --wave-timeout``):
  devices that do not answer (offline stores) count as pending, never as failed.
  After the timeout the next wave is pushed if at least one device of the wave is
  done and the failure share among the done devices is acceptable; a wave where
  nobody answered keeps waiting (there is no evidence either way). ``tick()`` checks
  the timeouts; the FleetBus calls it.
- **Operator**: ``pause`` (no wave is pushed; devices already reached keep the
  version), ``resume`` (a paused rollout continues; a stopped one is pushed into the
  next wave: the operator overrides the auto-stop), ``rollback`` (from any state:
  every device goes back to what it would run without this rollout; state
  ``rolled_back``). A device that had no managed version of the model before keeps
  running the new one after a rollback (a ``desired`` without the model leaves it
  alone): send it a ``rollback`` command if that matters.
- **One at a time**: a new rollout of a model is refused while another rollout of the
  same model is running, paused or stopped (finish, resume or roll it back first).
  A plain assignment (no waves) is always allowed; the newest one wins. Unassigning
  the model from the rollout's own target is refused (409) while the rollout is
  running, paused or stopped (``DesiredStates.unassign``), and so is deleting its
  version from the registry (``Registry.delete_version``).

**Plans and gates** (issue 11; ``fleet/gates.py`` holds the format and the
statistics, docs/fleet.md "Rollout plans and gates" the contract). A rollout started
with a ``Plan`` may begin with a **shadow** stage (``stage = 'shadow'``, wave 0): its
devices (``rollout_devices.shadow = 1``, chosen among the targeted devices that run a
version of the model) get the candidate as ``shadow`` in their desired document; the
stage ends when its gates pass after ``min_duration_s`` and ``min_items`` compared
items, and wave 1 is pushed. Each **serving wave** then advances only when today's
rules hold *and* the plan's gates pass on the evidence gathered since the wave
started (canary: the rollout's devices' telemetry for the new version; baseline: the
same devices' telemetry for any other version of the model since the first serving
wave started). A gate is checked on every decision (every ``reported``, every stored
telemetry batch with evidence: ``on_telemetry``, at most once a second per rollout,
every ``tick()``), while devices are still pending too, so a bad version is stopped as
soon as the evidence is clear. A stage whose gates keep waiting (too little traffic,
no drift figures) waits, without a deadline; the operator can ``advance`` it (the
next wave, or the end of the shadow stage, now: an ``override`` decision), pause it or
roll it back. A failed gate stops or rolls back the rollout (``on_fail``),
storing the evidence (``rollouts.evidence``, ``rollout_decisions``) with the devices
that served the version. **Sticky**: after a gate stop, devices that had not
activated the version are withdrawn (their rows ``rolled_back``: the assignment no
longer applies to them); a device that reports it still wants an aborted version
gets its stored, corrected desired document again. A plan rollout that completes
moves the plan's ``promote`` label (default ``stable``) to its version.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from edgefleet.core import protocol
from edgefleet.core.errors import BadRequest, EdgeError, NotFound
from edgefleet.fleet import gates
from edgefleet.fleet.db import FleetDB, dumps, loads, now
from edgefleet.fleet.desired import (
    DesiredStates,
    Snapshot,
    _groups_of,
    check_target,
    insert_assignment,
    resolve_version_in,
    target_devices,
)

log = logging.getLogger(__name__)

STATES = ("running", "paused", "stopped", "completed", "rolled_back")
DEVICE_STATES = ("waiting", "pending", "succeeded", "failed", "rolled_back")
FAILURE_EVENTS = frozenset({"activation_failed", "download_failed", "verify_failed"})
MAX_FAILURES_LISTED = 100
EVAL_INTERVAL_S = 1.0  # telemetry re-decides a rollout at most this often (tick() too)
# The gate charts' history (rollout_gate_evals, migration 8): a rollout's gate figures are
# stored at most every SERIES_INTERVAL_S while its gates wait (a decision is stored
# always), and no closer than 1/SERIES_POINTS of the rollout's age: a chart needs no
# more points than that, and a week-long rollout then stores ~3,300 evaluations per
# gate (500 in its first 42 min, then 500 per e-fold of its age), not 120,000.
SERIES_INTERVAL_S = 5.0
SERIES_POINTS = 500
_PCT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")

Docs = list[tuple[str, bytes]]


class RolloutConflict(EdgeError):
    """The operation clashes with the rollout's state or another rollout (HTTP 409)."""

    status = 409


class UnknownRollout(NotFound, LookupError):
    pass


def new_rollout_id() -> str:
    """``r-`` + 32 hex digits, time-ordered like the outbox's record ids."""
    return f"r-{time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF:012x}{secrets.token_hex(10)}"


# A wave timeout longer than a week is a typo (ms for s) more likely than a plan: a
# wave that waits that long for silent stores is better paused by hand.
MAX_WAVE_TIMEOUT_S = 7 * 86400.0


def check_wave_timeout(value: object) -> float | None:
    """``wave_timeout_s`` (seconds, None: a wave waits for every device): a number in
    (0, ``MAX_WAVE_TIMEOUT_S``]; ``BadRequest`` (400) naming the bound otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"wave_timeout_s must be a number of seconds, not {value!r}")
    if not 0 < value <= MAX_WAVE_TIMEOUT_S:
        raise BadRequest(
            f"wave_timeout_s must be above 0 and at most {MAX_WAVE_TIMEOUT_S:g} s (7 days),"
            f" not {value:g}"
        )
    return float(value)


def parse_waves(waves: Sequence[int | str]) -> list[int | float]:
    """Validate a wave plan: ints are device counts, floats shares (0, 1]."""
    if not isinstance(waves, list | tuple) or not waves or len(waves) > 100:
        raise BadRequest("waves must be a list of 1..100 entries such as [1, '10%', '100%']")
    out: list[int | float] = []
    for w in waves:
        if isinstance(w, bool):
            raise BadRequest(f"bad wave {w!r}")
        if isinstance(w, int):
            if w < 1:
                raise BadRequest(f"a wave of {w} devices: must be at least 1")
            out.append(w)
            continue
        m = _PCT.match(w) if isinstance(w, str) else None
        if m is None or not 0 < float(m.group(1)) <= 100:
            raise BadRequest(f"bad wave {w!r}: an integer device count or a share like '10%'")
        out.append(float(m.group(1)) / 100)
    return out


def wave_sizes(plan: Sequence[int | float], n: int) -> list[int]:
    """Cumulative plan → the sizes of the non-empty waves for ``n`` devices."""
    sizes: list[int] = []
    done = 0
    for i, w in enumerate(plan):
        upto = w if isinstance(w, int) else math.ceil(w * n - 1e-9)
        upto = n if i == len(plan) - 1 else min(max(upto, 0), n)
        if upto > done:
            sizes.append(upto - done)
            done = upto
    return sizes


class Rollouts:
    """Staged rollouts over ``DesiredStates``; all state in the database."""

    def __init__(self, db: FleetDB, desired: DesiredStates) -> None:
        self.db = db
        self.desired = desired
        # rollout id → monotonic time of its last telemetry-triggered decision (a
        # throttle for on_telemetry; writer thread only)
        self._evaluated: dict[str, float] = {}
        # How often the gate charts' history is written (``_record_gates_in``).
        self.series_interval_s = SERIES_INTERVAL_S

    # ------------------------------------------------------------------ public API

    async def start(
        self,
        model: str,
        version: str,
        *,
        target_kind: Literal["group", "all"],
        target: str = "",
        waves: Sequence[int | str] = (),
        max_failure_share: float = 0.2,
        wave_timeout_s: float | None = None,
        plan: gates.Plan | None = None,
    ) -> dict[str, Any]:
        """Snapshot the targeted devices, place them in waves, push wave 1 (or, with a
        plan that has one, start the shadow stage).

        With ``plan``, its waves, ``max_failure_share`` and ``wave_timeout_s`` replace
        the arguments. ``version`` may be a fleet label (``staging``): the version it
        names now is rolled out. Raises ``UnknownModelVersion`` (404), ``BadRequest``
        (bad waves or target, no device to roll out to, a shadow stage without a
        baseline) or ``RolloutConflict`` (409: another rollout of the model is not
        finished). Nothing is stored when it raises.
        """
        if target_kind not in ("group", "all"):
            raise BadRequest("a staged rollout targets a group or all devices")
        kind, target = check_target(target_kind, target)
        if plan is not None:
            waves = plan.waves
            max_failure_share = plan.max_failure_share
            wave_timeout_s = plan.wave_timeout_s
        wave_plan = parse_waves(waves)
        if isinstance(max_failure_share, bool) or not 0 <= max_failure_share <= 1:
            raise BadRequest("max_failure_share must be between 0 and 1")
        check_wave_timeout(wave_timeout_s)
        rid = new_rollout_id()
        requested = version

        def job(conn: sqlite3.Connection) -> tuple[dict[str, Any], Docs]:
            version = resolve_version_in(conn, model, requested)
            busy = conn.execute(
                "SELECT id, state FROM rollouts WHERE model = ?"
                " AND state IN ('running', 'paused', 'stopped')",
                (model,),
            ).fetchone()
            if busy is not None:
                raise RolloutConflict(
                    f"rollout {busy[0]} of {model} is {busy[1]}: finish, resume or roll it back"
                    " first"
                )
            t = now()
            # The rollout row first: the assignment's computation looks its state up.
            conn.execute(
                "INSERT INTO rollouts (id, model, version, target_kind, target, waves,"
                " max_failure_share, state, current_wave, wave_started_at, wave_timeout_s,"
                " reason, created_at, updated_at, plan, stage, stage_started_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'running', 0, NULL, ?, NULL, ?, ?, ?, ?, ?)",
                (
                    rid,
                    model,
                    version,
                    kind,
                    target,
                    dumps(list(waves)),
                    max_failure_share,
                    wave_timeout_s,
                    t,
                    t,
                    None if plan is None else dumps(plan.model_dump(mode="json")),
                    "shadow" if plan is not None and plan.shadow is not None else "serving",
                    t,
                ),
            )
            aid = insert_assignment(conn, model, version, kind, target, rid)
            devices = target_devices(conn, kind, target)
            if not devices:
                what = "the fleet" if kind == "all" else f"group {target!r}"
                raise BadRequest(f"no device in {what} to roll out to")
            # Which devices can this assignment win on? Ask the computation itself,
            # pretending every device is reached.
            snap = Snapshot.load(conn)
            snap.reached |= {(rid, d) for d in devices}
            groups = _groups_of(conn, devices)
            devices = [
                d
                for d in devices
                if (w := snap.winner(model, d, groups.get(d, ()))) is not None and w.id == aid
            ]
            if not devices:
                raise BadRequest(
                    "every targeted device has a more specific assignment for this model"
                )
            info = {
                r[0]: (r[1], r[2])
                for r in conn.execute(
                    "SELECT id, online, desired FROM devices"
                    " WHERE id IN (SELECT value FROM json_each(?))",
                    (dumps(devices),),
                )
            }

            def order(d: str) -> tuple[int, str]:
                online = info.get(d, (0, None))[0]
                return (0 if online else 1, hashlib.sha256(f"{rid}/{d}".encode()).hexdigest())

            devices.sort(key=order)
            rows = []
            i = 0
            for wave, size in enumerate(wave_sizes(wave_plan, len(devices)), start=1):
                for d in devices[i : i + size]:
                    prev_doc = loads(info.get(d, (0, None))[1]) or {}
                    prev = (prev_doc.get("models") or {}).get(model, {}).get("version")
                    rows.append((rid, d, wave, "waiting", prev, None, t))
                i += size
            conn.executemany(
                "INSERT INTO rollout_devices (rollout_id, device_id, wave, state,"
                " previous_version, reason, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            if plan is not None and plan.shadow is not None:
                reached = self._start_shadow_in(conn, rid, model, version, devices, plan.shadow)
            else:
                reached = self._push_wave_in(conn, rid, 1, t)
            reached |= self._advance_in(conn, rid, t)
            docs = self.desired.refresh_in(conn, sorted(reached))
            return self._describe_in(conn, rid), docs

        result, docs = await self.db.write(job)
        self.desired.send(docs)
        log.info("rollout %s: %s %s to %s %s", rid, model, result["version"], kind, target or "")
        return result

    async def on_reported(self, device_ids: Iterable[str]) -> None:
        """New ``reported`` documents arrived from these devices: update their rollout
        rows, and advance the rollouts whose current wave is now decided."""
        ids = sorted(set(device_ids))
        if not ids:
            return

        def job(conn: sqlite3.Connection) -> Docs:
            t = now()
            rows = conn.execute(
                "SELECT rd.rollout_id, rd.device_id FROM rollout_devices rd"
                " JOIN rollouts r ON r.id = rd.rollout_id"
                " WHERE rd.device_id IN (SELECT value FROM json_each(?))"
                " AND rd.state IN ('pending', 'failed') AND r.state != 'rolled_back'",
                (dumps(ids),),
            ).fetchall()
            touched = {rid for rid, d in rows if self._evaluate_in(conn, rid, d, t)}
            reached: set[str] = set()
            for rid in sorted(touched):
                reached |= self._advance_in(conn, rid, t)
            docs = self.desired.refresh_in(conn, sorted(reached))
            fresh = {d for d, _ in docs}
            return docs + [doc for doc in self._stale_in(conn, ids) if doc[0] not in fresh]

        self.desired.send(await self.db.write(job))

    async def on_telemetry(self, device_ids: Iterable[str]) -> None:
        """Gate evidence arrived from these devices (``inference_stats``,
        ``shadow_stats``, ...): re-decide the running rollouts they belong to now rather
        than at the next ``tick()``. At most once per ``EVAL_INTERVAL_S`` per rollout
        (a throttle only: the decision itself is made from the database)."""
        ids = sorted(set(device_ids))
        if not ids:
            return
        mono = time.monotonic()

        def job(conn: sqlite3.Connection) -> Docs:
            t = now()
            rids = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT r.id FROM rollouts r"
                    " JOIN rollout_devices rd ON rd.rollout_id = r.id"
                    " WHERE r.state = 'running' AND r.plan IS NOT NULL"
                    " AND rd.device_id IN (SELECT value FROM json_each(?))",
                    (dumps(ids),),
                )
            ]
            reached: set[str] = set()
            for rid in rids:
                if mono - self._evaluated.get(rid, -math.inf) < EVAL_INTERVAL_S:
                    continue
                self._evaluated[rid] = mono
                reached |= self._advance_in(conn, rid, t)
            return self.desired.refresh_in(conn, sorted(reached))

        self.desired.send(await self.db.write(job))

    def _stale_in(self, conn: sqlite3.Connection, ids: Sequence[str]) -> Docs:
        """Sticky aborts: devices whose ``reported`` still wants the version of a
        stopped or rolled-back rollout that their stored desired document no longer
        names (a device back from days offline with a stale desired): their stored
        document again (same revision; the broker's retained copy is replaced too)."""
        rows = conn.execute(
            "SELECT DISTINCT d.id, d.desired FROM devices d"
            " JOIN device_models dm ON dm.device_id = d.id"
            " JOIN rollouts r ON r.model = dm.model AND r.version = dm.desired"
            " JOIN rollout_devices rd ON rd.rollout_id = r.id AND rd.device_id = d.id"
            " WHERE d.id IN (SELECT value FROM json_each(?)) AND d.desired IS NOT NULL"
            " AND r.state IN ('stopped', 'rolled_back') AND rd.state != 'succeeded'"
            " AND json_extract(d.desired, '$.models.\"' || dm.model || '\".version')"
            " IS NOT dm.desired",
            (dumps(list(ids)),),
        ).fetchall()
        if rows:
            log.info("republishing the corrected desired of %d device(s)", len(rows))
        return [(r[0], str(r[1]).encode()) for r in rows]

    async def on_event(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Failure events give failed rollout devices their reason (the ``reported``
        document decides success and failure; an event may arrive before or after it)."""
        rows = [
            (e.get("reason"), e["rollout"], e["device_id"])
            for e in events
            if e.get("kind") in FAILURE_EVENTS and e.get("rollout") and e.get("reason")
        ]
        if not rows:
            return

        def job(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE rollout_devices SET reason = ?"
                " WHERE rollout_id = ? AND device_id = ? AND state = 'failed' AND reason IS NULL",
                rows,
            )

        await self.db.write(job)

    async def tick(self) -> None:
        """Check every running rollout (wave timeouts; also finishes a decision a
        crashed worker left half-way). Called periodically by the FleetBus."""

        def job(conn: sqlite3.Connection) -> Docs:
            t = now()
            reached: set[str] = set()
            running = conn.execute("SELECT id FROM rollouts WHERE state = 'running'").fetchall()
            for (rid,) in running:
                reached |= self._advance_in(conn, rid, t)
            return self.desired.refresh_in(conn, sorted(reached))

        self.desired.send(await self.db.write(job))

    async def advance(self, rollout_id: str) -> dict[str, Any]:
        """The operator overrides waiting gates: the shadow stage ends, or the next wave
        is pushed, now (a running or paused rollout; a paused one stays paused). Recorded
        as an ``override`` decision with the gates' figures at that moment."""

        def job(conn: sqlite3.Connection) -> tuple[dict[str, Any], Docs]:
            t = now()
            state = self._state_in(conn, rollout_id)
            if state not in ("running", "paused"):
                raise RolloutConflict(
                    f"rollout {rollout_id} is {state}: only a running or paused one advances"
                )
            wave, stage, plan_text, started = conn.execute(
                "SELECT current_wave, stage, plan, wave_started_at FROM rollouts WHERE id = ?",
                (rollout_id,),
            ).fetchone()
            plan = None if plan_text is None else gates.Plan.model_validate(loads(plan_text))
            reached: set[str] = set()
            evidence: Sequence[gates.Evidence] = ()
            if stage == "shadow" and plan is not None and plan.shadow is not None:
                _, evidence = self._shadow_gates_in(conn, rollout_id, plan.shadow, t)
                self._record_gates_in(conn, rollout_id, "shadow", 0, evidence, t, force=True)
                self._decision_in(conn, rollout_id, "shadow", 0, "override", evidence, t)
                conn.execute(
                    "UPDATE rollouts SET stage = 'serving', serving_started_at = ? WHERE id = ?",
                    (t, rollout_id),
                )
                reached |= self._shadow_devices_in(conn, rollout_id)
            elif plan is not None and plan.gates and wave >= 1:
                _, evidence = self._wave_gates_in(conn, rollout_id, plan, started or t)
                self._record_gates_in(conn, rollout_id, "wave", wave, evidence, t, force=True)
                self._decision_in(conn, rollout_id, "wave", wave, "override", evidence, t)
            log.info("rollout %s: advanced by the operator past wave %d", rollout_id, wave)
            reached |= self._next_wave_in(conn, rollout_id, wave, t)
            reached |= self._advance_in(conn, rollout_id, t)
            return self._describe_in(conn, rollout_id), self.desired.refresh_in(
                conn, sorted(reached)
            )

        result, docs = await self.db.write(job)
        self.desired.send(docs)
        return result

    async def pause(self, rollout_id: str) -> dict[str, Any]:
        def job(conn: sqlite3.Connection) -> dict[str, Any]:
            state = self._state_in(conn, rollout_id)
            if state == "running":
                self._set_state_in(conn, rollout_id, "paused", "paused by operator")
            elif state != "paused":
                raise RolloutConflict(f"rollout {rollout_id} is {state}: only a running one pauses")
            return self._describe_in(conn, rollout_id)

        return await self.db.write(job)

    async def resume(self, rollout_id: str) -> dict[str, Any]:
        """A paused rollout continues; a stopped one goes on into its next wave."""

        def job(conn: sqlite3.Connection) -> tuple[dict[str, Any], Docs]:
            t = now()
            state = self._state_in(conn, rollout_id)
            reached: set[str] = set()
            if state == "paused":
                self._set_state_in(conn, rollout_id, "running", None)
            elif state == "stopped":
                self._set_state_in(conn, rollout_id, "running", None)
                current = conn.execute(
                    "SELECT current_wave FROM rollouts WHERE id = ?", (rollout_id,)
                ).fetchone()[0]
                # The operator overrides the stop: a shadow stage ends (wave 1 is next),
                # and devices a gate stop withdrew get the version again.
                conn.execute(
                    "UPDATE rollouts SET stage = 'serving', serving_started_at = ?"
                    " WHERE id = ? AND stage = 'shadow'",
                    (t, rollout_id),
                )
                reached |= {
                    r[0]
                    for r in conn.execute(
                        "UPDATE rollout_devices SET state = 'pending', updated_at = ?"
                        " WHERE rollout_id = ? AND wave <= ? AND state = 'rolled_back'"
                        " RETURNING device_id",
                        (t, rollout_id, current),
                    )
                }
                reached |= self._next_wave_in(conn, rollout_id, current, t)
            elif state != "running":
                raise RolloutConflict(f"rollout {rollout_id} is {state}: nothing to resume")
            reached |= self._advance_in(conn, rollout_id, t)
            return self._describe_in(conn, rollout_id), self.desired.refresh_in(
                conn, sorted(reached)
            )

        result, docs = await self.db.write(job)
        self.desired.send(docs)
        return result

    async def rollback(self, rollout_id: str) -> dict[str, Any]:
        """Every device back to what it would run without this rollout."""

        def job(conn: sqlite3.Connection) -> tuple[dict[str, Any], Docs]:
            state = self._state_in(conn, rollout_id)
            if state == "rolled_back":
                return self._describe_in(conn, rollout_id), []
            kind, target = conn.execute(
                "SELECT target_kind, target FROM rollouts WHERE id = ?", (rollout_id,)
            ).fetchone()
            self._set_state_in(conn, rollout_id, "rolled_back", "rolled back by operator")
            conn.execute(
                "UPDATE rollout_devices SET state = 'rolled_back', updated_at = ?"
                " WHERE rollout_id = ? AND state != 'waiting'",
                (now(), rollout_id),
            )
            # The rollout's devices, and (after completion) devices that joined the
            # target later and got the version through the completed assignment.
            ids: set[str] = {
                r[0]
                for r in conn.execute(
                    "SELECT device_id FROM rollout_devices WHERE rollout_id = ?", (rollout_id,)
                )
            }
            ids |= set(target_devices(conn, kind, target or ""))
            return self._describe_in(conn, rollout_id), self.desired.refresh_in(conn, sorted(ids))

        result, docs = await self.db.write(job)
        self.desired.send(docs)
        log.info("rollout %s rolled back (%d devices changed)", rollout_id, len(docs))
        return result

    async def get(self, rollout_id: str) -> dict[str, Any]:
        return await self.db.read(lambda conn: self._describe_in(conn, rollout_id))

    async def list(self) -> list[dict[str, Any]]:
        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            ids = [r[0] for r in conn.execute("SELECT id FROM rollouts ORDER BY created_at DESC")]
            return [self._describe_in(conn, rid) for rid in ids]

        return await self.db.read(q)

    # ------------------------------------------------------ writer-thread decisions

    def _state_in(self, conn: sqlite3.Connection, rollout_id: str) -> str:
        row = conn.execute("SELECT state FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            raise UnknownRollout(f"unknown rollout {rollout_id!r}")
        return str(row[0])

    def _set_state_in(
        self, conn: sqlite3.Connection, rollout_id: str, state: str, reason: str | None
    ) -> None:
        conn.execute(
            "UPDATE rollouts SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
            (state, reason, now(), rollout_id),
        )
        log.info("rollout %s: %s%s", rollout_id, state, f" ({reason})" if reason else "")

    def _push_wave_in(self, conn: sqlite3.Connection, rid: str, wave: int, t: float) -> set[str]:
        """Reach every device of ``wave``; returns them (their desired must be refreshed)."""
        conn.execute(
            "UPDATE rollouts SET current_wave = ?, wave_started_at = ?, updated_at = ?"
            " WHERE id = ?",
            (wave, t, t, rid),
        )
        ids = [
            r[0]
            for r in conn.execute(
                "UPDATE rollout_devices SET state = 'pending', updated_at = ?"
                " WHERE rollout_id = ? AND wave = ? AND state = 'waiting' RETURNING device_id",
                (t, rid, wave),
            )
        ]
        # A device may already run the version (or have refused it): decide it now.
        for d in ids:
            self._evaluate_in(conn, rid, d, t)
        log.info("rollout %s: wave %d pushed to %d devices", rid, wave, len(ids))
        return set(ids)

    def _next_wave_in(self, conn: sqlite3.Connection, rid: str, current: int, t: float) -> set[str]:
        last = conn.execute(
            "SELECT max(wave) FROM rollout_devices WHERE rollout_id = ?", (rid,)
        ).fetchone()[0]
        if last is None or current >= last:
            self._set_state_in(conn, rid, "completed", None)
            return self._promote_in(conn, rid, t)
        return self._push_wave_in(conn, rid, current + 1, t)

    def _promote_in(self, conn: sqlite3.Connection, rid: str, t: float) -> set[str]:
        """A plan rollout completed: its ``promote`` label moves to the version. Returns
        the devices whose documents carry the model's labels (to refresh)."""
        model, version, plan_text = conn.execute(
            "SELECT model, version, plan FROM rollouts WHERE id = ?", (rid,)
        ).fetchone()
        label = (loads(plan_text) or {}).get("promote")
        if not label:
            return set()
        conn.execute(
            "INSERT INTO model_labels (name, label, version, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name, label) DO UPDATE SET version = excluded.version,"
            " updated_at = excluded.updated_at",
            (model, label, version, t),
        )
        log.info("rollout %s: %s %s promoted to %r", rid, model, version, label)
        return {
            r[0]
            for r in conn.execute("SELECT device_id FROM device_models WHERE model = ?", (model,))
        } | {
            r[0]
            for r in conn.execute(
                "SELECT device_id FROM rollout_devices WHERE rollout_id = ?", (rid,)
            )
        }

    def _evaluate_in(self, conn: sqlite3.Connection, rid: str, device_id: str, t: float) -> bool:
        """Compare a reached device's reported model with the rollout; True if it changed."""
        row = conn.execute(
            "SELECT r.version, dm.active, dm.desired, dm.state, dm.last_error, rd.state"
            " FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id"
            " LEFT JOIN device_models dm ON dm.device_id = rd.device_id AND dm.model = r.model"
            " WHERE rd.rollout_id = ? AND rd.device_id = ?",
            (rid, device_id),
        ).fetchone()
        if row is None:
            return False
        version, active, desired, state, last_error, current = row
        if desired != version or current not in ("pending", "failed"):
            return False
        if state == "active" and active == version:
            new, reason = "succeeded", None
        elif state == "failed" and current == "pending":
            new = "failed"
            reason = last_error or self._failure_reason_in(conn, rid, device_id)
        else:
            return False
        conn.execute(
            "UPDATE rollout_devices SET state = ?, reason = ?, updated_at = ?"
            " WHERE rollout_id = ? AND device_id = ?",
            (new, reason, t, rid, device_id),
        )
        return True

    def _failure_reason_in(self, conn: sqlite3.Connection, rid: str, device_id: str) -> str | None:
        kinds = sorted(FAILURE_EVENTS)
        row = conn.execute(
            "SELECT reason FROM events WHERE rollout = ? AND device_id = ?"
            f" AND kind IN ({','.join('?' * len(kinds))}) AND reason IS NOT NULL"
            " ORDER BY received_at DESC LIMIT 1",
            (rid, device_id, *kinds),
        ).fetchone()
        return None if row is None else str(row[0])

    def _advance_in(self, conn: sqlite3.Connection, rid: str, t: float) -> set[str]:
        """Push waves while the current one is decided and good; stop on a bad one."""
        reached: set[str] = set()
        while True:
            r = conn.execute(
                "SELECT state, current_wave, max_failure_share, wave_started_at, wave_timeout_s,"
                " plan, stage FROM rollouts WHERE id = ?",
                (rid,),
            ).fetchone()
            if r is None or r[0] != "running":
                return reached
            _, wave, max_share, started, timeout, plan_text, stage = r
            plan = None if plan_text is None else gates.Plan.model_validate(loads(plan_text))
            if stage == "shadow" and plan is not None and plan.shadow is not None:
                shadow_outcome, shadow_ev = self._shadow_gates_in(conn, rid, plan.shadow, t)
                self._record_gates_in(
                    conn, rid, "shadow", 0, shadow_ev, t, force=shadow_outcome != "wait"
                )
                if shadow_outcome == "fail":
                    return reached | self._abort_in(conn, rid, plan, "shadow", 0, shadow_ev, t)
                if shadow_outcome == "wait":
                    return reached
                self._decision_in(conn, rid, "shadow", 0, "pass", shadow_ev, t)
                conn.execute(
                    "UPDATE rollouts SET stage = 'serving', serving_started_at = ? WHERE id = ?",
                    (t, rid),
                )
                reached |= self._shadow_devices_in(conn, rid)
                reached |= self._next_wave_in(conn, rid, 0, t)
                continue
            gate_outcome: gates.Outcome = "pass"
            evidence: Sequence[gates.Evidence] = ()
            recorded = False
            if plan is not None and plan.gates and wave >= 1:
                gate_outcome, evidence = self._wave_gates_in(conn, rid, plan, started or t)
                recorded = self._record_gates_in(
                    conn, rid, "wave", wave, evidence, t, force=gate_outcome == "fail"
                )
                if gate_outcome == "fail":
                    return reached | self._abort_in(conn, rid, plan, "wave", wave, evidence, t)
            counts = dict(
                conn.execute(
                    "SELECT state, count(*) FROM rollout_devices"
                    " WHERE rollout_id = ? AND wave = ? GROUP BY state",
                    (rid, wave),
                ).fetchall()
            )
            size = sum(counts.values())
            failed, pending = counts.get("failed", 0), counts.get("pending", 0)
            done = counts.get("succeeded", 0) + failed
            if size and failed / size > max_share:
                self._stop_in(conn, rid, wave, failed, size, max_share)
                return reached
            if pending:
                timed_out = timeout is not None and started is not None and t - started >= timeout
                if not timed_out or done == 0:
                    return reached  # keep waiting (see the module doc: no evidence, no push)
                if failed / done > max_share:
                    self._stop_in(conn, rid, wave, failed, done, max_share)
                    return reached
                log.info("rollout %s: wave %d timed out with %d pending", rid, wave, pending)
            if gate_outcome == "wait":
                return reached  # the devices are done, the evidence is not yet
            if evidence:
                if not recorded:  # the point that passed the wave is always on the chart
                    self._record_gates_in(conn, rid, "wave", wave, evidence, t, force=True)
                self._decision_in(conn, rid, "wave", wave, "pass", evidence, t)
            reached |= self._next_wave_in(conn, rid, wave, t)

    # ------------------------------------------------------------------ gates

    def _start_shadow_in(
        self,
        conn: sqlite3.Connection,
        rid: str,
        model: str,
        version: str,
        devices: Sequence[str],
        shadow: gates.ShadowStage,
    ) -> set[str]:
        """Pick the shadow devices among those that run another version of the model
        (in rollout order: online first); ``BadRequest`` when there is none."""
        running = {
            r[0]
            for r in conn.execute(
                "SELECT device_id FROM device_models WHERE model = ? AND active IS NOT NULL"
                " AND active != ? AND device_id IN (SELECT value FROM json_each(?))",
                (model, version, dumps(list(devices))),
            )
        }
        eligible = [d for d in devices if d in running]
        if not eligible:
            raise BadRequest(
                f"a shadow stage needs a baseline: no targeted device runs a version of"
                f" {model} yet (roll it out without a shadow stage first)"
            )
        (share,) = parse_waves([shadow.devices])
        size = share if isinstance(share, int) else math.ceil(share * len(eligible) - 1e-9)
        size = min(max(size, 1), len(eligible))
        chosen = eligible[:size]
        conn.execute(
            "UPDATE rollout_devices SET shadow = 1"
            " WHERE rollout_id = ? AND device_id IN (SELECT value FROM json_each(?))",
            (rid, dumps(chosen)),
        )
        log.info("rollout %s: shadow stage on %d devices", rid, len(chosen))
        return set(chosen)

    def _shadow_devices_in(self, conn: sqlite3.Connection, rid: str) -> set[str]:
        return {
            r[0]
            for r in conn.execute(
                "SELECT device_id FROM rollout_devices WHERE rollout_id = ? AND shadow = 1",
                (rid,),
            )
        }

    def _shadow_gates_in(
        self, conn: sqlite3.Connection, rid: str, shadow: gates.ShadowStage, t: float
    ) -> tuple[gates.Outcome, Sequence[gates.Evidence]]:
        model, version, started = conn.execute(
            "SELECT model, version, stage_started_at FROM rollouts WHERE id = ?", (rid,)
        ).fetchone()
        k, n = conn.execute(
            "SELECT coalesce(sum(k), 0), coalesce(sum(n), 0) FROM signal_counts"
            " WHERE model = ? AND version = ? AND signal = 'shadow_agreement'"
            " AND received_at >= ? AND device_id IN"
            " (SELECT device_id FROM rollout_devices WHERE rollout_id = ? AND shadow = 1)",
            (model, version, started, rid),
        ).fetchone()
        evidence = [
            gates.decide_rate(gates.parse_gate(g), gates.Counts(k, n), None, shadow.min_items, 1)
            for g in shadow.gates
        ]
        outcome = _combine(evidence)
        if outcome == "pass" and t - started < shadow.min_duration_s:
            for ev in evidence:
                ev.outcome = "wait"
                ev.why += f"; baking until {shadow.min_duration_s:g} s have passed"
            outcome = "wait"
        return outcome, evidence

    def _wave_gates_in(
        self, conn: sqlite3.Connection, rid: str, plan: gates.Plan, wave_started: float
    ) -> tuple[gates.Outcome, Sequence[gates.Evidence]]:
        model, version, serving_started = conn.execute(
            "SELECT model, version, coalesce(serving_started_at, created_at) FROM rollouts"
            " WHERE id = ?",
            (rid,),
        ).fetchone()
        canary = _Figures.load(conn, rid, model, version, True, wave_started)
        baseline = _Figures.load(conn, rid, model, version, False, serving_started)
        evidence: list[gates.Evidence] = []
        for gate in plan.gated:
            if gate.signal == "p95_ms":
                ev = gates.decide_p95(
                    gate,
                    canary.latency,
                    baseline.latency,
                    plan.min_requests,
                    plan.min_baseline_requests,
                )
            elif gate.signal == "drift_psi":
                ev = gates.decide_mean(gate, canary.drift, baseline.drift, 1)
            else:
                c, b = canary.rate(gate.signal), baseline.rate(gate.signal)
                min_n = plan.min_audited if gate.signal == "cloud_agreement" else plan.min_requests
                min_b = (
                    plan.min_audited
                    if gate.signal == "cloud_agreement"
                    else plan.min_baseline_requests
                )
                ev = gates.decide_rate(gate, c, b, min_n, min_b)
            evidence.append(ev)
        return _combine(evidence), evidence

    def _record_gates_in(
        self,
        conn: sqlite3.Connection,
        rid: str,
        stage: str,
        wave: int,
        evidence: Sequence[gates.Evidence],
        t: float,
        *,
        force: bool,
    ) -> bool:
        """One point per gate on the rollout page's charts (``rollout_gate_evals``,
        writer thread). While the gates wait, or pass with wave devices still pending,
        at most one evaluation per ``series_interval_s`` per rollout is stored, and none
        closer than the rollout's age / ``SERIES_POINTS`` to the last one (decisions run
        on every report and telemetry batch: storing each would grow without bound);
        with ``force`` (the evaluation passes, fails or overrides a stage) it is
        always stored. True if it stored the points."""
        if not evidence:
            return False
        if not force:
            last, created = conn.execute(
                "SELECT (SELECT max(at) FROM rollout_gate_evals WHERE rollout_id = ?),"
                " created_at FROM rollouts WHERE id = ?",
                (rid, rid),
            ).fetchone()
            spacing = max(self.series_interval_s, (t - created) / SERIES_POINTS)
            if last is not None and t - last < spacing:
                return False
        rows = []
        for e in evidence:
            c, b = e.canary, e.baseline
            figures = [c.get("value"), c.get("low"), c.get("high"), c.get("n")]
            figures += [b.get("value"), b.get("n"), e.threshold]
            rows.append((rid, t, stage, wave, e.gate, e.signal, e.outcome, *figures))
        conn.executemany(
            "INSERT INTO rollout_gate_evals (rollout_id, at, stage, wave, gate, signal, outcome,"
            " canary, canary_low, canary_high, canary_n, baseline, baseline_n, threshold)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        return True

    def _decision_in(
        self,
        conn: sqlite3.Connection,
        rid: str,
        stage: str,
        wave: int,
        outcome: str,
        evidence: Sequence[gates.Evidence],
        t: float,
    ) -> None:
        conn.execute(
            "INSERT INTO rollout_decisions (rollout_id, stage, wave, outcome, evidence, at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (rid, stage, wave, outcome, dumps([e.to_json() for e in evidence]), t),
        )

    def _abort_in(
        self,
        conn: sqlite3.Connection,
        rid: str,
        plan: gates.Plan,
        stage: str,
        wave: int,
        evidence: Sequence[gates.Evidence],
        t: float,
    ) -> set[str]:
        """A gate failed: store the evidence, then stop or roll back (``plan.on_fail``).
        Returns the devices whose desired documents must be recomputed."""
        model, version, kind, target = conn.execute(
            "SELECT model, version, target_kind, target FROM rollouts WHERE id = ?", (rid,)
        ).fetchone()
        failed = [e for e in evidence if e.outcome == "fail"]
        served = sorted(
            {
                r[0]
                for r in conn.execute(
                    "SELECT device_id FROM rollout_devices WHERE rollout_id = ?"
                    " AND state = 'succeeded'",
                    (rid,),
                )
            }
            | {
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT device_id FROM inference_stats WHERE model = ?"
                    " AND version = ? AND device_id IN"
                    " (SELECT device_id FROM rollout_devices WHERE rollout_id = ?)",
                    (model, version, rid),
                )
            }
        )
        where = "the shadow stage" if stage == "shadow" else f"wave {wave}"
        first = failed[0]
        reason = f"gate {first.gate!r} failed in {where}: {first.why}"
        doc = {
            "stage": stage,
            "wave": wave,
            "gate": first.gate,
            "failed": [e.to_json() for e in failed],
            "gates": [e.to_json() for e in evidence],
            "devices_served": served[:MAX_FAILURES_LISTED],
            "devices_served_count": len(served),
            "action": plan.on_fail,
            "at": t,
        }
        conn.execute("UPDATE rollouts SET evidence = ? WHERE id = ?", (dumps(doc), rid))
        self._decision_in(conn, rid, stage, wave, "fail", evidence, t)
        ids = {
            r[0]
            for r in conn.execute(
                "SELECT device_id FROM rollout_devices WHERE rollout_id = ?", (rid,)
            )
        }
        if plan.on_fail == "rollback":
            self._set_state_in(conn, rid, "rolled_back", reason + "; rolled back")
            conn.execute(
                "UPDATE rollout_devices SET state = 'rolled_back', updated_at = ?"
                " WHERE rollout_id = ? AND state != 'waiting'",
                (t, rid),
            )
            return ids | set(target_devices(conn, kind, target or ""))
        self._set_state_in(conn, rid, "stopped", reason + "; stopped")
        # Sticky: devices that had not activated the version no longer get it (one
        # whose success report is not in yet but whose telemetry shows it serving the
        # version has activated it: it keeps it, as the others that did).
        conn.execute(
            "UPDATE rollout_devices SET state = 'rolled_back', updated_at = ?"
            " WHERE rollout_id = ? AND state IN ('pending', 'failed')"
            " AND device_id NOT IN (SELECT value FROM json_each(?))",
            (t, rid, dumps(served)),
        )
        return ids

    def _stop_in(
        self, conn: sqlite3.Connection, rid: str, wave: int, failed: int, of: int, share: float
    ) -> None:
        reason = (
            f"wave {wave}: {failed} of {of} devices failed, more than the"
            f" {share:.0%} allowed; later waves were not started"
        )
        self._set_state_in(conn, rid, "stopped", reason)

    # ----------------------------------------------------------------- description

    def _describe_in(self, conn: sqlite3.Connection, rid: str) -> dict[str, Any]:
        r = conn.execute(
            "SELECT id, model, version, target_kind, target, waves, max_failure_share, state,"
            " current_wave, wave_started_at, wave_timeout_s, reason, created_at, updated_at,"
            " plan, stage, stage_started_at, serving_started_at, evidence"
            " FROM rollouts WHERE id = ?",
            (rid,),
        ).fetchone()
        if r is None:
            raise UnknownRollout(f"unknown rollout {rid!r}")
        waves: dict[int, dict[str, int]] = {}
        for wave, state, n in conn.execute(
            "SELECT wave, state, count(*) FROM rollout_devices WHERE rollout_id = ?"
            " GROUP BY wave, state ORDER BY wave",
            (rid,),
        ):
            w = waves.setdefault(
                wave, {"wave": wave, "devices": 0, **dict.fromkeys(DEVICE_STATES, 0)}
            )
            w[state] = n
            w["devices"] += n
        totals = {"devices": 0, **dict.fromkeys(DEVICE_STATES, 0)}
        for w in waves.values():
            for k in totals:
                totals[k] += w[k]
        failures = [
            {"device_id": d, "wave": w, "reason": reason, "at": at}
            for d, w, reason, at in conn.execute(
                "SELECT device_id, wave, reason, updated_at FROM rollout_devices"
                " WHERE rollout_id = ? AND state = 'failed' ORDER BY wave, device_id LIMIT ?",
                (rid, MAX_FAILURES_LISTED),
            )
        ]
        kind, target = r[3], r[4] or ""
        return {
            "id": r[0],
            "model": r[1],
            "version": r[2],
            "target": {"all": True} if kind == "all" else {kind: target},
            "waves": loads(r[5], []),
            "max_failure_share": r[6],
            "state": r[7],
            "current_wave": r[8],
            "wave_count": len(waves),
            "wave_started_at": r[9],
            "wave_timeout_s": r[10],
            "reason": r[11],
            "created_at": r[12],
            "updated_at": r[13],
            "counts": totals,
            "per_wave": [waves[k] for k in sorted(waves)],
            "failures": failures,
            "plan": loads(r[14]),
            "stage": r[15],
            "stage_started_at": r[16],
            "serving_started_at": r[17],
            "shadow_devices": sorted(self._shadow_devices_in(conn, rid)),
            "evidence": loads(r[18]),
            "decisions": [
                {"stage": st, "wave": w, "outcome": o, "gates": loads(e), "at": at}
                for st, w, o, e, at in conn.execute(
                    "SELECT stage, wave, outcome, evidence, at FROM rollout_decisions"
                    " WHERE rollout_id = ? ORDER BY id",
                    (rid,),
                )
            ],
        }


def _combine(evidence: Sequence[gates.Evidence]) -> gates.Outcome:
    """Fail if any gate fails, pass if every gate passes, else wait."""
    outcomes = {e.outcome for e in evidence}
    if "fail" in outcomes:
        return "fail"
    return "pass" if outcomes <= {"pass"} else "wait"


class _Figures:
    """One cohort's telemetry for the gates (writer thread): the canary (the rollout's
    devices, the new version) or the baseline (the same devices, any other version)."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.asked_cloud = 0
        self.latency: list[int] = []
        self.agree = gates.Counts(0, 0)
        self.drift: list[float] = []

    @classmethod
    def load(
        cls,
        conn: sqlite3.Connection,
        rid: str,
        model: str,
        version: str,
        canary: bool,
        since: float,
    ) -> _Figures:
        f = cls()
        same = "=" if canary else "!="
        cohort = "SELECT device_id FROM rollout_devices WHERE rollout_id = ?"
        # Summed by SQLite's JSON functions, not parsed in Python: a decision runs on
        # every report and telemetry batch of a wave, over every window since it began.
        buckets = len(protocol.LATENCY_BOUNDS_MS) + 1
        latency = ", ".join(
            f"coalesce(sum(json_extract(data, '$.latency_ms.counts[{i}]')), 0)"
            for i in range(buckets)
        )
        row = conn.execute(
            "SELECT coalesce(sum(count), 0), coalesce(sum(errors), 0),"
            " coalesce(sum(json_extract(data, '$.sources.cloud')), 0),"
            " coalesce(sum(json_extract(data, '$.sources.mixed')), 0),"
            " coalesce(sum((SELECT sum(value) FROM json_each(data, '$.fallback'))), 0),"
            f" {latency} FROM inference_stats WHERE model = ? AND version {same} ?"
            f" AND received_at >= ? AND device_id IN ({cohort})",
            (model, version, since, rid),
        ).fetchone()
        f.requests, f.errors = int(row[0]), int(row[1])
        # Asked the cloud: answered by it (wholly or partly), or wanted it and had to
        # answer alone (a fallback reason).
        f.asked_cloud = int(row[2]) + int(row[3]) + int(row[4])
        f.latency = [int(c) for c in row[5 : 5 + buckets]]
        k, n = conn.execute(
            "SELECT coalesce(sum(k), 0), coalesce(sum(n), 0) FROM signal_counts"
            f" WHERE model = ? AND version {same} ? AND signal = 'cloud_agreement'"
            f" AND received_at >= ? AND device_id IN ({cohort})",
            (model, version, since, rid),
        ).fetchone()
        f.agree = gates.Counts(int(k), int(n))
        f.drift = _drift_scores(conn, rid, model, version, canary, since)
        return f

    def rate(self, signal: str) -> gates.Counts:
        answered = self.requests - self.errors
        if signal == "error_rate":
            return gates.Counts(self.errors, self.requests)
        if signal == "fallback_rate":
            return gates.Counts(min(self.asked_cloud, answered), answered)
        if signal == "cloud_agreement":
            return self.agree
        raise ValueError(f"no rate {signal!r} for a serving wave")


def _drift_scores(
    conn: sqlite3.Connection, rid: str, model: str, version: str, canary: bool, since: float
) -> list[float]:
    """Each cohort device's latest input drift (``psi_max``: the largest PSI over the
    input features, the device's own figure per window) since ``since``; a device
    without a figure (no reference profile in the bundle, too few items) gives none.

    The ``drift_stats`` table comes with the signals work (issue 11, part 3); without
    it there is no evidence and a drift gate waits."""
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'drift_stats'"
    ).fetchone()
    if found is None:
        return []
    same = "=" if canary else "!="
    rows = conn.execute(
        "SELECT device_id, psi_max FROM drift_stats WHERE model = ? AND version"
        f" {same} ? AND received_at >= ? AND psi_max IS NOT NULL AND device_id IN"
        " (SELECT device_id FROM rollout_devices WHERE rollout_id = ?)"
        " ORDER BY received_at, window_start",
        (model, version, since, rid),
    ).fetchall()
    latest = {d: float(s) for d, s in rows}
    return list(latest.values())

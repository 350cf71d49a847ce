"""Fallback policies from the fleet (issue 11, part 5; docs/fleet.md, "Fallback policy
from the fleet").

An operator sets a model's cloud-fallback settings (``mode``, ``confidence_rule``,
``threshold``, ``class_thresholds``, ``audit_rate``: ``core.protocol.FleetFallback``)
for one device, a group or all devices: a calibration update, or an emergency
``edge_only``, without a new bundle. They live in the ``fallback_policies`` table,
one row per (model, target), and reach each device inside its ``desired`` document
(``models.<m>.fallback``, computed by fleet/desired.py with :func:`effective`).

Precedence, per setting: **device** > **group** > **all** (like assignments); among a
device's groups the most recently set wins. So ``policy set m --all --threshold 0.8``
and ``policy set m --group north --mode edge_only`` give the north stores
``{threshold: 0.8, mode: edge_only}``. ``set`` merges into what that target had
(a setting given as ``null`` is removed); ``clear`` removes the target's row.
A policy only travels with a model the device has in its desired state.

Threads: ``*_in`` functions run on the database's writer thread inside one write job
with the desired-state refresh (so a policy and the documents it changes commit
together); the coroutines run on the event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgefleet.core import protocol
from edgefleet.core.errors import BadRequest, NotFound
from edgefleet.core.names import check_name
from edgefleet.fleet.db import dumps, loads, now
from edgefleet.fleet.desired import DesiredStates, UnknownDevice, check_target, target_devices

_LEVEL = {"all": 0, "group": 1, "device": 2}


@dataclass(frozen=True, slots=True)
class PolicyRow:
    model: str
    kind: str
    target: str
    policy: dict[str, Any]
    updated_at: float


def check_policy(doc: object) -> protocol.FleetFallback:
    """A policy document as the wire model, or ``BadRequest`` with the first problem
    (threshold outside 0..1, an unknown mode or rule, an unknown setting...)."""
    try:
        return protocol.FleetFallback.from_obj(doc)
    except protocol.WireError as exc:
        raise BadRequest(f"invalid fallback policy: {exc.detail}") from None


def load_policies(conn: sqlite3.Connection) -> dict[str, list[PolicyRow]]:
    """Every policy, by model (writer or reader thread)."""
    out: dict[str, list[PolicyRow]] = {}
    rows = conn.execute(
        "SELECT model, target_kind, target, policy, updated_at FROM fallback_policies"
        " ORDER BY model, updated_at, target_kind, target"
    )
    for model, kind, target, policy, updated_at in rows:
        out.setdefault(model, []).append(
            PolicyRow(model, kind, target or "", loads(policy, {}), float(updated_at))
        )
    return out


def effective(
    rows: Iterable[PolicyRow], device_id: str, groups: Iterable[str]
) -> protocol.FleetFallback | None:
    """One device's policy for one model: the settings of the rows that cover it,
    all < group (older < newer) < device. None when no row covers it."""
    gs = set(groups)
    covering = [
        r
        for r in rows
        if r.kind == "all"
        or (r.kind == "group" and r.target in gs)
        or (r.kind == "device" and r.target == device_id)
    ]
    if not covering:
        return None
    merged: dict[str, Any] = {}
    for r in sorted(covering, key=lambda r: (_LEVEL[r.kind], r.updated_at)):
        merged.update(r.policy)
    policy = protocol.FleetFallback.from_obj(merged)  # each row was checked when set
    return None if policy.is_empty() else policy


class FallbackPolicies:
    """The ``policy`` routes' and CLI's side: set, clear and list, then push."""

    def __init__(self, desired: DesiredStates) -> None:
        self.desired = desired
        self.db = desired.db

    async def set(
        self, model: str, kind: str, target: str, settings: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge ``settings`` into the target's policy (``None`` values remove a setting)
        and push the devices it covers. Returns the stored row. ``BadRequest`` for an
        invalid policy (nothing stored), ``NotFound`` for an unknown model or device."""
        kind, target = check_target(kind, target)
        _check_model_name(model)
        if not isinstance(settings, Mapping) or not settings:
            raise BadRequest("fallback must be an object with at least one setting")

        def job(conn: sqlite3.Connection) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
            _check_model(conn, model)
            if kind == "device" and not target_devices(conn, "device", target):
                raise UnknownDevice(f"unknown device {target!r}")
            row = conn.execute(
                "SELECT policy FROM fallback_policies"
                " WHERE model = ? AND target_kind = ? AND target = ?",
                (model, kind, target),
            ).fetchone()
            merged: dict[str, Any] = loads(row[0], {}) if row else {}
            for key, value in settings.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            policy = check_policy(merged).to_wire()
            at = now()
            if policy:
                conn.execute(
                    "INSERT INTO fallback_policies (model, target_kind, target, policy,"
                    " updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (model, target_kind,"
                    " target) DO UPDATE SET policy = excluded.policy,"
                    " updated_at = excluded.updated_at",
                    (model, kind, target, dumps(policy), at),
                )
            else:  # every setting removed: no row left
                conn.execute(
                    "DELETE FROM fallback_policies"
                    " WHERE model = ? AND target_kind = ? AND target = ?",
                    (model, kind, target),
                )
            ids = None if kind == "all" else target_devices(conn, kind, target)
            doc = {"model": model, "target": _target(kind, target), "fallback": policy}
            return doc | {"updated_at": at}, self.desired.refresh_in(conn, ids)

        doc, docs = await self.db.write(job)
        self.desired.send(docs)
        return doc | {"devices_changed": len(docs)}

    async def clear(self, model: str, kind: str, target: str) -> dict[str, Any]:
        """Remove the target's policy for ``model`` and push; ``NotFound`` if none."""
        kind, target = check_target(kind, target)
        _check_model_name(model)

        def job(conn: sqlite3.Connection) -> list[tuple[str, bytes]]:
            cur = conn.execute(
                "DELETE FROM fallback_policies WHERE model = ? AND target_kind = ? AND target = ?",
                (model, kind, target),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no fallback policy for {model} on {kind} {target!r}".strip())
            ids = None if kind == "all" else target_devices(conn, kind, target)
            return self.desired.refresh_in(conn, ids)

        docs = await self.db.write(job)
        self.desired.send(docs)
        return {"model": model, "target": _target(kind, target), "devices_changed": len(docs)}

    async def list(self, model: str | None = None) -> list[dict[str, Any]]:
        rows = await self.db.read(load_policies)
        return [
            {
                "model": r.model,
                "target": _target(r.kind, r.target),
                "fallback": r.policy,
                "updated_at": r.updated_at,
            }
            for name, rs in sorted(rows.items())
            if model is None or name == model
            for r in rs
        ]


def _target(kind: str, target: str) -> dict[str, Any]:
    return {"all": True} if kind == "all" else {kind: target}


def _check_model_name(model: str) -> None:
    check_name(model, "model name")  # InvalidName: a BadRequest (HTTP 400)


def _check_model(conn: sqlite3.Connection, model: str) -> None:
    if conn.execute("SELECT 1 FROM model_versions WHERE name = ?", (model,)).fetchone() is None:
        raise NotFound(f"the fleet has no model {model!r}")

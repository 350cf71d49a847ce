"""The audit log: who changed what in the fleet, when, and from where (issue 12).

Every state-changing API request (any method but GET/HEAD/OPTIONS) by a token or a
console session is written by ``audit_middleware`` after it is answered, whatever the
answer: a refused action (403, 409) is as worth knowing as a done one. Console sign-in,
failed sign-in and sign-out are written by the console itself. Device requests
(hard-example uploads, enrolment) are not operator actions and are not audited here:
the devices' own ``events`` say what they did.

Rows are written through the fleet database's writer thread (``FleetDB.write``); a
failure to write one is logged and never turns a done action into an error.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import Any

from edgefleet.fleet.db import FleetDB, now

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DETAIL_MAX = 500  # characters: an error message or a summary, never a request body


@dataclass(frozen=True)
class AuditEntry:
    actor: str  # the token's or session's name
    role: str
    via: str  # token | session | console
    action: str  # "POST /v1/rollouts/{id}/pause", "login", "login_failed", "logout"
    target: str  # what it acted on: the route's parameters, "id=r1", or ""
    status: int
    remote: str  # the client's address as the fleet saw it (a proxy's, behind one)
    detail: str = ""


class Audit:
    """Writes and lists audit rows (table ``audit_log``, migration 7)."""

    def __init__(self, db: FleetDB) -> None:
        self.db = db

    async def record(self, entry: AuditEntry) -> None:
        row = {
            "at": now(),
            "actor": entry.actor,
            "role": entry.role,
            "via": entry.via,
            "action": entry.action,
            "target": entry.target,
            "status": entry.status,
            "remote": entry.remote,
            "detail": entry.detail[:_DETAIL_MAX],
        }

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO audit_log (at, actor, role, via, action, target, status, remote,"
                " detail) VALUES (:at, :actor, :role, :via, :action, :target, :status,"
                " :remote, :detail)",
                row,
            )

        try:
            await self.db.write(insert)
        except Exception:  # the action itself is done: never fail it for its log line
            log.exception("could not write the audit row for %s %s", entry.actor, entry.action)

    async def list(
        self, *, limit: int = 100, before: int | None = None, actor: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; ``before`` an id for paging."""
        where: list[str] = []
        args: list[Any] = []
        if before is not None:
            where.append("id < ?")
            args.append(before)
        if actor:
            where.append("actor = ?")
            args.append(actor)
        sql = "SELECT * FROM audit_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)

        def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return [dict(r) for r in conn.execute(sql, args)]

        return await self.db.read(query)

"""Console sessions: a sign-in exchanges an API token for a session cookie (issue 12).

- The cookie holds 32 random bytes (URL-safe base64); the database keeps only their
  sha256 (table ``console_sessions``, migration 7), so a copy of the database signs
  nobody in. The session carries the token's name and role *as they were at sign-in*:
  removing a token from the config ends its sessions at the next restart only if the
  sessions table is cleared — ``Sessions.clear_unknown`` does that at start.
- Each session has its own CSRF token (32 random bytes) that every state-changing
  request made with the cookie must repeat in ``X-CSRF-Token`` (or a ``csrf_token``
  form field): the cookie is ``SameSite=Strict`` too, but a second, independent
  defence costs nothing and covers browsers that ignore SameSite.
- Sessions end at ``ttl_s`` after sign-in (absolute, not sliding: a stolen cookie
  stops working) and at sign-out. Expired rows are deleted when met and at start.

Lookups read through the database's reader threads; writes go through its writer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from dataclasses import dataclass

from edgefleet.fleet.db import FleetDB, now

COOKIE = "edgefleet_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
DEFAULT_TTL_S = 12 * 3600.0


def _hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    name: str
    role: str
    csrf: str
    expires_at: float

    def csrf_ok(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.csrf.encode())


class Sessions:
    def __init__(self, db: FleetDB, *, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.db = db
        self.ttl_s = ttl_s

    async def create(self, name: str, role: str, remote: str) -> tuple[str, Session]:
        """A new session; returns the raw cookie value (shown once) and the session."""
        raw = secrets.token_urlsafe(32)
        session = Session(name, role, secrets.token_urlsafe(32), now() + self.ttl_s)

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO console_sessions (id_hash, name, role, csrf, created_at,"
                " expires_at, remote) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (_hash(raw), name, role, session.csrf, now(), session.expires_at, remote),
            )

        await self.db.write(insert)
        return raw, session

    async def lookup(self, raw: str) -> Session | None:
        if not raw or len(raw) > 128:
            return None
        key = _hash(raw)

        def query(conn: sqlite3.Connection) -> sqlite3.Row | None:
            row: sqlite3.Row | None = conn.execute(
                "SELECT name, role, csrf, expires_at FROM console_sessions WHERE id_hash = ?",
                (key,),
            ).fetchone()
            return row

        row = await self.db.read(query)
        if row is None:
            return None
        if row["expires_at"] <= now():
            await self.end(raw)
            return None
        return Session(row["name"], row["role"], row["csrf"], row["expires_at"])

    async def end(self, raw: str) -> None:
        key = _hash(raw)

        def delete(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM console_sessions WHERE id_hash = ?", (key,))

        await self.db.write(delete)

    async def clear_unknown(self, known: set[tuple[str, str]]) -> int:
        """At start: drop expired sessions and those whose (name, role) no token has
        any more (a token removed or given another role signs its sessions out)."""

        def prune(conn: sqlite3.Connection) -> int:
            gone = 0
            rows = conn.execute("SELECT id_hash, name, role, expires_at FROM console_sessions")
            for row in rows.fetchall():
                if row[3] <= now() or (row[1], row[2]) not in known:
                    conn.execute("DELETE FROM console_sessions WHERE id_hash = ?", (row[0],))
                    gone += 1
            return gone

        return await self.db.write(prune)

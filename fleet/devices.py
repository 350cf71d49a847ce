"""Devices: enrolment tokens, enrolment, credentials, groups and the device views.

Credentials. A device's secret is 32 random bytes (``secrets.token_urlsafe``): its
MQTT password and its HTTP Basic password for bundle downloads. The database keeps
only its sha256. A slow password hash (scrypt, argon2) protects guessable human
passwords; a 256-bit random secret cannot be guessed whatever the hash, and a fast
one keeps 2,000 devices fetching a bundle at once from costing 2,000 scrypt runs.
Comparisons are constant-time.

Enrolment. An operator makes a one-time token (optionally for a given device id and
groups, with an expiry); the device trades it at ``POST /v1/enrol`` for its id, its
secret, the broker address and the fleet's trusted keys. Tokens, like secrets, are
stored as sha256, so a leaked database spends none of them. Enrolling again with a
token made for an existing device id rotates that device's secret (a replaced
store PC keeps its id, groups and history).

Broker accounts (issue 6). With ``broker_accounts`` managed (fleet/broker_accounts.py)
enrolment also creates the device's broker login, after the token is spent and the
new secret stored in one transaction (so a token enrols once, even when two requests
race). If the broker does not confirm, that transaction is undone (token usable
again, the device as it was) and the caller gets a 503 to retry. Revocation clears the
secret (downloads refused), cancels unused tokens naming the device, and deletes its
broker account, which Mosquitto also disconnects.

Bundle downloads (``may_download``). A device's credentials fetch only the versions
its desired state names or named: the current ``desired`` document, and every
assignment that reaches the device as it is now (to it, to one of its groups, or to
all; one made by a staged rollout only once the rollout reached the device or
completed). So a download that was under way when the assignment moved on still
resumes, a rolled-back version stays fetchable for the devices it was sent to, and
nothing else in the registry is.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edgefleet.core import names
from edgefleet.core.errors import BadRequest, EdgeError, NotFound
from edgefleet.fleet.broker_accounts import BrokerAccountError, BrokerAccounts, NoBrokerAccounts
from edgefleet.fleet.db import FleetDB, dumps, loads, now

RECENT_EVENTS = 50
ENROLMENT_TOKEN_PREFIX = "efe_"  # edgefleet enrolment


class Unauthorized(EdgeError):
    status = 401


def check_device_id(device_id: Any) -> str:
    # One MQTT topic level, the user part of HTTP Basic auth (no ':'), a path part:
    # the shared name rule (core/names.py). InvalidName is a BadRequest.
    return names.check_device_id(device_id)


def check_groups(groups: Any) -> list[str]:
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise BadRequest("groups must be a list of strings")
    bad = [g for g in groups if not names.is_name(g)]
    if bad:
        raise BadRequest(f"group names {bad} must match {names.NAME_PATTERN}")
    return sorted(set(groups))


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _new_device_id() -> str:
    return f"dev-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class EnrolmentInfo:
    """What an enrolled device is told besides its credentials."""

    mqtt_host: str
    mqtt_port: int
    mqtt_tls: bool
    fleet_url: str
    trusted_keys: list[str] = field(default_factory=list)  # PEM
    ca_cert: str | None = None  # PEM of the broker's CA (enrolment.ca_file)


@dataclass(frozen=True)
class _Before:
    """A device as it was before an enrolment touched it: what an undo restores."""

    device_id: str
    token_hash: str
    existed: bool
    secret_hash: str | None
    revoked_at: float | None
    groups: list[str]


def _store_device(conn: sqlite3.Connection, device_id: str, groups: list[str] | None) -> str:
    """Create ``device_id`` or rotate its secret (un-revoking it); replace its groups
    unless None."""
    secret = secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO devices (id, created_at, secret_hash) VALUES (?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET secret_hash = excluded.secret_hash,"
        " revoked_at = NULL",
        (device_id, now(), secret_hash(secret)),
    )
    if groups is not None:
        _replace_groups(conn, device_id, groups)
    return secret


def _replace_groups(conn: sqlite3.Connection, device_id: str, groups: list[str]) -> None:
    conn.execute("DELETE FROM device_groups WHERE device_id = ?", (device_id,))
    conn.executemany(
        "INSERT INTO device_groups (device_id, grp) VALUES (?, ?)",
        [(device_id, g) for g in groups],
    )


async def create_device(db: FleetDB, device_id: str, groups: Iterable[str] = ()) -> str:
    """Register ``device_id`` (or rotate its secret) and return its secret.

    For tests and benchmarks that need devices without the enrolment round trip.
    """
    check_device_id(device_id)
    group_list = check_groups(list(groups))
    return await db.write(lambda conn: _store_device(conn, device_id, group_list))


async def check_device_secret(db: FleetDB, device_id: str, secret: str) -> bool:
    """True when ``secret`` is enrolled ``device_id``'s (constant-time in the secret).

    The one check for both places a device presents its secret: bundle downloads
    (HTTP Basic) and the embedded broker's logins (fleet/embedded_broker.py). A
    revoked device has no secret any more.
    """
    if not names.is_name(device_id):
        return False

    def q(conn: sqlite3.Connection) -> str | None:
        row = conn.execute("SELECT secret_hash FROM devices WHERE id = ?", (device_id,))
        found = row.fetchone()
        return None if found is None else found[0]

    stored = await db.read(q)
    given = secret_hash(secret)
    # An unknown device still costs one comparison, against a dummy.
    return hmac.compare_digest(given, stored or "0" * 64) and stored is not None


class Devices:
    """Enrolment and the device views; ``on_groups_changed`` recomputes desired states."""

    def __init__(
        self,
        db: FleetDB,
        info: EnrolmentInfo,
        *,
        default_ttl_s: int = 24 * 3600,
        max_ttl_s: int = 30 * 24 * 3600,
        on_groups_changed: Callable[[list[str]], Awaitable[Any]] | None = None,
        accounts: BrokerAccounts | None = None,
    ) -> None:
        self.db = db
        self.info = info
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self.on_groups_changed = on_groups_changed
        self.accounts: BrokerAccounts = accounts or NoBrokerAccounts()

    def _check_not_reserved(self, device_id: str) -> None:
        # A device named like the fleet's own broker account would replace (or, when
        # revoked, delete) that account.
        if device_id in self.accounts.reserved_usernames:
            raise BadRequest(f"device id {device_id!r} is reserved for a broker account")

    # -------------------------------------------------------------- enrolment

    async def create_token(
        self,
        device_id: str | None = None,
        groups: list[str] | None = None,
        ttl_s: float | None = None,
    ) -> dict[str, Any]:
        if device_id is not None:
            check_device_id(device_id)
            self._check_not_reserved(device_id)
        group_list = check_groups(groups if groups is not None else [])
        if ttl_s is None:
            ttl_s = self.default_ttl_s
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or ttl_s <= 0:
            raise BadRequest("ttl_s must be a positive number of seconds")
        if ttl_s > self.max_ttl_s:
            raise BadRequest(f"ttl_s {ttl_s} is over the {self.max_ttl_s} s maximum")
        # A fixed prefix: never starts with "-" (a CLI would read it as an option) and
        # lets secret scanners recognise a leaked one.
        token = ENROLMENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
        created = now()
        row = {
            "token_hash": secret_hash(token),
            "device_id": device_id,
            "groups": dumps(group_list),
            "created_at": created,
            "expires_at": created + float(ttl_s),
        }
        await self.db.write(
            lambda conn: conn.execute(
                "INSERT INTO enrolment_tokens (token_hash, device_id, groups, created_at,"
                " expires_at) VALUES (:token_hash, :device_id, :groups, :created_at,"
                " :expires_at)",
                row,
            )
        )
        # The token itself exists only in this answer.
        return {
            "token": token,
            "device_id": device_id,
            "groups": group_list,
            "expires_at": row["expires_at"],
        }

    async def enrol(self, token: Any) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise BadRequest("token must be a non-empty string")
        token_hash = secret_hash(token)

        def job(conn: sqlite3.Connection) -> tuple[str, str, _Before]:
            row = conn.execute(
                "SELECT device_id, groups, expires_at, used_at FROM enrolment_tokens"
                " WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            if row is None:
                raise Unauthorized("unknown enrolment token")
            wanted_id, groups_json, expires_at, used_at = row
            at = now()
            if used_at is not None:
                raise Unauthorized("enrolment token already used")
            if at >= expires_at:
                raise Unauthorized("enrolment token expired")
            device_id = wanted_id
            if device_id is None:
                for _ in range(10):
                    candidate = _new_device_id()
                    taken = conn.execute(
                        "SELECT 1 FROM devices WHERE id = ?", (candidate,)
                    ).fetchone()
                    if taken is None:
                        device_id = candidate
                        break
                else:  # 10 collisions in 2^32: something else is wrong
                    raise RuntimeError("could not find a free device id")
            self._check_not_reserved(device_id)
            before = _snapshot(conn, device_id, token_hash)
            groups = loads(groups_json, [])
            # A token made without groups leaves a re-enrolled device's groups alone.
            secret = _store_device(conn, device_id, groups if groups or wanted_id is None else None)
            # Spent in the same transaction that creates the device: a token enrols once.
            conn.execute(
                "UPDATE enrolment_tokens SET used_at = ?, used_by = ? WHERE token_hash = ?",
                (at, device_id, token_hash),
            )
            return device_id, secret, before

        device_id, secret, before = await self.db.write(job)
        try:
            await self.accounts.set_device(device_id, secret)
        except BaseException:
            # The broker did not confirm: without a login the answer would be useless,
            # so give the token back and leave the device as it was (then 503: retry).
            await self.db.write(lambda conn: _undo_enrolment(conn, before))
            raise
        if self.on_groups_changed is not None:
            await self.on_groups_changed([device_id])
        return {
            "device_id": device_id,
            "mqtt": {
                "host": self.info.mqtt_host,
                "port": self.info.mqtt_port,
                "tls": self.info.mqtt_tls,
                "ca_cert": self.info.ca_cert,
                "username": device_id,
                "password": secret,
            },
            "trusted_keys": list(self.info.trusted_keys),
            "fleet_url": self.info.fleet_url,
        }

    async def revoke(self, device_id: str) -> dict[str, Any]:
        """Revoke a device: no downloads, no broker login, no unused tokens for it.

        Idempotent: revoking again repeats the broker step (after a broker outage the
        first call answered 503 for that step alone; the fleet side was already done).
        """
        check_device_id(device_id)
        self._check_not_reserved(device_id)

        def job(conn: sqlite3.Connection) -> tuple[float, int] | None:
            row = conn.execute(
                "SELECT revoked_at FROM devices WHERE id = ?", (device_id,)
            ).fetchone()
            if row is None:
                return None
            at = row[0] if row[0] is not None else now()
            conn.execute(
                "UPDATE devices SET secret_hash = NULL, revoked_at = ? WHERE id = ?",
                (at, device_id),
            )
            # A token made for this id and not used yet would bring it back.
            cancelled = conn.execute(
                "UPDATE enrolment_tokens SET expires_at = ? WHERE device_id = ?"
                " AND used_at IS NULL AND expires_at > ?",
                (now(), device_id, now()),
            ).rowcount
            return at, cancelled

        done = await self.db.write(job)
        if done is None:
            raise NotFound(f"unknown device {device_id!r}")
        revoked_at, cancelled = done
        try:
            await self.accounts.remove_device(device_id)
        except BrokerAccountError as exc:
            raise BrokerAccountError(
                f"device {device_id} is revoked on the fleet (downloads refused, tokens"
                f" cancelled) but its broker account was not removed: {exc.message};"
                " revoke again once the broker is reachable"
            ) from exc
        return {
            "device_id": device_id,
            "revoked_at": revoked_at,
            "tokens_cancelled": cancelled,
            "broker_account": "removed" if self.accounts.managed else "not managed",
        }

    # ------------------------------------------------------------ credentials

    async def check_secret(self, device_id: str, secret: str) -> bool:
        """True when ``secret`` is ``device_id``'s (constant-time in the secret)."""
        return await check_device_secret(self.db, device_id, secret)

    async def may_download(self, device_id: str, model: str, version: str) -> bool:
        """Whether ``device_id``'s desired state names or named ``model:version``.

        Read-only query (reader thread pool); see the module doc for the rule.
        """

        def q(conn: sqlite3.Connection) -> bool:
            # The shadow candidate and the canary of a split are in the desired state
            # too (issue 11): the device must be able to fetch them.
            row = conn.execute(
                "SELECT json_extract(desired, '$.models.' || json_quote(?) || '.version'),"
                " json_extract(desired, '$.models.' || json_quote(?) || '.shadow.version'),"
                " json_extract(desired, '$.models.' || json_quote(?) || '.split.version')"
                " FROM devices WHERE id = ? AND revoked_at IS NULL",
                (model, model, model, device_id),
            ).fetchone()
            if row is None:
                return False
            if version in row:
                return True
            found = conn.execute(
                "SELECT 1 FROM assignments a LEFT JOIN rollouts r ON r.id = a.rollout_id"
                " WHERE a.model = ? AND a.version = ? AND ("
                "   a.target_kind = 'all'"
                "   OR (a.target_kind = 'device' AND a.target = ?)"
                "   OR (a.target_kind = 'group' AND a.target IN"
                "       (SELECT grp FROM device_groups WHERE device_id = ?)))"
                " AND (a.rollout_id IS NULL OR r.state = 'completed' OR EXISTS ("
                "   SELECT 1 FROM rollout_devices rd WHERE rd.rollout_id = a.rollout_id"
                "   AND rd.device_id = ? AND rd.state != 'waiting'))"
                " LIMIT 1",
                (model, version, device_id, device_id, device_id),
            ).fetchone()
            return found is not None

        return bool(await self.db.read(q))

    # ------------------------------------------------------------------ views

    async def list_devices(self, group: str | None = None) -> list[dict[str, Any]]:
        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            if group is None:
                devices = conn.execute("SELECT * FROM devices ORDER BY id").fetchall()
                groups = conn.execute("SELECT device_id, grp FROM device_groups").fetchall()
                models = conn.execute("SELECT * FROM device_models").fetchall()
            else:
                sub = "SELECT device_id FROM device_groups WHERE grp = ?"
                devices = conn.execute(
                    f"SELECT * FROM devices WHERE id IN ({sub}) ORDER BY id", (group,)
                ).fetchall()
                groups = conn.execute(
                    f"SELECT device_id, grp FROM device_groups WHERE device_id IN ({sub})",
                    (group,),
                ).fetchall()
                models = conn.execute(
                    f"SELECT * FROM device_models WHERE device_id IN ({sub})", (group,)
                ).fetchall()
            by_groups: dict[str, list[str]] = {}
            for r in groups:
                by_groups.setdefault(r["device_id"], []).append(r["grp"])
            by_models: dict[str, dict[str, Any]] = {}
            for r in models:
                by_models.setdefault(r["device_id"], {})[r["model"]] = _model_state(r)
            return [
                _summary(d, sorted(by_groups.get(d["id"], [])), by_models.get(d["id"], {}))
                for d in devices
            ]

        return await self.db.read(q)

    async def get(self, device_id: str) -> dict[str, Any]:
        def q(conn: sqlite3.Connection) -> dict[str, Any] | None:
            d = conn.execute("SELECT * FROM devices WHERE id = ?", (device_id,)).fetchone()
            if d is None:
                return None
            groups = [
                r[0]
                for r in conn.execute(
                    "SELECT grp FROM device_groups WHERE device_id = ? ORDER BY grp",
                    (device_id,),
                )
            ]
            models = {
                r["model"]: _model_state(r)
                for r in conn.execute(
                    "SELECT * FROM device_models WHERE device_id = ? ORDER BY model",
                    (device_id,),
                )
            }
            events = conn.execute(
                "SELECT data, received_at FROM events WHERE device_id = ?"
                " ORDER BY received_at DESC LIMIT ?",
                (device_id, RECENT_EVENTS),
            ).fetchall()
            doc = _summary(d, groups, models)
            doc["desired"] = loads(d["desired"])
            doc["reported"] = loads(d["reported"])
            doc["events"] = [
                {**loads(e["data"], {}), "received_at": e["received_at"]} for e in events
            ]
            return doc

        doc = await self.db.read(q)
        if doc is None:
            raise NotFound(f"unknown device {device_id!r}")
        return doc

    async def set_groups(self, device_id: str, groups: Any) -> dict[str, Any]:
        group_list = check_groups(groups)

        def job(conn: sqlite3.Connection) -> bool:
            if conn.execute("SELECT 1 FROM devices WHERE id = ?", (device_id,)).fetchone() is None:
                return False
            _replace_groups(conn, device_id, group_list)
            return True

        if not await self.db.write(job):
            raise NotFound(f"unknown device {device_id!r}")
        if self.on_groups_changed is not None:
            # Group assignments may now reach (or leave) this device.
            await self.on_groups_changed([device_id])
        return {"device_id": device_id, "groups": group_list}


def _snapshot(conn: sqlite3.Connection, device_id: str, token_hash: str) -> _Before:
    row = conn.execute(
        "SELECT secret_hash, revoked_at FROM devices WHERE id = ?", (device_id,)
    ).fetchone()
    groups = [
        r[0]
        for r in conn.execute("SELECT grp FROM device_groups WHERE device_id = ?", (device_id,))
    ]
    if row is None:
        return _Before(device_id, token_hash, False, None, None, [])
    return _Before(device_id, token_hash, True, row[0], row[1], groups)


def _undo_enrolment(conn: sqlite3.Connection, before: _Before) -> None:
    """Writer thread: the token unspent and the device as in ``before``."""
    conn.execute(
        "UPDATE enrolment_tokens SET used_at = NULL, used_by = NULL WHERE token_hash = ?",
        (before.token_hash,),
    )
    if not before.existed:
        conn.execute("DELETE FROM device_groups WHERE device_id = ?", (before.device_id,))
        conn.execute("DELETE FROM devices WHERE id = ?", (before.device_id,))
        return
    conn.execute(
        "UPDATE devices SET secret_hash = ?, revoked_at = ? WHERE id = ?",
        (before.secret_hash, before.revoked_at, before.device_id),
    )
    _replace_groups(conn, before.device_id, before.groups)


def _model_state(r: sqlite3.Row) -> dict[str, Any]:
    return {
        "active": r["active"],
        "previous": r["previous"],
        "desired": r["desired"],
        "state": r["state"],
        "rollout": r["rollout"],
        "provider": r["provider"],
        "last_error": r["last_error"],
        "updated_at": r["updated_at"],
    }


def _summary(d: sqlite3.Row, groups: list[str], models: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": d["id"],
        "online": bool(d["online"]),
        "last_seen": d["last_seen"],
        "status_at": d["status_at"],
        "offline_reason": d["offline_reason"],
        "agent_version": d["agent_version"],
        "protocol": d["protocol"],
        "accelerators": loads(d["accelerators"]),
        "groups": groups,
        "models": models,
        "desired_revision": d["desired_revision"],
        "reported_revision": d["reported_revision"],
        "last_error": d["last_error"],
        "created_at": d["created_at"],
        "revoked_at": d["revoked_at"],
    }

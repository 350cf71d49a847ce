"""Per-device broker accounts: created at enrolment, removed at revocation.

Enrolment is the only moment the fleet holds a device's secret in clear (the
database keeps its sha256, fleet/devices.py), so that is when the device's MQTT
login must be made. Two modes (``broker_accounts.mode`` in the fleet config):

- ``none``: the fleet provisions nothing. For the embedded broker (which checks device
  secrets against the fleet's database itself) or a broker whose accounts someone else
  manages.
- ``dynsec``: Mosquitto's dynamic-security plugin (Mosquitto >= 2.0). The fleet logs
  in with a dedicated admin account whose only right is ``$CONTROL/dynamic-security/#``
  and sends JSON commands on ``$CONTROL/dynamic-security/v1``. The broker applies
  them at once, saves its own JSON file and disconnects a deleted client; there is no
  file for the fleet to rewrite, no reload, and no other client notices.

What each device may do is one **role per device** (``edgefleet-device-<id>``) with
literal topics: ``write`` status/reported/telemetry/events, ``read`` and subscribe
desired/commands/acks, all under ``edgefleet/v1/devices/<id>/``. Not one shared role
with ``%u`` patterns: Mosquitto 2.0.11's dynamic-security plugin does not substitute
``%u`` (measured: a device was denied its own topics), and literal roles also mean the
broker's JSON file says exactly what each device may touch.

The broker's dynamic-security file has to exist before Mosquitto starts; it holds the
admin account and the fleet's own account (role ``edgefleet-fleet``: all of
``edgefleet/v1/#``, also as ``$share/<group>/...`` for several ingest workers).
``python -m fleet.broker_accounts init-dynsec`` writes it (docs/fleet.md, "Deploying").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from edgefleet.core.errors import EdgeError
from edgefleet.core.mqtt import topics
from edgefleet.core.mqtt.config import MqttConnectionConfig
from edgefleet.core.mqtt.connection import MqttConnection
from edgefleet.core.mqtt.errors import LinkClosed, LinkError, LinkRefused
from edgefleet.core.mqtt.messages import Message

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
DEVICE_ROLE_PREFIX = "edgefleet-device-"
FLEET_ROLE = "edgefleet-fleet"
ADMIN_ROLE = "edgefleet-dynsec-admin"
DEFAULT_ADMIN_USER = "edgefleet-admin"
DEFAULT_FLEET_USER = "fleet"
# The plugin's own password format (what `mosquitto_ctrl dynsec init` writes):
# PBKDF2-SHA512, 12 random salt bytes, base64 of both. 101 iterations is the plugin's
# default; device secrets are 256-bit random, so iterations buy nothing for them.
_PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12

# A device publishes these leaves of its own subtree and receives the others
# (core/mqtt/topics.py; the contract is docs/mqtt.md). Direction matters: a device must not
# be able to overwrite its own retained `desired` or fake the fleet's `acks`.
DEVICE_PUBLISHES = (topics.STATUS, topics.REPORTED, topics.TELEMETRY, topics.EVENTS)
DEVICE_RECEIVES = (topics.DESIRED, topics.COMMANDS, topics.ACKS)


class BrokerAccountError(EdgeError):
    """The broker did not confirm an account change (unreachable, refused, timed out)."""

    status = 503


# ------------------------------------------------------------------ roles and ACLs


def device_role(device_id: str) -> str:
    return DEVICE_ROLE_PREFIX + topics.check_device_id(device_id)


def _acl(acltype: str, topic: str, allow: bool = True) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow}


def device_acls(device_id: str) -> list[dict[str, Any]]:
    """The device's own subtree, leaf by leaf, in the direction of the contract."""
    acls = [
        _acl("publishClientSend", topics.device_topic(device_id, leaf))  # type: ignore[arg-type]
        for leaf in DEVICE_PUBLISHES
    ]
    for leaf in DEVICE_RECEIVES:
        topic = topics.device_topic(device_id, leaf)  # type: ignore[arg-type]
        acls.append(_acl("subscribeLiteral", topic))
        acls.append(_acl("publishClientReceive", topic))
    return acls


def fleet_acls() -> list[dict[str, Any]]:
    """Every device's subtree, plain and as a shared subscription (several workers:
    Mosquitto checks a ``$share/g/...`` filter as written, prefix included)."""
    tree = "edgefleet/v1/#"
    return [
        _acl("publishClientSend", tree),
        _acl("publishClientReceive", tree),
        _acl("subscribePattern", tree),
        _acl("subscribePattern", f"$share/+/{tree}"),
    ]


def admin_acls() -> list[dict[str, Any]]:
    """Only the plugin's control topics: this account cannot read or send device data."""
    control = "$CONTROL/dynamic-security/#"
    return [
        _acl("publishClientSend", control),
        _acl("publishClientReceive", control),
        _acl("subscribePattern", control),
    ]


def dynsec_password(password: str) -> dict[str, Any]:
    """``password``, ``salt`` and ``iterations`` as the plugin stores them."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, _PBKDF2_ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode("ascii"),
        "salt": base64.b64encode(salt).decode("ascii"),
        "iterations": _PBKDF2_ITERATIONS,
    }


def initial_dynsec(
    admin_password: str,
    fleet_password: str,
    *,
    admin_user: str = DEFAULT_ADMIN_USER,
    fleet_user: str = DEFAULT_FLEET_USER,
) -> dict[str, Any]:
    """The broker's first dynamic-security document: the admin and fleet accounts.

    Everything not granted is denied (``defaultACLAccess``), including receiving:
    the plugin's own default lets any client receive whatever it managed to subscribe.
    """
    if admin_user == fleet_user:
        raise ValueError("the admin and fleet accounts need different usernames")
    return {
        "clients": [
            {
                "username": admin_user,
                "textName": "edgefleet fleet service: broker account administration",
                **dynsec_password(admin_password),
                "roles": [{"rolename": ADMIN_ROLE}],
            },
            {
                "username": fleet_user,
                "textName": "edgefleet fleet service: ingest, desired states, commands",
                **dynsec_password(fleet_password),
                "roles": [{"rolename": FLEET_ROLE}],
            },
        ],
        "groups": [],
        "roles": [
            {"rolename": ADMIN_ROLE, "acls": admin_acls()},
            {"rolename": FLEET_ROLE, "acls": fleet_acls()},
        ],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


def write_dynsec_file(
    path: Path, doc: dict[str, Any], *, owner: tuple[int, int] | None = None
) -> None:
    """Create the file (never overwrite: it is the broker's live account database), 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    if owner is not None:
        # The broker rewrites this file on every change: it must own it.
        os.chown(path, *owner)


# ------------------------------------------------------------------ provisioning


class BrokerAccounts(Protocol):
    """What fleet/devices.py needs: make or remove one device's broker login."""

    managed: bool
    reserved_usernames: frozenset[str]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def set_device(self, device_id: str, secret: str) -> None: ...

    async def remove_device(self, device_id: str) -> None: ...


class NoBrokerAccounts:
    """``mode: none``: device logins are not the fleet's business."""

    managed = False

    def __init__(self, reserved_usernames: frozenset[str] = frozenset()) -> None:
        self.reserved_usernames = reserved_usernames

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def set_device(self, device_id: str, secret: str) -> None:
        return None

    async def remove_device(self, device_id: str) -> None:
        return None


class DynsecAccounts:
    """Device accounts through Mosquitto's dynamic-security plugin, over MQTT.

    One connection of its own (a plain core ``MqttConnection``) with the admin
    account, separate from the fleet's data connection: the ingest workers'
    credentials cannot create accounts, and this one cannot read telemetry.
    Each request carries a random ``correlationData`` the plugin echoes, so several
    fleet workers sharing the response topic each pick out their own answers.
    """

    managed = True

    def __init__(
        self,
        broker: MqttConnectionConfig,
        *,
        username: str,
        password: str,
        client_id: str,
        timeout_s: float = 10.0,
        reserved_usernames: frozenset[str] = frozenset(),
    ) -> None:
        config = broker.model_copy(
            update={
                "username": username,
                "password": password,
                "password_file": None,
            }
        )
        self.username = username
        self.timeout_s = timeout_s
        self.reserved_usernames = reserved_usernames | {username}
        self.link = MqttConnection(config, client_id=client_id)
        self._waiting: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}
        self._started = False

    async def start(self) -> None:
        """Subscribe to the answers and connect in the background (returns at once)."""
        if self._started:
            return
        self._started = True
        await self.link.subscribe(RESPONSE_TOPIC, self._on_response, qos=1)
        await self.link.start()

    async def stop(self) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(BrokerAccountError("the fleet is stopping"))
        self._waiting.clear()
        await self.link.stop()

    async def set_device(self, device_id: str, secret: str) -> None:
        """Create the device's account and role, replacing any earlier ones.

        Delete-then-create rather than "set password": the role's ACLs are then
        exactly this version's, and deleting the old client disconnects a session
        still logged in with the secret being replaced.
        """
        self._check(device_id)
        role = device_role(device_id)
        await self._run(
            [
                {"command": "deleteClient", "username": device_id},
                {"command": "deleteRole", "rolename": role},
                {
                    "command": "createRole",
                    "rolename": role,
                    "textname": f"edgefleet device {device_id}: its own subtree only",
                    "acls": device_acls(device_id),
                },
                {
                    "command": "createClient",
                    "username": device_id,
                    # Bound to its client id (the agent's default, docs/mqtt.md): a copied
                    # secret cannot log in beside the device unnoticed; it can only take
                    # over the device's session, which then flaps, visibly.
                    "clientid": device_id,
                    "password": secret,
                    "textname": f"edgefleet device {device_id}",
                    "roles": [{"rolename": role}],
                },
            ]
        )
        log.info("broker account for device %s created (role %s)", device_id, role)

    async def remove_device(self, device_id: str) -> None:
        """Delete the account (Mosquitto disconnects it at once) and its role."""
        self._check(device_id)
        await self._run(
            [
                {"command": "deleteClient", "username": device_id},
                {"command": "deleteRole", "rolename": device_role(device_id)},
            ]
        )
        log.info("broker account for device %s removed", device_id)

    # ---------------------------------------------------------------- internals

    def _check(self, device_id: str) -> None:
        topics.check_device_id(device_id)
        if device_id in self.reserved_usernames:
            # Deleting "fleet" as if it were a device would cut the fleet off the broker.
            raise ValueError(f"{device_id!r} is a reserved broker account, not a device")

    async def _run(self, commands: list[dict[str, Any]]) -> None:
        """Send ``commands`` in one message; raise unless each one succeeded.

        Deleting something that does not exist is success (the goal is its absence).
        """
        request_id = secrets.token_hex(8)
        for i, command in enumerate(commands):
            command["correlationData"] = f"{request_id}/{i}"
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
        self._waiting[request_id] = fut
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    await self.link.wait_connected()
                except LinkRefused as exc:
                    raise BrokerAccountError(
                        f"the broker refused the fleet's account-admin login ({self.username}):"
                        f" {exc.reason}"
                    ) from exc
                except LinkClosed as exc:
                    raise BrokerAccountError("broker account service is not running") from exc
                payload = json.dumps({"commands": commands}).encode("utf-8")
                # Not logged: the payload holds the device secret.
                await self.link.publish(CONTROL_TOPIC, payload, qos=1)
                responses = await fut
        except TimeoutError:
            raise BrokerAccountError(
                f"the broker did not confirm the account change within {self.timeout_s} s"
                f" ({self.link.last_error or 'connected, no answer'})"
            ) from None
        except LinkError as exc:
            raise BrokerAccountError(f"broker account change failed: {exc}") from exc
        finally:
            self._waiting.pop(request_id, None)
        by_index: dict[int, dict[str, Any]] = {}
        for r in responses:
            _, _, index = str(r.get("correlationData", "")).partition("/")
            if index.isdigit():
                by_index[int(index)] = r
        for i, command in enumerate(commands):
            answer = by_index.get(i)
            if answer is None:
                raise BrokerAccountError(f"the broker did not answer {command['command']}")
            error = answer.get("error")
            if error and not (command["command"].startswith("delete") and "not found" in error):
                raise BrokerAccountError(f"broker refused {command['command']}: {error}")

    async def _on_response(self, message: Message) -> None:
        try:
            doc = message.json()
            responses = doc["responses"]
            if not isinstance(responses, list):
                raise TypeError("responses is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("dynamic-security: unreadable response ignored (%s)", exc)
            return
        grouped: dict[str, list[dict[str, Any]]] = {}
        for r in responses:
            if isinstance(r, dict):
                request_id = str(r.get("correlationData", "")).partition("/")[0]
                grouped.setdefault(request_id, []).append(r)
        for request_id, answers in grouped.items():
            fut = self._waiting.get(request_id)  # others belong to another fleet worker
            if fut is not None and not fut.done():
                fut.set_result(answers)


# ------------------------------------------------------------------ command line


def _read_secret(path: str) -> str:
    text = Path(path).read_text(encoding="utf-8").strip()
    if len(text) < 16:
        raise SystemExit(f"{path}: a broker password must be at least 16 characters")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.broker_accounts",
        description="Broker account tools for edgefleet (Mosquitto dynamic security).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser(
        "init-dynsec",
        help="write Mosquitto's first dynamic-security file: the fleet and admin accounts",
    )
    init.add_argument("--out", required=True, help="plugin_opt_config_file of the broker")
    init.add_argument("--admin-user", default=DEFAULT_ADMIN_USER)
    init.add_argument("--admin-password-file", required=True)
    init.add_argument("--fleet-user", default=DEFAULT_FLEET_USER)
    init.add_argument("--fleet-password-file", required=True)
    init.add_argument(
        "--if-missing", action="store_true", help="exit 0 without a change if --out exists"
    )
    init.add_argument("--chown", metavar="UID:GID", help="owner of the file (the broker's user)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists():
        if args.if_missing:
            print(f"{out} exists; left as it is (it holds the enrolled devices' accounts)")
            return 0
        print(
            f"{out} exists: it is the broker's live account database; not overwritten",
            file=sys.stderr,
        )
        return 1
    owner = None
    if args.chown:
        uid, _, gid = args.chown.partition(":")
        owner = (int(uid), int(gid or uid))
    doc = initial_dynsec(
        _read_secret(args.admin_password_file),
        _read_secret(args.fleet_password_file),
        admin_user=args.admin_user,
        fleet_user=args.fleet_user,
    )
    with contextlib.suppress(FileExistsError):
        write_dynsec_file(out, doc, owner=owner)
        print(
            f"wrote {out}: accounts {args.admin_user} (dynamic-security admin) and"
            f" {args.fleet_user} (fleet, all of edgefleet/v1/#)"
        )
        return 0
    print(f"{out} appeared while writing; not overwritten", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

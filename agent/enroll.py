"""``edge-agent enroll``: trade a one-time token for this box's identity in the fleet.

    edge-agent enroll --fleet https://fleet.example:8480 --token TOKEN
        [--config /etc/edgefleet/agent.yaml] [--data-dir /var/lib/edgefleet] [--ca-file CA.pem]

The fleet's ``POST /v1/enrol {"token"}`` answers with the device id, the MQTT broker
and credentials, the bundle-signing public keys (and, optionally, the broker's CA
certificate); see docs/fleet.md. This module writes them where the agent and its
systemd unit expect them, next to the config file:

| file | mode | what |
|---|---|---|
| ``<config dir>/keys/fleet-N.pub`` | 0644 | the fleet's bundle-signing public keys |
| ``<config dir>/mqtt.password`` | 0600, owned by the service user | the device secret |
| ``<config dir>/fleet-ca.pem`` | 0644 | the broker's CA, when the fleet sends one |
| ``<config dir>/agent.yaml`` | 0640, group of the service user | the config |

Only the keys enrolment owns change in an existing config (``device_id``; ``fleet``
host, port, tls, username, password_file, ``sync.fleet_url``; the fleet's keys in
``trust.public_keys``;
the store and outbox paths when missing or when ``--data-dir`` is given); everything
else (models, runtime, fallback, server, the rest of ``fleet`` and ``trust``) and the
comments outside the touched sections are kept. Enrolling again rotates the secret.

Every file is written to a temp file in its directory, fsynced, renamed over the old
one and the directory fsynced, so a power cut leaves the old or the new file, never
half of one. The config is written last: it is the commit point. Everything that can
be checked locally (the config loads, the directories are writable) is checked
*before* the token is sent, because the fleet spends the token on the first answer.

``fleet.sync.fleet_url`` records the fleet this device enrolled with: the URL the
fleet names in its answer (the base of its bundle URLs), else ``--fleet``. Bundle
downloads send the device secret to that origin only, and only over HTTPS unless it
is on loopback (agent/download.py, ``CredentialScope``).

The secret is never printed or logged; error messages never quote the fleet's answer.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from edgefleet.core.durable import atomic_write
from edgefleet.core.errors import ConfigError, EdgefleetError
from edgefleet.core.names import is_name

DEFAULT_CONFIG = Path("/etc/edgefleet/agent.yaml")
DEFAULT_DATA_DIR = Path("/var/lib/edgefleet")
SERVICE_USER = "edgefleet"  # User= in deploy/systemd/edgefleet-agent.service
TOKEN_ENV = "EDGEFLEET_ENROL_TOKEN"
KEY_PREFIX = "fleet-"  # keys/fleet-N.pub are enrolment's; other keys are the operator's
PASSWORD_FILE = "mqtt.password"
CA_FILE = "fleet-ca.pem"
_MAX_ANSWER = 1024 * 1024
# Exit codes, as edge-fleet's: 1 the fleet refused, 2 usage/local problem, 3 unreachable.
REFUSED, LOCAL, UNREACHABLE = 1, 2, 3


class EnrolError(EdgefleetError):
    """A failed enrolment, with the message for the operator and the exit code."""

    def __init__(self, message: str, exit_code: int = REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Enrolment:
    """The fleet's answer, checked. ``password`` stays out of ``repr``."""

    device_id: str
    mqtt_host: str
    mqtt_port: int
    mqtt_tls: bool
    username: str
    password: str = field(repr=False)
    trusted_keys: list[str]
    ca_cert: str | None = None
    fleet_url: str | None = None


@dataclass(frozen=True)
class Layout:
    """Where enrolment writes, all derived from the config file's location."""

    config: Path
    data_dir: Path

    @property
    def etc(self) -> Path:
        return self.config.parent

    @property
    def keys_dir(self) -> Path:
        return self.etc / "keys"

    @property
    def password_file(self) -> Path:
        return self.etc / PASSWORD_FILE

    @property
    def ca_file(self) -> Path:
        return self.etc / CA_FILE

    @property
    def http_ca_file(self) -> Path:
        """The CA of an https fleet (from ``--ca-file``), for bundle downloads too."""
        return self.etc / "fleet-http-ca.pem"

    def key_file(self, n: int) -> Path:
        return self.keys_dir / f"{KEY_PREFIX}{n}.pub"

    def is_enrolment_key(self, path: Path) -> bool:
        return path.parent == self.keys_dir and bool(
            re.fullmatch(rf"{KEY_PREFIX}\d+\.pub", path.name)
        )


@dataclass(frozen=True)
class Owner:
    """Who the files belong to. Only root can give files away; otherwise nobody is."""

    user: str | None
    uid: int = -1
    gid: int = -1

    @classmethod
    def resolve(cls, user: str | None) -> tuple[Owner, str | None]:
        """The owner, and a warning when the files cannot be given to ``user``."""
        if not user or os.geteuid() != 0:
            return cls(None), None
        try:
            import pwd

            entry = pwd.getpwnam(user)
        except KeyError:
            return cls(None), (
                f"user {user!r} does not exist: the files stay root's and a service running"
                f" as {user} cannot read the password (run deploy/install-agent.sh first,"
                " or pass --owner '' on purpose)"
            )
        return cls(user, entry.pw_uid, entry.pw_gid), None

    @property
    def secret_ids(self) -> tuple[int, int]:
        """The password file: the service user's own."""
        return self.uid, self.gid

    @property
    def group_ids(self) -> tuple[int, int]:
        """Config, keys, directories: root's, readable by the service user's group."""
        return (0, self.gid) if self.user else (-1, -1)


# --------------------------------------------------------------------------- fleet


def request_enrolment(
    fleet_url: str,
    token: str,
    *,
    ca_file: Path | None = None,
    timeout: float = 30.0,
    retries: int = 3,
) -> dict[str, Any]:
    """``POST {fleet_url}/v1/enrol``; the parsed JSON answer.

    Only failures that happen before the token left this box (connect errors, DNS) and
    answers that say the request never reached the enrolment (502/503/504 from a
    proxy) are retried, with a doubling pause: a token sent once may have been spent.
    """
    parts = urlsplit(fleet_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EnrolError(f"--fleet {fleet_url!r} must be an http(s) URL", LOCAL)
    if parts.scheme == "http" and ca_file is not None:
        raise EnrolError("--ca-file is for an https fleet URL", LOCAL)
    ctx: ssl.SSLContext | None = None
    if parts.scheme == "https":
        try:
            ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise EnrolError(f"cannot use --ca-file {ca_file}: {exc}", LOCAL) from exc
    target = parts.path.rstrip("/") + "/v1/enrol"
    body = json.dumps({"token": token}).encode()
    where = f"{parts.scheme}://{parts.netloc}{target}"
    pause = 1.0
    for attempt in range(1, retries + 2):
        conn: http.client.HTTPConnection
        if ctx is not None:
            conn = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=ctx
            )
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            try:
                conn.connect()
            except ssl.SSLCertVerificationError as exc:
                raise EnrolError(
                    f"cannot enrol at {where}: the fleet's TLS certificate is not trusted"
                    f" ({exc.verify_message}); pass --ca-file with the CA that signed it",
                    UNREACHABLE,
                ) from exc
            except (OSError, ssl.SSLError) as exc:
                if attempt <= retries:
                    print(
                        f"edge-agent enroll: cannot reach {where} ({_reason(exc)});"
                        f" retrying in {pause:.0f} s",
                        file=sys.stderr,
                    )
                    time.sleep(pause)
                    pause *= 2
                    continue
                raise EnrolError(
                    f"cannot reach the fleet at {where}: {_reason(exc)} (check --fleet, the"
                    " network, and that the fleet service runs)",
                    UNREACHABLE,
                ) from exc
            try:
                conn.request(
                    "POST",
                    target,
                    body=body,
                    headers={
                        "Content-Type": "application/json",
                        "Accept": "application/json",
                        "User-Agent": "edge-agent-enroll",
                    },
                )
                resp = conn.getresponse()
                raw = resp.read(_MAX_ANSWER + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise EnrolError(
                    f"the connection to {where} broke after the token was sent"
                    f" ({_reason(exc)}). Run the same command again; if the fleet says the"
                    " token was already used, ask for a new one.",
                    UNREACHABLE,
                ) from exc
        finally:
            conn.close()
        if resp.status in (502, 503, 504) and attempt <= retries:
            print(
                f"edge-agent enroll: {where} answered {resp.status}; retrying in {pause:.0f} s",
                file=sys.stderr,
            )
            time.sleep(pause)
            pause *= 2
            continue
        return _answer(where, resp.status, raw)
    raise AssertionError("unreachable")  # the loop returns or raises


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _answer(where: str, status: int, raw: bytes) -> dict[str, Any]:
    if len(raw) > _MAX_ANSWER:
        raise EnrolError(f"the answer of {where} is over {_MAX_ANSWER} bytes: not a fleet")
    try:
        doc = json.loads(raw) if raw else None
    except ValueError:
        doc = None
    if status == 200:
        if not isinstance(doc, dict):
            raise EnrolError(f"{where} answered 200 without a JSON object: is --fleet a fleet?")
        return doc
    # An error answer holds no secret: its message can be shown.
    message = doc.get("error") if isinstance(doc, dict) else None
    message = str(message) if message else raw[:200].decode("utf-8", "replace").strip()
    if status == 401:
        raise EnrolError(
            f"the fleet refused the token: {message or 'unauthorized'}. Enrolment tokens work"
            " once and expire: ask the fleet operator for a new one"
            " (edge-fleet devices enrol-token --device-id ID)."
        )
    if status == 404:
        raise EnrolError(f"no enrolment endpoint at {where} (404): is --fleet the fleet's URL?")
    raise EnrolError(f"the fleet answered {status}: {message or 'no message'}")


def parse_enrolment(doc: dict[str, Any]) -> Enrolment:
    """Check the answer's shape; the messages name fields, never their values."""

    def bad(what: str) -> EnrolError:
        return EnrolError(f"the fleet's answer is not a valid enrolment: {what}")

    device_id = doc.get("device_id")
    if not isinstance(device_id, str) or not is_name(device_id):  # core/names.py's rule
        raise bad("device_id is missing or not a valid device id")
    mqtt = doc.get("mqtt")
    if not isinstance(mqtt, dict):
        raise bad("no mqtt section")
    host, port, tls = mqtt.get("host"), mqtt.get("port"), mqtt.get("tls", False)
    if not isinstance(host, str) or not host or any(c.isspace() for c in host):
        raise bad("mqtt.host is missing")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise bad("mqtt.port is not a port number")
    if not isinstance(tls, bool):
        raise bad("mqtt.tls is not true or false")
    username = mqtt.get("username", device_id)
    if not isinstance(username, str) or not username:
        raise bad("mqtt.username is not a string")
    password = mqtt.get("password")
    if not isinstance(password, str) or not password or "\n" in password:
        raise bad("mqtt.password is missing")
    ca_cert = mqtt.get("ca_cert")  # optional: the broker's CA (PEM), or null
    if ca_cert is not None and (
        not isinstance(ca_cert, str) or "-----BEGIN CERTIFICATE-----" not in ca_cert
    ):
        raise bad("mqtt.ca_cert is not a PEM certificate")
    if ca_cert is not None:
        _check_certificates(ca_cert, bad)
    keys = doc.get("trusted_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise bad("trusted_keys is not a list of PEM strings")
    from edgefleet.core.bundle.signing import load_public_key

    for i, pem in enumerate(keys):
        try:
            load_public_key(pem)
        except ValueError as exc:
            raise bad(f"trusted_keys[{i}] is not an Ed25519 public key") from exc
    fleet_url = doc.get("fleet_url")
    return Enrolment(
        device_id=device_id,
        mqtt_host=host,
        mqtt_port=port,
        mqtt_tls=tls,
        username=username,
        password=password,
        trusted_keys=[k if k.endswith("\n") else k + "\n" for k in keys],
        ca_cert=ca_cert if ca_cert is None or ca_cert.endswith("\n") else ca_cert + "\n",
        fleet_url=fleet_url if isinstance(fleet_url, str) else None,
    )


def _check_certificates(pem: str, bad: Any) -> None:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeError) as exc:
        raise bad("mqtt.ca_cert is not a PEM certificate") from exc


# ------------------------------------------------------------------------- config


def merge_config(
    text: str | None,
    enrolment: Enrolment,
    layout: Layout,
    *,
    key_files: list[Path],
    ca_file: Path | None,
    set_data_paths: bool,
    http_ca_file: Path | None = None,
    fleet_url: str | None = None,
) -> str:
    """The config text with the enrolment-owned keys set and everything else kept.

    ``fleet_url`` is the URL enrolment went to; the fleet's own ``fleet_url`` in its
    answer wins (its bundle URLs are built on it).
    """
    raw: dict[str, Any] = {}
    if text is not None:
        loaded = yaml.safe_load(text)
        if loaded is not None:
            if not isinstance(loaded, dict):
                raise EnrolError(f"{layout.config}: the top level is not a mapping", LOCAL)
            raw = loaded

    def section(name: str) -> dict[str, Any]:
        value = raw.get(name)
        return dict(value) if isinstance(value, dict) else {}

    old_id = raw.get("device_id")
    store = section("store")
    if set_data_paths or "path" not in store:
        store["path"] = str(layout.data_dir / "models")

    trust = section("trust")
    kept = [
        k
        for k in trust.get("public_keys") or []
        if not (isinstance(k, str) and layout.is_enrolment_key(_absolute(k, layout.etc)))
    ]
    trust["public_keys"] = [str(p) for p in key_files] + kept

    fleet = section("fleet")
    fleet["host"] = enrolment.mqtt_host
    fleet["port"] = enrolment.mqtt_port
    fleet["username"] = enrolment.username
    fleet.pop("password", None)  # the secret lives in the 0600 file only
    fleet["password_file"] = str(layout.password_file)
    if fleet.get("client_id") is not None and fleet.get("client_id") == old_id:
        fleet.pop("client_id")  # it followed the old device id: follow the new one
    if enrolment.mqtt_tls:
        tls = dict(fleet.get("tls") or {})
        if ca_file is not None:
            tls["ca_file"] = str(ca_file)
        elif (
            isinstance(tls.get("ca_file"), str)
            and _absolute(tls["ca_file"], layout.etc) == layout.ca_file
        ):
            # A CA an earlier enrolment wrote, no longer sent: the system's store now.
            tls.pop("ca_file")
        fleet["tls"] = tls
    else:
        fleet.pop("tls", None)
    sync = dict(fleet.get("sync") or {})
    if http_ca_file is not None:
        # Bundle URLs point at the same https fleet: downloads must trust its CA too.
        sync["ca_file"] = str(http_ca_file)
    enrolled_url = recorded_fleet_url(enrolment.fleet_url, fleet_url)
    if enrolled_url is not None:
        sync["fleet_url"] = enrolled_url
    if sync:
        fleet["sync"] = sync
    outbox = dict(fleet.get("outbox") or {})
    if set_data_paths or "path" not in outbox:
        outbox["path"] = str(layout.data_dir / "outbox.sqlite")
    fleet["outbox"] = outbox

    updates = {"device_id": enrolment.device_id, "store": store, "trust": trust, "fleet": fleet}
    if text is None:
        header = (
            "# edgefleet agent configuration. `edge-agent enroll` owns device_id, fleet"
            " (broker,\n# credentials), the fleet's keys in trust.public_keys and the data"
            " paths; other\n# settings are yours and are kept when it runs again."
            " Reference: README.md.\n"
        )
        return header + _dump(updates)
    return replace_top_level(text, updates)


def recorded_fleet_url(answered: str | None, given: str | None) -> str | None:
    """The fleet URL to record: the fleet's own (``answered``) when it is an absolute
    http(s) URL, else the one enrolment went to (``given``)."""
    for url in (answered, given):
        if url:
            parts = urlsplit(url)
            if parts.scheme in ("http", "https") and parts.hostname:
                return url.rstrip("/")
    return None


def _has_data_paths(raw: Any) -> bool:
    """Whether a loaded config already names the store and the outbox paths."""
    if not isinstance(raw, dict):
        return False
    store, fleet = raw.get("store"), raw.get("fleet")
    outbox = fleet.get("outbox") if isinstance(fleet, dict) else None
    return (
        isinstance(store, dict)
        and "path" in store
        and isinstance(outbox, dict)
        and "path" in outbox
    )


def _absolute(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p


def _dump(mapping: dict[str, Any]) -> str:
    return yaml.safe_dump(mapping, sort_keys=False, default_flow_style=False, allow_unicode=True)


def replace_top_level(text: str, updates: dict[str, Any]) -> str:
    """Replace (or append) whole top-level entries of a YAML mapping, as text.

    The lines of every other entry, and comments outside the replaced entries, stay
    as they were; PyYAML cannot round-trip comments, so re-dumping the whole file
    would drop the operator's notes. A top level in flow style (``{a: 1}``) is
    re-dumped whole.
    """
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    if node is None:
        return text + ("\n" if text and not text.endswith("\n") else "") + _dump(updates)
    if not isinstance(node, yaml.MappingNode):
        raise EnrolError("the config's top level is not a mapping", LOCAL)
    spans: dict[str, tuple[int, int]] = {}
    for key, value in node.value:
        spans[str(key.value)] = (key.start_mark.line, _last_line(value))
    ordered = sorted(spans.values())
    overlapping = any(a[1] >= b[0] for a, b in itertools.pairwise(ordered))
    if node.flow_style or overlapping:
        merged = {**(yaml.safe_load(text) or {}), **updates}
        return _dump(merged)
    # New keys go right after the mapping's last entry (before a trailing comment or a
    # `...` document end); inserted first, so the spans above it stay where they are.
    appended = {k: v for k, v in updates.items() if k not in spans}
    if appended:
        after = max(last for _, last in spans.values()) + 1
        lines[after:after] = [_dump(appended)]
    for key in sorted((k for k in updates if k in spans), key=lambda k: spans[k][0], reverse=True):
        first, last = spans[key]
        lines[first : last + 1] = [_dump({key: updates[key]})]
    return "".join(lines)


def _last_line(node: yaml.Node) -> int:
    """The last line (0-based) that holds part of ``node``."""
    if isinstance(node, yaml.MappingNode) and not node.flow_style and node.value:
        return max(max(_last_line(k), _last_line(v)) for k, v in node.value)
    if isinstance(node, yaml.SequenceNode) and not node.flow_style and node.value:
        return max(_last_line(v) for v in node.value)
    end = node.end_mark
    # A block scalar (| or >) ends at the start of the line after it.
    if end.column == 0 and end.line > node.start_mark.line:
        return int(end.line) - 1
    return int(end.line)


# -------------------------------------------------------------------------- files


def ensure_dir(path: Path, mode: int, uid: int = -1, gid: int = -1) -> None:
    """Create ``path`` with ``mode`` (and owner); an existing directory is left as is:
    the installer or the operator chose its mode."""
    if path.is_dir():
        return
    path.mkdir(mode=mode, parents=True)
    os.chmod(path, mode)  # mkdir's mode is filtered by the umask
    if uid != -1 or gid != -1:
        os.chown(path, uid, gid)


@contextlib.contextmanager
def _local_step(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise EnrolError(f"cannot {what}: {exc.strerror or exc}", LOCAL) from exc


@dataclass
class Result:
    enrolment: Enrolment
    layout: Layout
    key_files: list[Path]
    ca_file: Path | None
    created_config: bool
    owner: Owner
    warnings: list[str] = field(default_factory=list)


def enroll(
    fleet_url: str,
    token: str,
    layout: Layout,
    *,
    data_dir_given: bool = False,
    owner_user: str | None = SERVICE_USER,
    ca_file: Path | None = None,
    timeout: float = 30.0,
    retries: int = 3,
) -> Result:
    owner, warning = Owner.resolve(owner_user)
    warnings = [warning] if warning else []

    # Everything local first: a token is spent by the fleet's first answer.
    text: str | None = None
    with _local_step(f"read {layout.config}"):
        if layout.config.exists():
            text = layout.config.read_text(encoding="utf-8")
    loaded: Any = None
    if text is not None:
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise EnrolError(f"{layout.config} is not valid YAML: {exc}", LOCAL) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise EnrolError(f"{layout.config}: the top level is not a mapping", LOCAL)
    root_gid = owner.group_ids
    with _local_step("create the config and data directories"):
        ensure_dir(layout.etc, 0o750, *root_gid)
        ensure_dir(layout.keys_dir, 0o750, *root_gid)
        # The data dir only when the config will point into it (merge_config's rule).
        if data_dir_given or not _has_data_paths(loaded):
            ensure_dir(layout.data_dir, 0o750, *owner.secret_ids)
        for d in (layout.etc, layout.keys_dir):
            if not os.access(d, os.W_OK):
                raise PermissionError(13, f"{d} is not writable (run as root?)")

    # The config this would produce must load: tried with stand-in values first, so a
    # config broken for reasons of its own is refused before the token is spent.
    _check_config(
        merge_config(
            text,
            _STAND_IN,
            layout,
            key_files=[],
            ca_file=None,
            set_data_paths=data_dir_given,
            fleet_url=fleet_url,
        ),
        layout,
        "the config is invalid (nothing was sent, the token is still good)",
    )

    enrolment = parse_enrolment(
        request_enrolment(fleet_url, token, ca_file=ca_file, timeout=timeout, retries=retries)
    )

    key_files = [layout.key_file(i + 1) for i in range(len(enrolment.trusted_keys))]
    ca_path = layout.ca_file if enrolment.ca_cert else None
    https_ca = ca_file if ca_file is not None and fleet_url.startswith("https:") else None
    new_text = merge_config(
        text,
        enrolment,
        layout,
        key_files=key_files,
        ca_file=ca_path,
        set_data_paths=data_dir_given,
        http_ca_file=layout.http_ca_file if https_ca is not None else None,
        fleet_url=fleet_url,
    )
    # The result must load as the agent will load it, before anything is written.
    _check_config(
        new_text,
        layout,
        f"enrolled as {enrolment.device_id}, but the updated config would not load"
        " (nothing was written; fix the config and enrol with a new token)",
    )

    with _local_step("write the enrolment files"):
        for path, pem in zip(key_files, enrolment.trusted_keys, strict=True):
            atomic_write(path, pem.encode("ascii"), 0o644, *root_gid)
        # Keys an earlier enrolment wrote that the fleet no longer sends.
        for old in layout.keys_dir.glob(f"{KEY_PREFIX}*.pub"):
            if layout.is_enrolment_key(old) and old not in key_files:
                old.unlink()
        if enrolment.ca_cert is not None and ca_path is not None:
            atomic_write(ca_path, enrolment.ca_cert.encode("ascii"), 0o644, *root_gid)
        if https_ca is not None and https_ca.resolve() != layout.http_ca_file.resolve():
            atomic_write(layout.http_ca_file, https_ca.read_bytes(), 0o644, *root_gid)
        atomic_write(
            layout.password_file,
            (enrolment.password + "\n").encode("utf-8"),
            0o600,
            *owner.secret_ids,
        )
        atomic_write(layout.config, new_text.encode("utf-8"), 0o640, *root_gid)
        if ca_path is None and layout.ca_file.exists() and str(layout.ca_file) not in new_text:
            layout.ca_file.unlink()  # an earlier enrolment's CA, no longer used
    recorded = recorded_fleet_url(enrolment.fleet_url, fleet_url)
    if recorded is not None:
        from edgefleet.agent.download import is_loopback

        parts = urlsplit(recorded)
        if parts.scheme != "https" and not is_loopback(parts.hostname or ""):
            warnings.append(
                f"the fleet's URL {recorded} is plain http: bundle downloads never send the"
                " device secret over plain http outside loopback, so the fleet will refuse"
                " them; serve the fleet over https (http.tls_cert_file or a TLS proxy)"
            )
    if not enrolment.trusted_keys:
        warnings.append(
            "the fleet sent no bundle-signing keys: the agent refuses every bundle it pushes"
            " (unless trust.allow_unsigned, for development only)"
        )
    return Result(enrolment, layout, key_files, ca_path, text is None, owner, warnings)


_STAND_IN = Enrolment(
    device_id="enrolment-check",
    mqtt_host="localhost",
    mqtt_port=1883,
    mqtt_tls=False,
    username="enrolment-check",
    password="-",
    trusted_keys=[],
)


def _check_config(text: str, layout: Layout, what: str) -> None:
    from edgefleet.agent.config import parse_config

    try:
        parse_config(text, str(layout.config), base=layout.etc.resolve())
    except ConfigError as exc:
        raise EnrolError(f"{what}: {exc}", LOCAL) from exc


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fleet", required=True, help="the fleet's URL, e.g. https://fleet:8480")
    p.add_argument(
        "--token",
        help=f"the one-time enrolment token (or --token-file, or ${TOKEN_ENV}: a token on"
        " the command line shows in the process list)",
    )
    p.add_argument("--token-file", help="file holding the token ('-': standard input)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="default: %(default)s")
    p.add_argument(
        "--data-dir",
        help=f"models and outbox go under it (default: {DEFAULT_DATA_DIR}, set only where the"
        " config has no path yet)",
    )
    p.add_argument("--ca-file", help="PEM CA bundle for an https fleet URL with a private CA")
    p.add_argument(
        "--owner",
        default=SERVICE_USER,
        help="when run as root, the service user that gets the password file"
        " (default: %(default)s; '' for none)",
    )
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--retries", type=int, default=3, help="connection attempts after the first")


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        with _local_step(f"read the token file {args.token_file}"):
            if args.token_file == "-":
                token = sys.stdin.readline()
            else:
                token = Path(args.token_file).read_text(encoding="utf-8")
    else:
        token = args.token or os.environ.get(TOKEN_ENV, "")
    token = token.strip()
    if not token:
        raise EnrolError(f"give the enrolment token: --token, --token-file or ${TOKEN_ENV}", LOCAL)
    return token


def cmd_enroll(args: argparse.Namespace) -> int:
    try:
        layout = Layout(
            Path(os.path.abspath(args.config)),
            Path(os.path.abspath(args.data_dir or DEFAULT_DATA_DIR)),
        )
        result = enroll(
            args.fleet,
            _token(args),
            layout,
            data_dir_given=args.data_dir is not None,
            owner_user=args.owner or None,
            ca_file=Path(args.ca_file) if args.ca_file else None,
            timeout=args.timeout,
            retries=max(0, args.retries),
        )
    except EnrolError as exc:
        print(f"edge-agent enroll: {exc}", file=sys.stderr)
        return exc.exit_code
    print_result(result)
    return 0


def print_result(r: Result) -> None:
    e, lay = r.enrolment, r.layout
    owner = f", owner {r.owner.user}" if r.owner.user else ""
    tls = "TLS" if e.mqtt_tls else "no TLS"
    if e.mqtt_tls:
        tls += f", CA {r.ca_file}" if r.ca_file else ", CA: the system's trust store"
    print(f"enrolled as {e.device_id}" + (f", fleet {e.fleet_url}" if e.fleet_url else ""))
    print(f"  MQTT broker    {e.mqtt_host}:{e.mqtt_port} ({tls}), user {e.username}")
    print(f"  password       {lay.password_file} (mode 0600{owner}; never printed)")
    for path in r.key_files:
        print(f"  trusted key    {path}")
    what = "written" if r.created_config else "updated device_id, fleet, trust; the rest kept"
    print(f"  config         {lay.config} ({what})")
    print(f"  data           {lay.data_dir}")
    for w in r.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(
        "the agent reads these at start: `systemctl restart edgefleet-agent`, then"
        " `edge-fleet devices show " + e.device_id + "` on the fleet side shows it online"
    )

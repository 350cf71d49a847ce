"""Typed fleet-service configuration (``edge-fleet serve --config FILE``), from YAML.

Same rules as the agent's config (the core's config primitives): every section
forbids unknown keys, errors name the key path and the YAML line, a key given twice
is an error, and every path field is a ``ConfigPath`` (relative to the config file).
The ``broker`` section is the core's plain ``MqttConnectionConfig`` (host, port, tls,
username, password_file...): the fleet is one more MQTT client of the same broker,
and a device's settings (``outbox``, ``telemetry``, ``sync``) are errors here.

```yaml
data_dir: /var/lib/edgefleet/fleet      # fleet.sqlite + bundles/
http:
  host: 127.0.0.1                       # 0.0.0.0 to serve devices on other machines
  port: 8480
  public_url: https://fleet.example.com # what devices are told (bundle URLs, enrolment)
  max_upload_bytes: 1073741824
auth:
  token_file: /etc/edgefleet/admin.token  # default: <data_dir>/admin.token, made at first start
  tokens: [{name: dashboard, role: read, token_file: dashboard.token}]   # read|operator|admin
trust:
  public_keys: [keys/release.pub]       # an upload must be signed by one of these
broker:                                 # absent: the embedded amqtt broker
  host: mqtt.example.com
  username: fleet
  password_file: mqtt.password
embedded_broker: {host: 127.0.0.1, port: 1883}
enrolment: {mqtt_host: mqtt.example.com, mqtt_port: 8883, ca_file: mqtt-ca.pem, token_ttl_s: 86400}
broker_accounts: {mode: dynsec, username: edgefleet-admin, password_file: broker-admin.password}
rollouts: {max_failure_share: 0.2}
ingest: {device_rate_per_s: 20, device_burst: 200}   # per-device token bucket
console: {session_ttl_s: 43200, live_interval_s: 0.5}   # the web console under /ui/
```
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgefleet.core.config import ConfigPath, TrustConfig, parse_yaml_model
from edgefleet.core.errors import ConfigError
from edgefleet.core.mqtt.config import MQTT_PORT, MqttConnectionConfig

if TYPE_CHECKING:
    from edgefleet.fleet.rollup import Retention

HTTP_PORT = 8480  # DESIGN.md: fleet HTTP (API, dashboard, bundle downloads)
_ANY_ADDRESS = ("0.0.0.0", "::", "")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpConfig(_Section):
    # Loopback by default: a fleet API reachable from the network must be a decision
    # (set host: 0.0.0.0 and, past a lab, TLS or a TLS-terminating proxy).
    host: str = "127.0.0.1"
    port: int = Field(HTTP_PORT, ge=0, le=65535, description="0: any free port (tests)")
    public_url: str | None = Field(
        None,
        description="base URL devices reach this service at; None: http://<host>:<port>",
    )
    max_upload_bytes: int = Field(1024 * 1024 * 1024, gt=0, description="bundle upload cap")
    max_member_bytes: int = Field(
        512 * 1024 * 1024, gt=0, description="largest file inside an uploaded bundle"
    )
    tls_cert_file: ConfigPath | None = Field(
        None, description="PEM chain: HTTPS when set with the key"
    )
    tls_key_file: ConfigPath | None = None

    @field_validator("public_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("public_url must be an absolute http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError("public_url may not have a query or fragment")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self

    def base_url(self, port: int | None = None) -> str:
        """``public_url``, or a URL made of the bind address (``port``: the bound one)."""
        if self.public_url is not None:
            return self.public_url
        host = self.host
        if host in _ANY_ADDRESS:
            # Bound to every interface: the machine's name is the best guess a device
            # can use; set public_url when it is not resolvable from the stores.
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.tls_cert_file is not None else "http"
        return f"{scheme}://{host}:{port if port is not None else self.port}"


Role = Literal["read", "operator", "admin"]


class ApiToken(_Section):
    """One named bearer token with a role (fleet/api.py: ``ROLE_PERMISSIONS``).

    ``read``: every GET (dashboards); ``operator``: also uploads, labels, groups,
    assignments, rollouts, commands, bundle downloads; ``admin``: also enrolment tokens
    and revocation. The name is what logs and 403 answers show, never the token.
    """

    name: str = Field(min_length=1, max_length=64)
    role: Role
    token: str | None = Field(None, min_length=16, description="prefer token_file")
    token_file: ConfigPath | None = None

    @model_validator(mode="after")
    def _one(self) -> ApiToken:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give exactly one of token or token_file")
        return self


class AuthConfig(_Section):
    """The admin bearer token, plus named tokens with roles (issue 6).

    The admin token (``token``, ``token_file`` or the generated
    ``<data_dir>/admin.token``) always exists: it is what ``edge-fleet`` on the fleet
    host uses. ``tokens`` adds read-only (dashboards), operator and further admin
    tokens; each route checks a permission against the caller's role (fleet/api.py).
    """

    token: str | None = Field(None, description="prefer token_file: configs leak")
    token_file: ConfigPath | None = Field(
        None, description="None (and no token): <data_dir>/admin.token, created at first start"
    )
    tokens: list[ApiToken] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one(self) -> AuthConfig:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if self.token is not None and len(self.token) < 16:
            raise ValueError("token must be at least 16 characters")
        names = [t.name for t in self.tokens]
        if "admin" in names or len(set(names)) != len(names):
            raise ValueError("token names must be unique and not 'admin' (the admin token's)")
        return self


class EmbeddedBrokerConfig(_Section):
    """The in-process amqtt broker, started when no ``broker`` is configured."""

    host: str = "127.0.0.1"
    port: int = Field(MQTT_PORT, ge=0, le=65535, description="0: any free port (tests)")


class EnrolmentConfig(_Section):
    """What an enrolling device is told, and how long a token lives."""

    mqtt_host: str | None = Field(
        None, description="broker host as devices reach it; None: the broker's (or public_url's)"
    )
    mqtt_port: int | None = Field(None, ge=1, le=65535, description="None: the broker's port")
    mqtt_tls: bool | None = Field(
        None, description="None: true with ca_file, else whether the fleet uses TLS itself"
    )
    ca_file: ConfigPath | None = Field(
        None, description="PEM CA of the broker's certificate, handed to enrolling devices"
    )
    token_ttl_s: int = Field(24 * 3600, gt=0, description="default lifetime of a token")
    max_token_ttl_s: int = Field(30 * 24 * 3600, gt=0, description="longest a caller may ask")

    @model_validator(mode="after")
    def _ttls(self) -> EnrolmentConfig:
        if self.token_ttl_s > self.max_token_ttl_s:
            raise ValueError("token_ttl_s must be <= max_token_ttl_s")
        return self


class RolloutDefaults(_Section):
    max_failure_share: float = Field(
        0.2, ge=0.0, le=1.0, description="a wave whose failed share passes this stops the rollout"
    )


class IngestConfig(_Section):
    # Several fleet workers: each subscribes to `$share/<group>/...` so the broker
    # splits device traffic between them (DESIGN.md, Scale). None: one worker.
    shared_group: str | None = None
    # The per-device token bucket (fleet/ingest.py, "Per-device rate limit"): messages a
    # second sustained, and at once. Over it a message is dropped unparsed and not
    # acked, so the device's outbox sends it again later: nothing is lost.
    device_rate_per_s: float = Field(20.0, gt=0, le=100_000)
    device_burst: int = Field(200, ge=1, le=1_000_000)

    @field_validator("shared_group")
    @classmethod
    def _group(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/+#")):
            raise ValueError("shared_group may not be empty or contain '/', '+' or '#'")
        return v


class BrokerAccountsConfig(_Section):
    """Who makes each device's broker login (fleet/broker_accounts.py).

    ``none``: nobody here (the embedded broker checks the fleet's database itself). ``dynsec``:
    the fleet creates the device's account at enrolment and deletes it at revocation
    through Mosquitto's dynamic-security plugin, logged in as ``username`` (an account
    that may only administer the plugin; ``python -m fleet.broker_accounts init-dynsec``
    makes it). Host, port and TLS are the ``broker`` section's.
    """

    mode: Literal["none", "dynsec"] = "none"
    username: str = Field("edgefleet-admin", min_length=1)
    password: str | None = Field(None, description="prefer password_file")
    password_file: ConfigPath | None = None
    client_id: str | None = Field(None, description="None: <the fleet's client id>-accounts")
    timeout_s: float = Field(10.0, gt=0, description="wait for the broker to confirm a change")

    @model_validator(mode="after")
    def _password(self) -> BrokerAccountsConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if self.mode == "dynsec" and self.password is None and self.password_file is None:
            raise ValueError("mode dynsec needs password or password_file")
        return self


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # json: one JSON object per line on stderr, for log shippers (core/logs.py).
    format: Literal["text", "json"] = "text"


class HardExamplesConfig(_Section):
    """Hard examples uploaded by devices (fleet/hard_examples.py), under data_dir."""

    max_bytes: int = Field(2 * 1024**3, gt=0, description="storage budget: 507 past it")
    max_example_bytes: int = Field(8 * 1024**2, gt=0, description="one upload: 413 past it")


class TelemetryRetention(_Section):
    """How long the chart roll-ups keep their buckets (fleet/rollup.py, docs/fleet.md
    "Time series"); the stored records themselves are not touched."""

    minute_device_h: float = Field(48.0, gt=0, description="per-minute rows per device")
    minute_version_d: float = Field(8.0, gt=0, description="per-minute rows per model version")
    hour_d: float = Field(90.0, gt=0, description="per-hour rows (per version and per device)")
    interval_s: float = Field(300.0, ge=1.0, description="how often old buckets are deleted")
    batch_rows: int = Field(5000, ge=100, le=1_000_000, description="rows per delete job")

    def rollup(self) -> Retention:
        from edgefleet.fleet.rollup import Retention  # the database side, only when serving

        return Retention(
            minute_device_s=self.minute_device_h * 3600.0,
            minute_version_s=self.minute_version_d * 86400.0,
            hour_s=self.hour_d * 86400.0,
            interval_s=self.interval_s,
            batch_rows=self.batch_rows,
        )


class TelemetryConfig(_Section):
    retention: TelemetryRetention = Field(default_factory=TelemetryRetention)


class ConsoleConfig(_Section):
    """The web console under ``/ui/`` (fleet/console/): sign-in sessions and live pages."""

    # Absolute, not sliding: a stolen cookie stops working at the latest this long after
    # its sign-in (fleet/console/sessions.py).
    session_ttl_s: float = Field(12 * 3600.0, ge=60.0, le=30 * 86400.0)
    # How often the change stamps are read while a page watches (fleet/console/live.py):
    # the live delay is at most this plus one fragment fetch.
    live_interval_s: float = Field(0.5, ge=0.1, le=10.0)


class FleetServiceConfig(_Section):
    data_dir: ConfigPath = Path("/var/lib/edgefleet/fleet")
    http: HttpConfig = Field(default_factory=HttpConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    trust: TrustConfig = Field(default_factory=TrustConfig)
    broker: MqttConnectionConfig | None = Field(None, description="external broker; None: embedded")
    embedded_broker: EmbeddedBrokerConfig = Field(default_factory=EmbeddedBrokerConfig)
    enrolment: EnrolmentConfig = Field(default_factory=EnrolmentConfig)
    rollouts: RolloutDefaults = Field(default_factory=RolloutDefaults)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    broker_accounts: BrokerAccountsConfig = Field(default_factory=BrokerAccountsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    hard_examples: HardExamplesConfig = Field(default_factory=HardExamplesConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)

    @model_validator(mode="after")
    def _one_broker(self) -> FleetServiceConfig:
        if self.broker is not None and "embedded_broker" in self.model_fields_set:
            raise ValueError("give broker (external) or embedded_broker, not both")
        if self.broker_accounts.mode == "dynsec" and self.broker is None:
            raise ValueError("broker_accounts mode dynsec needs an external broker (Mosquitto)")
        return self

    @property
    def db_path(self) -> Path:
        return self.data_dir / "fleet.sqlite"

    @property
    def bundle_dir(self) -> Path:
        return self.data_dir / "bundles"

    @property
    def hard_examples_dir(self) -> Path:
        return self.data_dir / "hard-examples"

    @property
    def token_file(self) -> Path:
        """Where the admin token is read from (when ``auth.token`` is not inline)."""
        return self.auth.token_file or self.data_dir / "admin.token"


# ----------------------------------------------------------------------- loading


def parse_fleet_config(
    text: str, source: str = "<config>", base: Path | None = None
) -> FleetServiceConfig:
    """Validate config ``text``; relative paths are made absolute against ``base``
    (the config file's directory), or kept as written without one."""
    return parse_yaml_model(FleetServiceConfig, text, source, base)


def load_fleet_config(path: Path) -> FleetServiceConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    return parse_fleet_config(text, str(path), base=path.resolve().parent)

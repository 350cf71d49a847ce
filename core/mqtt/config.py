"""One broker connection's settings: :class:`MqttConnectionConfig`.

The fleet's ``broker:`` section is exactly this model; the agent's ``fleet:`` section
(``agent/config.py``: ``FleetConfig``) extends it with the device's outbox, telemetry
and sync settings. Path fields are :data:`~edgefleet.core.config.ConfigPath`: relative
to the config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgefleet.core.config import ConfigPath, Section

MQTT_PORT = 1883
MQTT_TLS_PORT = 8883


class MqttTLSConfig(Section):
    """TLS to the broker. Present (even empty) means TLS on, with the system trust store."""

    ca_file: ConfigPath | None = Field(None, description="PEM CA bundle; None: the system's")
    cert_file: ConfigPath | None = Field(None, description="client certificate for mutual TLS")
    key_file: ConfigPath | None = None
    # Off only for a lab broker with a self-made certificate: never on a store PC.
    verify_hostname: bool = True


class MqttConnectionConfig(Section):
    """Where the broker is, how to log in, and the connection's timers and limits."""

    host: str
    port: int | None = Field(None, ge=1, le=65535, description="None: 1883, or 8883 with tls")
    tls: MqttTLSConfig | None = None
    username: str | None = Field(None, description="None: the client id")
    password: str | None = None
    password_file: ConfigPath | None = Field(None, description="first line is the password")
    client_id: str | None = Field(
        None, description="None: the owner's default (a device: its device_id)"
    )
    keepalive_s: int = Field(30, ge=1, le=65535)
    # 3.1.1 is the baseline every broker speaks; "5" is tried first and falls back to
    # 3.1.1 when the broker does not negotiate it.
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    session_expiry_s: int = Field(7 * 24 * 3600, ge=0, description="MQTT 5 only")
    reconnect_min_s: float = Field(1.0, gt=0)
    reconnect_max_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    publish_timeout_s: float = Field(30.0, gt=0, description="wait for a broker PUBACK")
    max_payload_bytes: int = Field(1024 * 1024, gt=0, description="larger incoming are dropped")

    @property
    def effective_port(self) -> int:
        """``port``, or the default for the transport (1883, 8883 with TLS)."""
        if self.port is not None:
            return self.port
        return MQTT_TLS_PORT if self.tls is not None else MQTT_PORT

    def secret(self) -> str | None:
        """The login password: ``password``, or the first line of ``password_file``.

        For a device this is also the HTTP Basic secret of bundle downloads (the fleet
        checks the same secret): one rule for both. Reads a file: call it off the event
        loop (``MqttConnection.start`` does).
        """
        if self.password_file is not None:
            lines = Path(self.password_file).read_text(encoding="utf-8").splitlines()
            return lines[0].strip() if lines else ""
        return self.password

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, v: Any) -> Any:
        # YAML reads `protocol: 5` as an int and `3.1.1` as a string.
        return str(v) if isinstance(v, int | float) else v

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, v: str | None) -> str | None:
        if v is not None and (not v or "+" in v or "#" in v or "/" in v):
            raise ValueError("client_id may not be empty or contain '/', '+' or '#'")
        return v

    @model_validator(mode="after")
    def _one_password(self) -> MqttConnectionConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        return self

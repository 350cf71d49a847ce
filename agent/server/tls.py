"""HTTPS for the agent's own server (the cloud profile on a routable address)."""

from __future__ import annotations

import logging
import ssl

from edgefleet.agent.config import AgentConfig

log = logging.getLogger(__name__)
_LOOPBACK = ("127.", "localhost", "::1")


def server_ssl_context(config: AgentConfig) -> ssl.SSLContext | None:
    """An SSL context when ``server.tls_cert_file``/``tls_key_file`` are set, else None."""
    server = config.server
    if server.tls_cert_file is None or server.tls_key_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(server.tls_cert_file, server.tls_key_file)
    return ctx


def warn_if_exposed(config: AgentConfig) -> None:
    """A token sent in clear on a routable address can be read by anyone on the path."""
    server = config.server
    if server.host.startswith(_LOOPBACK) or server.tls_cert_file is not None:
        return
    log.warning(
        "serving plain HTTP on %s:%d%s: set server.tls_cert_file and tls_key_file",
        server.host,
        server.port,
        ": the bearer token travels in clear" if server.auth_token else " with no token",
    )

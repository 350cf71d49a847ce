"""One exception tree for all of edgefleet (agent, fleet, converters).

Every error edgefleet raises on purpose derives from :class:`EdgefleetError`, so a
caller can catch "anything edgefleet refused" in one clause and let real bugs
(``TypeError``, ``KeyError``...) through. The HTTP-facing branch, :class:`EdgeError`,
carries the status it maps to, so a server never guesses; ``edgefleet.core.http``
turns it into ``{"error": "..."}`` at the API boundary and nowhere else::

    EdgefleetError
    ├── ConfigError               invalid configuration; names the key and its line
    ├── EdgeError                 an API caller's error; ``status`` is its HTTP status
    │   ├── BadRequest            400: malformed input
    │   │   └── InvalidName       400 (and ValueError): core/names.py's rule broken
    │   ├── NotFound              404: unknown model, version, label, device...
    │   ├── PayloadTooLarge       413
    │   ├── Unavailable           503 (+ ``retry_after``): not ready, queue full
    │   ├── BundleError           400: malformed, tampered or unsigned bundle
    │   │   └── SignatureError
    │   └── ModelLoadError        503: the runtime refused the model
    │       └── SelfTestError
    ├── LinkError                 core/mqtt/errors.py: the MQTT connection
    │   ├── LinkClosed, LinkRefused, PublishRefused
    │   └── PublishTimeout        (also TimeoutError)
    ├── CloudError                core/oip_client.py: no usable answer from the cloud
    │   └── CloudTimeout, CloudUnreachable, CloudHTTPError, CloudProtocolError
    ├── WireError                 core/protocol.py (also ValueError): a refused message
    ├── DownloadError             agent/download.py: a bundle download failed
    ├── EnrolError                agent/enroll.py: enrolment refused or impossible
    └── the converters' errors    converters/*.py: a model edge-convert cannot take

Errors of libraries we call (aiohttp, paho, onnxruntime, sqlite3) are translated into
this tree where they cross into our code, or are bugs.
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base of every error edgefleet raises on purpose."""


class EdgeError(EdgefleetError):
    """Base of every error an API caller gets; ``status`` is its HTTP status."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str] | None:
        """HTTP headers the answer carries (e.g. ``Retry-After``); None: none."""
        return None


class BadRequest(EdgeError):
    """The caller sent something we cannot use (malformed JSON, wrong shape...)."""

    status = 400


class NotFound(EdgeError):
    """Unknown model, version or label."""

    status = 404


class PayloadTooLarge(EdgeError):
    status = 413


class Unavailable(EdgeError):
    """Not ready, or the model's queue is full. ``retry_after`` in seconds, if known."""

    status = 503

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        if self.retry_after is None:
            return None
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class BundleError(EdgeError):
    """A bundle is malformed, tampered with, unsigned or fails verification."""

    status = 400


class SignatureError(BundleError):
    pass


class ModelLoadError(EdgeError):
    """The runtime refused the model file, or its self-test failed."""

    status = 503


class SelfTestError(ModelLoadError):
    pass


class ConfigError(EdgefleetError):
    """Invalid configuration (agent or fleet); the message names the key and its line."""

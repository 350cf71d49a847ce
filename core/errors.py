"""One exception hierarchy for the agent, translated to HTTP only at the API boundary.

Each class carries the HTTP status it maps to, so the server never guesses.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error the agent reports to a caller."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class ConfigError(Exception):
    """Invalid agent configuration; the message names the key and the line."""

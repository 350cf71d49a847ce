"""Log output for the services (``edge-agent serve``, ``edge-fleet serve``): text or JSON lines.

``configure(level, format)`` is called once by each CLI entry point, before the
service starts, from ``logging.level`` and ``logging.format`` of its config (or
``--log-format``). Both write to stderr (systemd's journal, a container's log).

- ``text``: ``2026-12-07 23:50:01,234 INFO edgefleet.fleet: message`` (as before).
- ``json``: one JSON object per line, for log shippers (Loki, Elasticsearch, Vector)
  that would otherwise have to parse free text and glue tracebacks back together:
  ``{"ts": "2026-12-07T23:50:01.234Z", "level": "INFO", "logger": "edgefleet.fleet",
  "message": "..."}`` plus ``exc_info`` (the formatted traceback, one string) when the
  record carries an exception and ``stack_info`` when it carries a stack. ``ts`` is
  UTC, ISO 8601, milliseconds. A line never contains a raw newline (JSON escapes it),
  so a multi-line traceback stays one record.

Like ``logging.basicConfig`` (which it uses), it changes nothing when the root logger
already has handlers: an embedding program (or pytest) keeps its own.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

import orjson

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (the keys in the module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        doc: dict[str, str] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc_info"] = record.exc_text
        if record.stack_info:
            doc["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(doc).decode()


def formatter(format: LogFormat) -> logging.Formatter:
    if format == "json":
        return JsonFormatter()
    if format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {format!r}")


def configure(level: str, format: LogFormat = "text", *, stream: TextIO | None = None) -> None:
    """Root logging at ``level`` (DEBUG, INFO, WARNING, ERROR) in ``format`` on
    ``stream`` (stderr). ``ValueError`` for an unknown level or format."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(format))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])

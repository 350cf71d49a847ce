"""Request bodies whose parsing can fail in the client's hands: each failure a precise 400.

Runs on the event loop (the bytes arrive there); parsing is a few string operations
per part, the payload itself is only copied.
"""

from __future__ import annotations

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from edgefleet.agent.server.context import services
from edgefleet.core.errors import BadRequest, PayloadTooLarge

# What aiohttp's multipart parser raises on a broken body: ValueError for most
# (a missing or wrong boundary, a truncated part), HttpProcessingError for bad part
# headers, RuntimeError/TypeError for unknown encodings, AssertionError for a few
# internal checks, KeyError for a header it expected.
_MULTIPART_ERRORS = (
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    AssertionError,
    HttpProcessingError,
)


async def read_form_file(request: web.Request, field: str) -> bytes:
    """The bytes of the part named ``field`` of a ``multipart/form-data`` body.

    400 for a body that is not well-formed multipart or has no such file part (the
    message says which); 413 past ``server.max_body_bytes``, which streaming the parts
    would otherwise not enforce on the whole body. Other parts are read and dropped,
    never kept.
    """
    limit = services(request).config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body larger than the {limit} byte limit")
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if request.content.total_bytes > limit:
                raise PayloadTooLarge(f"request body larger than the {limit} byte limit")
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart bodies are not supported")
            if part.name == field and part.filename is not None:
                return bytes(await part.read())
            await part.release()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"request body larger than the {limit} byte limit") from exc
    except _MULTIPART_ERRORS as exc:
        detail = str(exc) or type(exc).__name__
        raise BadRequest(f"malformed multipart body: {detail}") from exc
    raise BadRequest(f"multipart body needs a file field named {field!r}")

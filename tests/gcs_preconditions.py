"""Generation preconditions for gcp-storage-emulator, which ignores them.

Real GCS answers 412 to an object write whose ``ifGenerationMatch`` is not the object's
current generation (0: the object must not exist). The emulator writes regardless, so a
compare-and-swap could not fail against it. :func:`enforced` wraps its object-insert handler
with that one rule (the emulator serves one request at a time, so check and write cannot
interleave), for media, multipart and resumable-session uploads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _object_name(request) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    body = request.data
    if isinstance(body, dict):
        meta = body.get("meta") if "meta" in body else body
        return (meta or {}).get("name")
    return None


def _insert_with_preconditions(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    name = _object_name(request) if wanted else None
    if wanted and name:
        try:
            generation = int(storage.get_file_obj(request.params["bucket_name"], name)
                             ["generation"])
        except NotFound:
            generation = 0
        if generation != int(wanted[0]):
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "Precondition Failed",
                                     "errors": [{"reason": "conditionNotMet"}]}})
            return None
    return objects.insert(request, response, storage, *args, **kwargs)


@contextlib.contextmanager
def enforced() -> Iterator[None]:
    """Every emulator in this process enforces ``ifGenerationMatch`` on uploads."""
    original = server.HANDLERS
    server.HANDLERS = tuple(
        (regex, {method: _insert_with_preconditions if handler is objects.insert else handler
                 for method, handler in handlers.items()})
        for regex, handlers in original)
    try:
        yield
    finally:
        server.HANDLERS = original

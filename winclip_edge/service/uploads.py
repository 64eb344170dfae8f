"""Reading an uploaded image: raw body or multipart, bounded before it is read, decoded like a file.

The size limit is enforced twice: a declared ``Content-Length`` over it is refused before the request reaches a
route (guard.py, which also drains or closes cleanly), and here the bytes actually received are counted as they
arrive (chunked uploads, lying headers), so an upload never occupies more than the limit in memory.
"""
from __future__ import annotations

from typing import AsyncIterator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from ..preprocess import ImageError, decode_image_bytes

FORM_FIELDS = ("image", "file")  # multipart field names taken as the image, in this order


class UploadError(Exception):
    """A request whose upload cannot be used; ``status`` is the HTTP answer, ``kind`` the metric label."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


def _too_large(limit: int) -> UploadError:
    return UploadError(413, "too_large", f"the upload is over the limit of {limit / 2**20:g} MiB (--max-upload-mb)")


async def _counted(request: Request, limit: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        yield chunk


async def read_upload(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The image bytes and the client's file name (multipart only) of a request, at most ``limit`` bytes."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        data = bytearray()
        async for chunk in _counted(request, limit):
            data += chunk
        if not data:
            raise UploadError(422, "bad_image", "empty body: send the image as the body or as multipart field 'image'")
        return bytes(data), None
    try:
        form = await MultiPartParser(request.headers, _counted(request, limit), max_files=1, max_fields=16).parse()
    except MultiPartException as err:
        raise UploadError(422, "bad_request", f"malformed multipart body: {err.message}") from None
    try:
        for name in FORM_FIELDS:
            field = form.get(name)
            if isinstance(field, UploadFile):
                return await field.read(), field.filename
        raise UploadError(422, "bad_request", "the multipart body has no file field 'image' "
                          "(e.g. curl -F image=@part.png)")
    finally:
        await form.close()


def decode_upload(data: bytes, name: str):
    """RGB uint8 of the upload, decoded exactly as ``infer`` decodes a file; 422 with the reason otherwise."""
    try:
        return decode_image_bytes(data, name)
    except ImageError as err:
        raise UploadError(422, "bad_image", str(err)) from None

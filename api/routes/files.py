"""The Files API: upload, list, retrieve, download and delete the files kept in Redis."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from redis.exceptions import OutOfMemoryError, RedisError

from tokenrelay.queueing.files import FileGone, FileInfo, FileStore, FileWriter

from ..deps import check_key
from ..errors import APIError
from ..service import redis_down
from ..uploads import Upload, bad_upload, read_upload, too_large

router = APIRouter(dependencies=[Depends(check_key)])  # the key only: uploads are not JSON

UPLOAD_PURPOSES = ("batch",)  # batch_output files are written by the server
DEFAULT_EXPIRES_AFTER = {"batch": 30 * 86400}  # as OpenAI: batch files expire in 30 days
EXPIRES_AFTER_S = (3600, 30 * 86400)
MAX_LIST = 10_000


def get_files(request: Request) -> FileStore:
    return request.app.state.files  # type: ignore[no-any-return]


Files = Annotated[FileStore, Depends(get_files)]


def file_object(info: FileInfo) -> dict[str, Any]:
    """OpenAI's file object (``status`` is always "processed": nothing is checked on
    upload; a batch file is validated when a batch is created from it)."""
    return {
        "id": info.id,
        "object": "file",
        "bytes": info.bytes,
        "created_at": info.created_at,
        "filename": info.filename,
        "purpose": info.purpose,
        "expires_at": info.expires_at,
        "status": "processed",
        "status_details": None,
    }


def file_not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", code="file_not_found", param="id")


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    try:
        yield
    except OutOfMemoryError as exc:
        raise APIError(
            503,
            "Redis is full (its maxmemory is reached): the file was not stored. Delete files "
            "or give Redis more memory.",
            type="server_overloaded",
            code="storage_full",
            retry_after=30,
        ) from exc
    except (RedisError, TimeoutError) as exc:
        raise redis_down(exc) from exc


@router.post("/v1/files")
async def create_file(request: Request, files: Files) -> dict[str, Any]:
    """A multipart upload: a ``file`` part, ``purpose=batch`` and optionally
    ``expires_after[anchor]=created_at`` with ``expires_after[seconds]``."""
    writer = files.writer(request.app.state.settings.max_file_size)
    try:
        with redis_errors():
            upload = await read_upload(request, writer)
            purpose, expires_after = _checked(upload, writer)
            info = await writer.commit(upload.filename or "", purpose, expires_after)
    except BaseException:
        with contextlib.suppress(RedisError, TimeoutError):  # else the upload TTL cleans up
            await writer.abort()
        raise
    return file_object(info)


def _checked(upload: Upload, writer: FileWriter) -> tuple[str, int | None]:
    """The purpose and the expiry (seconds) of a complete upload, or a 400."""
    if upload.filename is None:
        raise bad_upload("The request needs a 'file' part (a file, with a filename).", "file")
    if writer.too_large:
        raise too_large(writer.max_bytes, writer.size)
    purpose = upload.fields.get("purpose")
    if purpose not in UPLOAD_PURPOSES:
        got = "is missing" if purpose is None else f"is '{purpose}'"
        raise APIError(
            400,
            f"'purpose' {got}: this server accepts 'batch' (files of purpose "
            "'batch_output' are written by the server).",
            code="invalid_value",
            param="purpose",
        )
    anchor = upload.fields.get("expires_after[anchor]")
    seconds = upload.fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return purpose, DEFAULT_EXPIRES_AFTER.get(purpose)
    if anchor != "created_at":
        raise APIError(
            400,
            f"'expires_after.anchor' must be 'created_at', not {anchor!r}.",
            code="invalid_value",
            param="expires_after.anchor",
        )
    low, high = EXPIRES_AFTER_S
    if seconds is None or not seconds.isdecimal() or not low <= int(seconds) <= high:
        raise APIError(
            400,
            f"'expires_after.seconds' must be an integer from {low} to {high}, not {seconds!r}.",
            code="invalid_value",
            param="expires_after.seconds",
        )
    return purpose, int(seconds)


@router.get("/v1/files")
async def list_files(
    files: Files,
    purpose: str | None = None,
    limit: str = str(MAX_LIST),
    order: str = "desc",
    after: str | None = None,
) -> dict[str, Any]:
    """A page of files, newest first unless ``order=asc``; page on with ``after``."""
    if not limit.isdecimal() or not 1 <= int(limit) <= MAX_LIST:
        raise APIError(
            400,
            f"'limit' must be an integer from 1 to {MAX_LIST}, not {limit!r}.",
            code="invalid_value",
            param="limit",
        )
    if order not in ("asc", "desc"):
        raise APIError(
            400,
            f"'order' must be 'asc' or 'desc', not {order!r}.",
            code="invalid_value",
            param="order",
        )
    with redis_errors():
        found, has_more = await files.list(int(limit), order == "desc", after or None, purpose)
    data = [file_object(f) for f in found]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


async def _file(files: FileStore, file_id: str) -> FileInfo:
    with redis_errors():
        info = await files.get(file_id)
    if info is None:
        raise file_not_found(file_id)
    return info


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, files: Files) -> dict[str, Any]:
    return file_object(await _file(files, file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, files: Files) -> StreamingResponse:
    """The file's bytes, streamed from Redis a chunk at a time. The first chunk is read
    before answering, so a file deleted meanwhile is still a 404; one deleted while being
    sent ends the response short of its Content-Length."""
    info = await _file(files, file_id)
    chunks = files.content(info)
    try:
        with redis_errors():
            first = await anext(chunks, b"")
    except FileGone as exc:
        raise file_not_found(file_id) from exc

    async def body() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"Content-Length": str(info.bytes)},
    )


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, files: Files) -> dict[str, Any]:
    with redis_errors():
        deleted = await files.delete(file_id)
    if not deleted:
        raise file_not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
